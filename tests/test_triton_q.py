"""Fused dequant-matmul Triton kernels (offload.kernels.triton_q) on raw GGUF bytes.

Without a GPU the kernels run under Triton's interpreter, which must be switched on before triton is imported, so
those checks run in a child process (TRITON_INTERPRET=1) and report JSON. References: gguf-py's dequantize and a
plain matmul; the whole tiny model with and without the fused path in the device cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def run_child(code: str, *args: str, timeout: int = 600) -> dict:
    """Run `code` in a fresh interpreter with the Triton interpreter on; its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("K2LOCAL_TRITON", None)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                       env=env, timeout=timeout, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


TYPES = ["Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "IQ1_S",
         "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"]


def weight_bytes(name: str, n: int, k: int):
    """GGUF bytes [n, row bytes] of an n x k matrix of type `name`: K-quants by our codecs (from scaled normal
    values), the legacy 32-value types by gguf-py (as llama.cpp), the codebook types as random valid blocks."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from quant import codecs
    from quant.random_blocks import random_blocks

    qt = Q[name]
    if name.startswith("IQ") or name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        return random_blocks(qt, n, k, np.random.default_rng(int(qt)))
    return codecs.quantize(torch.randn(n, k) * torch.rand(n, 1) * 3, qt)


KERNELS = """
    import json, numpy as np, torch
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize
    from offload.kernels import triton_q as tq

    from tests.test_triton_q import TYPES, weight_bytes

    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = []
    # 32-value types: rows may end inside a 256-value super-block
    shapes = {q: [(37, 256), (5, 96)] for q in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")}
    batches = [(1, torch.float32), (3, torch.bfloat16), (17, torch.float32), (17, torch.bfloat16)]
    for name in TYPES:
        qt = Q[name]
        for n, k in shapes.get(name, [(37, 256), (9, 512)]):
            b = weight_bytes(name, n, k)
            W = torch.from_numpy(np.ascontiguousarray(dequantize(b, qt))).float().reshape(n, k)
            for m, dt in batches if name in ("Q8_0", "Q4_K", "IQ2_XXS") else batches[:3]:
                x = torch.randn(m, k).to(dt)
                y = tq.qmatmul_gpu(x, torch.from_numpy(b), int(qt), k)
                ref = x.float() @ W.T  # fp32 products of the exact dequantized values
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                out.append([name, n, k, m, str(dt), list(y.shape), str(y.dtype), err])
                if k % 256 == 0 and m != 1:  # the down projection reading a [gate | up] row: SiLU(g) * u on load
                    gu = (torch.randn(m, 2 * k) * 2).to(dt)
                    y = tq.swiglu_qmatmul_gpu(gu, torch.from_numpy(b), int(qt), k)
                    h = torch.nn.functional.silu(gu[:, :k]) * gu[:, k:]  # in dt, as the unfused path computes it
                    ref = h.float() @ W.T
                    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                    out.append([name + "+swiglu", n, k, m, str(dt), list(y.shape), str(y.dtype), err])
    print(json.dumps(out))
"""


def test_kernels_match_dequantize_matmul() -> None:
    """Every type, rows not a multiple of the program's block, 1-2 super-blocks, GEMV (1, 3) and tl.dot (17) batches,
    fp32 and bf16 activations: the fused product equals gguf-py's dequantize followed by an fp32 matmul; with SiLU(g) * u
    applied on load (the down projection), it equals torch's SiLU(g) * u followed by the same matmul."""
    rows = run_child(KERNELS)
    types = set(TYPES)
    assert {r[0] for r in rows} == types | {t + "+swiglu" for t in types}
    for name, n, k, m, dt, shape, ydt, err in rows:
        assert shape == [m, n] and ydt == dt, (name, n, k, m, dt)
        # fp32: only the summation order differs; bf16: the output is rounded to bf16 (<= 2^-8 relative), and tl.dot
        # (17 rows) takes the weights rounded to bf16
        tol = 2e-6 if dt == "torch.float32" else 6e-3
        assert err <= tol, (name, n, k, m, dt, err)


MODEL = """
    import json, os, sys, torch
    from k2local.weights.hf_checkpoint import open_checkpoint
    from k2local.engine import LoadOptions
    from k2local.model import KimiK2Model
    from k2local.placement import build_backend, layout_for
    from offload.store import DeviceCache, ExpertStore
    from offload.kernels import triton_q as tq

    torch.set_num_threads(1)
    src = open_checkpoint(sys.argv[1])
    prompt = [5, 17, 33, 2, 9, 100, 7, 8, 41, 3]

    def run(flag):
        os.environ["K2LOCAL_TRITON"] = flag
        # host experts through torch (the C kernels quantize activations: fp32 noise could flip a rounding)
        opts = LoadOptions(experts_on="ram", extra={"save_routing_stats": False, "device_cache_experts": 8,
                                                    "kernels": False})
        b = build_backend(src, opts, torch.device("cpu"), torch.float32)
        try:
            m = KimiK2Model(src, experts=b, device="cpu", dtype=torch.float32)
            cache = m.new_cache()
            lg = m.forward(prompt, cache)[-1]
            toks, logits = [], [lg]
            for _ in range(2):
                toks.append(int(lg.argmax()))
                lg = m.forward([toks[-1]], cache)[-1]
                logits.append(lg)
            dev = b.stats()["tiers"]["device"]
            return toks, torch.stack(logits), dev, b.plan.device_expert_bytes
        finally:
            b.close()

    t_off, l_off, d_off, bytes_off = run("0")
    t_on, l_on, d_on, bytes_on = run("1")
    # a kernel failure falls back (once, for good) to dequantize + matmul on the same bytes
    layout = layout_for(src)
    cache = DeviceCache(layout, torch.device("cpu"), torch.float32)
    store = ExpertStore(layout, keys=[(1, 0)], io_threads=1)
    cache.add((1, 0), store.read_copy((1, 0)))
    store.close()
    x = torch.randn(3, src.config.hidden_size)
    good = cache.compute((1, 0), x)
    def broken(*a, **k):
        raise RuntimeError("simulated compile failure")
    tq.qmatmul_gpu = broken
    fell_back = cache.compute((1, 0), x)
    print(json.dumps({"toks": [t_off, t_on], "diff": (l_on - l_off).abs().max().item(),
                      "scale": l_off.abs().max().item(), "fused": [d_off["fused"], d_on["fused"]],
                      "hits": d_on["hits"], "bytes": [bytes_off, bytes_on], "cached_fused": cache.fused_experts,
                      "fallback_diff": (good - fell_back).abs().max().item(), "after": tq.available("cpu")}))
"""


@pytest.fixture(scope="module")
def tiny_q3(tiny_k2, tmp_path_factory) -> Path:
    convert = pytest.importorskip("k2local.convert.to_gguf").convert
    out = tmp_path_factory.mktemp("gguf") / "tiny-q3.gguf"
    convert(tiny_k2, out, "q3")  # experts Q3_K (gate, up) and Q4_K (down)
    return out


@pytest.mark.parametrize("model", ["tiny_q3", "iq_gguf"])
def test_whole_model_same_with_and_without_fused_experts(model: str, request) -> None:
    """8 of the 48 routed experts in the device cache (the CPU stands in for the GPU; the interpreter is slow):
    K2LOCAL_TRITON=1 keeps their raw bytes and computes them with the fused kernels; =0 keeps them dequantized. Same
    greedy tokens, logits within fp32 noise; the cache holds the raw bytes (~7x less than fp32 at Q3_K / Q4_K, more
    at the IQ types); a failing kernel falls back to dequantize + matmul. Models: K-quant experts, and Unsloth-style
    IQ1_S / IQ2_XXS / IQ3_XXS / IQ4_XS experts quantized by llama.cpp."""
    r = run_child(MODEL, str(request.getfixturevalue(model)))
    assert r["fused"] == [0, 8] and r["hits"] > 0
    assert r["toks"][0] == r["toks"][1]
    assert r["diff"] <= 1e-4 * max(1.0, r["scale"]), r
    assert r["bytes"][1] * 5 < r["bytes"][0]
    assert r["cached_fused"] == 1 and r["fallback_diff"] <= 1e-4 and r["after"] is False


# ---------------------------------------------------------------------------------------------- in-process
def test_policy_and_input_errors(monkeypatch) -> None:
    from offload.kernels import triton_q as tq

    assert tq.supported(12) and tq.supported(8) and tq.supported(16) and not tq.supported(15) and not tq.supported("x")
    assert tq.row_bytes(12, 512) == 288 and tq.row_bytes(8, 96) == 102
    with pytest.raises(ValueError, match="multiple of 256"):
        tq.row_bytes(14, 300)
    with pytest.raises(ValueError, match="no Triton kernel"):
        tq.row_bytes(15, 256)  # Q8_K: an activation type, never a GGUF weight
    if not tq._INTERPRET:  # this process: the CPU is never "available" without the interpreter
        for flag in ("", "0", "1"):
            monkeypatch.setenv("K2LOCAL_TRITON", flag)
            assert not tq.enabled("cpu")
    monkeypatch.setenv("K2LOCAL_TRITON", "0")
    assert not tq.enabled("cuda")
    x = torch.zeros(2, 256)
    w = torch.zeros(4, 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        tq.qmatmul_gpu(x, w.float(), 12, 256)
    with pytest.raises(ValueError, match="whole number"):
        tq.qmatmul_gpu(x, w.reshape(-1)[:-1], 12, 256)
    with pytest.raises(ValueError, match="columns"):
        tq.qmatmul_gpu(torch.zeros(2, 512), w, 12, 256)
    with pytest.raises(ValueError, match="needs 512"):
        tq.swiglu_qmatmul_gpu(x, w, 12, 256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_dequantize_matmul() -> None:
    """The compiled kernels on a real GPU: every type, decode and prefill batches, bf16 and fp32, and SiLU(g) * u
    applied on load."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    from offload.kernels import triton_q as tq

    assert tq.available("cuda")
    torch.manual_seed(0)
    for name in TYPES:
        qt = Q[name]
        n, k = 300, 1024
        b = weight_bytes(name, n, k)
        W = torch.from_numpy(np.ascontiguousarray(dequantize(b, qt))).float().reshape(n, k).cuda()
        wb = torch.from_numpy(b).cuda()
        for m in (1, 5, 8, 40, 130):
            for dt in (torch.bfloat16, torch.float32):
                x = torch.randn(m, k, device="cuda").to(dt)
                y = tq.qmatmul_gpu(x, wb, int(qt), k)
                ref = x.float() @ W.to(dt).float().T
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                assert y.dtype == dt and err <= (1e-5 if dt == torch.float32 else 8e-3), (name, m, dt, err)
            gu = torch.randn(m, 2 * k, device="cuda").to(torch.bfloat16)
            y = tq.swiglu_qmatmul_gpu(gu, wb, int(qt), k)
            ref = (torch.nn.functional.silu(gu[:, :k]) * gu[:, k:]).float() @ W.bfloat16().float().T
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            assert err <= 8e-3, (name, m, "swiglu", err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_with_fused_experts_matches(tiny_q3: Path, monkeypatch) -> None:
    """On CUDA: device-cached experts as raw bytes + fused kernels, and a long prompt whose host experts are shipped
    to the GPU and computed there by the same kernels, give the tokens and logits of the dequantizing path."""
    from k2local.weights.hf_checkpoint import open_checkpoint
    from k2local.engine import LoadOptions
    from k2local.model import KimiK2Model
    from k2local.placement import build_backend

    src = open_checkpoint(tiny_q3)
    prompt = list(range(3, 83))
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("K2LOCAL_TRITON", flag)
        opts = LoadOptions(experts_on="ram", gpu_mem=1, extra={
            "save_routing_stats": False, "device_cache_experts": 16, "kernels": False, "gpu_prefill_min_tokens": 32})
        b = build_backend(src, opts, torch.device("cuda"), torch.float32)
        try:
            m = KimiK2Model(src, experts=b, device="cuda", dtype=torch.float32)
            cache = m.new_cache()
            lg = m.forward(prompt, cache)[-1]
            toks, logits = [], [lg]
            for _ in range(4):
                toks.append(int(lg.argmax()))
                lg = m.forward([toks[-1]], cache)[-1]
                logits.append(lg)
            st = b.stats()
            runs[flag] = (toks, torch.stack(logits).cpu(), st["tiers"]["device"]["fused"], st["shipped_to_gpu_bytes"])
        finally:
            b.close()
    assert runs["0"][2] == 0 and runs["1"][2] == 16 and runs["1"][3] > 0
    assert runs["0"][0] == runs["1"][0]
    assert torch.allclose(runs["0"][1], runs["1"][1], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("model", ["tiny_q3", "iq_gguf"])
def test_big_batches_go_to_the_gpu_only_as_raw_bytes(model: str, request, monkeypatch) -> None:
    """A prefill batch is shipped to the GPU only when every expert can travel as its raw bytes: the fused kernels,
    or a torch decoder that runs on the GPU (the K-quants have one). Codebook (IQ) experts without the fused kernels
    stay on the CPU kernels: dequantizing them on the host to ship dense takes ~1 s per Kimi K2 expert."""
    from k2local.weights.hf_checkpoint import open_checkpoint
    from k2local.engine import LoadOptions
    from offload.kernels import triton_q as tq
    from k2local.placement import build_backend

    src = open_checkpoint(request.getfixturevalue(model))
    b = build_backend(src, LoadOptions(experts_on="ram", extra={"save_routing_stats": False}), torch.device("cpu"),
                      torch.float32)
    try:
        keys = [(layer, e) for layer in b.layout.moe_layers for e in range(b.layout.n_experts)]
        b.device = torch.device("cuda")  # the policy as it would decide on a GPU box (nothing runs here)
        monkeypatch.setattr(tq, "enabled", lambda device: False)
        assert b._decodable_on_device(keys) is (model == "tiny_q3")
        monkeypatch.setattr(tq, "enabled", lambda device: True)
        assert b._decodable_on_device(keys)
    finally:
        b.device = torch.device("cpu")
        b.close()
