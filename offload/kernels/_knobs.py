"""The CPU kernels' knobs: every environment variable they read (ENV, the one list) and the setters that change the
same settings at run time.

The C library reads its variables once, at its first call (csrc/pool.c: ensure_init, csrc/isa.c: isa_init);
K2LOCAL_KERNELS and K2LOCAL_NUMA are read here, at each use.  The build's variables (CC, XDG_CACHE_HOME) are
_build's.
"""
from __future__ import annotations

import os

import torch

from . import _abi

ENV: dict[str, str] = {
    "K2LOCAL_KERNELS": "torch: force the torch fallback (dequantize row chunks with gguf + matmul)",
    "K2LOCAL_ISA": "generic | avx2 | avx512: cap the instruction set used by the C kernels",
    "K2LOCAL_AVXVNNI": "0: at the AVX2 level, do not use AVX-VNNI (vpdpbusd / vpdpwssd) even where the CPU has it",
    "K2LOCAL_THREADS": "n: initial thread count (default: physical cores)",
    "K2LOCAL_PIN": "1: pin the kernel threads to CPUs, interleaving NUMA nodes",
    "K2LOCAL_SPIN_US": "us: how long idle workers spin before sleeping (default 300)",
    "K2LOCAL_PREFETCH": "bytes: software prefetch distance ahead of the weight stream (0: off; default 8192)",
    "K2LOCAL_PREFETCH_L2": "1: software prefetch into L2 instead of L1",
    "K2LOCAL_PAIRS": "1: single-token calls run two weight rows per kernel call (set_row_pairs)",
    "K2LOCAL_PANEL": "0: many tokens against a matrix without the decode-once paths (set_panel_gemm)",
    "K2LOCAL_REPACK": "0: keep the model's Q8_0 matrices in gguf's layout instead of 16 rows interleaved (QMatrix)",
    "K2LOCAL_MLA": "0: a decoded token's MLA attention as separate k_b / torch / v_b calls, not one kernel call (MLADecode)",
    "K2LOCAL_NUMA": "interleave | off: page-interleave expert memory across NUMA nodes (default: with > 1 node)",
}


def forced_torch() -> bool:
    """K2LOCAL_KERNELS=torch: the compiled kernels are not used even when they load."""
    return os.environ.get("K2LOCAL_KERNELS", "").lower() == "torch"


def fused_mla_wanted() -> bool:
    """K2LOCAL_MLA (default on): MLADecode runs a decoded token's attention in one kernel call."""
    return os.environ.get("K2LOCAL_MLA", "1") != "0"


_repack: list[bool] = []  # set_repack's value; empty: K2LOCAL_REPACK decides


def repack_wanted() -> bool:
    """Whether Q8_0 / Q4_K rows go interleaved (QMatrix(repack=True), the RAM tier's experts; set_repack, else
    K2LOCAL_REPACK; default on)."""
    return _repack[-1] if _repack else os.environ.get("K2LOCAL_REPACK", "1") != "0"


def set_repack(on: bool | None) -> None:
    """Matrices bound from now on are repacked (True), kept in gguf's layout (False), or as K2LOCAL_REPACK says
    (None)."""
    _repack.clear()
    if on is not None:
        _repack.append(bool(on))


def set_isa(name: str) -> str:
    """Cap the instruction set ('generic', 'avx2', 'avx512', 'avx512-gfni' or 'best'); returns the effective one.
    'avx512' is AVX-512 VNNI without the GFNI bit-unpacking kernels."""
    lib = _abi.load()
    if lib is None:
        return "torch"
    return _abi.ISA_NAMES[lib.k2k_set_isa(_abi.ISA_LEVELS[name])]


def set_threads(n: int | None = None, pin: bool = False) -> int:
    """Restart the worker pool with n threads (None: physical cores); pin=True binds threads to CPUs,
    interleaving NUMA nodes.  Returns the thread count in effect (torch's for the fallback)."""
    lib = _abi.load()
    if lib is None or forced_torch():
        if n:
            torch.set_num_threads(n)
        return torch.get_num_threads()
    return lib.k2k_set_threads(int(n or 0), int(bool(pin)))


def get_threads() -> int:
    lib = _abi.load()
    return lib.k2k_get_threads() if lib is not None and not forced_torch() else torch.get_num_threads()


def default_threads() -> int:
    """Physical cores available to this process."""
    lib = _abi.load()
    return lib.k2k_default_threads() if lib is not None else (os.cpu_count() or 1)


def numa_nodes() -> int:
    """NUMA nodes listed in /sys (1 when none).  The expert store page-interleaves its memory across them
    (interleave_memory) and threads can be pinned (set_threads(pin=True))."""
    lib = _abi.load()
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


def set_prefetch(nbytes: int | None = None, l2: bool | None = None) -> int:
    """Software prefetch distance ahead of the weight stream in bytes (0 disables) and whether to
    prefetch into L2 instead of L1; None keeps the current value.  Returns the distance in effect."""
    lib = _abi.load()
    if lib is None:
        return 0
    return lib.k2k_set_prefetch(-1 if nbytes is None else int(nbytes), -1 if l2 is None else int(bool(l2)))


def set_row_pairs(on: bool | None = None) -> bool:
    """Whether single-token calls run two weight rows per kernel call (shared activation loads, two
    independent chains; results are bit-identical either way).  Off by default (K2LOCAL_PAIRS=1 turns it
    on): faster from cache, but two interleaved row streams read from DRAM much slower on Zen 4.
    None keeps the setting; returns it."""
    lib = _abi.load()
    if lib is None:
        return False
    return bool(lib.k2k_set_pairs(-1 if on is None else int(bool(on))))


def set_panel_gemm(on: bool | None = None) -> bool:
    """Whether many tokens against a matrix (prefill) decode each weight row once where the type has such a path
    (AVX-512: Q4_K, Q6_K, IQ4_XS and the codebook types IQ1_S .. IQ3_S, a 16-token-lane GEMM over 6 decoded rows;
    AVX2, with or without AVX-VNNI: the codebook types, 4-token tiles over one decoded row) instead of decoding each
    block again per 4-token tile.  Same int8 activations.  On by default (K2LOCAL_PANEL=0 turns it off); None keeps
    the setting; returns it."""
    lib = _abi.load()
    if lib is None:
        return False
    return bool(lib.k2k_set_panel(-1 if on is None else int(bool(on))))


def set_avxvnni(on: bool | None = None) -> bool:
    """Whether the AVX2-level kernels use AVX-VNNI (vpdpbusd / vpdpwssd; same results).  On by default where
    the CPU has it (K2LOCAL_AVXVNNI=0 turns it off); it can only be on there.  None keeps the setting; returns it."""
    lib = _abi.load()
    if lib is None:
        return False
    return bool(lib.k2k_set_avxvnni(-1 if on is None else int(bool(on))))
