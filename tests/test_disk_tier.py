"""The disk tier: same tokens as the RAM tier under a skewed router, a cache that hits at least its share under
uniform routing, prefetches that never displace cached or in-use experts, pre-warm from saved routing
statistics, the raw O_DIRECT probe, and the Zipf router bias of the synthetic models."""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from k2local.placement import build_backend, layout_for
from k2local.tiny import make_tiny, skew_gguf_routers, zipf_router_bias
from k2local.weights.hf_checkpoint import open_checkpoint
from offload import kernels
from offload.cache import FrequencyPolicy
from offload.probe import measure_raw_disk
from offload.routing_stats import RoutingStats
from offload.store import ExpertStore
from tests.test_offload import _one_torch_thread, assert_same_run, greedy_run, opts  # noqa: F401 (autouse fixture)

GiB = 1 << 30


@pytest.fixture(scope="module")
def skewed(tmp_path_factory) -> Path:
    """A tiny Kimi K2 checkpoint whose routers are Zipf-skewed (s = 1)."""
    return make_tiny(tmp_path_factory.mktemp("skewed"), "kimi_k2", route_skew=1.0)


@pytest.fixture(scope="module")
def skewed_gguf(skewed, tmp_path_factory) -> Path:
    convert = pytest.importorskip("k2local.convert.to_gguf").convert
    out = tmp_path_factory.mktemp("skewed-gguf") / "skewed-q8.gguf"
    convert(skewed, out, "q8")
    return out


def _run(src, o, n: int = 8):
    b = build_backend(src, o, torch.device("cpu"), torch.float32)
    try:
        return greedy_run(src, b, n=n), b.stats(), b.routing
    finally:
        b.close()


def test_disk_tier_matches_ram_tier_under_skewed_router(skewed_gguf, tmp_path) -> None:
    src = open_checkpoint(skewed_gguf)
    total = layout_for(src).total_bytes
    stats = str(tmp_path / "none.json")
    (fast_toks, fast_lg), _, _ = _run(src, opts(experts_on="ram", extra={"routing_stats": stats}))
    kernels.set_repack(False)  # gguf's layout in RAM as on disk: the same kernel calls on the same bytes
    try:
        (ram_toks, ram_lg), _, routing = _run(src, opts(experts_on="ram", extra={"routing_stats": stats}))
        (disk_toks, disk_lg), st, _ = _run(src, opts(experts_on="disk", ram=total / 3 / GiB,
                                                     extra={"routing_stats": stats, "io_threads": 3}))
    finally:
        kernels.set_repack(None)
    assert st["tiers"]["disk"]["misses"] > 0 and st["tiers"]["disk"]["prefetch_issued"] > 0
    assert disk_toks == ram_toks and torch.equal(disk_lg, ram_lg)
    assert_same_run(fast_toks, fast_lg, disk_toks, disk_lg)  # the RAM tier's interleaved experts: the same tokens
    # the bias really skews routing: a quarter of the experts take well over a quarter of the uses
    layer = layout_for(src).moe_layers[0]
    assert routing.top_coverage(layer, 4) > 0.4


def test_skewed_safetensors_disk_matches_ram(skewed, tmp_path) -> None:
    src = open_checkpoint(skewed)
    total = layout_for(src).total_bytes
    stats = str(tmp_path / "none.json")
    (ram_toks, ram_lg), _, _ = _run(src, opts(experts_on="ram", extra={"routing_stats": stats}), n=4)
    (disk_toks, disk_lg), _, _ = _run(src, opts(experts_on="disk", ram=total / 3 / GiB,
                                                extra={"routing_stats": stats}), n=4)
    assert disk_toks == ram_toks and torch.equal(disk_lg, ram_lg)  # safetensors: no interleaved layout


def test_gguf_router_skew_patch(tmp_path, skewed_gguf) -> None:
    out = skew_gguf_routers(skewed_gguf, tmp_path / "s2.gguf", 2.0)
    src = open_checkpoint(out)
    layer = layout_for(src).moe_layers[0]
    b = src.get(f"model.layers.{layer}.mlp.gate.e_score_correction_bias", torch.float32)
    assert torch.equal(b, zipf_router_bias(b.numel(), 2.0, layer))
    assert torch.equal(zipf_router_bias(16, 1.0, 3), zipf_router_bias(16, 1.0, 3))  # fixed seed
    assert sorted(zipf_router_bias(16, 0.0, 3).tolist()) == [0.0] * 16


# ---------------------------------------------------------------------------------------------- cache behaviour
def _layer_step(store: ExpertStore, keys: list) -> None:
    """What the executor does for one layer: lease the resident ones, then the misses; release all."""
    store.protect(keys)
    leases = store.pin_resident(keys)
    got = {lease.key for lease in leases}
    futs = [store.lease(k, counted=True) for k in keys if k not in got]
    leases += [f.result() for f in futs]
    for lease in leases:
        lease.release()
    store.protect(())


def _trace(store: ExpertStore, layers: list[int], n_experts: int, k: int, steps: int, rng: random.Random,
           weights: list[float] | None = None) -> None:
    for _ in range(steps):
        for layer in layers:
            if weights is None:
                picks = rng.sample(range(n_experts), k)
            else:
                picks = []
                while len(picks) < k:
                    e = rng.choices(range(n_experts), weights)[0]
                    if e not in picks:
                        picks.append(e)
            _layer_step(store, [(layer, e) for e in picks])


def test_hit_rate_at_least_share_under_uniform_routing(skewed) -> None:
    layout = layout_for(open_checkpoint(skewed))
    n = len(layout.keys())
    cache = n // 4
    store = ExpertStore(layout, n_slots=cache, staging=6, io_threads=1, policy=FrequencyPolicy())
    try:
        rng = random.Random(7)
        _trace(store, layout.moe_layers, layout.n_experts, 4, 30, rng)  # warm-up
        store.counters.reset()
        _trace(store, layout.moe_layers, layout.n_experts, 4, 300, rng)
        assert store.counters.hit_rate >= cache / n
        assert len(store.cached_keys()) == cache
    finally:
        store.close()


def test_prefetch_never_displaces_cached_or_in_use_experts(skewed) -> None:
    layout = layout_for(open_checkpoint(skewed))
    layer = layout.moe_layers[0]
    store = ExpertStore(layout, n_slots=4, staging=3, io_threads=2)
    try:
        for e in range(4):
            store.lease((layer, e)).result().release()
        cached = set(store.cached_keys())
        assert len(cached) == 4
        held = store.lease((layer, 4)).result()  # in use (staged: the cache is full of hotter experts)
        store.protect([(layer, 4), (layer, 5)])
        store.lease((layer, 5)).result().release()
        others = [(lay, e) for lay in layout.moe_layers[1:] for e in range(layout.n_experts)]
        store.prefetch(others)
        for _ in range(50):  # let queued prefetches run
            if not store._loading:
                break
            time.sleep(0.02)
        assert set(store.cached_keys()) == cached
        assert store.is_resident((layer, 4)) and store.is_resident((layer, 5))
        assert store.counters.prefetch_issued > 0
        assert len(store.resident_keys()) <= store.n_slots
        held.release()
    finally:
        store.close()


def test_routing_stats_prewarm_and_skewed_hit_rate(skewed, tmp_path) -> None:
    src = open_checkpoint(skewed)
    layout = layout_for(src)
    cfg = src.config
    rng = np.random.default_rng(3)
    weights = [1.0 / (r + 1) for r in range(layout.n_experts)]
    stats = RoutingStats(cfg.num_hidden_layers, layout.n_experts)
    for layer in layout.moe_layers:
        for _ in range(200):
            stats.record(layer, torch.tensor(rng.choice(layout.n_experts, 4, replace=False,
                                                        p=np.array(weights) / sum(weights))).view(1, -1))
    path = tmp_path / "stats.json"
    stats.save(path)
    total = layout.total_bytes
    b = build_backend(src, opts(experts_on="disk", ram=total / 3 / GiB, extra={"routing_stats": str(path)}),
                      torch.device("cpu"), torch.float32)
    try:
        cached = set(b.store.cached_keys())
        want = set(stats.hot(b.store.cache_slots, layout.moe_layers))
        assert cached == want and b.store.counters.requests == 0  # filled before any request
    finally:
        b.close()

    def hit_rate(prior: RoutingStats | None) -> float:
        pol = FrequencyPolicy(prior=prior.as_prior(layout.moe_layers) if prior else None)
        store = ExpertStore(layout, n_slots=len(layout.keys()) // 4, staging=6, io_threads=1, policy=pol)
        try:
            if prior is not None:
                store.preload(prior.hot(store.cache_slots, layout.moe_layers))
            _trace(store, layout.moe_layers, layout.n_experts, 4, 15, random.Random(11), weights)
            return store.counters.hit_rate
        finally:
            store.close()
    cold, warm = hit_rate(None), hit_rate(stats)
    assert warm > cold and warm > 0.4


def test_raw_disk_probe_reads_direct(skewed_gguf) -> None:
    layout = layout_for(open_checkpoint(skewed_gguf))
    raw = measure_raw_disk(layout, in_flight=4, max_bytes=8 << 20, max_s=0.5)
    assert raw is not None and raw.parallel > 0 and raw.one_stream > 0 and raw.in_flight in (2, 4)
    assert [d for d, _ in raw.by_depth] == [1, 2, 4]  # every depth measured; parallel is the best above one
    assert raw.parallel == max(g for d, g in raw.by_depth if d > 1) and raw.best >= raw.parallel
    assert raw.read_bytes % 4096 == 0
