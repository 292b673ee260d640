"""Shared fixtures: tiny checkpoints generated once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _k2local_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the built-in tiny checkpoint cache at a per-session temp dir (hermetic tests)."""
    d = tmp_path_factory.mktemp("k2cache")
    os.environ.setdefault("K2LOCAL_CACHE", str(d))
    return Path(os.environ["K2LOCAL_CACHE"])


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory: pytest.TempPathFactory):
    """tiny_factory(variant) -> path of a tiny random checkpoint of that variant (built once)."""
    from k2local.tiny import make_tiny

    made: dict[str, Path] = {}

    def get(variant: str = "kimi_k2") -> Path:
        if variant not in made:
            made[variant] = make_tiny(tmp_path_factory.mktemp(f"tiny-{variant}"), variant)
        return made[variant]

    return get


@pytest.fixture(scope="session")
def tiny_k2(tiny_factory) -> Path:
    return tiny_factory("kimi_k2")


def shared_kimi_dir() -> Path | None:
    """../shared/kimi_k2 beside the checkout (real Kimi K2 tokenizer files), or $K2_SHARED."""
    env = os.environ.get("K2_SHARED")
    cands = [Path(env) / "kimi_k2" if env else None, Path(__file__).resolve().parents[2] / "shared" / "kimi_k2"]
    for c in cands:
        if c is not None and (c / "tiktoken.model").exists():
            return c
    return None


@pytest.fixture(scope="session")
def tiny_ds(tiny_factory) -> Path:
    """The tiny DeepSeek-V3 checkpoint (HF tokenizer.json layout, no tiktoken.model)."""
    return tiny_factory("deepseek_v3")


@pytest.fixture(scope="session")
def ggml_quantize_chunk():
    """llama.cpp's ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix) from llama-cpp-python, as
    run(x [rows, cols], qtype, imatrix=None) -> uint8 [rows, row bytes] (the IQ1 / IQ2 types need the imatrix)."""
    pytest.importorskip("llama_cpp")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from tests.peers import llama_cpp as llama

    fn = llama.ggml_quantize_chunk()

    def run(x: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        bs, bb = GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]
        out = np.zeros((x.shape[0], x.shape[1] // bs * bb), np.uint8)
        im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        n = fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
               None if im is None else im.ctypes.data)
        assert n == out.nbytes
        return out

    return run


# per MoE layer (gate, up, down), cycled: Unsloth-style mixes of IQ types (llama.cpp's IQ1_M / IQ2_XS / IQ2_S
# quantizers take seconds per matrix set: the kernel tests cover those on smaller matrices)
IQ_EXPERT_TYPES = [{"ffn_gate_exps": 16, "ffn_up_exps": 18, "ffn_down_exps": 23},  # IQ2_XXS, IQ3_XXS, IQ4_XS
                   {"ffn_gate_exps": 19, "ffn_up_exps": 23, "ffn_down_exps": 16}]  # IQ1_S, IQ4_XS, IQ2_XXS


@pytest.fixture(scope="session")
def iq_gguf(tiny_k2, tmp_path_factory, ggml_quantize_chunk) -> Path:
    """The tiny Kimi K2 checkpoint as GGUF with its routed experts quantized by llama.cpp (ggml_quantize_chunk,
    with an importance matrix) to IQ types (IQ_EXPERT_TYPES), everything else kept in F32."""
    import gguf

    from k2local.convert.to_gguf import convert

    d = tmp_path_factory.mktemp("iq")
    f32 = convert(tiny_k2, d / "tiny-f32.gguf", "f32").paths[0]
    r = gguf.GGUFReader(str(f32))
    out = d / "tiny-iq-experts.gguf"
    w = gguf.GGUFWriter(str(out), str(r.fields["general.architecture"].contents()))
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    rng = np.random.default_rng(3)
    layers = sorted({int(t.name.split(".")[1]) for t in r.tensors if "_exps" in t.name})
    for t in r.tensors:
        data = np.asarray(t.data)
        kind = t.name.split(".")[-2]
        if "_exps" in t.name:
            mix = IQ_EXPERT_TYPES[layers.index(int(t.name.split(".")[1])) % len(IQ_EXPERT_TYPES)]
            qt = gguf.GGMLQuantizationType(mix[kind])
            q = np.stack([ggml_quantize_chunk(e, qt, rng.uniform(0.5, 2.0, e.shape[1])) for e in data])
            w.add_tensor(t.name, q, raw_dtype=qt)
        else:
            w.add_tensor(t.name, np.array(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
