"""Registry of GGUF tensor codecs: quantize / dequantize whole 2-D tensors row-wise, ggml byte layout.

    quantize(t, qtype, imatrix=None) -> np.ndarray uint8 [rows, bytes_per_row(qtype, cols)]
    dequantize(data, qtype, cols)    -> torch.Tensor float32 [rows, cols]

Quantized bytes equal llama.cpp's (ggml_quantize_chunk, i.e. llama-quantize; with `imatrix` its
importance-weighted path).  Work happens on the input tensor's device (CPU threads via torch, or CUDA)
in row chunks to bound memory.  Model-agnostic: callers decide which tensor gets which type.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import kquants, q8_0
from . import types as qtypes

QType = GGMLQuantizationType
BlockFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Codec:
    """One GGUF type: block geometry and block-level (de)quantizers (None for plain float types)."""

    qtype: QType
    block_size: int
    block_bytes: int
    quantize_blocks: BlockFn | None = None
    dequantize_blocks: BlockFn | None = None
    uses_imatrix: bool = False


_FLOAT_DTYPES = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}


def _codec(qtype: QType, quantize_blocks: BlockFn | None = None, dequantize_blocks: BlockFn | None = None,
           uses_imatrix: bool = False) -> Codec:
    """A Codec with the type's block geometry from the type table (quant.types)."""
    t = qtypes.info(qtype)
    return Codec(qtype, t.block_size, t.type_size, quantize_blocks, dequantize_blocks, uses_imatrix)


_CODECS: dict[QType, Codec] = {c.qtype: c for c in [
    _codec(QType.F32),
    _codec(QType.F16),
    _codec(QType.BF16),
    _codec(QType.Q8_0, q8_0.quantize_q8_0, q8_0.dequantize_q8_0),
    _codec(QType.Q2_K, kquants.quantize_q2_k, kquants.dequantize_q2_k, True),
    _codec(QType.Q3_K, kquants.quantize_q3_k, kquants.dequantize_q3_k, True),
    _codec(QType.Q4_K, kquants.quantize_q4_k, kquants.dequantize_q4_k, True),
    _codec(QType.Q5_K, kquants.quantize_q5_k, kquants.dequantize_q5_k, True),
    _codec(QType.Q6_K, kquants.quantize_q6_k, kquants.dequantize_q6_k, True),
]}

SUPPORTED_TYPES: tuple[QType, ...] = tuple(_CODECS)

# Weights per chunk.  The quantizers issue thousands of elementwise ops per chunk, so chunks must be large
# enough to amortize per-op overhead (kernel launches on CUDA, OpenMP fan-out on CPU); peak temporary memory
# is up to ~70 bytes per weight of the chunk (K-quants with an imatrix), ~45 without.  On the CPU the scale searches
# work on much smaller numpy blocks inside a chunk (kquant_search._NP_BLOCK), so a chunk only needs to amortize the
# torch ops around them; 256K weights keeps those in the L2/L3 caches.
DEFAULT_CHUNK_WEIGHTS = {"cpu": 1 << 18, "cuda": 1 << 25}


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool kept for the life of the process: the same threads every call, so the allocator's per-thread
    arenas (and the memory they keep) do not multiply over a long conversion."""
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="quant")
    return pool


def codec(qtype: QType | int) -> Codec:
    """The codec for qtype; ValueError if unsupported."""
    try:
        return _CODECS[QType(qtype)]
    except (KeyError, ValueError):
        raise ValueError(f"unsupported GGUF tensor type {qtype!r}; supported: "
                         f"{', '.join(t.name for t in SUPPORTED_TYPES)}") from None


def block_size(qtype: QType | int) -> int:
    """Values per block (256 for K-quants, 32 for Q8_0, 1 for float types)."""
    return codec(qtype).block_size


def bytes_per_row(qtype: QType | int, cols: int) -> int:
    """Bytes of one quantized row of `cols` values; ValueError if cols is not a whole number of blocks."""
    c = codec(qtype)
    if cols <= 0 or cols % c.block_size:
        raise ValueError(f"{c.qtype.name} needs a row length that is a multiple of {c.block_size}, got {cols}")
    return qtypes.row_bytes(c.qtype, cols)


def can_quantize(qtype: QType | int, cols: int) -> bool:
    """True if rows of `cols` values can be stored as qtype."""
    try:
        bytes_per_row(qtype, cols)
    except ValueError:
        return False
    return True


def _as_rows(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.ndim == 0:
        raise ValueError("cannot quantize a scalar")
    return t.reshape(1, -1) if t.ndim == 1 else t.reshape(-1, t.shape[-1])


def _chunk_rows(cols: int, device: torch.device, chunk_weights: int | None) -> int:
    weights = chunk_weights or DEFAULT_CHUNK_WEIGHTS.get(device.type, DEFAULT_CHUNK_WEIGHTS["cuda"])
    return max(1, weights // max(cols, 1))


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quantize(
    t: torch.Tensor | np.ndarray,
    qtype: QType | int,
    imatrix: torch.Tensor | np.ndarray | None = None,
    chunk_weights: int | None = None,
    device: torch.device | str | None = None,
    threads: int | None = None,
    workers: int = 1,
) -> np.ndarray:
    """Quantize a float tensor [rows, cols] (leading dims are flattened into rows) to qtype.

    imatrix: optional per-column importance weights [cols] (llama.cpp's imatrix for this tensor or
    expert); used by the K-quants, ignored by Q8_0 and float types exactly as llama.cpp does.
    device: where to compute (default: the tensor's device); chunks are moved there one at a time, so a
    CPU tensor can be quantized on CUDA without copying it whole.  chunk_weights: weights per chunk.
    threads: torch intra-op threads for this call (CPU; restored after).  Default: torch's setting.  On a
    machine shared with other busy processes, 1 can be several times faster than OpenMP fan-out.
    workers: CPU only: quantize this many chunks at once in a thread pool, each with one torch thread (the
    numpy searches release the GIL); faster than torch's own threads on these many small ops.
    Returns uint8 numpy [rows, bytes_per_row(qtype, cols)].
    """
    c = codec(qtype)
    x = _as_rows(t)
    rows, cols = x.shape
    bpr = bytes_per_row(c.qtype, cols)
    out = np.empty((rows, bpr), dtype=np.uint8)
    if rows == 0:
        return out
    qw = None
    if imatrix is not None and c.uses_imatrix:
        qw = torch.as_tensor(imatrix).to(device=x.device, dtype=torch.float32).reshape(-1)
        if qw.numel() != cols:
            raise ValueError(f"imatrix has {qw.numel()} values, tensor has {cols} columns")
    dev = x.device if device is None else torch.device(device)
    if qw is not None:
        qw = qw.to(dev)
    step = _chunk_rows(cols, dev, chunk_weights)
    parallel = workers > 1 and dev.type == "cpu" and rows > 1 and c.quantize_blocks is not None
    if parallel:
        step = min(step, -(-rows // workers))  # at least one chunk per worker

    def one(r0: int) -> None:
        chunk = x[r0:r0 + step].to(dev)
        n = chunk.shape[0]
        if c.quantize_blocks is None:
            data = chunk.to(_FLOAT_DTYPES[c.qtype]).contiguous().view(torch.uint8)
        else:
            blocks = chunk.to(torch.float32).reshape(-1, c.block_size).contiguous()
            if qw is None:
                data = c.quantize_blocks(blocks)
            else:
                data = c.quantize_blocks(blocks, qw.expand(n, cols).reshape(-1, c.block_size))
        out[r0:r0 + n] = data.reshape(n, bpr).cpu().numpy()

    starts = range(0, rows, step)
    with _torch_threads(1 if parallel else threads):
        if parallel:
            list(_pool(workers).map(one, starts))
        else:
            for r0 in starts:
                one(r0)
    return out


def dequantize(
    data: np.ndarray | torch.Tensor,
    qtype: QType | int,
    cols: int,
    chunk_weights: int | None = None,
) -> torch.Tensor:
    """Quantized bytes [rows, bytes_per_row] (or flat) -> float32 [rows, cols], on data's device."""
    c = codec(qtype)
    bpr = bytes_per_row(c.qtype, cols)
    b = torch.as_tensor(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data)
    if b.dtype != torch.uint8:
        raise ValueError(f"quantized data must be uint8, got {b.dtype}")
    if b.numel() % bpr:
        raise ValueError(f"{b.numel()} bytes is not a whole number of {c.qtype.name} rows of {cols} values")
    b = b.reshape(-1, bpr)
    rows = b.shape[0]
    out = torch.empty((rows, cols), dtype=torch.float32, device=b.device)
    step = _chunk_rows(cols, b.device, chunk_weights)
    for r0 in range(0, rows, step):
        chunk = b[r0:r0 + step].contiguous()
        n = chunk.shape[0]
        if c.dequantize_blocks is None:
            vals = chunk.view(_FLOAT_DTYPES[c.qtype]).to(torch.float32)
        else:
            vals = c.dequantize_blocks(chunk.reshape(-1, c.block_bytes))
        out[r0:r0 + n] = vals.reshape(n, cols)
    return out
