"""Expert matrices the RAM tier keeps in the CPU kernels' interleaved layouts instead of gguf's.

Q4_K / Q8_0 rows regrouped 16 at a time (kernels.R16_OF: the same bytes per row, so a slot's plan does not change)
let one AVX-512 dot-product instruction serve 16 rows and need no horizontal sums; the store rewrites a matrix in
place right after reading it, once per expert when every expert is resident. Bytes in such a layout are readable by
the compiled kernels only: the torch decode (Lease.matrices) and the GPU paths take gguf's bytes, so the store
repacks only where the executor runs every host expert through the kernels.
"""
from __future__ import annotations

from typing import Sequence

import torch

from offload.expert_layout import MatrixFormat

try:
    from offload import kernels as _kernels
except ImportError:  # pragma: no cover (the package ships with the kernels module)
    _kernels = None  # type: ignore[assignment]

KernelTypes = tuple[int | None, ...]  # per matrix: the interleaved type id, or None (stored bytes as they are)


def kernel_types(formats: Sequence[MatrixFormat]) -> KernelTypes:
    """For an expert's (gate, up, down) formats, which matrices go interleaved: only when all three are ggml types with
    compiled kernels (the executor then runs the whole expert in them), each where kernels.r16_type allows."""
    none = (None,) * len(formats)
    if _kernels is None or not all(f.kind == "ggml" and f.qtype is not None and _kernels.supported(f.qtype)
                                   for f in formats):
        return none
    return tuple(_kernels.r16_type(int(f.qtype), f.rows) for f in formats)  # type: ignore[arg-type]


def repack_in_place(fmt: MatrixFormat, view: torch.Tensor) -> None:
    """Rewrite one matrix's gguf bytes (`view`, uint8) in its interleaved layout (see kernel_types)."""
    assert _kernels is not None and fmt.qtype is not None
    _kernels.repack_r16(int(fmt.qtype), view, fmt.rows, fmt.cols)
