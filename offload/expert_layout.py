"""Where each routed expert's bytes live on disk, and how to turn those bytes into matrices.

An expert is three matrices (gate, up, down). Each matrix is one or two byte *segments* in a file: the stored
weight, plus its FP8 `scale_inv` grid for block-FP8 checkpoints. The store reads segments with pread (never
through a page-cache mmap); `decode` turns the bytes, wherever they sit (CPU RAM, pinned RAM or GPU), into a
float matrix. The application builds the layout (it knows its checkpoint formats and tensor names): offload only
reads it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from quant.fp8 import dequantize_fp8_block, expected_scale_shape

PROJS = ("gate", "up", "down")  # an expert's matrices, in segment order


@dataclass(frozen=True)
class Segment:
    """`nbytes` bytes at `offset` in file `path`; or, for sources without a file, a slice of `array`; or bytes that
    `fill` writes on each read (experts the application repacks as they are read, e.g. INT4 checkpoints as Q4_0:
    `fill(buf)` fills the writable memoryview `buf` of `nbytes` bytes, `origin` names the file it reads)."""

    path: str | None
    offset: int
    nbytes: int
    array: Any = None  # np.ndarray (uint8, contiguous) when path is None
    fill: Callable[[memoryview], None] | None = None  # with path None and no array
    origin: str | None = None  # the file `fill` reads (for the plan's file list)

    def copy_into(self, buf: memoryview) -> None:
        """Bytes of a segment without a path (array or fill) into `buf` (exactly nbytes long)."""
        if self.fill is not None:
            self.fill(buf)
        else:
            buf[:] = memoryview(self.array).cast("B")


@dataclass(frozen=True)
class MatrixFormat:
    """How one expert matrix is stored. kind: 'fp8' (+ scale segment), 'float' (torch dtype) or 'ggml'."""

    kind: str
    rows: int
    cols: int
    dtype: torch.dtype | None = None  # float kinds, and the FP8 scale's dtype
    qtype: int | None = None  # ggml kinds
    block: tuple[int, int] = (128, 128)

    @property
    def n_segments(self) -> int:
        return 2 if self.kind == "fp8" else 1


@dataclass(frozen=True)
class ExpertEntry:
    """The segments of one expert (gate, [scale], up, [scale], down, [scale]) and each matrix's format."""

    segments: tuple[Segment, ...]
    formats: tuple[MatrixFormat, MatrixFormat, MatrixFormat]

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def matrix_segments(self, views: Sequence[Any]) -> list[tuple[MatrixFormat, list[Any]]]:
        """Group per-segment views by matrix: [(format, [weight_view, scale_view?]) x 3]."""
        out, i = [], 0
        for f in self.formats:
            out.append((f, list(views[i:i + f.n_segments])))
            i += f.n_segments
        return out


def _codecs_module() -> Any:
    try:  # deferred: the codec registry (and its K-quant search code) loads only when a ggml expert is decoded
        from quant import codecs  # noqa: PLC0415

        return codecs
    except ImportError:  # pragma: no cover (the codec registry is part of the project)
        return None


def ggml_supported_on_device(qtype: int) -> bool:
    """Whether the project's codec registry dequantizes `qtype` with torch ops (so on a CUDA tensor too)."""
    codecs = _codecs_module()
    if codecs is None:
        return False
    try:
        return int(qtype) in {int(q) for q in codecs.SUPPORTED_TYPES}
    except AttributeError:  # pragma: no cover
        return False


def ggml_dequantize(data: torch.Tensor | np.ndarray, qtype: int, rows: int, cols: int) -> torch.Tensor:
    """Dequantize ggml rows to float32 [rows, cols] on data's device: quant.codecs, else gguf-py (CPU)."""
    codecs = _codecs_module()
    if codecs is not None and ggml_supported_on_device(qtype):
        return codecs.dequantize(data, int(qtype), cols).reshape(rows, cols)
    # deferred: only types quant.codecs lacks come here
    from gguf import GGMLQuantizationType  # noqa: PLC0415
    from gguf.quants import dequantize  # noqa: PLC0415

    arr = data.cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    out = torch.from_numpy(np.ascontiguousarray(dequantize(arr.reshape(rows, -1), GGMLQuantizationType(qtype))))
    return out.reshape(rows, cols).to(data.device if isinstance(data, torch.Tensor) else "cpu")


def decode_matrix(fmt: MatrixFormat, views: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Bytes (uint8 tensors on any device) -> the dense [rows, cols] matrix in `dtype`, same rounding as the source."""
    w = views[0]
    if fmt.kind == "fp8":
        q = w.view(torch.float8_e4m3fn).view(fmt.rows, fmt.cols)
        s = views[1].view(fmt.dtype).view(*expected_scale_shape((fmt.rows, fmt.cols), fmt.block))
        (b0, b1), (r, c) = fmt.block, (fmt.rows, fmt.cols)
        if r % b0 == 0 and c % b1 == 0:  # whole blocks: broadcast the scales (same products, no expanded grid)
            out = q.to(torch.float32).view(r // b0, b0, c // b1, b1) * s.to(torch.float32)[:, None, :, None]
            return out.view(r, c).to(dtype)
        return dequantize_fp8_block(q, s, fmt.block, dtype)
    if fmt.kind == "float":
        return w.view(fmt.dtype).view(fmt.rows, fmt.cols).to(dtype)
    if fmt.kind == "ggml":
        assert fmt.qtype is not None
        return ggml_dequantize(w, fmt.qtype, fmt.rows, fmt.cols).to(device=w.device, dtype=dtype)
    raise ValueError(f"unknown expert matrix format {fmt.kind!r}")


def cheap_to_decode(fmt: MatrixFormat) -> bool:
    """Whether decoding per use costs about one elementwise pass (FP8 block scales, float casts): such experts
    stay as raw bytes in the device cache. ggml block formats stay raw only where the fused Triton kernels
    compute them (offload.kernels.triton_q); otherwise they are kept dequantized there (much faster per use)."""
    return fmt.kind in ("fp8", "float")


def decodes_on_gpu(fmt: MatrixFormat) -> bool:
    """Whether `decode_matrix` runs on a CUDA tensor without a host round trip (so raw bytes can live on GPU)."""
    return fmt.kind in ("fp8", "float") or (fmt.kind == "ggml" and ggml_supported_on_device(fmt.qtype or -1))


class ExpertLayout:
    """Every routed expert of every MoE layer: its segments and formats."""

    def __init__(self, entries: dict[int, list[ExpertEntry]], n_experts: int, kind: str):
        self.entries = entries
        self.moe_layers = sorted(entries)
        self.n_experts = n_experts
        self.kind = kind  # "safetensors" | "gguf" | "memory"

    def entry(self, layer: int, expert: int) -> ExpertEntry:
        return self.entries[layer][expert]

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of `layer` (the largest, if they differ)."""
        return max(e.nbytes for e in self.entries[layer])

    @property
    def max_expert_bytes(self) -> int:
        return max(self.expert_bytes(layer) for layer in self.moe_layers)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for layer in self.moe_layers for e in self.entries[layer])

    def keys(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer in self.moe_layers for e in range(self.n_experts)]

    def files(self) -> list[str]:
        return sorted({s.path or s.origin for es in self.entries.values() for e in es for s in e.segments
                       if s.path or s.origin})
