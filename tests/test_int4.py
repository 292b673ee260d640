"""Native INT4 checkpoints (compressed-tensors pack-quantized, Kimi K2 Thinking / K2.5): the repack to Q4_0 is the
same 4-bit code, the model equals transformers on the dequantized weights, the RAM and disk tiers agree, bad
quantization configs are refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from k2local.config import ModelConfig
from k2local.errors import CheckpointError
from k2local.model import KimiK2Model
from k2local.placement import build_backend, layout_for, make_plan, source_notes
from k2local.weights import sanitize
from k2local.weights.hf_checkpoint import SafetensorsSource, expert_name
from offload import kernels
from offload.errors import ExpertReadError
from quant.types import QType
from tests.test_offload import greedy_run, opts

PROMPT = [5, 17, 300, 2, 99, 43, 700, 12, 1, 250, 251, 64]


@pytest.fixture(scope="module")
def tiny_int4(tiny_factory) -> Path:
    return tiny_factory("kimi_k2_thinking")


def _random_int4(rows: int, cols: int, scale: torch.Tensor | None = None, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    if scale is None:
        scale = (torch.rand(rows, cols // 32, generator=g) * 0.02 + 1e-4).to(torch.bfloat16)
    return u, sanitize.pack_int4(u), scale


def _q4_0_dequant(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(q.numpy(), GGMLQuantizationType.Q4_0))).view(rows, cols)


# ---------------------------------------------------------------------------------------------- the codes
def test_bit_order_is_compressed_tensors() -> None:
    """Element j of an int32 word in bits 4j..4j+3, stored as q + 8 (compressed-tensors pack_to_int32)."""
    word = sum(((j + 8) % 16) << (4 * j) for j in range(8))  # q = j -> u = j + 8 (wrapping)
    packed = torch.tensor([[word - (1 << 32) if word >= 1 << 31 else word]], dtype=torch.int32)
    assert sanitize.unpack_int4(packed).tolist() == [[(j + 8) % 16 for j in range(8)]]
    w = sanitize.dequantize_int4(packed.repeat(1, 4), torch.ones(1, 1, dtype=torch.bfloat16), (1, 32))
    assert w[0, :8].tolist() == [float((j + 8) % 16 - 8) for j in range(8)]


def test_repack_is_exact_where_scales_are_fp16() -> None:
    rows, cols = 48, 256
    u, packed, scale = _random_int4(rows, cols)
    assert sanitize.fp16_exact(scale).all()
    q, inexact = sanitize.repack_int4(packed, scale, (rows, cols))
    assert inexact == 0 and q.shape == (rows, cols // 32 * 18) and q.numel() == sanitize.q4_0_nbytes(rows, cols)
    want = (u.float() - 8) * scale.float().repeat_interleave(32, 1)
    assert torch.equal(_q4_0_dequant(q, rows, cols), want)  # gguf-py's Q4_0 reader
    assert torch.equal(sanitize.dequantize_int4(packed, scale, (rows, cols)), want)
    # same total bytes as the INT4 checkpoint (packed int32 + bf16 scale)
    assert q.numel() == packed.numel() * 4 + scale.numel() * 2


def test_inexact_and_out_of_range_scales() -> None:
    rows, cols = 4, 64
    s = torch.full((rows, cols // 32), 0.01).to(torch.bfloat16)
    s[0, 0] = 2.0 ** -20 * 1.0078125  # bf16 with 8 significant bits below 2^-17: not an fp16 value
    s[1, 1] = 2.0 ** -26  # rounds to fp16 0
    s[2, 0] = 2.0 ** -17 * 1.9921875  # smallest binade that is still exact
    assert sanitize.fp16_exact(s).tolist() == [[False, True], [True, False], [True, True], [True, True]]
    u, packed, _ = _random_int4(rows, cols, s)
    q, inexact = sanitize.repack_int4(packed, s)
    assert inexact == 2
    got, want = _q4_0_dequant(q, rows, cols), sanitize.dequantize_int4(packed, s)
    err = (got - want).abs()
    assert err.max() <= 8 * 2.0 ** -25 and err.max() > 0  # half an fp16 subnormal step, times |q| <= 8
    exact_blocks = sanitize.fp16_exact(s).repeat_interleave(32, 1)
    assert torch.equal(got[exact_blocks], want[exact_blocks])
    big = s.clone()
    big[3, 1] = 1e5
    with pytest.raises(ValueError, match="outside fp16"):
        sanitize.repack_int4(packed, big)


@pytest.mark.skipif(not kernels.available(), reason="needs the compiled kernel library")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_c_repack_equals_torch_repack(dtype: torch.dtype) -> None:
    """The C repack (k2k_repack_int4_q4_0) gives the torch path's bytes and inexact count, for scales over every
    binade bf16 reaches below f16's max: zeros, negatives, f16 subnormals and values that round to 0."""
    rows, cols = 64, 32 * 40
    g = torch.Generator().manual_seed(1)
    mant = 1 + torch.rand(rows, cols // 32, generator=g)
    exps = torch.randint(-30, 16, (rows, cols // 32), generator=g).float()
    sign = torch.where(torch.rand(rows, cols // 32, generator=g) < 0.2, -1.0, 1.0)
    s = (sign * mant * 2.0 ** exps).clamp(-65280, 65280)  # 65280: the largest bf16 value f16 holds
    s[0, :4] = torch.tensor([0.0, -0.0, 65280.0, 2.0 ** -24])
    s = s.to(dtype)
    _, packed, _ = _random_int4(rows, cols, s, seed=3)
    q_c, n_c = sanitize.repack_int4(packed, s)
    q_t, n_t = sanitize.repack_int4(packed, s, use_kernel=False)
    assert torch.equal(q_c, q_t) and n_c == n_t
    assert (n_t == 0) == (dtype is torch.float16)  # f16 scales are always exact


@pytest.mark.skipif(not kernels.available(), reason="needs the compiled kernel library")
def test_c_repack_refuses_scales_past_fp16() -> None:
    _, packed, s = _random_int4(2, 64)
    s = s.clone()
    s[1, 0] = 7e4
    with pytest.raises(ValueError, match=r"INT4 scale 7\d+ is outside fp16"):
        sanitize.repack_int4(packed, s)


def test_scale_exactness_rate_on_realistic_scales() -> None:
    """absmax / 7 group scales (bf16) of N(0, std) weights: every one is an fp16 value for std from 1e-4 to 1
    (4M groups); the first inexact ones appear only for weights ~1000x smaller than K2's."""
    g = torch.Generator().manual_seed(0)
    for std in (1e-4, 1e-3, 0.02, 1.0):
        w = torch.randn(4096, 32 * 256, generator=g) * std
        _, scale = sanitize.quantize_int4(w)
        assert sanitize.fp16_exact(scale).all(), std
    w = torch.randn(1024, 32 * 64, generator=g) * 2e-6
    _, scale = sanitize.quantize_int4(w)
    assert not sanitize.fp16_exact(scale).all()


# ---------------------------------------------------------------------------------------------- the checkpoint
def test_tiny_thinking_layout(tiny_int4: Path) -> None:
    cfg = json.loads((tiny_int4 / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32 and qc["ignore"][0] == "lm_head"
    idx = json.loads((tiny_int4 / "model.safetensors.index.json").read_text())["weight_map"]
    base = "model.layers.1.mlp.experts.0.down_proj.weight"
    assert {base + s for s in ("_packed", "_scale", "_shape")} <= set(idx) and base not in idx
    src = SafetensorsSource(tiny_int4)
    info = src.tensor_location(base + "_packed")
    assert info.dtype == "I32" and info.shape == (512, 256 // 8)
    assert src.tensor_location(base + "_scale").dtype == "BF16"
    assert src.tensor_location("model.layers.1.mlp.shared_experts.down_proj.weight").dtype == "BF16"
    assert src.tensor_location("model.layers.0.self_attn.q_a_proj.weight").dtype == "BF16"
    assert src.shape(base) == (512, 256) and src.get_rows(base, 3, 7).shape == (4, 256)
    assert torch.equal(src.get_rows(base, 3, 7), src.get(base)[3:7])
    assert base in set(src.names()) and not any(n.endswith("_packed") for n in src.names())
    tc = json.loads((tiny_int4 / "tokenizer_config.json").read_text())
    shipped = Path(__file__).resolve().parents[1] / "k2local" / "chat" / "templates" / "kimi_k2_thinking.jinja"
    assert tc["chat_template"] == shipped.read_text() and not (tiny_int4 / "chat_template.jinja").exists()
    from k2local.chat.template import ChatTemplate

    text = ChatTemplate.from_dir(tiny_int4).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert "<|im_user|>" in text and text.rstrip().endswith("<|im_middle|>")


def test_layout_is_q4_0_repacked_on_read(tiny_int4: Path) -> None:
    src = SafetensorsSource(tiny_int4)
    layout = layout_for(src)
    e = layout.entry(1, 5)
    assert all(f.kind == "ggml" and f.qtype == int(QType.Q4_0) for f in e.formats)
    assert all(s.path is None and s.fill is not None for s in e.segments) and layout.files()
    for seg, fmt, p in zip(e.segments, e.formats, ("gate", "up", "down")):
        buf = bytearray(seg.nbytes)
        seg.fill(memoryview(buf))
        q = torch.frombuffer(buf, dtype=torch.uint8)
        assert torch.equal(_q4_0_dequant(q, fmt.rows, fmt.cols), src.get(expert_name(1, 5, p)))
    notes = make_plan(src, opts(experts_on="ram"), torch.device("cpu"), torch.float32).notes
    assert any("INT4" in n and "Q4_0" in n for n in notes)


def test_int4_logits_match_transformers(tiny_int4: Path) -> None:
    pytest.importorskip("transformers")
    from tests.hf_reference import hf_model

    src = SafetensorsSource(tiny_int4)
    ours = KimiK2Model(src)  # the reference backend: experts dequantized (u - 8) * scale
    full = ours.forward(PROMPT, ours.new_cache())
    with torch.no_grad():
        ref = hf_model(src)(torch.tensor([PROMPT])).logits[0].float()
    assert (full - ref).abs().max().item() <= 1e-4
    cache = ours.new_cache()
    steps = [ours.forward(PROMPT[:4], cache)] + [ours.forward([t], cache) for t in PROMPT[4:]]
    assert (torch.cat(steps) - ref).abs().max().item() <= 1e-4


def test_int4_ram_and_disk_tiers(tiny_int4: Path) -> None:
    src = SafetensorsSource(tiny_int4)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = greedy_run(src, None, n=4)
        runs = {}
        for name, o in [("ram", opts(experts_on="ram")), ("disk", opts(experts_on="disk", ram=0.004)),
                        ("torch", opts(experts_on="disk", ram=0.004, extra={"kernels": False}))]:
            b = build_backend(src, o, torch.device("cpu"), torch.float32)
            try:
                runs[name] = greedy_run(src, b, n=4)
                if name == "disk":
                    st = b.stats()["tiers"]["disk"]
                    assert st["misses"] > 0 and st["evictions"] > 0
            finally:
                b.close()
    finally:
        torch.set_num_threads(n)
    assert runs["ram"][0] == runs["disk"][0] and torch.equal(runs["ram"][1], runs["disk"][1])
    # Q4_0 bytes dequantized by torch equal the INT4 reference
    assert runs["torch"][0] == ref[0] and torch.allclose(runs["torch"][1], ref[1], atol=1e-4, rtol=1e-4)
    # the C kernels quantize activations (as llama.cpp does): same tokens, logits close (a near-tie in one step's
    # routing may pick another expert, so per step by direction, and most steps by size)
    assert runs["ram"][0] == ref[0]
    cos = torch.nn.functional.cosine_similarity(runs["ram"][1], ref[1], dim=1)
    assert cos.min() > 0.95, cos
    per_step = (runs["ram"][1] - ref[1]).abs().amax(1) / ref[1].abs().amax(1)
    assert per_step.median() < 0.05, per_step


def test_kimi_k25_layout_runs_the_text_model(tiny_factory, tiny_int4: Path) -> None:
    k25 = tiny_factory("kimi_k25")
    cfg = json.loads((k25 / "config.json").read_text())
    assert "text_config" in cfg and "hidden_size" not in cfg and cfg["model_type"] == "kimi_k25"
    idx = json.loads((k25 / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(n.startswith(("language_model.", "vision_tower.", "mm_projector.")) for n in idx)
    src = SafetensorsSource(k25)
    assert src.config.is_int4 and src.config.multimodal == "kimi_k25" and src.other_tensors == 2
    assert any("images are not supported" in n for n in source_notes(src))
    m = KimiK2Model(src)
    a = m.forward(PROMPT[:6], m.new_cache())
    thinking = KimiK2Model(SafetensorsSource(tiny_int4))  # same seed, same text model
    b = thinking.forward(PROMPT[:6], thinking.new_cache())
    assert torch.equal(a, b)


def test_bad_quantization_configs_are_one_line_errors(tiny_int4: Path) -> None:
    d = json.loads((tiny_int4 / "config.json").read_text())
    bad = json.loads(json.dumps(d))
    bad["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    with pytest.raises(CheckpointError, match="num_bits") as e:
        ModelConfig.from_dict(bad)
    assert "\n" not in str(e.value)
    bad["quantization_config"] = {"quant_method": "awq"}
    with pytest.raises(CheckpointError, match="quant_method 'awq'"):
        ModelConfig.from_dict(bad)
    bad["quantization_config"] = dict(d["quantization_config"], format="float-quantized")
    with pytest.raises(CheckpointError, match="pack-quantized"):
        ModelConfig.from_dict(bad)


def test_scale_out_of_fp16_range_fails_the_read(tmp_path: Path, tiny_int4: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path / "big"
    shutil.copytree(tiny_int4, dst)
    name = "model.layers.1.mlp.experts.2.up_proj.weight_scale"
    shard = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][name]
    t = load_file(str(dst / shard))
    t[name] = t[name].clone()
    t[name][0, 0] = 1e6
    save_file(t, str(dst / shard), metadata={"format": "pt"})
    seg = layout_for(SafetensorsSource(dst)).entry(1, 2).segments[1]
    with pytest.raises(ExpertReadError, match="outside fp16's range") as e:
        seg.fill(memoryview(bytearray(seg.nbytes)))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- quantize
def test_quantize_int4_copies_the_codes_and_llama_cpp_loads_it(tiny_int4: Path, tmp_path: Path) -> None:
    from k2local.convert.to_gguf import convert
    from k2local.weights.hf_checkpoint import open_checkpoint
    from tests.test_quantize import assert_agree

    res = convert(tiny_int4, tmp_path / "tiny-int4.gguf", "int4-bf16")
    assert res.int4_inexact_blocks == 0 and res.types.get("Q4_0") == 9  # 3 MoE layers x gate/up/down
    gguf = open_checkpoint(res.paths[0])
    hf = SafetensorsSource(tiny_int4)
    for layer, e, p in [(1, 0, "gate"), (2, 7, "up"), (3, 15, "down")]:
        n = expert_name(layer, e, p)
        assert gguf.tensor_type(n) == "Q4_0"
        assert torch.equal(gguf.get(n), hf.get(n))  # exactly the INT4 values: no re-rounding
        data, qtype, rows, cols = gguf.expert_tensor(layer, p)
        q, _ = sanitize.repack_int4(*hf.raw(n))
        assert int(qtype) == int(QType.Q4_0) and np.array_equal(np.asarray(data[e]).reshape(-1), q.numpy().reshape(-1))
    n = "model.layers.1.self_attn.o_proj.weight"
    assert gguf.tensor_type(n) == "BF16" and torch.equal(gguf.get(n), hf.get(n))
    # llama.cpp loads it and agrees with k2local on it
    pytest.importorskip("llama_cpp")
    assert_agree(res.paths[0], 0.05)
