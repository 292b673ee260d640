"""GGUFSource: a GGUF (ours or llama.cpp's, single or split) read as a WeightSource with canonical HF names."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from k2local.arch import expected_tensor_names
from k2local.weights.hf_checkpoint import open_checkpoint
from k2local.convert.to_gguf import plan_tensors
from k2local.errors import CheckpointError
from k2local.weights.gguf_checkpoint import GGUFSource
from quant.gguf_file import GGUFStreamWriter, TensorSpec, quantize_rows, strv
from tests.test_quantize import f32_gguf, gguf_dir, q8_gguf  # noqa: F401 (shared fixtures; gguf_dir is theirs)


def test_config_rebuilt_from_metadata(f32_gguf, tiny_k2) -> None:
    got, want = open_checkpoint(f32_gguf).config, open_checkpoint(tiny_k2).config
    assert got.model_type == "kimi_k2"
    for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
              "topk_method", "norm_topk_prob", "scoring_func", "first_k_dense_replace", "rope_theta",
              "max_position_embeddings", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        assert getattr(got, f) == getattr(want, f), f
    assert got.routed_scaling_factor == pytest.approx(want.routed_scaling_factor, rel=1e-6)
    assert got.softmax_scale == pytest.approx(want.softmax_scale, rel=1e-6)
    inv_g, m_g = got.rope_inv_freq()
    inv_w, m_w = want.rope_inv_freq()
    assert torch.allclose(inv_g, inv_w) and m_g == pytest.approx(m_w)


def test_every_tensor_round_trips_exactly_at_f32(f32_gguf, tiny_k2) -> None:
    g, h = open_checkpoint(f32_gguf), open_checkpoint(tiny_k2)
    assert isinstance(g, GGUFSource)
    for name in expected_tensor_names(h.config):
        assert g.has(name), name
        assert torch.equal(g.get(name), h.get(name)), name  # kv_b re-merged, experts unstacked: bit-exact
    assert not g.has("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert not g.has("model.layers.1.mlp.experts.99.up_proj.weight")
    with pytest.raises(CheckpointError, match="not in checkpoint"):
        g.get("model.layers.0.nonsense.weight")


def test_q8_dequantizes_close_and_expert_bytes_are_zero_copy(q8_gguf, tiny_k2) -> None:
    g, h = open_checkpoint(q8_gguf), open_checkpoint(tiny_k2)
    cfg = g.config
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    w, ref = g.get(name), h.get(name)
    assert (w - ref).norm() / ref.norm() < 0.01
    assert g.get(name, torch.bfloat16).dtype == torch.bfloat16
    data, qtype, rows, cols = g.expert_tensor(2, "down")
    assert (rows, cols) == (cfg.hidden_size, cfg.moe_intermediate_size) and qtype == 8  # Q8_0
    assert data.shape == (cfg.n_routed_experts, rows, 34 * cols // 32) and data.dtype == np.uint8
    assert isinstance(data, np.memmap) and not data.flags.writeable
    assert np.array_equal(data[5], quantize_rows(ref.numpy(), "Q8_0"))
    assert g.nbytes(name) == data[5].nbytes
    assert g.shape("model.layers.1.self_attn.kv_b_proj.weight") == tuple(h.get(
        "model.layers.1.self_attn.kv_b_proj.weight").shape)
    rows_ = g.get_rows("model.embed_tokens.weight", 10, 20)
    assert torch.equal(rows_, g.get("model.embed_tokens.weight")[10:20])


def test_tokenizer_and_template_from_metadata(f32_gguf, tiny_k2) -> None:
    from k2local.chat.template import ChatTemplate
    from k2local.tokenizer.tiktoken_bpe import Tokenizer

    tok, tmpl = open_checkpoint(f32_gguf).tokenizer_and_template()
    ref_tok, ref_tmpl = Tokenizer.from_dir(tiny_k2), ChatTemplate.from_dir(tiny_k2)
    text = "Hello, world! 你好，世界！<|im_end|> 12345 678\n  code()"
    assert tok.encode(text) == ref_tok.encode(text)
    assert tok.encode(text, allow_special=False) == ref_tok.encode(text, allow_special=False)
    assert tok.vocab_size == ref_tok.vocab_size and tok.stop_ids == ref_tok.stop_ids
    assert tok.bos_id == ref_tok.bos_id and tok.eos_id == ref_tok.eos_id
    msgs = [{"role": "user", "content": "hi"}]
    assert tmpl.render(msgs, add_generation_prompt=True) == ref_tmpl.render(msgs, add_generation_prompt=True)


def test_engine_generates_from_gguf(q8_gguf) -> None:
    from k2local.engine import Engine, LoadOptions

    eng = Engine.load(q8_gguf, LoadOptions(device="cpu"))
    ids = eng.chat_ids([{"role": "user", "content": "hello"}])
    logits = eng.model.forward(ids, eng.model.new_cache())
    assert logits.shape == (len(ids), eng.source.config.vocab_size) and torch.isfinite(logits).all()


def test_legacy_attn_kv_b_and_directory_input(f32_gguf, tiny_k2, tmp_path) -> None:
    """Old GGUFs carry the unsplit attn_kv_b; a directory holding one model opens too."""
    src = open_checkpoint(f32_gguf)
    cfg = src.config
    meta = {}
    from gguf import GGUFValueType

    from quant.gguf_file import MetaValue

    for k, v in src.meta.items():
        f = src._readers[0].fields[k]
        t = GGUFValueType(f.types[0])
        meta[k] = MetaValue(t, v, GGUFValueType(f.types[1]) if t == GGUFValueType.ARRAY else None)
    specs, data = [], {}
    for p in plan_tensors(cfg):
        if p.build == "v_b":
            continue
        if p.build == "k_b":
            name = p.name.replace("attn_k_b", "attn_kv_b")
            hf = p.hf[0]
            arr = open_checkpoint(tiny_k2).get(hf).numpy()
        else:
            name, arr = p.name, src._dequant(src.tensors[p.name]).numpy().reshape(p.shape)
        specs.append(TensorSpec(name, tuple(arr.shape), 0))
        data[name] = arr
    d = tmp_path / "legacy"
    d.mkdir()
    w = GGUFStreamWriter(d / "legacy.gguf", meta, specs)
    for spec, _ in w.remaining():
        w.write(np.ascontiguousarray(data[spec.name], np.float32))
    w.finish()
    g = open_checkpoint(d)  # the directory
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    assert torch.equal(g.get(name), src.get(name))
    ids = [1, 20, 300]
    from k2local.model import KimiK2Model

    a, b = KimiK2Model(g), KimiK2Model(src)
    assert torch.allclose(a.forward(ids, a.new_cache()), b.forward(ids, b.new_cache()), atol=1e-5)


def test_corrupt_and_foreign_ggufs_give_clear_errors(f32_gguf, tmp_path) -> None:
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(f32_gguf.read_bytes()[: 3 << 20])
    with pytest.raises(CheckpointError, match="trunc.gguf"):
        GGUFSource(trunc)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF"):
        GGUFSource(junk)
    other = tmp_path / "llama.gguf"
    w = GGUFStreamWriter(other, {"general.architecture": strv("llama")}, [TensorSpec("x", (32,), 0)])
    w.write(np.zeros(32, np.float32))
    w.finish()
    with pytest.raises(CheckpointError, match="architecture 'llama' is not supported"):
        GGUFSource(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(other, empty / "a.gguf")
    shutil.copy(other, empty / "b.gguf")
    with pytest.raises(CheckpointError, match="2 GGUF models"):
        GGUFSource(empty)
