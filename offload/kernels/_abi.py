"""The C library's ctypes side: the ABI version it must report, the signature of every function it exports
(csrc/k2kern.h), loading it, and handing it gguf's IQ codebooks.

A library is used only when its ABI version is ABI_VERSION and (where the sources are shipped) its embedded
source tag matches csrc/ (_build.source_tag): an installed extension or in-place build of another revision is
skipped, and the user-cache build of this revision is made (or reused) instead.
The IQ types' codebooks (grids, sign table, IQ4 values) are not compiled in: they are read from the installed gguf
package and handed to the library once, when it is loaded (``k2k_set_grid``); a table that is missing or refused
leaves its types on the torch fallback (k2k_supported says which).
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from quant import types as qtypes

from . import _build

ABI_VERSION = 14
GRID_KSIGNS = 256  # k2k_set_grid id of the IQ sign table
ISA_NAMES = {0: "generic", 1: "avx2", 2: "avx512-vnni", 3: "avx512-vnni-gfni"}
ISA_LEVELS = {"generic": 0, "avx2": 1, "avx512": 2, "avx512-vnni": 2, "avx512-gfni": 3, "avx512-vnni-gfni": 3,
              "best": 3}

_i64, _i32, _vp, _fp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p
SIGNATURES: dict[str, tuple[object, list]] = {
    "k2k_abi_version": (_i32, []),
    "k2k_src_tag": (ctypes.c_char_p, []),
    "k2k_isa": (_i32, []),
    "k2k_isa_hw": (_i32, []),
    "k2k_set_isa": (_i32, [_i32]),
    "k2k_act_bytes": (_i64, [_i64]),
    "k2k_interleave": (_i32, [_vp, _i64]),
    "k2k_matmul_heads": (_i32, [_i32, _vp, _i64, _i64, _i64, _i64, _i64, _fp, _i64, _fp]),
    "k2k_quantize_act": (_i32, [_fp, _i64, _i32, _vp]),
    "k2k_set_threads": (_i32, [_i32, _i32]),
    "k2k_get_threads": (_i32, []),
    "k2k_default_threads": (_i32, []),
    "k2k_numa_nodes": (_i32, []),
    "k2k_supported": (_i32, [_i32]),
    "k2k_set_prefetch": (_i32, [_i32, _i32]),
    "k2k_set_pairs": (_i32, [_i32]),
    "k2k_set_panel": (_i32, [_i32]),
    "k2k_set_avxvnni": (_i32, [_i32]),
    "k2k_row_bytes": (_i64, [_i32, _i64]),
    "k2k_type_name": (ctypes.c_char_p, [_i32]),
    "k2k_matmul": (_i32, [_i32, _vp, _i64, _i64, _i64, _fp, _i64, _i64, _fp, _i64]),
    "k2k_moe": (_i32, [_i64, _i64, _i64, _fp, _i64, _i32, _vp, _vp, _vp, _i32, _i32, _i32, _i32, _vp, _fp, _fp,
                       _i64, _i32]),
    "k2k_mla_decode": (_i32, [_i32, _vp, _i64, _i32, _vp, _i64, _i64, _i64, _i64, _i64, _i64, _fp, _i64, _fp, _i64,
                              _fp, _fp, _i64, ctypes.c_float, _fp]),
    "k2k_read_bw": (ctypes.c_double, [_vp, _i64, _i32]),
    "k2k_pool_seconds": (ctypes.c_double, [ctypes.POINTER(ctypes.c_int64)]),
    "k2k_set_grid": (_i32, [_i32, _vp, _i64]),
    "k2k_repack_int4_q4_0": (_i64, [_vp, _vp, _i32, _i64, _i64, _vp]),
    "k2k_repack_q8_0_r16": (_i64, [_vp, _i64, _i64, _vp]),
    "k2k_repack_q4_k_r16": (_i64, [_vp, _i64, _i64, _vp]),
}


def declare(lib: ctypes.CDLL) -> None:
    """Set every exported function's result and argument types (AttributeError when one is missing)."""
    for name, (res, args) in SIGNATURES.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args


def iq_tables() -> dict[int, np.ndarray]:
    """The IQ codebooks from the installed gguf package, as the byte arrays k2k_set_grid takes: grid magnitudes
    as uint8 rows (IQ2_*: 8 per row, IQ3_*: 4), IQ1_S values as int8 rows, IQ4_NL values, and the sign table.
    Keys are ggml type ids (IQ1_M shares IQ1_S's grid, IQ4_XS IQ4_NL's values) and GRID_KSIGNS."""
    from gguf import quants as gq  # noqa: PLC0415

    Q = qtypes.QType
    out: dict[int, np.ndarray] = {}
    for qt, dtype in ((Q.IQ2_XXS, np.uint8), (Q.IQ2_XS, np.uint8), (Q.IQ2_S, np.uint8), (Q.IQ3_XXS, np.uint8),
                      (Q.IQ3_S, np.uint8), (Q.IQ1_S, np.int8)):
        cls = getattr(gq, qt.name, None)
        if cls is None:
            continue
        cls.init_grid()
        out[int(qt)] = np.ascontiguousarray(np.asarray(cls.grid).reshape(-1).astype(dtype))
    if hasattr(gq, "IQ4_NL"):
        out[int(Q.IQ4_NL)] = np.asarray(gq.IQ4_NL.kvalues, dtype=np.int8)
    if hasattr(gq, "IQ2_XXS") and hasattr(gq.IQ2_XXS, "ksigns"):
        out[GRID_KSIGNS] = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8).copy()
    return out


grid_errors: dict[int, str] = {}


def set_grids(lib: ctypes.CDLL) -> None:
    """Hand the IQ codebooks to the library; a table that is missing or rejected leaves its types on torch."""
    try:
        tables = iq_tables()
    except Exception as e:  # gguf without IQ support: those types stay on the fallback
        grid_errors[-1] = f"gguf.quants: {type(e).__name__}: {e}"
        return
    for tid, arr in tables.items():
        rc = lib.k2k_set_grid(tid, arr.ctypes.data, arr.nbytes)
        if rc != 0:
            what = {-2: "has the wrong size", -3: "holds values out of range"}.get(rc, f"was rejected ({rc})")
            name = "sign" if tid == GRID_KSIGNS else qtypes.qtype_of(tid).name
            grid_errors[tid] = f"gguf's {name} table {what}"


_lib: ctypes.CDLL | None = None
_lib_err: str | None = None
_lock = threading.Lock()


def load() -> ctypes.CDLL | None:
    """The library, loaded (and built into the user cache if needed) at the first call; None when unavailable."""
    global _lib, _lib_err
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        tag = _build.source_tag()
        for path in _build.candidates():
            try:
                lib = ctypes.CDLL(str(path))
                if lib.k2k_abi_version() != ABI_VERSION:
                    continue
                declare(lib)
                if tag is not None and lib.k2k_src_tag().decode() != tag:
                    continue  # built from another revision of csrc/ (e.g. stale in-place build)
                set_grids(lib)
                _lib = lib
                return lib
            except (OSError, AttributeError):
                continue
        try:
            path, err = _build.build_into_cache()
            if err is not None:
                _lib_err = err
            if path is not None:
                lib = ctypes.CDLL(str(path))
                declare(lib)
                if lib.k2k_abi_version() == ABI_VERSION:
                    set_grids(lib)
                    _lib = lib
                    return lib
        except OSError as e:  # read-only home, broken compiler, ...
            _lib_err = repr(e)
        return None


def load_error() -> str | None:
    """Why the library is unavailable, if known (or why some IQ types stay on the fallback)."""
    load()
    return _lib_err or ("; ".join(grid_errors.values()) or None)
