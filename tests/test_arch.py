"""k2local.arch (the deepseek2 tensor schema as data) and k2local.weights.sanitize (the checkpoint quirks)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader, TensorNameMap
from gguf.constants import MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

from k2local import arch
from k2local.weights.hf_checkpoint import SafetensorsSource
from k2local.config import ModelConfig
from k2local.convert.to_gguf import plan_tensors
from k2local.tiny import VARIANTS
from k2local.weights import sanitize
from tests.test_quantize import f32_gguf, gguf_dir  # noqa: F401 (shared fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _configs() -> list[ModelConfig]:
    """Kimi K2's config and each tiny variant's (with and without q LoRA, shared experts, bias, tied head)."""
    out = [ModelConfig()]
    for v in VARIANTS.values():
        d = {k: x for k, x in v.items() if k != "fp8"}
        out.append(ModelConfig.from_dict({**d, "vocab_size": 1000}))
    out.append(ModelConfig.from_dict({**out[1].to_dict(), "tie_word_embeddings": True, "topk_method": "greedy",
                                      "n_shared_experts": 0}))
    return out


def test_every_key_is_one_gguf_knows_for_deepseek2() -> None:
    known = set(MODEL_TENSORS[arch.ARCH])
    assert arch.ARCH_NAME == "deepseek2"
    for d in arch.HF_TENSORS:
        assert d.key in known, d
    for g in arch.GGUF_TENSORS:
        assert g.key in known and g.source in arch.BY_KEY, g
    assert len({d.key for d in arch.HF_TENSORS}) == len(arch.HF_TENSORS)
    assert len({g.key for g in arch.GGUF_TENSORS}) == len(arch.GGUF_TENSORS)
    for cfg in _configs():
        for t in arch.gguf_tensors(cfg):
            key, layer, suffix = arch.parse_gguf_name(t.name)
            assert (key, layer) == (t.key, t.layer) and t.name == f"{TENSOR_NAMES[key].format(bid=layer)}.{suffix}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_checkpoint_matches_the_schema(tiny_factory, variant: str) -> None:
    src = SafetensorsSource(tiny_factory(variant))
    cfg = src.config
    stored = [n for n in src.names() if not n.endswith("rotary_emb.inv_freq")]
    tensors = arch.hf_tensors(cfg)
    assert sorted(stored) == sorted(t.name for t in tensors)
    for t in tensors:
        assert src.shape(t.name) == t.shape, t.name
    assert arch.expected_tensor_names(cfg) == [t.name for t in tensors]


def test_hf_and_gguf_names_round_trip() -> None:
    for cfg in _configs():
        for t in arch.hf_tensors(cfg):
            p = arch.parse_hf_name(t.name)
            assert p is not None and (p.tensor, p.layer, p.expert) == (t.tensor, t.layer, t.expert)
            assert arch.hf_name(p.key, p.layer, p.expert) == t.name
        plan = arch.gguf_tensors(cfg)
        by_name = {p.name: p for p in plan}
        assert len(by_name) == len(plan)
        for p in plan:
            assert arch.hf_for_gguf(p.name, cfg) == p.hf
            for hf in p.hf:
                assert p.name in arch.gguf_for_hf(hf), (p.name, hf)
        hf_names = set(arch.expected_tensor_names(cfg))
        assert {hf for p in plan for hf in p.hf} == hf_names  # every HF tensor lands in the GGUF, nothing else
        for name in hf_names:
            assert set(arch.gguf_for_hf(name)) <= set(by_name)
    assert arch.parse_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert arch.parse_hf_name("model.layers.0.self_attn.o_proj.weight_scale_inv") is None
    assert arch.parse_hf_name("model.layers.1.mlp.experts.2.3.up_proj.weight") is None
    assert arch.parse_gguf_name("blk.0.nonsense.weight") is None and arch.hf_for_gguf("x.weight", cfg) == ()
    assert arch.hf_for_gguf("blk.4.attn_kv_b.weight", cfg) == ("model.layers.4.self_attn.kv_b_proj.weight",)
    assert arch.expert_name(3, 7, "down") == "model.layers.3.mlp.experts.7.down_proj.weight"
    assert arch.router_names(2) == ("model.layers.2.mlp.gate.weight", "model.layers.2.mlp.gate.e_score_correction_bias")


def _llama_cpp_name(nmap: TensorNameMap, hf: str, build: str) -> str:
    """What llama.cpp's converter names the GGUF tensor made from HF tensor `hf` (its DeepseekV2 rules: routed
    experts stacked under mlp.experts.<proj>, kv_b_proj split into k_b_proj / v_b_proj, the router bias renamed)."""
    p = arch.parse_hf_name(hf)
    if build == "experts":
        hf = f"model.layers.{p.layer}.mlp.experts.{p.proj}_proj.weight"
    elif build in ("k_b", "v_b"):
        hf = hf.replace("kv_b_proj", f"{build}_proj")
    hf = hf.replace("e_score_correction_bias", "e_score_correction.bias")
    name = nmap.get_name(hf, try_suffixes=(".weight", ".bias"))
    assert name is not None, hf
    return name


def test_gguf_names_are_llama_cpp_converters() -> None:
    for cfg in _configs():
        nmap = TensorNameMap(arch.ARCH, cfg.num_hidden_layers)
        for p in arch.gguf_tensors(cfg):
            assert _llama_cpp_name(nmap, p.hf[0], p.build.value) == p.name


def test_our_gguf_holds_the_plan_in_order(f32_gguf, tiny_k2) -> None:
    cfg = SafetensorsSource(tiny_k2).config
    r = GGUFReader(f32_gguf)
    written = [(t.name, tuple(int(d) for d in reversed(list(t.shape)))) for t in r.tensors]
    assert written == [(p.name, p.shape) for p in arch.gguf_tensors(cfg)]
    assert [(p.name, p.shape, p.build, p.hf) for p in plan_tensors(cfg)] == \
        [(p.name, p.shape, p.build.value, p.hf) for p in arch.gguf_tensors(cfg)]
    nmap = TensorNameMap(arch.ARCH, cfg.num_hidden_layers)
    assert [n for n, _ in written] == [_llama_cpp_name(nmap, p.hf[0], p.build.value) for p in arch.gguf_tensors(cfg)]


def test_resident_tensors_are_everything_but_routed_experts() -> None:
    for cfg in _configs():
        res = arch.resident_tensors(cfg)
        assert all(t.role is not arch.Role.ROUTED_EXPERT for t in res)
        routed = [t for t in arch.hf_tensors(cfg) if t.role is arch.Role.ROUTED_EXPERT]
        assert len(res) + len(routed) == len(arch.hf_tensors(cfg))
        moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        assert sum(t.numel for t in routed) == len(moe) * cfg.n_routed_experts * 3 * cfg.hidden_size \
            * cfg.moe_intermediate_size
        by_role = {r: sum(t.numel for t in res if t.role is r) for r in arch.Role}
        assert by_role[arch.Role.SHARED_EXPERT] == len(moe) * 3 * cfg.hidden_size * cfg.moe_intermediate_size \
            * cfg.n_shared_experts
        assert by_role[arch.Role.EMBEDDING] == cfg.vocab_size * cfg.hidden_size
        assert by_role[arch.Role.HEAD] == (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    k2 = ModelConfig()
    res = arch.resident_tensors(k2)
    # embed, norm, head; per layer 5 attention matrices and 4 norms, then 3 dense FFN (layer 0) or router, its bias
    # and 3 shared-expert matrices (layers 1-60)
    assert len(res) == 3 + 12 + 60 * 14
    per_layer = {}
    for t in res:
        if t.layer is not None:
            per_layer.setdefault(t.layer, []).append(t.key)
    assert MODEL_TENSOR.FFN_GATE in per_layer[0] and MODEL_TENSOR.FFN_GATE_INP not in per_layer[0]
    assert MODEL_TENSOR.FFN_GATE_INP in per_layer[1] and MODEL_TENSOR.FFN_UP_SHEXP in per_layer[60]


def test_kv_b_split_merge_and_absorbed_form() -> None:
    heads, nope, v, kvr = 3, 5, 4, 7
    kv_b = torch.randn(heads * (nope + v), kvr)
    k_b, v_b = sanitize.split_kv_b(kv_b, heads, nope)
    assert k_b.shape == (heads, kvr, nope) and v_b.shape == (heads, v, kvr)
    assert torch.equal(sanitize.merge_kv_b(k_b, v_b), kv_b)
    w_uk, w_uv = sanitize.absorbed_kv_b(kv_b, heads, nope)
    assert torch.equal(w_uk, k_b.transpose(1, 2)) and torch.equal(w_uv, v_b)
    assert torch.equal(w_uk[1, 2], kv_b[1 * (nope + v) + 2])


def test_expert_stacking() -> None:
    assert list(sanitize.stacked_experts(4, 10)) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert list(sanitize.stacked_experts(4, 10, 23)) == [(2, 3), (3, 0)]

    class T:
        def __init__(self, *shape: int):
            self.shape = shape

    sep = {arch.gguf_name(MODEL_TENSOR.FFN_UP_EXP, 2): T(8, 6, 16)}
    assert sanitize.find_stacked_experts(sep, 2, "up") == (sep["blk.2.ffn_up_exps.weight"], 0, 6)
    assert sanitize.find_stacked_experts(sep, 2, "gate") is None and sanitize.find_stacked_experts(sep, 1, "up") is None
    if arch.FUSED_GATE_UP_EXP is not None:
        fused = {"blk.2.ffn_gate_up_exps.weight": T(8, 12, 16)}
        t = fused["blk.2.ffn_gate_up_exps.weight"]
        assert sanitize.find_stacked_experts(fused, 2, "gate") == (t, 0, 6)
        assert sanitize.find_stacked_experts(fused, 2, "up") == (t, 6, 6)
        assert sanitize.find_stacked_experts(fused, 2, "down") is None


def test_fp8_quirks() -> None:
    assert sanitize.scale_name("a.weight") == "a.weight_scale_inv" and sanitize.is_scale_name("a.weight_scale_inv")
    assert sanitize.fp8_block(None) == (128, 128) and sanitize.fp8_block({"weight_block_size": [64, 32]}) == (64, 32)
    assert sanitize.fp8_row_window(130, 300, 128, 3) == (128, 1, 3)
    w = torch.randn(200, 300)
    st = sanitize.stored_as_checkpoint("model.layers.0.self_attn.o_proj.weight", w, fp8=True)
    q, s = st["model.layers.0.self_attn.o_proj.weight"], st["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    assert sanitize.needs_scale(q) and not sanitize.needs_scale(s)
    d = sanitize.dequantize(q, s, (128, 128), torch.float32)
    assert (d - w).abs().max() < 0.1 * w.abs().max()
    head = sanitize.stored_as_checkpoint("lm_head.weight", w, fp8=True)
    assert list(head) == ["lm_head.weight"] and head["lm_head.weight"].dtype == torch.bfloat16
    bias = sanitize.stored_as_checkpoint("model.layers.1.mlp.gate.e_score_correction_bias", w[0], fp8=True)
    assert bias["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_int4_slot() -> None:
    assert sanitize.is_int4({"quant_method": "compressed-tensors", "format": "pack-quantized"})
    assert not sanitize.is_int4({"quant_method": "fp8"}) and not sanitize.is_int4(None)
    # the slot is filled (tests/test_int4.py covers it): a group size other than Q4_0's 32 is refused
    with pytest.raises(ValueError, match="group size"):
        sanitize.repack_int4(torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1), (1, 8), 8)


@pytest.mark.parametrize("module", ["k2local.weights.gguf_checkpoint", "k2local.weights.hf_checkpoint", "k2local.arch",
                                    "k2local.weights.sanitize"])
def test_no_checkpoint_gguf_source_circle(module: str) -> None:
    """gguf_source and the schema import nothing that imports them back (checkpoint imports gguf_source)."""
    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(' '.join(m for m in ('k2local.weights.hf_checkpoint', 'k2local.weights.gguf_checkpoint') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = set(out.stdout.split())
    if module != "k2local.weights.hf_checkpoint":
        assert "k2local.weights.hf_checkpoint" not in loaded, module
    if module in ("k2local.arch", "k2local.weights.sanitize"):
        assert "k2local.weights.gguf_checkpoint" not in loaded, module
