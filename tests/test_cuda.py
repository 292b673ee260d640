"""The same model on CUDA (skipped without a GPU): attention, shared/dense layers and head on the GPU."""
from __future__ import annotations

import pytest
import torch

from k2local.weights.hf_checkpoint import SafetensorsSource
from k2local.engine import Engine, LoadOptions
from k2local.model import KimiK2Model
from k2local.sampler import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPT = [5, 17, 300, 2, 99, 43, 700, 12]


def test_cuda_fp32_matches_cpu(tiny_k2) -> None:
    src = SafetensorsSource(tiny_k2)
    m_cpu, m_gpu = KimiK2Model(src), KimiK2Model(src, device="cuda")
    cpu = m_cpu.forward(PROMPT, m_cpu.new_cache())
    gpu = m_gpu.forward(PROMPT, m_gpu.new_cache()).cpu()
    assert (cpu - gpu).abs().max() <= 1e-3
    cache = m_gpu.new_cache()
    steps = [m_gpu.forward(PROMPT[:3], cache)] + [m_gpu.forward([t], cache) for t in PROMPT[3:]]
    assert (torch.cat(steps).cpu() - cpu).abs().max() <= 1e-3


def test_engine_on_cuda_bf16_generates_like_cpu(tiny_k2) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=8)
    ids = [5, 17, 300, 2]
    out = {}
    for dev, dt in (("cpu", "float32"), ("cuda", "bfloat16")):
        e = Engine.load(tiny_k2, LoadOptions(device=dev, dtype=dt))
        out[dev] = e.new_generator().generate(ids, greedy, set()).tokens
    assert len(out["cuda"]) == 8
    # bf16 rounding may flip a near-tie late in a random model; the first tokens must agree
    assert out["cuda"][:3] == out["cpu"][:3]


def test_quantized_weights_on_gpu_match_dense(tiny_k2, tmp_path) -> None:
    """Non-expert GGUF weights kept block-quantized in VRAM (dequantized per use) give the dense logits."""
    convert = pytest.importorskip("k2local.convert.to_gguf").convert
    from k2local.weights.hf_checkpoint import open_checkpoint
    from k2local.linear import QuantWeight

    gguf = tmp_path / "tiny-q8.gguf"
    convert(tiny_k2, gguf, "q8")
    src = open_checkpoint(gguf)
    dense = KimiK2Model(src, device="cuda", quantized_linear=False)
    quant = KimiK2Model(src, device="cuda", quantized_linear=True)
    assert isinstance(quant.layers[0].o_proj, QuantWeight) and quant.layers[0].o_proj.data.is_cuda
    a = dense.forward(PROMPT, dense.new_cache())
    b = quant.forward(PROMPT, quant.new_cache())
    assert (a - b).abs().max() <= 1e-3
