"""Linear weights that stay in their GGUF block format instead of a dequantized copy.

On the CPU they are multiplied by the compiled kernels directly on the quantized bytes: Kimi K2's ~11.5B
non-expert parameters read 12 GB per token as Q8_0 instead of 23 GB as bf16. On a GPU too small for the bf16
copy (a 24 GB card), the bytes live in VRAM and each matrix is dequantized just before its matmul.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from quant import types as qtypes

FLOAT_TYPES = tuple(int(t) for t in qtypes.FLOAT_TYPES)  # ggml F32, F16, BF16: no gain over a dense tensor
# Below this many weights a CPU kernel call costs more than it saves (call and thread wake-up overhead).
# Measured here (2 cores): keeping every matrix of >= 64K weights quantized decodes the tiny q8 model 1.7x and a
# K2-shaped synthetic q4 model 1.3x faster than dequantized float32 weights.
MIN_QUANT_PARAMS = 1 << 16


class QuantWeight:
    """W [rows, cols] as ggml blocks; `x @ W.T` by the CPU kernels, or (on a GPU) dequantize-then-matmul."""

    def __init__(self, data: np.ndarray, qtype: int, rows: int, cols: int, device: torch.device | str = "cpu"):
        self.qtype, self.shape, self.device = qtype, (rows, cols), torch.device(device)
        host = np.ascontiguousarray(data).reshape(rows, -1)  # copied out of the file mapping
        self.data: np.ndarray | torch.Tensor = host if self.device.type == "cpu" else \
            torch.from_numpy(host).to(self.device)
        self._mm = None  # the CPU kernels' matrix bound to data (offload.kernels.QMatrix), made at the first call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.shape
        if isinstance(self.data, np.ndarray):
            if self._mm is None:
                from offload.kernels import QMatrix  # noqa: PLC0415

                self._mm = QMatrix(self.data, self.qtype, cols, repack=True)
            y = self._mm(x.reshape(-1, cols))
            return (y if x.dtype == torch.float32 else y.to(x.dtype)).reshape(*x.shape[:-1], rows)
        from quant.codecs import dequantize  # noqa: PLC0415

        return F.linear(x, dequantize(self.data, self.qtype, cols).to(x.dtype))

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


LinearObserver = Callable[[torch.Tensor, "torch.Tensor | QuantWeight", torch.Tensor], None]
_observers: list[LinearObserver] = []


@contextmanager
def observe_linear(fn: LinearObserver) -> Iterator[None]:
    """Call fn(x, w, y) after every model matmul inside the block (activation statistics, e.g. the imatrix)."""
    _observers.append(fn)
    try:
        yield
    finally:
        _observers.remove(fn)


def linear(x: torch.Tensor, w: "torch.Tensor | QuantWeight") -> torch.Tensor:
    """y = x @ w.T for a dense tensor or a quantized weight."""
    y = F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)
    for fn in _observers:
        fn(x, w, y)
    return y


def _multipliable(qtype: int, device: torch.device) -> bool:
    if qtype in FLOAT_TYPES:
        return False
    if device.type == "cpu":
        try:
            from offload import kernels  # noqa: PLC0415
        except ImportError:
            return False
        return kernels.available() and kernels.supported(qtype)
    from quant.codecs import SUPPORTED_TYPES  # noqa: PLC0415

    return qtype in {int(t) for t in SUPPORTED_TYPES}


def quantized_weight(source, name: str, min_params: int = MIN_QUANT_PARAMS,
                     device: torch.device | str = "cpu") -> QuantWeight | None:
    """The tensor as a QuantWeight on `device` when the source stores it in a block type that can be multiplied
    there and it has at least `min_params` weights; else None (the caller dequantizes it)."""
    if not hasattr(source, "quantized"):
        return None
    try:
        data, qtype, shape = source.quantized(name)
    except Exception:  # noqa: BLE001 - not a plain stored tensor (e.g. merged kv_b): use the dense path
        return None
    dev = torch.device(device)
    if len(shape) != 2 or shape[0] * shape[1] < min_params or not _multipliable(int(qtype), dev):
        return None
    return QuantWeight(data, int(qtype), shape[0], shape[1], dev)


def quantized_heads(source, layer: int, heads: int, device: torch.device | str = "cpu") -> tuple:
    """(k_b, v_b) of MLA's absorbed attention, each as an offload.kernels.QHeads when the source stores it per head
    in a block type the CPU kernels multiply (GGUF attn_k_b / attn_v_b), else None. Decoding then reads them
    quantized (Kimi K2 as Q8_0: 0.5 GB per token instead of 2 GB as float32)."""
    kv = source.quantized_kv_b(layer) if hasattr(source, "quantized_kv_b") else None
    if torch.device(device).type != "cpu" or kv is None:
        return None, None
    from offload.kernels import QHeads  # noqa: PLC0415

    cfg = source.config
    return tuple(QHeads(np.ascontiguousarray(b), int(qt), heads, cols)
                 if _multipliable(int(qt), torch.device("cpu")) else None
                 for (b, qt), cols in zip(kv, (cfg.qk_nope_head_dim, cfg.kv_lora_rank)))


def decode_attention(k_b, v_b):
    """MLA's decode step for one token in one CPU kernel call (offload.kernels.MLADecode) on the layer's quantized
    k_b / v_b, or None when they are not both QHeads the kernels take."""
    if k_b is None or v_b is None:
        return None
    from offload.kernels import MLADecode  # noqa: PLC0415

    return MLADecode(k_b, v_b) if MLADecode.usable(k_b, v_b) else None


def quantized_bytes_per_param(source, cfg) -> float | None:
    """Bytes per weight of the source's stored non-expert matrices (sampled on the last layer's o_proj)."""
    if not hasattr(source, "quantized"):
        return None
    name = f"model.layers.{cfg.num_hidden_layers - 1}.self_attn.o_proj.weight"
    try:
        data, qtype, shape = source.quantized(name)
    except Exception:  # noqa: BLE001
        return None
    return None if int(qtype) in FLOAT_TYPES else data.nbytes / (shape[0] * shape[1])
