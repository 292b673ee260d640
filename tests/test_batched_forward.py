"""The batched forward step (continuous batching): several sequences, each with its own KV cache and position,
decode rows and prefill chunks mixed, give the same logits as running each alone; the routed experts see all the
step's rows in one call per layer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2local.convert.to_gguf import convert
from k2local.engine import LoadOptions
from k2local.model import KimiK2Model, KVCache, SeqRows
from k2local.placement import DenseExperts, build_backend
from k2local.weights.hf_checkpoint import open_checkpoint

A = [5, 17, 33, 2, 9, 100, 7, 8, 41, 3, 11, 12, 13, 200, 201]
B = [6, 18, 34, 3, 10, 101, 9, 4, 44, 7, 250, 21]
C = [31, 32, 33, 34, 35, 36, 37]


class _Recording:
    """Expert backend that notes the rows of every call."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def forward(self, layer, x, idx, w):
        self.rows.append((layer, x.shape[0]))
        return self.inner.forward(layer, x, idx, w)


def _cache_at(model: KimiK2Model, ids: list[int]) -> KVCache:
    cache = model.new_cache()
    if ids:
        model.forward(ids, cache)
    return cache


WORK = [([], A, True), (B[:5], B[5:], False), (C, [77], True), (A[:9], [A[9]], False)]
"""(cached prefix, new rows, last_only) of four sequences in one step: A a prefill from empty, B a chunk after a
cached prefix (every row's logits), C one decode token, and a decode token of A's prompt at its 10th position."""


def _check(model: KimiK2Model, atol: float) -> None:
    refs = [model.forward(new, _cache_at(model, prefix), last_only=last) for prefix, new, last in WORK]
    seqs = [SeqRows(new, _cache_at(model, prefix), len(prefix), last) for prefix, new, last in WORK]
    got = model.forward_batch(seqs)
    for sq, lg, ref in zip(seqs, got, refs):
        assert lg.shape == ref.shape == ((1 if sq.last_only else len(sq.ids)), model.cfg.vocab_size)
        assert (lg - ref).abs().max().item() <= atol
        assert sq.cache.length == sq.pos + len(sq.ids)
    # the caches go on as if each had run alone: a next (batched) decode step matches one over a fresh cache
    nxt = [SeqRows([int(lg[-1].argmax())], sq.cache, sq.cache.length, True) for sq, lg in zip(seqs, got)]
    for (prefix, new, _), n, lg in zip(WORK, nxt, model.forward_batch(nxt)):
        ref = model.forward(n.ids, _cache_at(model, prefix + new))
        assert (lg - ref).abs().max().item() <= atol


@pytest.fixture(scope="module")
def dense_model(tiny_k2: Path) -> tuple[KimiK2Model, _Recording]:
    src = open_checkpoint(tiny_k2)
    rec = _Recording(DenseExperts.from_source(src))
    return KimiK2Model(src, experts=rec), rec


def test_batched_step_matches_each_sequence_alone(dense_model) -> None:
    _check(dense_model[0], atol=1e-4)


def test_experts_called_once_per_layer_for_all_rows(dense_model) -> None:
    model, rec = dense_model
    seqs = [SeqRows(new, _cache_at(model, prefix), len(prefix), last) for prefix, new, last in WORK]
    rec.rows.clear()
    model.forward_batch(seqs)
    moe = [i for i in range(model.cfg.num_hidden_layers) if model.cfg.is_moe_layer(i)]
    rows = sum(len(sq.ids) for sq in seqs)
    last_rows = sum(1 if sq.last_only else len(sq.ids) for sq in seqs)  # the last layer: rows whose logits count
    assert [layer for layer, _ in rec.rows] == moe
    assert [t for _, t in rec.rows] == [rows] * (len(moe) - 1) + [last_rows if moe[-1] == len(model.layers) - 1
                                                                  else rows]


def test_offload_executor_rows_of_several_sequences(tiny_k2: Path, tmp_path: Path) -> None:
    """Q8_0 GGUF, experts in RAM computed by the compiled kernels: one call over the rows of several sequences gives
    each row what a call over its own sequence gives (the kernels are row-independent, so a shared step changes
    nothing but the order of work). Whole-model logits of a quantized model are not compared: the kernels quantize
    activations to 8 bits, and float rounding differences of 1e-6 (a float matmul over 22 rows instead of 15)
    can move a value across a rounding step."""
    gguf = convert(tiny_k2, tmp_path / "tiny-q8.gguf", "q8").paths[0]
    src = open_checkpoint(gguf)
    backend = build_backend(src, LoadOptions(cpu_only=True, experts_on="ram", extra={"save_routing_stats": False}),
                            torch.device("cpu"), torch.float32)
    try:
        model = KimiK2Model(src, experts=backend, quantized_linear=True)
        layer = next(i for i in range(model.cfg.num_hidden_layers) if model.cfg.is_moe_layer(i))
        lw = model.layers[layer]
        g = torch.Generator().manual_seed(0)
        parts = [torch.randn(n, model.cfg.hidden_size, generator=g) for n in (15, 7, 1, 1)]
        routed = [model.router(x, lw.router, lw.router_bias) for x in parts]
        alone = [backend.forward(layer, x, idx, w) for x, (idx, w) in zip(parts, routed)]
        together = backend.forward(layer, torch.cat(parts), torch.cat([r[0] for r in routed]),
                                   torch.cat([r[1] for r in routed]))
        assert (together - torch.cat(alone)).abs().max().item() <= 1e-5
        # and the whole model still runs a mixed step through it
        seqs = [SeqRows(new, _cache_at(model, prefix), len(prefix), last) for prefix, new, last in WORK]
        assert all(torch.isfinite(lg).all() for lg in model.forward_batch(seqs))
    finally:
        backend.close()


def test_bad_batches_are_refused(dense_model) -> None:
    model = dense_model[0]
    cache = model.new_cache()
    with pytest.raises(ValueError, match="share one KV cache"):
        model.forward_batch([SeqRows([1], cache, 0), SeqRows([2], cache, 0)])
    with pytest.raises(ValueError, match="at least one token"):
        model.forward_batch([SeqRows([], cache, 0)])
