"""torch's thread pool is narrowed to one thread while a token is decoded on the CPU (the expert kernels' own pool
does the heavy work), and restored afterwards."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2local.weights.hf_checkpoint import open_checkpoint
from k2local.model import KimiK2Model, SeqRows
from k2local.placement import DenseExperts
from offload.threads import full_threads, torch_threads


def test_torch_threads_sets_and_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
        assert full_threads() == before  # what a block that needs the whole pool asks for
        with torch_threads(full_threads()):
            assert torch.get_num_threads() == before
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before and full_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0: unchanged
        assert torch.get_num_threads() == before


class _Recording:
    """Expert backend that notes torch's thread count on each call."""

    def __init__(self, inner: DenseExperts):
        self.inner, self.seen = inner, []

    def forward(self, layer, x, idx, w):
        self.seen.append((x.shape[0], torch.get_num_threads()))
        return self.inner.forward(layer, x, idx, w)


def test_cpu_decode_runs_torch_at_one_thread(tiny_k2: Path) -> None:
    src = open_checkpoint(tiny_k2)
    rec = _Recording(DenseExperts.from_source(src))
    model = KimiK2Model(src, experts=rec)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cache = model.new_cache()
        ref = model.forward(list(range(3, 15)), cache)
        step = model.forward([7], cache)
        assert torch.get_num_threads() == 2  # restored after each call
        assert {n for t, n in rec.seen if t > 4} == {2} and {n for t, n in rec.seen if t == 1} == {1}
        # the result does not depend on it: the same step with the full pool gives the same logits
        cache2 = model.new_cache()
        model.forward(list(range(3, 15)), cache2)
        with torch_threads(2):
            full = model._forward([SeqRows([7], cache2, cache2.length)])[0]
        assert torch.allclose(step, full, atol=1e-5) and ref.shape[0] == 12
    finally:
        torch.set_num_threads(before)
