"""Non-expert linear weights kept in GGUF block format and multiplied by the CPU kernels."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2local.weights.hf_checkpoint import open_checkpoint
from k2local.linear import QuantWeight, quantized_weight
from k2local.model import KimiK2Model

kernels = pytest.importorskip("offload.kernels")
convert = pytest.importorskip("k2local.convert.to_gguf").convert


@pytest.fixture(scope="module")
def q8_gguf(tiny_k2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qlin") / "tiny-q8.gguf"
    convert(tiny_k2, out, "q8")
    return out


def test_quant_weight_matches_dequantized_matmul(q8_gguf: Path) -> None:
    src = open_checkpoint(q8_gguf)
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"):
        q = quantized_weight(src, name, min_params=0)
        assert isinstance(q, QuantWeight)
        w = src.get(name)
        x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
        ref = torch.nn.functional.linear(x, w)
        # activations are quantized to 8-bit blocks (as llama.cpp does): ~0.5% of the output range
        assert (q(x) - ref).abs().max() <= 0.01 * ref.abs().max()
        assert q.nbytes < w.numel() * 4 / 3  # Q8_0 bytes, not a float copy
    # kv_b is stored split (attn_k_b/attn_v_b) and is merged on load: no quantized path for it
    assert quantized_weight(src, "model.layers.0.self_attn.kv_b_proj.weight", min_params=0) is None


def test_model_on_quantized_weights_tracks_dense(q8_gguf: Path) -> None:
    src = open_checkpoint(q8_gguf)
    dense = KimiK2Model(src, quantized_linear=False)
    quant = KimiK2Model(src, quantized_linear=True)
    assert isinstance(quant.layers[0].o_proj, QuantWeight) and isinstance(dense.layers[0].o_proj, torch.Tensor)
    ids = list(range(3, 40))
    a = dense.forward(ids, dense.new_cache())
    b = quant.forward(ids, quant.new_cache())
    # a random 4-layer model amplifies the 8-bit activation rounding; the top token must still mostly agree
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75
    # the default (auto) keeps matrices quantized on the CPU, except tiny ones (norm-sized) where a call costs more
    auto = KimiK2Model(src)
    assert isinstance(auto.layers[0].o_proj, QuantWeight)


def test_decode_reads_absorbed_kv_b_quantized(tmp_path: Path, q8_gguf: Path) -> None:
    """On the CPU, decoding multiplies MLA's per-head k_b / v_b in their stored Q8_0 blocks (QHeads), prefill
    keeps the dense form; decoded logits track the all-dense path like the other quantized matmuls."""
    from k2local.tiny import make_tiny

    # the default tiny model's 48 no-rope dims are no whole Q8_0 block, so its k_b is stored F16 (dense path)
    assert open_checkpoint(q8_gguf).quantized_kv_b(0)[0][1] == 1
    assert KimiK2Model(open_checkpoint(q8_gguf)).layers[0].uk_q is None
    gguf = tmp_path / "nope64-q8.gguf"
    convert(make_tiny(tmp_path / "hf", overrides={"qk_nope_head_dim": 64}), gguf, "q8")
    src = open_checkpoint(gguf)
    quant = KimiK2Model(src, quantized_linear=True)
    lw = quant.layers[0]
    cfg = src.config
    assert isinstance(lw.uk_q, kernels.QHeads) and isinstance(lw.uv_q, kernels.QHeads)
    assert (lw.uk_q.rows, lw.uk_q.cols) == (cfg.kv_lora_rank, cfg.qk_nope_head_dim)
    assert (lw.uv_q.rows, lw.uv_q.cols) == (cfg.v_head_dim, cfg.kv_lora_rank)
    # the stored blocks are exactly the dense matrices the prefill path uses
    assert torch.allclose(lw.uk_q.dequantize().transpose(1, 2), lw.w_uk, atol=1e-6)
    assert torch.allclose(lw.uv_q.dequantize(), lw.w_uv, atol=1e-6)
    ids = list(range(3, 20))
    seen: list[torch.Tensor] = []
    attention = quant._attention

    def first_layer_attention(i, *args):  # layer 0 sees the same input on both paths: compare its output there
        out = attention(i, *args)
        if i == 0:
            seen.append(out)
        return out

    quant._attention = first_layer_attention  # type: ignore[method-assign]

    def decode(model: KimiK2Model) -> torch.Tensor:
        seen.clear()
        cache = model.new_cache()
        model.forward(ids[:-4], cache)
        logits = torch.cat([model.forward([t], cache) for t in ids[-4:]])
        return torch.cat(seen[1:]), logits  # the four decode steps

    got, got_logits = decode(quant)
    for layer in quant.layers:
        layer.uk_q = layer.uv_q = None
    ref, ref_logits = decode(quant)
    assert (got[0] - ref[0]).norm() <= 0.02 * ref[0].norm()  # int8 activations, as llama.cpp: ~0.5% here
    # a random 4-layer model amplifies that rounding (as for every quantized matmul): the top tokens agree
    assert (got_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() >= 0.75
    assert KimiK2Model(src, quantized_linear=False).layers[0].uk_q is None


def test_gpu_mode_dequantizes_per_use(q8_gguf: Path) -> None:
    """The GPU form keeps the bytes as a torch tensor and dequantizes before each matmul (exact vs dense)."""
    src = open_checkpoint(q8_gguf)
    name = "model.layers.0.self_attn.o_proj.weight"
    q = quantized_weight(src, name, min_params=0)
    assert q is not None
    q.data = torch.from_numpy(q.data)  # what a CUDA device holds, here on the CPU
    w = src.get(name)
    x = torch.randn(2, w.shape[1])
    assert torch.allclose(q(x), torch.nn.functional.linear(x, w), atol=1e-5)


def test_planner_counts_quantized_weights(q8_gguf: Path) -> None:
    from k2local.engine import LoadOptions
    from k2local.placement import make_plan

    src = open_checkpoint(q8_gguf)
    dense = make_plan(src, LoadOptions(cpu_only=True, quantized_weights=False), torch.device("cpu"), torch.float32)
    quant = make_plan(src, LoadOptions(cpu_only=True, quantized_weights=True), torch.device("cpu"), torch.float32)
    assert dense.resident_parts["attention"] > 3 * quant.resident_parts["attention"]  # fp32 vs Q8_0 (8.5 bits)
