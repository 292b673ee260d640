"""`k2local quantize`: HF checkpoint -> GGUF that llama.cpp loads and agrees with; recipes, imatrix, resume, splits."""
from __future__ import annotations

import os
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from k2local.weights.hf_checkpoint import open_checkpoint
from k2local.convert.to_gguf import convert, describe_recipes, plan_tensors, projected_size
from k2local.errors import CheckpointError, K2Error
from k2local.model import KimiK2Model
from k2local.convert.recipes import Recipe, TensorRole, get_recipe, resolve_type
from quant.gguf_file import GGUFStreamWriter, TensorSpec, split_parts, strv
from tests.peers import llama_cpp as llama

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- fixtures
def _mixed_choose(r: TensorRole) -> str:
    """Layer-1 experts in three K-quants, output Q6_K, the rest Q8_0 (covers our K-quant encoders, kept fast)."""
    if r.layer == 1 and r.is_expert:
        return {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q3_K", "ffn_down_exps": "Q2_K"}[r.kind]
    return "Q6_K" if r.kind == "output" else "Q8_0"


MIXED = Recipe("test-mixed", "test", _mixed_choose, 15)


_BUILT: dict[str, Path] = {}  # shared by every module importing these fixtures (pytest would build per module)


def _built(key: str, make) -> Path:
    if key not in _BUILT or not _BUILT[key].exists():
        _BUILT[key] = make()
    return _BUILT[key]


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory) -> Path:
    return _built("dir", lambda: tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="session")
def f32_gguf(tiny_k2, gguf_dir) -> Path:
    return _built("f32", lambda: convert(tiny_k2, gguf_dir / "tiny-f32.gguf", "f32").paths[0])


@pytest.fixture(scope="session")
def q8_gguf(tiny_k2, gguf_dir) -> Path:
    return _built("q8", lambda: convert(tiny_k2, gguf_dir / "tiny-q8.gguf", "q8").paths[0])


@pytest.fixture(scope="session")
def kq_gguf(tiny_k2, gguf_dir) -> Path:
    return _built("kq", lambda: convert(tiny_k2, gguf_dir / "tiny-kq.gguf", MIXED).paths[0])


@pytest.fixture(scope="session")
def llama_q4km_gguf(f32_gguf, gguf_dir) -> Path:
    """llama.cpp's own quantizer (Q4_K_M mixture) applied to our F32 GGUF."""
    out = gguf_dir / "tiny-llama-q4km.gguf"
    return _built("q4km", lambda: (llama_quantize(f32_gguf, out, 15), out)[1])


# ----------------------------------------------------------------------------------------------------- helpers
def llama_quantize(src: Path, dst: Path, ftype: int, pure: bool = False) -> None:
    pytest.importorskip("llama_cpp")
    llama.isolated("quantize", str(src), str(dst), ftype, pure)


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position (YaRN betas passed explicitly: see Config.llama_cpp_overrides), in a
    child process: a llama.cpp abort fails the test instead of ending the run."""
    pytest.importorskip("llama_cpp")
    return llama.isolated("logits", str(path), ids, **open_checkpoint(path).config.llama_cpp_overrides)


def k2_logits(path: Path, ids: list[int]) -> np.ndarray:
    m = KimiK2Model(open_checkpoint(path))
    return m.forward(ids, m.new_cache()).numpy()


@torch.inference_mode()
def robust_prompt(path: Path, n: int = 10, route_tau: float = 0.02, logit_tau: float = 0.5,
                  seed: int = 0) -> list[int]:
    """Tokens where no decision is a near tie: at every position and MoE layer the k-th and (k+1)-th expert
    choices differ by > route_tau, and the top two logits by > logit_tau. Two correct implementations that round
    differently (llama.cpp quantizes activations to 8 bits) can only disagree at near ties, so on this prompt
    they must pick the same experts and the same argmax everywhere."""
    m = KimiK2Model(open_checkpoint(path))
    cfg, k, orig = m.cfg, m.cfg.num_experts_per_tok, m.router
    margins: list[float] = []

    def router(x, w, b):
        s = torch.nn.functional.linear(x.float(), w.float())
        s = s.sigmoid() if cfg.scoring_func == "sigmoid" else s.softmax(-1)
        top = (s + b.float() if b is not None else s).topk(k + 1, dim=-1).values
        margins.append((top[:, k - 1] - top[:, k]).min().item())
        return orig(x, w, b)

    m.router = router
    rng = np.random.default_rng(seed)
    cache, ids = m.new_cache(), []
    for _ in range(3000):
        if len(ids) == n:
            break
        t = int(rng.integers(0, cfg.vocab_size))
        margins.clear()
        pos = cache.length
        top2 = m.forward([t], cache)[0].topk(2).values
        if min(margins) > route_tau and (top2[0] - top2[1]).item() > logit_tau:
            ids.append(t)
        else:
            cache.truncate(pos)
    assert len(ids) == n
    return ids


def assert_agree(path: Path, tol_rel: float) -> float:
    ids = robust_prompt(path)
    ll, k2 = llama_logits(path, ids), k2_logits(path, ids)
    diff = float(np.abs(ll - k2).max())
    assert diff <= tol_rel * float(np.abs(k2).max()), diff
    assert (ll.argmax(-1) == k2.argmax(-1)).all()
    return diff


# ------------------------------------------------------------------------------------------- llama.cpp agreement
def test_llama_cpp_loads_f32_and_logits_match_tightly(f32_gguf, tiny_k2) -> None:
    ids = [3, 700, 41, 1000, 12, 256, 99, 7, 512, 1100]
    ll = llama_logits(f32_gguf, ids)
    k2 = k2_logits(f32_gguf, ids)
    assert np.abs(ll - k2).max() < 1e-3
    assert (ll.argmax(-1) == k2.argmax(-1)).all()
    # and the F32 GGUF is the HF checkpoint exactly
    assert np.abs(k2_logits(tiny_k2, ids) - k2).max() < 1e-5


def test_llama_cpp_agrees_on_q8(q8_gguf) -> None:
    assert_agree(q8_gguf, 0.05)


def test_llama_cpp_agrees_on_our_kquants(kq_gguf) -> None:
    src = open_checkpoint(kq_gguf)
    assert {src.tensor_type(f"model.layers.1.mlp.experts.0.{p}_proj.weight") for p in ("gate", "up", "down")} == \
        {"Q4_K", "Q3_K", "Q2_K"}
    assert src.tensor_type("lm_head.weight") == "Q6_K"
    assert_agree(kq_gguf, 0.05)


def test_k2local_runs_llama_cpp_quantized_gguf(llama_q4km_gguf) -> None:
    src = open_checkpoint(llama_q4km_gguf)
    assert src.tensor_type("model.layers.1.mlp.experts.3.gate_proj.weight") == "Q4_K"
    assert src.tensor_type("model.layers.1.self_attn.q_b_proj.weight") == "Q5_0"  # llama.cpp's fallback
    assert_agree(llama_q4km_gguf, 0.05)


def test_our_kquant_bytes_equal_llama_cpp(kq_gguf, f32_gguf, gguf_dir) -> None:
    """Same input, same type: our quantizer writes llama.cpp's bytes, so its error is exactly llama.cpp's."""
    ours = open_checkpoint(kq_gguf)
    for ftype, t, name in [(15, "Q4_K", "blk.1.ffn_gate_exps.weight"), (12, "Q3_K", "blk.1.ffn_up_exps.weight"),
                           (10, "Q2_K", "blk.1.ffn_down_exps.weight")]:
        out = gguf_dir / f"llama-pure-{t}.gguf"
        llama_quantize(f32_gguf, out, ftype, pure=True)
        theirs = open_checkpoint(out)
        a, b = ours.tensors[name], theirs.tensors[name]
        assert a.qtype == b.qtype
        assert np.array_equal(ours._bytes(a), theirs._bytes(b)), name


# ------------------------------------------------------------------------------------------------ file contents
def test_metadata_matches_llama_cpp_converter(f32_gguf, tiny_k2) -> None:
    s = open_checkpoint(f32_gguf)
    m, cfg = s.meta, open_checkpoint(tiny_k2).config
    assert m["general.architecture"] == "deepseek2"
    assert m["deepseek2.expert_gating_func"] == 2
    assert m["deepseek2.attention.head_count_kv"] == 1
    assert m["deepseek2.attention.key_length"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert m["deepseek2.attention.value_length"] == cfg.kv_lora_rank
    assert m["deepseek2.attention.key_length_mla"] == cfg.qk_head_dim
    assert m["deepseek2.attention.value_length_mla"] == cfg.v_head_dim
    assert m["deepseek2.leading_dense_block_count"] == 1
    assert m["deepseek2.rope.scaling.type"] == "yarn"
    assert m["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)
    assert m["deepseek2.rope.scaling.yarn_beta_fast"] == 1.0
    assert m["deepseek2.expert_weights_norm"] is True
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "kimi-k2"
    assert len(m["tokenizer.ggml.tokens"]) == cfg.vocab_size and len(m["tokenizer.ggml.merges"]) > 0
    assert "<|im_assistant|>assistant<|im_middle|>" in m["tokenizer.chat_template"]
    names = set(s.tensors)
    assert {"blk.1.exp_probs_b.bias", "blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight",
            "blk.1.ffn_gate_exps.weight", "blk.0.ffn_gate.weight", "output.weight"} <= names
    assert not any("kv_b" in n or "rotary" in n for n in names)
    k_b, v_b = s.tensors["blk.1.attn_k_b.weight"], s.tensors["blk.1.attn_v_b.weight"]
    nh = cfg.num_attention_heads
    assert k_b.shape == (nh, cfg.kv_lora_rank, cfg.qk_nope_head_dim)
    assert v_b.shape == (nh, cfg.v_head_dim, cfg.kv_lora_rank)
    assert s.tensors["blk.1.ffn_down_exps.weight"].shape == (cfg.n_routed_experts, cfg.hidden_size,
                                                             cfg.moe_intermediate_size)


def test_recipes_types_and_fallbacks() -> None:
    def role(kind: str, cols: int, layer: int = 10) -> TensorRole:
        return TensorRole(f"blk.{layer}.{kind}.weight", kind, layer, 61, 1, cols)

    q4, q2 = get_recipe("q4"), get_recipe("q2")
    assert resolve_type(q4, role("ffn_up_exps", 7168)) == "Q4_K"
    assert resolve_type(q4, role("attn_q_a", 7168)) == "Q8_0"
    assert resolve_type(q4, role("norm", 7168)) == "F32"
    assert resolve_type(q4, role("ffn_gate_inp", 7168)) == "F32"
    assert resolve_type(get_recipe("pure:Q4_K"), role("attn_k_b", 128)) == "Q5_0"  # llama.cpp's fallback
    assert resolve_type(get_recipe("pure:Q2_K"), role("attn_q_b", 1536 + 32)) == "Q4_0"
    assert resolve_type(get_recipe("pure:Q6_K"), role("attn_k_b", 48)) == "F16"
    assert resolve_type(q2, role("ffn_gate_exps", 7168, layer=30)) == "Q2_K"
    assert resolve_type(q2, role("ffn_down_exps", 7168, layer=30)) == "Q3_K"
    assert resolve_type(q2, role("ffn_gate_exps", 7168, layer=1)) == "Q4_K"  # first MoE layers kept higher
    assert resolve_type(q2, role("ffn_gate_exps", 7168, layer=60)) == "Q4_K"
    with pytest.raises(K2Error, match="unknown recipe"):
        get_recipe("q7")


def test_projected_sizes_for_kimi_k2() -> None:
    rows = {name: (bpw, size) for name, _, bpw, size in describe_recipes()}
    assert 4.5 < rows["q4"][0] < 4.7 and 570e9 < rows["q4"][1] < 600e9
    assert 2.7 < rows["q2"][0] < 3.2
    assert rows["q8"][0] == pytest.approx(8.5, abs=0.01)
    # the plan covers Kimi K2: 1.03T parameters, 61 blocks, 384 stacked experts
    from k2local.config import ModelConfig

    n = sum(p.numel for p in plan_tensors(ModelConfig()))
    assert 1.02e12 < n < 1.04e12
    assert projected_size(ModelConfig(), get_recipe("f32"))[1] == 32.0


# --------------------------------------------------------------------------------------------- imatrix, errors
def test_imatrix_roundtrip_and_quantize_with_it(tiny_k2, tmp_path) -> None:
    from k2local.convert.imatrix import IMatrix, collect

    text = (ROOT / "README.md").read_text() * 2
    imat = collect(tiny_k2, text, ctx=64, max_chunks=3)
    assert imat.chunk_count == 3
    cfg = open_checkpoint(tiny_k2).config
    assert imat.sums["blk.1.ffn_gate_exps.weight"].shape == (cfg.n_routed_experts, cfg.hidden_size)
    assert imat.sums["blk.1.ffn_down_exps.weight"].shape == (cfg.n_routed_experts, cfg.moe_intermediate_size)
    assert imat.sums["blk.1.attn_k_b.weight"].shape == (cfg.num_attention_heads, cfg.qk_nope_head_dim)
    assert imat.counts["blk.0.attn_q_a.weight"][0] == imat.counts["output.weight"][0] > 0
    path = imat.save(tmp_path / "im.gguf")
    back = IMatrix.load(path)
    for k in imat.sums:
        np.testing.assert_allclose(back.weights(k), imat.weights(k), rtol=1e-6)
    # an importance-weighted Q4_K of one expert has lower activation-weighted error than the plain one
    from quant.gguf_file import dequantize_rows, quantize_rows

    w = open_checkpoint(tiny_k2).get("model.layers.1.mlp.experts.0.up_proj.weight").numpy()
    imp = imat.weights("blk.1.ffn_up_exps.weight")[0]
    err = {}
    for label, im in (("plain", None), ("imatrix", imp)):
        d = dequantize_rows(quantize_rows(w, "Q4_K", im), "Q4_K", w.shape[1]) - w
        err[label] = float((d * d * imp).sum())
    assert err["imatrix"] < err["plain"]


def test_bad_sources_give_clear_errors(tiny_k2, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        convert(tmp_path / "nope", tmp_path / "o.gguf")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_k2, bad)
    shard = next(bad.glob("model-2-of-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        convert(bad, tmp_path / "o.gguf")
    with pytest.raises(K2Error, match="must end in .gguf"):
        convert(tiny_k2, tmp_path / "o.bin")
    with pytest.raises(K2Error, match="imatrix file not found"):
        convert(tiny_k2, tmp_path / "o.gguf", "q4", imatrix=tmp_path / "none.gguf")
    assert not list(tmp_path.glob("o.*"))


# ------------------------------------------------------------------------------------------ resume, atomicity
def test_interrupted_conversion_resumes_to_identical_file(tiny_k2, f32_gguf, tmp_path) -> None:
    out = tmp_path / "r.gguf"
    seen: list[str] = []

    def boom(name: str, n: int) -> None:
        seen.append(name)
        if len(seen) == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_k2, out, "f32", progress=boom)
    assert not out.exists()  # never a valid-looking partial file
    assert (tmp_path / "r.gguf.partial").exists()
    state = json.loads((tmp_path / "r.gguf.resume.json").read_text())
    assert state["tensor"] > 0
    res = convert(tiny_k2, out, "f32")
    assert 0 < res.resumed_bytes < res.total_bytes
    assert out.read_bytes() == f32_gguf.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.gguf"]


def test_changed_options_restart_instead_of_resuming(tiny_k2, tmp_path) -> None:
    out = tmp_path / "c.gguf"
    n = [0]

    def boom(name: str, k: int) -> None:
        n[0] += 1
        if n[0] == 20:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        convert(tiny_k2, out, "f32", progress=boom)
    res = convert(tiny_k2, out, "bf16")
    assert res.resumed_bytes == 0
    assert open_checkpoint(out).tensor_type("model.layers.0.self_attn.q_a_proj.weight") == "BF16"


def test_split_output_loads_in_both(tiny_k2, f32_gguf, tmp_path) -> None:
    out = tmp_path / "s.gguf"
    res = convert(tiny_k2, out, "f32", split_max_bytes=30 << 20)
    assert len(res.paths) > 1
    assert [p.name for p in res.paths] == [f"s-{i:05d}-of-{len(res.paths):05d}.gguf"
                                           for i in range(1, len(res.paths) + 1)]
    assert split_parts(res.paths[1]) == res.paths
    ids = [5, 77, 300, 1000, 2]
    np.testing.assert_array_equal(k2_logits(res.paths[0], ids), k2_logits(f32_gguf, ids))
    assert np.abs(llama_logits(res.paths[0], ids) - k2_logits(f32_gguf, ids)).max() < 1e-3
    res.paths[-1].unlink()
    with pytest.raises(CheckpointError, match="split part missing"):
        open_checkpoint(res.paths[0])


def test_stream_writer_rejects_wrong_sizes(tmp_path) -> None:
    w = GGUFStreamWriter(tmp_path / "w.gguf", {"general.architecture": strv("x")},
                         [TensorSpec("a", (2, 32), 0), TensorSpec("b", (3,), 0)])
    spec, done = next(iter(w.remaining()))
    assert (spec.name, done) == ("a", 0)
    with pytest.raises(ValueError, match="expected 256"):
        w.write(np.zeros(65, np.float32))
    w.write(np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="not written"):
        w.finish()
    w.write(np.ones(3, np.float32))
    [p] = w.finish()
    from gguf import GGUFReader

    r = GGUFReader(p)
    assert [t.name for t in r.tensors] == ["a", "b"] and list(r.tensors[1].data) == [1, 1, 1]


# ------------------------------------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bin" / "k2local"), *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_quantize_and_list(tiny_k2, tmp_path) -> None:
    r = _cli("quantize", "--list-recipes")
    assert r.returncode == 0 and "q4" in r.stdout and "Kimi K2" in r.stdout and "GB" in r.stdout
    out = tmp_path / "cli.gguf"
    r = _cli("quantize", str(tiny_k2), str(out), "--recipe", "f16")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and out.exists()
    r = _cli("quantize", str(tiny_k2), str(out), "--recipe", "f16")
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = _cli("quantize", str(tmp_path / "missing"), str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = _cli("imatrix", str(out), str(ROOT / "README.md"), "-o", str(tmp_path / "im.gguf"), "--ctx", "64",
             "--chunks", "2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "im.gguf").exists()


# ------------------------------------------------------------------------------------------------- peak memory
_MEM_CHILD = r"""
import json, sys, threading, time
from k2local.convert.to_gguf import convert

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out

base, peak, stop = status(), {}, threading.Event()

def sample():
    while not stop.is_set():
        for k, v in status().items():
            peak[k] = max(peak.get(k, 0), v)
        stop.wait(0.002)

t = threading.Thread(target=sample, daemon=True)
t.start()
convert(sys.argv[1], sys.argv[2], sys.argv[3])
stop.set()
t.join()
print(json.dumps({"base": base, "peak": peak, "end": status()}))
"""


def _conversion_memory(src: Path, out: Path, recipe: str) -> dict:
    """Memory figures (bytes) of converting `src` in a fresh process: baseline after imports, peaks, end."""
    r = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(src), str(out), recipe], capture_output=True, text=True,
                       timeout=300, cwd=str(ROOT), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    m["hwm"] = max(m["peak"]["VmHWM"], m["end"]["VmHWM"])
    return m


def test_peak_memory_does_not_grow_with_model_size(tmp_path) -> None:
    """4x bigger routed experts (+42 MB of FP8, +170 MB as float32): the conversion's peak RSS stays put.

    The converter holds one row chunk (<= CHUNK_WEIGHTS values) of one tensor at a time and reads with pread (no
    mmap), so neither anonymous nor file-backed RSS depends on the model size; a per-tensor leak or a resident
    mmap'd shard would add tens of MB here. The bound, 16 MB, covers the bigger model's larger row chunk (one
    768x512 expert: 1.6 MB as float32, ~4 such buffers while dequantizing and encoding) plus allocator slack. The
    peak is the kernel's exact VmHWM, so a busy CPU does not change it."""
    from k2local.tiny import make_tiny

    sizes = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP fan-out on a busy 2-core box costs more than it gains
    try:
        for label, inter in (("small", 192), ("big", 768)):
            src = make_tiny(tmp_path / label, shards=2, overrides={
                "n_routed_experts": 48, "moe_intermediate_size": inter, "num_hidden_layers": 2})
            m = _conversion_memory(src, tmp_path / f"{label}.gguf", "f16")
            m["ckpt"] = sum(f.stat().st_size for f in src.iterdir())
            sizes[label] = m
    finally:
        torch.set_num_threads(threads)
    small, big = sizes["small"], sizes["big"]
    assert big["ckpt"] - small["ckpt"] > 40e6  # the models really differ
    detail = {k: (v["base"], v["peak"], v["hwm"], v["ckpt"]) for k, v in sizes.items()}
    assert big["hwm"] - small["hwm"] < 16e6, detail
    assert big["peak"]["RssAnon"] - small["peak"]["RssAnon"] < 16e6, detail
    assert big["peak"]["RssFile"] - small["peak"]["RssFile"] < 4e6, detail  # no shard stays mapped
