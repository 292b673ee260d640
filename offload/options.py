"""Typed options of the expert tiers: the user's memory budgets, and the knobs of the backend.

Defaults are what a normal run uses; most knobs exist for tests and benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budgets:
    """The user's placement limits (the CLI's --gpu-mem, --ram, --experts-on)."""

    gpu_mem: float | None = None  # GiB of VRAM to use (None: what is free, less half a GiB)
    ram: float | None = None  # GiB of RAM for routed experts (None: what is available, less a reserve)
    experts_on: str | None = None  # "ram" | "disk" | None (the planner decides)


@dataclass
class OffloadOptions:
    """How the routed-expert backend is set up beyond the budgets."""

    routing_stats: str | None = None  # saved routing statistics file (None: the model's file in the cache)
    save_routing_stats: bool = True  # merge this run's routing counts into that file on close
    device_cache_experts: int | None = None  # experts held on the compute device (None: as many as fit; on a
    #                                          CPU-only run a testing aid, 0 by default)
    pin: bool = True  # pin expert RAM under CUDA (unless it is over half of physical memory)
    dense: bool = False  # every routed expert dequantized in memory (the reference backend) instead of the tiers
    io_threads: int = 8  # threads reading experts from disk (each segment of an expert is its own read)
    direct_io: bool = True  # O_DIRECT reads where the file system allows them
    prefetch: bool = True  # guess the next MoE layer's experts (its router applied early) and start reading them
    gpu_prefill_min_tokens: int = 64  # batches of at least this many tokens ship host experts to the GPU
    prewarm: bool = True  # disk tier: fill the RAM cache with the experts the saved routing statistics rank hottest
    lookahead: int = 2  # expert reads kept in flight while the CPU computes
    kernels: bool = True  # the compiled CPU expert kernels for ggml types (False: torch dequantize + matmul)
