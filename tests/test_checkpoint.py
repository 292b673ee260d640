"""Checkpoint loading: config parsing, FP8 block dequantization, and clear errors for bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from k2local.weights.hf_checkpoint import SafetensorsSource, open_checkpoint
from k2local.config import ModelConfig
from k2local.errors import CheckpointError
from quant.fp8 import dequantize_fp8_block, quantize_fp8_block

KIMI_K2_CONFIG = {  # Kimi-K2-Instruct config.json (FACTS.md §1.1), the fields that matter
    "model_type": "kimi_k2", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 384,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827,
    "first_k_dense_replace": 1, "rope_theta": 50000.0, "max_position_embeddings": 131072, "vocab_size": 163840,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "auto_map": {"AutoConfig": "x"},
}


def test_kimi_k2_config_derived_values() -> None:
    cfg = ModelConfig.from_dict(KIMI_K2_CONFIG)
    assert cfg.is_fp8 and not cfg.is_moe_layer(0) and cfg.is_moe_layer(1) and cfg.is_moe_layer(60)
    assert cfg.softmax_scale == pytest.approx(0.130861, abs=1e-6)  # FACTS §7.2
    inv, mscale = cfg.rope_inv_freq()
    base = 50000.0 ** (-torch.arange(0, 64, 2).float() / 64)
    assert mscale == 1.0
    assert torch.allclose(inv[:20], base[:20]) and torch.allclose(inv[20:], base[20:] / 32)  # low 19, high 20
    cfg0905 = ModelConfig.from_dict({**KIMI_K2_CONFIG, "rope_scaling": {**KIMI_K2_CONFIG["rope_scaling"],
                                                                        "factor": 64.0}})
    assert cfg0905.softmax_scale == pytest.approx(0.144680, abs=1e-6)
    assert cfg.extra["auto_map"] == {"AutoConfig": "x"}


def test_k25_nested_text_config() -> None:
    cfg = ModelConfig.from_dict({"model_type": "kimi_k25", "text_config": KIMI_K2_CONFIG})
    assert cfg.n_routed_experts == 384


@pytest.mark.parametrize("shape", [(576, 7168 // 8), (200, 300), (128, 256), (1, 5)])
def test_fp8_block_roundtrip_partial_blocks(shape: tuple[int, int]) -> None:
    w = torch.randn(*shape) * torch.linspace(0.1, 3, shape[1])
    q, s = quantize_fp8_block(w)
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    d = dequantize_fp8_block(q, s)
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 of each block's scale
    assert ((d - w).abs() <= (s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
                              * 448 / 16 + 1e-6)).all()
    # explicit rule: W[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128]
    i, j = shape[0] - 1, shape[1] - 1
    assert d[i, j] == q[i, j].float() * s[i // 128, j // 128]


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_shard(tiny_k2: Path, tmp_path: Path) -> None:
    d = _copy(tiny_k2, tmp_path)
    (d / "model-2-of-3.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-2-of-3\.safetensors.*missing"):
        SafetensorsSource(d)


def test_truncated_shard(tiny_k2: Path, tmp_path: Path) -> None:
    d = _copy(tiny_k2, tmp_path)
    f = d / "model-3-of-3.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model-3-of-3\.safetensors.*truncated"):
        SafetensorsSource(d)


def test_missing_tensor(tiny_k2: Path, tmp_path: Path) -> None:
    d = _copy(tiny_k2, tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["model.layers.2.mlp.experts.3.up_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*experts\.3\.up_proj"):
        SafetensorsSource(d)


@pytest.mark.parametrize("change,pattern", [
    ({"model_type": "llama"}, r"config\.json.*unsupported model_type 'llama'"),
    ({"scoring_func": "tanh"}, r"config\.json.*scoring_func"),
])
def test_bad_config(tiny_k2: Path, tmp_path: Path, change: dict, pattern: str) -> None:
    d = _copy(tiny_k2, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=pattern):
        open_checkpoint(d)


def test_config_not_json_and_missing_paths(tiny_k2: Path, tmp_path: Path) -> None:
    d = _copy(tiny_k2, tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        open_checkpoint(d)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({**KIMI_K2_CONFIG}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(empty)


def test_missing_scale_inv(tiny_k2: Path, tmp_path: Path) -> None:
    d = _copy(tiny_k2, tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    src = SafetensorsSource(d)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight has no .*_scale_inv"):
        src.get("model.layers.0.self_attn.o_proj.weight")


def test_bf16_checkpoint_loads(tiny_factory) -> None:
    src = SafetensorsSource(tiny_factory("moonlight"))
    assert not src.config.is_fp8 and src.config.q_lora_rank is None
    w, s = src.raw("model.layers.0.self_attn.q_proj.weight")
    assert w.dtype == torch.bfloat16 and s is None


def test_make_tiny_overrides(tmp_path: Path) -> None:
    from k2local.tiny import make_tiny

    src = SafetensorsSource(make_tiny(tmp_path / "big", "moonlight", overrides={"n_routed_experts": 8}))
    assert src.config.n_routed_experts == 8 and src.config.q_lora_rank is None
    assert src.shape("model.layers.1.mlp.experts.7.up_proj.weight") == (256, 512)
