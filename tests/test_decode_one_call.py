"""One-token decode paths in one kernel call: MLA (offload.kernels.MLADecode, csrc/attn.c) against the separate
k_b / torch / v_b calls it replaces, the model's decoded logits with it on and off (K2LOCAL_MLA), and a layer's
experts bound once (offload.kernels.MoELayer) against moe_experts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from offload import kernels as K
from quant.random_blocks import random_blocks

needs_c = pytest.mark.skipif(not K.available(), reason=f"compiled kernels unavailable: {K.load_error()}")


def _layer(heads: int, nope: int, latent: int, v: int, seed: int = 0) -> K.MLADecode:
    rng = np.random.default_rng(seed)
    k_b = K.QHeads(random_blocks(Q.Q8_0, heads * latent, nope, rng), int(Q.Q8_0), heads, nope)
    v_b = K.QHeads(random_blocks(Q.Q8_0, heads * v, latent, rng), int(Q.Q8_0), heads, latent)
    return K.MLADecode(k_b, v_b)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@needs_c
@pytest.mark.parametrize("heads,s", [(4, 1), (5, 3), (8, 17), (6, 130), (16, 1000)])
def test_matches_separate_calls(heads, s, monkeypatch):
    """Every ISA the CPU runs and 1-3 threads: the same output as k_b, torch's softmax attention and v_b called
    one by one, for caches shorter than a thread's key block, odd head counts and keys split over threads."""
    mla = _layer(heads, 128, 512, 128, seed=heads + s)
    g = torch.Generator().manual_seed(s)
    q = torch.randn(heads, 192, generator=g)
    q_nope, q_pe = q[:, :128], torch.randn(heads, 64, generator=g)  # q_nope's rows 192 apart, as in the model
    lat, kpe = torch.randn(s, 512, generator=g), torch.randn(s, 64, generator=g)
    ref = mla.reference(q_nope, q_pe, lat, kpe, 0.06)
    before = K.get_threads()
    try:
        for isa in ("generic", "avx2", "best"):
            K.set_isa(isa)
            for n in (1, 2, 3):
                K.set_threads(n)
                out = mla(q_nope, q_pe, lat, kpe, 0.06)
                assert out.shape == (heads, 128)
                # float sums in another order can move one int8 rounding step of v_b's quantized input
                assert _rel(out, ref) < 1e-3, (isa, n)
    finally:
        K.set_threads(before)
        K.set_isa("best")
    monkeypatch.setenv("K2LOCAL_MLA", "0")
    assert not mla.fused()
    assert torch.equal(mla(q_nope, q_pe, lat, kpe, 0.06), ref)


@needs_c
def test_shape_errors():
    mla = _layer(4, 128, 512, 128)
    q, pe, lat, kpe = torch.randn(4, 128), torch.randn(4, 64), torch.randn(9, 512), torch.randn(9, 64)
    with pytest.raises(ValueError, match="MLADecode"):
        mla(q[:3], pe[:3], lat, kpe, 0.1)
    with pytest.raises(ValueError, match="MLADecode"):
        mla(q, pe, lat[:, :256], kpe, 0.1)
    with pytest.raises(ValueError, match="not one MLA layer"):
        K.MLADecode(mla.k_b, K.QHeads(mla.v_b.w, int(Q.Q8_0), 4, 256))


@needs_c
def test_model_decode_same_with_and_without(tmp_path, monkeypatch):
    """A tiny K2-layout GGUF decoded with the one-call attention and with the separate calls: the same greedy
    tokens and logits within float summation order."""
    from k2local.convert.to_gguf import convert  # noqa: PLC0415
    from k2local.model import KimiK2Model  # noqa: PLC0415
    from k2local.tiny import make_tiny  # noqa: PLC0415
    from k2local.weights.hf_checkpoint import open_checkpoint  # noqa: PLC0415

    gguf = tmp_path / "nope64-q8.gguf"  # 64 no-rope dims: whole Q8_0 blocks, so k_b / v_b stay quantized
    convert(make_tiny(tmp_path / "hf", overrides={"qk_nope_head_dim": 64}), gguf, "q8")
    model = KimiK2Model(open_checkpoint(gguf), quantized_linear=True)
    assert all(isinstance(lw.mla, K.MLADecode) for lw in model.layers)

    def run() -> list[torch.Tensor]:
        cache = model.new_cache()
        out = [model.forward(list(range(3, 12)), cache, last_only=True)[-1]]
        for _ in range(4):
            out.append(model.forward([int(out[-1].argmax())], cache)[-1])
        return out

    monkeypatch.setenv("K2LOCAL_MLA", "1")
    fused = run()
    monkeypatch.setenv("K2LOCAL_MLA", "0")
    split = run()
    for a, b in zip(fused, split):
        assert int(a.argmax()) == int(b.argmax())
        assert _rel(a, b) < 1e-4


@needs_c
def test_bound_layer_rows_equal_moe_experts():
    """kernels.MoELayer (the RAM tier's one-token path) gives the very rows moe_experts gives for the same experts
    in the general path's call (one row per routed slot, unweighted), whichever order the experts were bound in."""
    rng = np.random.default_rng(3)
    hidden, inter, n = 256, 64, 6
    experts = [(random_blocks(Q.Q4_K, inter, hidden, rng), random_blocks(Q.Q4_K, inter, hidden, rng),
                random_blocks(Q.Q8_0, hidden, inter, rng)) for _ in range(n)]
    qt = (int(Q.Q4_K), int(Q.Q4_K), int(Q.Q8_0))
    layer = K.MoELayer(experts, qt, hidden)
    x = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    ids = np.array([4, 1, 5], dtype=np.int32)
    got = layer.rows(x, ids, torch.zeros(3, hidden))
    order = [5, 4, 1]  # the general path binds only the routed experts, in its own order
    lut = np.array([order.index(int(e)) for e in ids], dtype=np.int32).reshape(-1, 1)
    ref = K.moe_experts(x.expand(3, hidden), [experts[e] for e in order], qt, lut, np.ones((3, 1), np.float32))
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="in range"):
        layer.rows(x, np.array([6], dtype=np.int32), torch.zeros(1, hidden))
