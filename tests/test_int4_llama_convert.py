"""llama.cpp's own converter (convert_hf_to_gguf.py, llama-cpp-python 0.3.36 sdist) on the tiny INT4 checkpoint.

Issue 17: the converter dequantizes compressed-tensors pack-quantized INT4 to a float type; with ``--outtype f32``
that is exact ((u - 8) * bf16 scale fits an f32), so k2local's logits on its GGUF must equal k2local's logits on
the INT4 checkpoint itself, and our lossless ``--recipe int4`` GGUF's experts (Q4_0, the same codes, fp16 scales)
must equal the converter's expert values wherever the bf16 scale is an fp16 value.

Skips unless the sdist is unpacked locally: run ``tests/peers/fetch_llama_sdist.sh /path/to/venv/bin/python``
(or point ``$K2LOCAL_LLAMA_SDIST`` at an unpacked sdist). What the converter needs for a tiny Kimi checkpoint
(remote-code tokenizer/config files in a copy of the checkpoint, the tiny vocabulary's pre-tokenizer hash) is
described in tests/peers/llama_convert.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from k2local.model import KimiK2Model
from k2local.tokenizer.tiktoken_bpe import load_tokenizer
from k2local.weights import sanitize
from k2local.weights.hf_checkpoint import SafetensorsSource, expert_name, open_checkpoint
from tests.peers import llama_convert

PROMPT = [5, 17, 300, 2, 99, 43, 700, 12, 1, 250, 251, 64]
PROJS = ("gate", "up", "down")

pytestmark = pytest.mark.skipif(
    llama_convert.sdist_dir() is None,
    reason=f"llama-cpp-python {llama_convert.VERSION} sdist not unpacked under {llama_convert.cache_dir()} "
           "(run tests/peers/fetch_llama_sdist.sh, or set $K2LOCAL_LLAMA_SDIST)")


@pytest.fixture(scope="module")
def tiny_int4(tiny_factory) -> Path:
    return tiny_factory("kimi_k2_thinking")


@pytest.fixture(scope="module")
def llama_f32(tiny_int4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llconv") / "tiny-int4-llama-f32.gguf"
    llama_convert.convert(tiny_int4, out, "f32", timeout=600)
    return out


def _moe_layers(src) -> range:
    cfg = src.config
    return range(cfg.first_k_dense_replace, cfg.num_hidden_layers)


def _forward(src) -> tuple[torch.Tensor, torch.Tensor]:
    m = KimiK2Model(src)
    full = m.forward(PROMPT, m.new_cache())
    cache = m.new_cache()
    steps = [m.forward(PROMPT[:4], cache)] + [m.forward([t], cache) for t in PROMPT[4:]]
    return full, torch.cat(steps)


def test_llama_converter_gguf_loads_and_logits_equal_the_int4_checkpoint(llama_f32: Path, tiny_int4: Path) -> None:
    gguf = open_checkpoint(llama_f32)
    hf = SafetensorsSource(tiny_int4)
    assert gguf.config.n_routed_experts == hf.config.n_routed_experts
    # the converter dequantized the experts (F32, not Q4_0) ...
    for layer in _moe_layers(hf):
        for p in PROJS:
            assert gguf.tensor_type(expert_name(layer, 0, p)) == "F32"
    # ... to exactly the INT4 values (w = (u - 8) * scale)
    n = expert_name(1, 3, "down")
    assert torch.equal(gguf.get(n).float(), sanitize.dequantize_int4(*hf.raw(n)).float())
    # the vocabulary came through the converter's Kimi (tiktoken mergeable ranks) path: same ids as the checkpoint's
    assert gguf.meta["tokenizer.ggml.pre"] == "kimi-k2"
    tok, template = gguf.tokenizer_and_template()
    ref_tok = load_tokenizer(tiny_int4)
    text = template.render([{"role": "user", "content": "Hello! What's the weather like in Beijing today?"}],
                           add_generation_prompt=True)
    assert tok.encode(text, allow_special=True) == ref_tok.encode(text, allow_special=True)
    g_full, g_steps = _forward(gguf)
    h_full, h_steps = _forward(hf)
    d_full = (g_full - h_full).abs().max().item()
    d_steps = (g_steps - h_steps).abs().max().item()
    print(f"max |logit diff| llama.cpp-converted f32 GGUF vs INT4 checkpoint: prompt {d_full:.3g}, "
          f"cached decode {d_steps:.3g} (|logits| max {h_full.abs().max().item():.3g})")
    # f32 holds every dequantized INT4 weight and every bf16 weight exactly: same weights, same arithmetic
    assert d_full <= 1e-5 and d_steps <= 1e-5


def _expert_values(src, layer: int, p: str, n_experts: int) -> torch.Tensor:
    return torch.stack([src.get(expert_name(layer, e, p)).float() for e in range(n_experts)])


def _compare_experts(ours_path: Path, llama_path: Path, ckpt: Path) -> tuple[int, int]:
    """Our int4 GGUF's experts vs the converter's, per element: equal where the block's scale is fp16-exact.
    Returns (inexact blocks seen, elements compared)."""
    ours, theirs, hf = open_checkpoint(ours_path), open_checkpoint(llama_path), SafetensorsSource(ckpt)
    n_exp = hf.config.n_routed_experts
    inexact = compared = 0
    for layer in _moe_layers(hf):
        for p in PROJS:
            assert ours.tensor_type(expert_name(layer, 0, p)) == "Q4_0"
            a = _expert_values(ours, layer, p, n_exp)
            b = _expert_values(theirs, layer, p, n_exp)
            assert a.shape == b.shape
            exact = torch.stack([sanitize.fp16_exact(hf.raw(expert_name(layer, e, p))[1]) for e in range(n_exp)])
            inexact += int((~exact).sum())
            mask = exact.repeat_interleave(32, -1)
            assert torch.equal(a[mask], b[mask]), (layer, p)
            if (~mask).any():  # bf16 scale rounded to fp16: off by at most half an fp16 step of the scale, x |q| <= 8
                scale = torch.stack([hf.raw(expert_name(layer, e, p))[1].float() for e in range(n_exp)])
                bound = 8 * (scale.abs() * 2.0 ** -11 + 2.0 ** -25).repeat_interleave(32, -1)
                assert ((a - b).abs() <= bound)[~mask].all()
            compared += int(mask.sum())
    return inexact, compared


def test_our_int4_gguf_experts_equal_the_converters(llama_f32: Path, tiny_int4: Path, tmp_path: Path) -> None:
    from k2local.convert.to_gguf import convert

    res = convert(tiny_int4, tmp_path / "tiny-int4.gguf", "int4")
    assert res.int4_inexact_blocks == 0
    inexact, compared = _compare_experts(res.paths[0], llama_f32, tiny_int4)
    assert inexact == 0 and compared == 3 * 3 * 16 * 512 * 256


def test_inexact_scales_differ_only_in_their_blocks(tiny_int4: Path, tmp_path: Path) -> None:
    """A checkpoint with a few bf16 scales that are not fp16 values (below fp16's normal range): the converter keeps
    them (f32), our Q4_0 rounds them to fp16; every other block is still equal."""
    from safetensors.torch import load_file, save_file

    from k2local.convert.to_gguf import convert

    ck = tmp_path / "inexact"
    shutil.copytree(tiny_int4, ck)
    idx = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    names = [expert_name(1, 2, "up") + "_scale", expert_name(3, 9, "down") + "_scale"]
    for name in names:
        shard = ck / idx[name]
        t = load_file(str(shard))
        s = t[name].clone()
        s[0, 0] = 2.0 ** -20 * 1.0078125  # a bf16 value with more bits than an fp16 subnormal holds there
        s[5, 1] = -(2.0 ** -19) * 1.5078125
        t[name] = s
        save_file(t, str(shard), metadata={"format": "pt"})
    llama = tmp_path / "inexact-llama-f32.gguf"
    llama_convert.convert(ck, llama, "f32", timeout=600)
    res = convert(ck, tmp_path / "inexact-int4.gguf", "int4")
    assert res.int4_inexact_blocks == 4
    inexact, _ = _compare_experts(res.paths[0], llama, ck)
    assert inexact == 4
