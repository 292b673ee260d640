"""Sharing the CPU between torch's thread pool and the expert kernels' own pool.

While a token is decoded the heavy work runs in the kernels' pool; torch only does small operations between the
kernel calls (norms, rope, routing, short attention). With torch's pool at full size, each of those wakes threads
that compete for the cores the kernels' workers are still spinning on: on a 2-core box, decoding a Kimi-K2-shaped
model ran 15-25% faster with torch at one thread (bench/decode.py). Prefill and attention over long contexts keep
torch's full pool.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

# attention work (multiply-adds per layer) above which torch's full pool pays off again during decoding
PARALLEL_ATTENTION_MACS = 1 << 24

_local = threading.local()  # .outer: this thread's stack of pool sizes outside its active torch_threads blocks


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op pool at n threads (n <= 0: unchanged), then restore it."""
    prev = torch.get_num_threads()
    outer = _stack()
    outer.append(prev)
    try:
        if n <= 0 or n == prev:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(prev)
    finally:
        outer.pop()


def _stack() -> list[int]:
    if not hasattr(_local, "outer"):
        _local.outer = []
    return _local.outer


def full_threads() -> int:
    """torch's pool size before this thread's outermost active torch_threads block narrowed it."""
    outer = _stack()
    return outer[0] if outer else torch.get_num_threads()


def decode_step(tokens: int) -> bool:
    """Whether CPU work for `tokens` new tokens is a decoding step, best run with torch at one thread."""
    return tokens <= 4
