"""k2local's forward pass equals transformers' DeepseekV3ForCausalLM on the same (dequantized) weights."""
from __future__ import annotations

import pytest
import torch

from k2local.weights.hf_checkpoint import SafetensorsSource
from k2local.model import KimiK2Model

pytest.importorskip("transformers")
from tests.hf_reference import hf_model  # noqa: E402

PROMPT = [5, 17, 300, 2, 99, 43, 700, 12, 1, 250, 251, 64]


@pytest.mark.parametrize("variant", ["kimi_k2", "deepseek_v3", "moonlight"])
def test_prompt_and_decode_match_transformers(tiny_factory, variant: str) -> None:
    src = SafetensorsSource(tiny_factory(variant))
    ours = KimiK2Model(src)
    full = ours.forward(PROMPT, ours.new_cache())
    with torch.no_grad():
        ref = hf_model(src)(torch.tensor([PROMPT])).logits[0].float()
    assert (full - ref).abs().max().item() <= 1e-4

    # Token-by-token decode with the compressed cache (absorbed attention) equals the full forward.
    cache = ours.new_cache()
    steps = [ours.forward(PROMPT[:4], cache)] + [ours.forward([t], cache) for t in PROMPT[4:]]
    assert (torch.cat(steps) - ref).abs().max().item() <= 1e-4
    assert (torch.cat(steps) - full).abs().max().item() <= 1e-4

    # A prompt chunk asking only for its last row (the last layer's FFN then runs for that row alone) gives that
    # row, and a cache the next tokens continue from unchanged.
    cache = ours.new_cache()
    last = ours.forward(PROMPT[:8], cache, last_only=True)
    assert last.shape[0] == 1 and (last[0] - ref[7]).abs().max().item() <= 1e-4
    assert (ours.forward(PROMPT[8:], cache) - ref[8:]).abs().max().item() <= 1e-4


def test_tiny_checkpoint_exercises_hard_cases(tiny_k2) -> None:
    src = SafetensorsSource(tiny_k2)
    cfg = src.config
    assert cfg.model_type == "kimi_k2" and cfg.is_fp8
    bias = src.get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.abs().min() > 0  # non-zero router bias
    w, scale = src.raw("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    assert w.dtype == torch.float8_e4m3fn and w.shape[0] % 128 != 0 and scale is not None
    assert scale.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
