"""CPU expert kernels on ggml-quantized bytes (Q4_0, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K and the IQ types), with a torch fallback.

The compiled part is a plain C shared library (``k2kern.c``) called through ctypes, which
releases the GIL.  It is found, in order: as the optional extension built by ``setup.py``
(``offload.kernels._k2kern``), or in the user cache (``$XDG_CACHE_HOME/k2local`` or
``~/.cache/k2local``), built there on first use with ``$CC``/gcc when missing.  One binary
serves every x86-64 CPU: AVX-512 VNNI / AVX2 / scalar code is chosen at run time.
The IQ types' codebooks (grids, sign table, IQ4 values) are not compiled in: they are read from the
installed gguf package and handed to the library once, when it is loaded (``k2k_set_grid``).

Environment:
  K2LOCAL_KERNELS=torch   force the torch fallback (dequantize row chunks with gguf + matmul)
  K2LOCAL_ISA=generic|avx2|avx512   cap the instruction set used by the C kernels
  K2LOCAL_AVXVNNI=0       at the AVX2 level, do not use AVX-VNNI (vpdpbusd / vpdpwssd) even where the CPU has it
  K2LOCAL_THREADS=n, K2LOCAL_PIN=1  initial thread count (default: physical cores) / pinning
  K2LOCAL_SPIN_US=us      how long idle workers spin before sleeping (default 300)
  K2LOCAL_PREFETCH=bytes, K2LOCAL_PREFETCH_L2=1   software prefetch distance (0: off) / into L2
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

__all__ = [
    "available", "backend", "isa", "set_isa", "set_threads", "get_threads", "default_threads", "numa_nodes",
    "set_prefetch", "set_avxvnni", "set_panel_gemm", "numa_interleave_wanted", "interleave_memory", "supported", "row_bytes", "QMatrix", "QHeads", "qmatmul", "moe_experts", "read_bandwidth", "C_TYPES",
]

ABI_VERSION = 9
_SRC = Path(__file__).with_name("k2kern.c")
# ggml type ids with a C kernel (gguf.GGMLQuantizationType values)
C_TYPES = {2: "Q4_0", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
           16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
           23: "IQ4_XS", 29: "IQ1_M"}
_GRID_KSIGNS = 256  # k2k_set_grid id of the IQ sign table
_ISA_NAMES = {0: "generic", 1: "avx2", 2: "avx512-vnni", 3: "avx512-vnni-gfni"}

Bytes = Union[np.ndarray, torch.Tensor]

_lib: ctypes.CDLL | None = None
_lib_err: str | None = None
_lock = threading.Lock()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "k2local"


def source_tag() -> str | None:
    """Short hash of k2kern.c (None if the source is not shipped); builds embed it."""
    try:
        return hashlib.sha256(_SRC.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def compile_command(cc: str, out: str) -> list[str]:
    """The one compile line used for on-demand builds (setup.py uses the same flags)."""
    return [cc, "-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", f'-DK2K_SRC_TAG="{source_tag()}"',
            "-o", out, str(_SRC), "-lm"]


def _build_into_cache() -> Path | None:
    """Compile k2kern.c into the user cache (keyed by source hash); None when no compiler works."""
    tag = source_tag()
    if tag is None:
        return None
    out = _cache_dir() / f"k2kern-{tag}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = compile_command(cc, tmp)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        global _lib_err
        _lib_err = f"compile failed: {' '.join(cmd)}\n{r.stderr[-2000:]}"
        return None
    os.replace(tmp, out)  # atomic: concurrent builders race harmlessly
    return out


def _candidates() -> list[Path]:
    paths = []
    try:
        spec = importlib.util.find_spec("offload.kernels._k2kern")
        if spec is not None and spec.origin:
            paths.append(Path(spec.origin))
    except (ImportError, ValueError):
        pass
    paths += sorted(Path(__file__).parent.glob("_k2kern*.so"))
    return paths


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, vp, fp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p
    sig = {
        "k2k_abi_version": (i32, []),
        "k2k_src_tag": (ctypes.c_char_p, []),
        "k2k_isa": (i32, []),
        "k2k_isa_hw": (i32, []),
        "k2k_set_isa": (i32, [i32]),
        "k2k_act_bytes": (i64, [i64]),
        "k2k_interleave": (i32, [vp, i64]),
        "k2k_matmul_heads": (i32, [i32, vp, i64, i64, i64, i64, i64, fp, i64, fp]),
        "k2k_quantize_act": (i32, [fp, i64, i32, vp]),
        "k2k_set_threads": (i32, [i32, i32]),
        "k2k_get_threads": (i32, []),
        "k2k_default_threads": (i32, []),
        "k2k_numa_nodes": (i32, []),
        "k2k_supported": (i32, [i32]),
        "k2k_set_prefetch": (i32, [i32, i32]),
        "k2k_set_pairs": (i32, [i32]),
        "k2k_set_panel": (i32, [i32]),
        "k2k_set_avxvnni": (i32, [i32]),
        "k2k_row_bytes": (i64, [i32, i64]),
        "k2k_matmul": (i32, [i32, vp, i64, i64, i64, fp, i64, i64, fp, i64]),
        "k2k_moe": (i32, [i64, i64, i64, fp, i64, i32, vp, vp, vp, i32, i32, i32, i32, vp, fp, fp, i64, i32]),
        "k2k_read_bw": (ctypes.c_double, [vp, i64, i32]),
        "k2k_set_grid": (i32, [i32, vp, i64]),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args


def _load() -> ctypes.CDLL | None:
    global _lib, _lib_err
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        tag = source_tag()
        for path in _candidates():
            try:
                lib = ctypes.CDLL(str(path))
                if lib.k2k_abi_version() != ABI_VERSION:
                    continue
                _declare(lib)
                if tag is not None and lib.k2k_src_tag().decode() != tag:
                    continue  # built from another revision of k2kern.c (e.g. stale in-place build)
                _set_grids(lib)
                _lib = lib
                return lib
            except (OSError, AttributeError):
                continue
        try:
            path = _build_into_cache()
            if path is not None:
                lib = ctypes.CDLL(str(path))
                _declare(lib)
                if lib.k2k_abi_version() == ABI_VERSION:
                    _set_grids(lib)
                    _lib = lib
                    return lib
        except OSError as e:  # read-only home, broken compiler, ...
            _lib_err = repr(e)
        return None


def iq_tables() -> dict[int, np.ndarray]:
    """The IQ codebooks from the installed gguf package, as the byte arrays k2k_set_grid takes: grid magnitudes
    as uint8 rows (IQ2_*: 8 per row, IQ3_*: 4), IQ1_S values as int8 rows, IQ4_NL values, and the sign table.
    Keys are ggml type ids (IQ1_M shares IQ1_S's grid, IQ4_XS IQ4_NL's values) and _GRID_KSIGNS."""
    from gguf import quants as gq

    out: dict[int, np.ndarray] = {}
    for tid, name, dtype in ((16, "IQ2_XXS", np.uint8), (17, "IQ2_XS", np.uint8), (22, "IQ2_S", np.uint8),
                             (18, "IQ3_XXS", np.uint8), (21, "IQ3_S", np.uint8), (19, "IQ1_S", np.int8)):
        cls = getattr(gq, name, None)
        if cls is None:
            continue
        cls.init_grid()
        out[tid] = np.ascontiguousarray(np.asarray(cls.grid).reshape(-1).astype(dtype))
    if hasattr(gq, "IQ4_NL"):
        out[20] = np.asarray(gq.IQ4_NL.kvalues, dtype=np.int8)
    if hasattr(gq, "IQ2_XXS") and hasattr(gq.IQ2_XXS, "ksigns"):
        out[_GRID_KSIGNS] = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8).copy()
    return out


_grid_errors: dict[int, str] = {}


def _set_grids(lib: ctypes.CDLL) -> None:
    """Hand the IQ codebooks to the library; a table that is missing or rejected leaves its types on torch."""
    try:
        tables = iq_tables()
    except Exception as e:  # gguf without IQ support: those types stay on the fallback
        _grid_errors[-1] = f"gguf.quants: {type(e).__name__}: {e}"
        return
    for tid, arr in tables.items():
        rc = lib.k2k_set_grid(tid, arr.ctypes.data, arr.nbytes)
        if rc != 0:
            what = {-2: "has the wrong size", -3: "holds values out of range"}.get(rc, f"was rejected ({rc})")
            _grid_errors[tid] = f"gguf's {C_TYPES.get(tid, 'sign')} table {what}"


def _forced_torch() -> bool:
    return os.environ.get("K2LOCAL_KERNELS", "").lower() == "torch"


def available() -> bool:
    """True when the compiled kernels are usable (and not disabled by K2LOCAL_KERNELS=torch)."""
    return not _forced_torch() and _load() is not None


def backend() -> str:
    """'c' or 'torch'."""
    return "c" if available() else "torch"


def load_error() -> str | None:
    """Why the compiled library is unavailable, if known (or why some IQ types stay on the fallback)."""
    _load()
    return _lib_err or ("; ".join(_grid_errors.values()) or None)


def library_path() -> str | None:
    """File the compiled kernels were loaded from."""
    lib = _load()
    return None if lib is None else lib._name


def isa() -> str:
    """Instruction set the kernels run with: 'avx512-vnni-gfni', 'avx512-vnni', 'avx2', 'generic' or 'torch'."""
    return _ISA_NAMES[_load().k2k_isa()] if available() else "torch"


def set_isa(name: str) -> str:
    """Cap the instruction set ('generic', 'avx2', 'avx512', 'avx512-gfni' or 'best'); returns the effective one.
    'avx512' is AVX-512 VNNI without the GFNI bit-unpacking kernels."""
    lib = _load()
    if lib is None:
        return "torch"
    level = {"generic": 0, "avx2": 1, "avx512": 2, "avx512-vnni": 2, "avx512-gfni": 3, "avx512-vnni-gfni": 3,
             "best": 3}[name]
    return _ISA_NAMES[lib.k2k_set_isa(level)]


def set_threads(n: int | None = None, pin: bool = False) -> int:
    """Restart the worker pool with n threads (None: physical cores); pin=True binds threads to CPUs,
    interleaving NUMA nodes.  Returns the thread count in effect (torch's for the fallback)."""
    lib = _load()
    if lib is None or _forced_torch():
        if n:
            torch.set_num_threads(n)
        return torch.get_num_threads()
    return lib.k2k_set_threads(int(n or 0), int(bool(pin)))


def get_threads() -> int:
    lib = _load()
    return lib.k2k_get_threads() if lib is not None and not _forced_torch() else torch.get_num_threads()


def default_threads() -> int:
    """Physical cores available to this process."""
    lib = _load()
    return lib.k2k_default_threads() if lib is not None else (os.cpu_count() or 1)


def numa_nodes() -> int:
    """NUMA nodes listed in /sys (1 when none).  The expert store page-interleaves its memory across them
    (interleave_memory) and threads can be pinned (set_threads(pin=True))."""
    lib = _load()
    return lib.k2k_numa_nodes() if lib is not None else 1


def numa_interleave_wanted() -> bool:
    """Whether expert memory should be page-interleaved across NUMA nodes: K2LOCAL_NUMA=interleave / off, by
    default when the machine has more than one node."""
    env = os.environ.get("K2LOCAL_NUMA", "").lower()
    if env in ("interleave", "on", "1"):
        return True
    if env in ("off", "0", "none"):
        return False
    return numa_nodes() > 1


def interleave_memory(buf: torch.Tensor) -> int:
    """Page-interleave a CPU buffer whose pages are not touched yet across the NUMA nodes (mbind); returns the
    node count, or 0 when that is not possible here (no compiled library, no NUMA support)."""
    lib = _load()
    if lib is None or buf.numel() == 0:
        return 0
    r = lib.k2k_interleave(buf.data_ptr(), buf.numel() * buf.element_size())
    return max(r, 0)


def set_prefetch(nbytes: int | None = None, l2: bool | None = None) -> int:
    """Software prefetch distance ahead of the weight stream in bytes (0 disables) and whether to
    prefetch into L2 instead of L1; None keeps the current value.  Returns the distance in effect."""
    lib = _load()
    if lib is None:
        return 0
    return lib.k2k_set_prefetch(-1 if nbytes is None else int(nbytes), -1 if l2 is None else int(bool(l2)))


def set_row_pairs(on: bool | None = None) -> bool:
    """Whether single-token calls run two weight rows per kernel call (shared activation loads, two
    independent chains; results are bit-identical either way).  Off by default (K2LOCAL_PAIRS=1 turns it
    on): faster from cache, but two interleaved row streams read from DRAM much slower on Zen 4.
    None keeps the setting; returns it."""
    lib = _load()
    if lib is None:
        return False
    return bool(lib.k2k_set_pairs(-1 if on is None else int(bool(on))))


def set_panel_gemm(on: bool | None = None) -> bool:
    """Whether many tokens against a matrix (prefill) decode each weight row once where the type has such a path
    (AVX-512: Q4_K, Q6_K, IQ4_XS and the codebook types IQ1_S .. IQ3_S, a 16-token-lane GEMM over 6 decoded rows;
    AVX2, with or without AVX-VNNI: the codebook types, 4-token tiles over one decoded row) instead of decoding each block again per 4-token tile.  Same
    int8 activations.  On by default (K2LOCAL_PANEL=0 turns it off); None keeps the setting; returns it."""
    lib = _load()
    if lib is None:
        return False
    return bool(lib.k2k_set_panel(-1 if on is None else int(bool(on))))


def set_avxvnni(on: bool | None = None) -> bool:
    """Whether the AVX2-level kernels use AVX-VNNI (vpdpbusd / vpdpwssd; same results).  On by default where
    the CPU has it (K2LOCAL_AVXVNNI=0 turns it off); it can only be on there.  None keeps the setting; returns it."""
    lib = _load()
    if lib is None:
        return False
    return bool(lib.k2k_set_avxvnni(-1 if on is None else int(bool(on))))


def supported(qtype: int) -> bool:
    """True when qtype has a compiled kernel (for IQ types: once gguf's codebooks are loaded into it); other gguf
    types work through the torch fallback."""
    if int(qtype) not in C_TYPES:
        return False
    lib = _load()
    return lib is None or bool(lib.k2k_supported(int(qtype)))


@functools.cache
def _block(qtype: int) -> tuple[int, int]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes of one quantized row of `cols` weights."""
    blk, nbytes = _block(qtype)
    if cols % blk:
        raise ValueError(f"cols={cols} is not a multiple of the block size {blk} of type {qtype}")
    return cols // blk * nbytes


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
        rc = _lib.k2k_matmul_heads(self.qtype, self._wp, self.heads, self.rows * self.row_bytes, self.rows, self.cols,
                                   self.row_bytes, x.data_ptr(), T, y.data_ptr())
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

    def __init__(self, w: Bytes, qtype: int, cols: int):
        super().__init__(w, qtype, 1, cols)

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
        rc = _lib.k2k_matmul(self.qtype, self._wp, self.rows, self.cols, self.row_bytes, x.data_ptr(), T, self.cols,
                             y.data_ptr(), self.rows)
        if rc != 0:
            raise RuntimeError(f"k2k_matmul failed ({rc})")
        return y


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
    addrs = [_addr(m, keep) for e in experts for m in e]  # gate, up, down of expert 0, then expert 1, ...
    if len(addrs) != 3 * n:
        raise ValueError("each expert must be (gate, up, down)")
    rg = row_bytes(tg, hidden)
    inter = addrs[0][1] // rg if n else 0
    sizes = (inter * rg, inter * row_bytes(tu, hidden), hidden * row_bytes(td, inter)) if n else ()
    if any(addrs[i][1] != sizes[i % 3] for i in range(3 * n)):
        raise ValueError("expert byte sizes do not match [inter, hidden] / [hidden, inter] shapes")
    y = out if out is not None else torch.zeros(T, hidden, dtype=torch.float32)
    if y.shape != (T, hidden) or y.dtype != torch.float32 or not y.is_contiguous():
        raise ValueError("out must be a contiguous float32 [T, hidden] tensor")
    if not n:
        if not accumulate:
            y.zero_()
        return y
    if available() and all(supported(t) for t in (tg, tu, td)):
        if threads and threads != _lib.k2k_get_threads():
            _lib.k2k_set_threads(int(threads), 0)
        pg = (ctypes.c_void_p * n)(*[a for a, _ in addrs[0::3]])
        pu = (ctypes.c_void_p * n)(*[a for a, _ in addrs[1::3]])
        pd = (ctypes.c_void_p * n)(*[a for a, _ in addrs[2::3]])
        rc = _lib.k2k_moe(T, hidden, inter, x2.data_ptr(), x2.stride(0), n, pg, pu, pd, tg, tu, td, K,
                          idx.ctypes.data, wts.ctypes.data, y.data_ptr(), hidden, int(accumulate))
        if rc != 0:
            raise RuntimeError(f"k2k_moe failed ({rc})")
        return y
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


def read_bandwidth(buf: Bytes | None = None, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """RAM read bandwidth in GB/s (best of reps) streaming `buf` (or a fresh nbytes buffer) with the
    kernel thread pool; 0.0 without the compiled library."""
    lib = _load()
    if lib is None:
        return 0.0
    if buf is None:
        arr = np.empty(nbytes + 64, dtype=np.uint8)
        off = (-arr.ctypes.data) % 64
        buf = arr[off:off + nbytes]
        buf.fill(1)
    b = _as_u8(buf)
    p = _ptr(b)
    if p % 64:
        raise ValueError("buffer must be 64-byte aligned")
    return float(lib.k2k_read_bw(p, _nbytes(b), int(reps)))
