"""MLA's decode step in one kernel call (offload.kernels.MLADecode, csrc/attn.c) against the separate k_b / torch /
v_b calls it replaces, and the model's decoded logits with it on and off (K2LOCAL_MLA)."""
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
