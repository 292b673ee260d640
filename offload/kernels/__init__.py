"""CPU expert kernels on ggml-quantized bytes (Q4_0, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K and the IQ types), with a torch fallback.

The compiled part is a plain C shared library (csrc/*.c, one library) called through ctypes, which releases the
GIL.  One binary serves every x86-64 CPU: AVX-512 VNNI / AVX2 / scalar code is chosen at run time.
This module is the API; the rest is split by job:
  _build.py   finding or compiling the library (installed extension, or the user cache: $CC / gcc, on first use)
  _abi.py     its ctypes signatures and ABI version, loading it, handing it gguf's IQ codebooks
  _knobs.py   the environment variables (ENV: K2LOCAL_KERNELS=torch, K2LOCAL_ISA, K2LOCAL_THREADS, ...) and setters
  triton_q.py the fused GPU kernels (Triton) on the same bytes
The ggml type table (block sizes, which types have kernels) is quant.types.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Sequence, Union

import numpy as np
import torch

from quant.types import C_KERNEL_TYPES, row_bytes

# re-exported: _build (the tests' special builds), ENV (the knobs' list), the build / ABI helpers callers use
from . import _abi, _build  # noqa: F401
from ._abi import ABI_VERSION, iq_tables  # noqa: F401
from ._build import compile_command, source_tag  # noqa: F401
from ._knobs import (  # noqa: F401
    ENV,
    default_threads,
    get_threads,
    numa_interleave_wanted,
    numa_nodes,
    set_avxvnni,
    set_isa,
    set_panel_gemm,
    set_prefetch,
    set_repack,
    set_row_pairs,
    set_threads,
)
from ._knobs import forced_torch as _forced_torch
from ._knobs import fused_mla_wanted, repack_wanted

__all__ = [
    "available", "backend", "isa", "set_isa", "set_threads", "get_threads", "default_threads", "numa_nodes",
    "set_prefetch", "set_avxvnni", "set_panel_gemm", "set_repack", "numa_interleave_wanted", "interleave_memory", "supported",
    "row_bytes", "QMatrix", "QHeads", "qmatmul", "moe_experts", "read_bandwidth", "repack_int4_q4_0", "C_TYPES",
    "r16_type", "repack_r16", "advise_hugepages", "aligned_buffer", "MLADecode", "pool_time", "MoELayer",
]

# ggml type ids with a C kernel (gguf.GGMLQuantizationType values) -> names
C_TYPES: dict[int, str] = {int(t): t.name for t in C_KERNEL_TYPES}
Q8_0, Q4_K = 8, 12  # gguf GGMLQuantizationType.Q8_0 / Q4_K
# the library's own type ids (csrc/common.h GT_*_R16): a gguf type with 16 rows interleaved, the same bytes per row
Q8_0_R16, Q4_K_R16 = 1008, 1012
R16_ROWS = 16
OWN_TYPES = {"Q8_0_R16": Q8_0_R16, "Q4_K_R16": Q4_K_R16}  # the library's layouts that are not gguf types
R16_OF = {Q8_0: Q8_0_R16, Q4_K: Q4_K_R16}  # gguf type -> its interleaved layout
BASE_OF = {v: k for k, v in R16_OF.items()}  # and back (row sizes, names)
_REPACK_FN = {Q8_0: "k2k_repack_q8_0_r16", Q4_K: "k2k_repack_q4_k_r16"}

Bytes = Union[np.ndarray, torch.Tensor]

# what the tests reach for
_load = _abi.load
_declare = _abi.declare
_set_grids = _abi.set_grids
_GRID_KSIGNS = _abi.GRID_KSIGNS


def available() -> bool:
    """True when the compiled kernels are usable (and not disabled by K2LOCAL_KERNELS=torch)."""
    return not _forced_torch() and _load() is not None


def backend() -> str:
    """'c' or 'torch'."""
    return "c" if available() else "torch"


def load_error() -> str | None:
    """Why the compiled library is unavailable, if known (or why some IQ types stay on the fallback)."""
    return _abi.load_error()


def library_path() -> str | None:
    """File the compiled kernels were loaded from."""
    lib = _load()
    return None if lib is None else lib._name


def isa() -> str:
    """Instruction set the kernels run with: 'avx512-vnni-gfni', 'avx512-vnni', 'avx2', 'generic' or 'torch'."""
    return _abi.ISA_NAMES[_load().k2k_isa()] if available() else "torch"


def interleave_memory(buf: torch.Tensor) -> int:
    """Page-interleave a CPU buffer whose pages are not touched yet across the NUMA nodes (mbind); returns the
    node count, or 0 when that is not possible here (no compiled library, no NUMA support)."""
    lib = _load()
    if lib is None or buf.numel() == 0:
        return 0
    r = lib.k2k_interleave(buf.data_ptr(), buf.numel() * buf.element_size())
    return max(r, 0)


HUGE_PAGE = 2 << 20  # x86-64 transparent huge page
_MADV_HUGEPAGE = 14  # Linux


def advise_hugepages(buf: torch.Tensor | np.ndarray) -> bool:
    """Ask Linux for transparent huge pages over the whole 2 MiB pages inside a CPU buffer whose pages are not
    touched yet (madvise MADV_HUGEPAGE: the machines here run THP in `madvise` mode, so anonymous memory otherwise
    gets 4 KiB pages, and the hardware prefetchers stop at every 4 KiB boundary of a weight stream). False where it
    is not possible or K2LOCAL_HUGEPAGES=0. Memory use does not change (whole pages inside the buffer only)."""
    if os.environ.get("K2LOCAL_HUGEPAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    start, n = _ptr(buf), _nbytes(buf)
    lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, (start + n) // HUGE_PAGE * HUGE_PAGE
    if hi <= lo:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0


def aligned_buffer(nbytes: int, align: int = 64) -> np.ndarray:
    """An untouched uint8 buffer of nbytes at `align`; from 4 MiB up aligned to huge pages and advised for them
    (advise_hugepages). The memory is owned by the returned array's base."""
    if nbytes >= 2 * HUGE_PAGE:
        align = max(align, HUGE_PAGE)
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    out = raw[off:off + nbytes]
    if align >= HUGE_PAGE:
        advise_hugepages(out)
    return out


def supported(qtype: int) -> bool:
    """True when qtype has a compiled kernel (for IQ types: once gguf's codebooks are loaded into it); other gguf
    types work through the torch fallback. The library's own layouts (OWN_TYPES) have no fallback."""
    if int(qtype) in BASE_OF:
        return available()
    if int(qtype) not in C_TYPES:
        return False
    lib = _load()
    return lib is None or bool(lib.k2k_supported(int(qtype)))


def r16_type(qtype: int, rows: int) -> int | None:
    """The interleaved layout the kernels would run a gguf `qtype` matrix of `rows` rows in here (Q8_0 / Q4_K, rows a
    multiple of 16, the AVX-512 level, set_repack / K2LOCAL_REPACK allowing), else None: gguf's layout."""
    if int(qtype) not in R16_OF or rows % R16_ROWS or not repack_wanted() or not available():
        return None
    return R16_OF[int(qtype)] if _load().k2k_isa() >= _abi.ISA_LEVELS["avx512"] else None


def repack_r16(qtype: int, w: torch.Tensor | np.ndarray, rows: int, cols: int, out: Bytes | None = None) -> int:
    """gguf `qtype` bytes [rows, cols] -> the interleaved layout R16_OF[qtype], into `out` (default: over `w`
    itself, each 16-row group staying where it was); returns that type id. No lock, no pool thread: callable from
    the store's reader threads."""
    b = _as_u8(w)
    dst = b if out is None else _as_u8(out)
    if _nbytes(b) != rows * row_bytes(qtype, cols) or _nbytes(dst) != _nbytes(b):
        raise ValueError(f"{_nbytes(b)} bytes are not [{rows}, {cols}] of type {qtype}")
    rc = getattr(_load(), _REPACK_FN[int(qtype)])(_ptr(b), rows, cols // (32 if qtype == Q8_0 else 256), _ptr(dst))
    if rc != 0:
        raise RuntimeError(f"{_REPACK_FN[int(qtype)]} failed ({rc})")
    return R16_OF[int(qtype)]


def _as_u8(w: Bytes) -> np.ndarray | torch.Tensor:
    if isinstance(w, torch.Tensor):
        if w.device.type != "cpu":
            raise ValueError("weights must be in CPU memory")
        if not w.is_contiguous():
            w = w.contiguous()
        return w.view(torch.uint8) if w.dtype != torch.uint8 else w
    w = np.asarray(w)
    if not w.flags.c_contiguous:
        w = np.ascontiguousarray(w)
    return w.view(np.uint8)


def _addr(w: Bytes, keep: list) -> tuple[int, int]:
    """(address, byte size) of w's bytes, without making a uint8 view of a contiguous CPU tensor (a MoE call takes
    24 per layer); a copy made to get contiguous bytes is appended to `keep`, which must outlive the address."""
    if type(w) is torch.Tensor and w.is_contiguous() and w.device.type == "cpu":
        return w.data_ptr(), w.nbytes
    a = _as_u8(w)
    keep.append(a)
    return _ptr(a), _nbytes(a)


def _ptr(a: np.ndarray | torch.Tensor) -> int:
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.ctypes.data


def _nbytes(a: np.ndarray | torch.Tensor) -> int:
    return a.numel() * a.element_size() if isinstance(a, torch.Tensor) else a.nbytes


def _dequant_rows(w: np.ndarray | torch.Tensor, qtype: int, cols: int, r0: int, r1: int) -> torch.Tensor:
    from gguf.quants import dequantize

    rb = row_bytes(qtype, cols)
    flat = w.reshape(-1).numpy() if isinstance(w, torch.Tensor) else w.reshape(-1)
    chunk = flat[r0 * rb:r1 * rb].reshape(r1 - r0, rb)
    return torch.from_numpy(np.ascontiguousarray(dequantize(chunk, int(qtype)), dtype=np.float32).reshape(r1 - r0, cols))


def _torch_matmul(x: torch.Tensor, w, qtype: int, cols: int, rows: int, chunk_rows: int = 1024) -> torch.Tensor:
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        y[:, r0:r1] = x @ _dequant_rows(w, qtype, cols, r0, r1).T
    return y


class QHeads:
    """Per-head quantized matrices W_h [rows, cols] stacked as bytes [heads, rows, row_bytes] (MLA's absorbed
    k_b / v_b), checked once: `x[h] @ W_h.T` for every head in one call."""

    def __init__(self, w: Bytes, qtype: int, heads: int, cols: int):
        self.w, self.qtype, self.heads, self.cols = _as_u8(w), int(qtype), int(heads), int(cols)
        self.row_bytes = row_bytes(self.qtype, self.cols)
        nb = _nbytes(self.w)
        if nb % (self.heads * self.row_bytes):
            raise ValueError(f"weight bytes {nb} are not a multiple of {self.heads} row(s) of {self.row_bytes} bytes")
        self.rows = nb // (self.heads * self.row_bytes)
        self._wp = _ptr(self.w)
        self._c = available() and supported(self.qtype)
        self._lib = _load() if self._c else None

    def _compiled(self) -> bool:
        return self._c and not _forced_torch()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [heads, T, cols] -> float32 [heads, T, rows]."""
        if x.dim() != 3 or x.shape[0] != self.heads or x.shape[2] != self.cols:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [{self.heads}, T, {self.cols}]")
        x = x.to(torch.float32).contiguous()
        T = x.shape[1]
        if not self._compiled():
            return torch.bmm(x, self.dequantize().transpose(1, 2))
        y = torch.empty(self.heads, T, self.rows, dtype=torch.float32)
        rc = self._lib.k2k_matmul_heads(self.qtype, self._wp, self.heads, self.rows * self.row_bytes, self.rows,
                                        self.cols, self.row_bytes, x.data_ptr(), T, y.data_ptr())
        if rc != 0:
            raise RuntimeError(f"k2k_matmul_heads failed ({rc})")
        return y

    def dequantize(self) -> torch.Tensor:
        """float32 [heads, rows, cols]."""
        return _dequant_rows(self.w, self.qtype, self.cols, 0, self.heads * self.rows).view(self.heads, self.rows, -1)


class QMatrix(QHeads):
    """One quantized weight W [rows, cols] (ggml blocks of qtype) checked once, for many `x @ W.T` calls.

    Model weights are multiplied a few hundred times per decoded token; binding them saves the per-call
    validation and pointer lookups (about 5 us a call, measured here)."""

    def __init__(self, w: Bytes, qtype: int, cols: int, repack: bool = False):
        """repack: a Q8_0 / Q4_K matrix is copied once into the kernels' interleaved layout where r16_type says so:
        the model's own matrices, multiplied every token.  `w` stays the gguf bytes (dequantize, torch fallback)."""
        super().__init__(w, qtype, 1, cols)
        self._ktype, self._packed = self.qtype, None
        if repack and self._c and r16_type(self.qtype, self.rows) is not None:
            self._packed = aligned_buffer(_nbytes(self.w))
            self._ktype = repack_r16(self.qtype, self.w, self.rows, self.cols, self._packed)
            self._wp = self._packed.ctypes.data

    @property
    def repacked(self) -> bool:
        """True when the kernels read the interleaved copy (see __init__)."""
        return self._packed is not None

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """x: float32 [T, cols] -> float32 [T, rows] (into out when given: contiguous float32 [T, rows])."""
        T = x.shape[0]
        if x.dim() != 2 or x.shape[1] != self.cols:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [T, {self.cols}]")
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        if not self._compiled():
            y = _torch_matmul(x, self.w, self.qtype, self.cols, self.rows)
            return y if out is None else out.copy_(y)
        y = torch.empty(T, self.rows, dtype=torch.float32) if out is None else out
        if out is not None and (y.shape != (T, self.rows) or y.dtype != torch.float32 or not y.is_contiguous()):
            raise ValueError("out must be a contiguous float32 [T, rows] tensor")
        rc = self._lib.k2k_matmul(self._ktype, self._wp, self.rows, self.cols, self.row_bytes, x.data_ptr(), T,
                                  self.cols, y.data_ptr(), self.rows)
        if rc != 0:
            raise RuntimeError(f"k2k_matmul failed ({rc})")
        return y


class MLADecode:
    """MLA's absorbed attention for one decoded token in one kernel call on the pool (csrc/attn.c): per head,
    q_lat = k_b q_nope, softmax over the latent cache of (lat q_lat + k_pe q_pe) * scale, then v_b (lat^T p).
    k_b: QHeads [heads, kv_lora rows, nope cols]; v_b: QHeads [heads, v rows, kv_lora cols]. Same values as those
    QHeads calls around the torch attention, up to float summation order."""

    def __init__(self, k_b: QHeads, v_b: QHeads):
        if k_b.heads != v_b.heads or k_b.rows != v_b.cols:
            raise ValueError(f"k_b [{k_b.heads}, {k_b.rows}, {k_b.cols}] and v_b [{v_b.heads}, {v_b.rows}, {v_b.cols}]"
                             " are not one MLA layer's")
        self.k_b, self.v_b = k_b, v_b
        self.heads, self.nope, self.latent, self.v_dim = k_b.heads, k_b.cols, k_b.rows, v_b.rows

    @staticmethod
    def usable(k_b: QHeads | None, v_b: QHeads | None) -> bool:
        """Both matrices have compiled kernels and the widths csrc/attn.c takes."""
        return (k_b is not None and v_b is not None and k_b._compiled() and v_b._compiled()  # noqa: SLF001
                and k_b.rows % 8 == 0)

    def fused(self) -> bool:
        """Calls run in the one kernel call now (not K2LOCAL_MLA=0 / K2LOCAL_KERNELS=torch)."""
        return self.k_b._compiled() and self.v_b._compiled() and fused_mla_wanted()  # noqa: SLF001

    def __call__(self, q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, kpe: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """q_nope [heads, nope], q_pe [heads, rope] (rows may be apart, columns contiguous), lat [s, kv_lora],
        kpe [s, rope] contiguous float32 -> float32 [heads, v]."""
        h, s, rope = self.heads, lat.shape[0], kpe.shape[-1]
        if (q_nope.shape != (h, self.nope) or q_pe.shape != (h, rope) or lat.shape != (s, self.latent)
                or kpe.shape[0] != s or any(t.dtype != torch.float32 for t in (q_nope, q_pe, lat, kpe))):
            raise ValueError("MLADecode: shapes or dtypes do not match the layer")
        kb, vb = self.k_b, self.v_b
        if not self.fused():
            return self.reference(q_nope, q_pe, lat, kpe, scale)
        q_nope, q_pe = (t if t.stride(1) == 1 else t.contiguous() for t in (q_nope, q_pe))
        lat, kpe = lat.contiguous(), kpe.contiguous()
        out = torch.empty(h, self.v_dim, dtype=torch.float32)
        rc = kb._lib.k2k_mla_decode(kb.qtype, kb._wp, kb.rows * kb.row_bytes, vb.qtype, vb._wp,  # noqa: SLF001
                                    vb.rows * vb.row_bytes, h, self.nope, rope, self.latent, self.v_dim,
                                    q_nope.data_ptr(), q_nope.stride(0), q_pe.data_ptr(), q_pe.stride(0),
                                    lat.data_ptr(), kpe.data_ptr(), s, float(scale), out.data_ptr())
        if rc != 0:
            raise RuntimeError(f"k2k_mla_decode failed ({rc})")
        return out

    def reference(self, q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, kpe: torch.Tensor,
                  scale: float) -> torch.Tensor:
        """The same product as separate k_b / torch / v_b calls (K2LOCAL_MLA=0, the torch fallback, the tests)."""
        q_lat = self.k_b(q_nope[:, None, :])  # [heads, 1, kv_lora]
        scores = (torch.matmul(q_lat, lat.t()) + torch.matmul(q_pe[:, None, :], kpe.t())) * scale
        return self.v_b(torch.matmul(scores.softmax(-1), lat))[:, 0]


def qmatmul(x: torch.Tensor, w: Bytes, qtype: int, cols: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y[T, rows] = x[T, cols] @ W.T with W stored as ggml blocks of type qtype.

    x: float32 [T, cols] (or [cols]); w: uint8 bytes [rows, row_bytes] (or flat, rows inferred);
    returns float32 [T, rows] ([rows] for 1-D x)."""
    squeeze = x.dim() == 1
    x2 = x.reshape(1, -1) if squeeze else x
    y = QMatrix(w, qtype, int(cols if cols is not None else x2.shape[1]))(x2, out)
    return y.reshape(-1) if squeeze else y


def _types3(qtypes: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(qtypes, (int, np.integer)):
        return (int(qtypes),) * 3
    t = tuple(int(q) for q in qtypes)
    if len(t) != 3:
        raise ValueError("qtypes must be one type or (gate, up, down)")
    return t  # type: ignore[return-value]


def _expert_pointers(experts: Sequence[tuple[Bytes, Bytes, Bytes]], hidden: int, qtypes: tuple[int, int, int],
                     keep: list) -> tuple[tuple, int]:
    """((gate, up, down) ctypes pointer arrays, inter) of experts' bytes, their sizes checked against [inter, hidden]
    / [hidden, inter]; copies made for contiguity go to `keep`."""
    n = len(experts)
    addrs = [_addr(m, keep) for e in experts for m in e]  # gate, up, down of expert 0, then expert 1, ...
    if len(addrs) != 3 * n:
        raise ValueError("each expert must be (gate, up, down)")
    bg, bu, bd = (BASE_OF.get(t, t) for t in qtypes)  # an interleaved layout has its gguf type's row size
    rg = row_bytes(bg, hidden)
    inter = addrs[0][1] // rg if n else 0
    sizes = (inter * rg, inter * row_bytes(bu, hidden), hidden * row_bytes(bd, inter)) if n else ()
    if any(addrs[i][1] != sizes[i % 3] for i in range(3 * n)):
        raise ValueError("expert byte sizes do not match [inter, hidden] / [hidden, inter] shapes")
    return tuple((ctypes.c_void_p * n)(*[a for a, _ in addrs[j::3]]) for j in range(3)), inter


class MoELayer:
    """One layer's routed experts bound once (their byte addresses checked and kept), for the many one-token
    calls of a decode: `rows[k] = Expert_{idx[k]}(x)`, unweighted, in one kernel call. The experts' bytes must stay
    where they are (the RAM tier with every expert resident)."""

    def __init__(self, experts: Sequence[tuple[Bytes, Bytes, Bytes]], qtypes: int | Sequence[int], hidden: int):
        self.types = _types3(qtypes)
        if not available() or not all(supported(t) for t in self.types):
            raise RuntimeError("MoELayer needs the compiled kernels for its types")
        self._keep: list = []
        self._ptrs, self.inter = _expert_pointers(experts, hidden, self.types, self._keep)
        self.n, self.hidden = len(experts), hidden
        self._lib = _load()
        self._ones = np.ones(64, dtype=np.float32)

    def rows(self, x: torch.Tensor, idx: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """x float32 [hidden] (one token), idx int32 [K] expert ids (< n), out float32 [K, hidden] zeroed:
        out[k] += Expert_{idx[k]}(x)."""
        K = idx.shape[0]
        if x.shape != (self.hidden,) or x.dtype != torch.float32 or out.shape != (K, self.hidden) or K > 64:
            raise ValueError("MoELayer.rows: x [hidden] float32 and out [K, hidden], K <= 64")
        if idx.dtype != np.int32 or not idx.flags.c_contiguous or (K and (idx.max() >= self.n or idx.min() < 0)):
            raise ValueError("MoELayer.rows: idx must be contiguous int32 expert ids in range")
        tg, tu, td = self.types
        pg, pu, pd = self._ptrs
        rc = self._lib.k2k_moe(K, self.hidden, self.inter, x.data_ptr(), 0, self.n, pg, pu, pd, tg, tu, td, 1,
                               idx.ctypes.data, self._ones.ctypes.data, out.data_ptr(), self.hidden, 1)
        if rc != 0:
            raise RuntimeError(f"k2k_moe failed ({rc})")
        return out


def moe_experts(
    x: torch.Tensor,
    experts: Sequence[tuple[Bytes, Bytes, Bytes]],
    qtypes: int | Sequence[int],
    token_expert_index: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray,
    threads: int | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Routed-expert FFN for T tokens in one call.

    y[t] = sum_k weights[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = token_expert_index[t, k]
    x: float32 [T, hidden]; experts: list of (gate [inter, *], up [inter, *], down [hidden, *]) quantized
    bytes; qtypes: one ggml type or (gate, up, down); token_expert_index: int [T, K] into `experts`
    (negative entries are skipped); weights: float [T, K].  accumulate=True adds into `out`.
    threads: if given and different, the pool is resized first (sticky)."""
    x2 = x.to(torch.float32)
    if x2.dim() != 2 or x2.stride(1) != 1:  # rows may be apart (or the same row: stride 0), columns contiguous
        x2 = x2.contiguous()
    T, hidden = x2.shape
    tg, tu, td = _types3(qtypes)
    idx = np.ascontiguousarray(np.asarray(token_expert_index, dtype=np.int32).reshape(T, -1))
    wts = np.ascontiguousarray(np.asarray(weights, dtype=np.float32).reshape(T, -1))
    K = idx.shape[1]
    if wts.shape != idx.shape:
        raise ValueError("weights and token_expert_index shapes differ")
    if idx.size and idx.max() >= len(experts):
        raise ValueError("expert index out of range")
    n = len(experts)
    keep: list = []
    ptrs, inter = _expert_pointers(experts, hidden, (tg, tu, td), keep)
    y = out if out is not None else torch.zeros(T, hidden, dtype=torch.float32)
    if y.shape != (T, hidden) or y.dtype != torch.float32 or not y.is_contiguous():
        raise ValueError("out must be a contiguous float32 [T, hidden] tensor")
    if not n:
        if not accumulate:
            y.zero_()
        return y
    if available() and all(supported(t) for t in (tg, tu, td)):
        lib = _load()
        if threads and threads != lib.k2k_get_threads():
            lib.k2k_set_threads(int(threads), 0)
        pg, pu, pd = ptrs
        rc = lib.k2k_moe(T, hidden, inter, x2.data_ptr(), x2.stride(0), n, pg, pu, pd, tg, tu, td, K,
                          idx.ctypes.data, wts.ctypes.data, y.data_ptr(), hidden, int(accumulate))
        if rc != 0:
            raise RuntimeError(f"k2k_moe failed ({rc})")
        return y
    if any(t in BASE_OF for t in (tg, tu, td)):
        raise RuntimeError("interleaved (R16) expert bytes need the compiled kernels")
    if threads:
        torch.set_num_threads(threads)
    if not accumulate:
        y.zero_()
    for e in np.unique(idx[idx >= 0]):
        tok, slot = np.nonzero(idx == e)
        xe = x2[torch.from_numpy(tok)]
        g, u, d = (_as_u8(m) for m in experts[int(e)])
        h = torch.nn.functional.silu(_torch_matmul(xe, g, tg, hidden, inter)) * _torch_matmul(xe, u, tu, hidden, inter)
        ye = _torch_matmul(h, d, td, inter, hidden) * torch.from_numpy(wts[tok, slot]).unsqueeze(1)
        y.index_add_(0, torch.from_numpy(tok).long(), ye)
    return y


def pool_time() -> tuple[float, int]:
    """(wall seconds, calls) the compiled kernels' pool has run since the library loaded; (0.0, 0) without it.
    The difference over a decoded token is the part of it spent in the kernels (the rest: Python, torch, waits)."""
    lib = _load()
    if lib is None:
        return 0.0, 0
    n = ctypes.c_int64(0)
    return float(lib.k2k_pool_seconds(ctypes.byref(n))), int(n.value)


def read_bandwidth(buf: Bytes | None = None, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """RAM read bandwidth in GB/s (best of reps) streaming `buf` (or a fresh nbytes buffer) with the
    kernel thread pool; 0.0 without the compiled library."""
    lib = _load()
    if lib is None:
        return 0.0
    if buf is None:  # on huge pages, as the store's slots and the repacked matrices are (aligned_buffer)
        buf = aligned_buffer(nbytes)
        buf.fill(1)
    b = _as_u8(buf)
    p = _ptr(b)
    if p % 64:
        raise ValueError("buffer must be 64-byte aligned")
    return float(lib.k2k_read_bw(p, _nbytes(b), int(reps)))


SCALE_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # k2k_repack_int4_q4_0's scale_kind


def repack_int4_q4_0(packed: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> int | None:
    """compressed-tensors INT4 codes (int32 [rows, cols/8]) and their group-32 scales (bf16/f16/f32 [rows, cols/32])
    -> Q4_0 bytes written into `out` (uint8, rows * cols/32 * 18); returns how many scales were not f16-exact.
    None without the compiled library (the caller repacks in torch). ValueError for a scale past f16's range.
    Takes no lock and no pool thread: callable from reader threads while a matmul runs."""
    lib = _load()
    if lib is None or scale.dtype not in SCALE_KINDS:
        return None
    packed, scale = packed.contiguous(), scale.contiguous()
    rows, groups = scale.shape
    if packed.numel() * 4 != rows * groups * 16 or out.numel() * out.element_size() < rows * groups * 18:
        raise ValueError(f"INT4 codes {list(packed.shape)} / scales {list(scale.shape)} / output size disagree")
    r = int(lib.k2k_repack_int4_q4_0(packed.data_ptr(), scale.data_ptr(), SCALE_KINDS[scale.dtype], rows, groups,
                                     out.data_ptr()))
    if r < 0:
        g = -1 - r
        bad = float(scale.view(-1)[g].float())
        raise ValueError(f"INT4 scale {bad:g} is outside fp16's range: cannot be Q4_0")
    return r
