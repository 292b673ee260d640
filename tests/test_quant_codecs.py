"""GGUF tensor codecs (quant.codecs): layout, accuracy, and bit-identity with llama.cpp.

The llama.cpp comparisons use llama-cpp-python's own libraries: ggml_quantize_chunk (what llama-quantize
calls per tensor) on hard-case data, and llama_model_quantize end to end on a tiny llama-architecture GGUF.
They skip when llama_cpp is not installed.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from quant import codecs
from tests.peers import llama_cpp as llama

QUANT_TYPES = [T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K]
K_TYPES = [T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K]
FLOAT_TYPES = [T.F32, T.F16, T.BF16]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The codecs issue many small ops; on a small shared machine OpenMP fan-out costs more than it gains."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Weight-like data: heavy tails, per-row scale spread, an all-zero block and an all-zero sub-block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    x = x + 0.3 * torch.randn(rows, cols, generator=g) ** 3
    x[0, :256] = 0
    x[1, 32:48] = 0
    return (0.02 * x).float()


def _hard_cases(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Data families that stress rounding ties, degenerate groups, fp16 subnormals and overflow."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "normal":
        return x * np.float32(0.02)
    if kind == "heavy":
        return (rng.standard_t(3, (rows, cols)) * 0.01).astype(np.float32)
    if kind == "positive":
        return np.abs(x)
    if kind == "sparse":
        x[rng.random((rows, cols)) < 0.7] = 0
        return x
    if kind == "ties":
        return (np.round(x * 2) / 2).astype(np.float32)
    if kind == "constant":
        return np.repeat(x[:, ::16, None], 16, axis=2).reshape(rows, cols)
    if kind == "tiny":
        return x * np.float32(1e-39)
    if kind == "scales":
        spread = np.exp(rng.uniform(-40, 40, (rows, cols // 16, 1))).astype(np.float32)
        return (x.reshape(rows, cols // 16, 16) * spread).reshape(rows, cols)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------- API


def test_geometry() -> None:
    assert codecs.block_size(T.Q4_K) == 256 and codecs.block_size(T.Q8_0) == 32 and codecs.block_size(T.BF16) == 1
    assert codecs.bytes_per_row(T.Q4_K, 7168) == 28 * 144
    assert codecs.bytes_per_row(T.Q8_0, 64) == 68
    assert codecs.bytes_per_row(T.F32, 3) == 12
    for qtype in QUANT_TYPES:
        bs, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        assert codecs.bytes_per_row(qtype, 4 * bs) == 4 * nbytes
    assert codecs.can_quantize(T.Q4_K, 512) and not codecs.can_quantize(T.Q4_K, 320)
    assert codecs.can_quantize(T.Q8_0, 320) and not codecs.can_quantize(T.Q8_0, 100)
    assert not codecs.can_quantize(T.IQ2_XXS, 256)


def test_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        codecs.quantize(torch.zeros(2, 320), T.Q4_K)
    with pytest.raises(ValueError, match="unsupported"):
        codecs.quantize(torch.zeros(2, 256), T.IQ2_XXS)
    with pytest.raises(ValueError, match="imatrix"):
        codecs.quantize(torch.zeros(2, 256), T.Q4_K, imatrix=torch.ones(255))
    with pytest.raises(ValueError, match="whole number"):
        codecs.dequantize(np.zeros(145, np.uint8), T.Q4_K, 256)


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES)
def test_shapes_chunking_and_input_dtypes(qtype: T) -> None:
    x = _weights(12, 512, seed=1)
    ref = codecs.quantize(x, qtype)
    assert ref.shape == (12, codecs.bytes_per_row(qtype, 512)) and ref.dtype == np.uint8
    # chunk boundaries, leading dims and numpy input do not change the bytes
    assert np.array_equal(codecs.quantize(x, qtype, chunk_weights=1000), ref)
    assert np.array_equal(codecs.quantize(x, qtype, workers=3), ref)  # chunks in a thread pool
    assert np.array_equal(codecs.quantize(x.reshape(3, 4, 512), qtype), ref)
    assert np.array_equal(codecs.quantize(x.numpy(), qtype), ref)
    # bf16 input is quantized from its exact float32 values
    xb = x.to(torch.bfloat16)
    assert np.array_equal(codecs.quantize(xb, qtype), codecs.quantize(xb.float(), qtype))
    out = codecs.dequantize(torch.from_numpy(ref), qtype, 512, chunk_weights=1000)
    assert out.shape == (12, 512) and out.dtype == torch.float32
    assert torch.equal(out, codecs.dequantize(ref.reshape(-1), qtype, 512))


# ---------------------------------------------------------------------------------------------- (a) gguf agrees


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES)
def test_dequantize_matches_gguf_package(qtype: T) -> None:
    x = _weights(8, 1024, seed=2)
    data = codecs.quantize(x, qtype)
    ours = codecs.dequantize(data, qtype, 1024).numpy()
    theirs = gguf.quants.dequantize(data, qtype).reshape(8, 1024)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_imatrix_bytes_decode_with_gguf_package(qtype: T) -> None:
    x = _weights(4, 512, seed=3)
    imatrix = torch.rand(512, generator=torch.Generator().manual_seed(3)) * 5
    data = codecs.quantize(x, qtype, imatrix=imatrix)
    theirs = gguf.quants.dequantize(data, qtype).reshape(4, 512)
    np.testing.assert_array_equal(codecs.dequantize(data, qtype, 512).numpy(), theirs)


# ---------------------------------------------------------------------------------------------- (b) accuracy


def _rel_mse(x: torch.Tensor, qtype: T, imatrix: torch.Tensor | None = None,
             weights: torch.Tensor | None = None) -> float:
    y = codecs.dequantize(codecs.quantize(x, qtype, imatrix=imatrix), qtype, x.shape[1])
    w = torch.ones_like(x) if weights is None else weights.expand_as(x)
    return float((w * (y - x) ** 2).sum() / (w * x**2).sum())


def test_roundtrip_error_is_ordered_by_bits() -> None:
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(4)) * 0.02
    err = {q: _rel_mse(x, q) for q in QUANT_TYPES}
    order = [T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K]
    assert all(err[a] < err[b] for a, b in zip(order, order[1:])), err
    assert err[T.Q8_0] < 1e-4 and err[T.Q6_K] < 1e-3 and err[T.Q4_K] < 1e-2 and err[T.Q2_K] < 0.15, err
    for qtype in FLOAT_TYPES:
        assert _rel_mse(x, qtype) < 1e-4


def test_imatrix_lowers_weighted_error() -> None:
    x = torch.randn(32, 1024, generator=torch.Generator().manual_seed(5)) * 0.02
    importance = torch.ones(1024)
    importance[::8] = 100.0  # a few columns matter much more
    for qtype in [T.Q4_K, T.Q3_K, T.Q2_K]:
        plain = _rel_mse(x, qtype, weights=importance)
        weighted = _rel_mse(x, qtype, imatrix=importance, weights=importance)
        assert weighted < plain, (qtype, weighted, plain)


def test_zero_rows_stay_zero() -> None:
    x = torch.zeros(2, 512)
    for qtype in QUANT_TYPES:
        assert torch.equal(codecs.dequantize(codecs.quantize(x, qtype), qtype, 512), x)


# ---------------------------------------------------------------------------------------------- (c) llama.cpp


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


HARD_KINDS = ["normal", "heavy", "positive", "sparse", "ties", "constant", "tiny", "scales"]


@pytest.mark.parametrize("qtype", QUANT_TYPES + [T.F16, T.BF16])
def test_bit_identical_with_ggml_quantize_chunk(qtype: T, ggml_quantize_chunk) -> None:
    rng = np.random.default_rng(int(qtype))
    for kind in HARD_KINDS:
        x = _hard_cases(kind, 4, 1024, rng)
        with np.errstate(all="ignore"):
            ours = codecs.quantize(torch.from_numpy(x), qtype)
        theirs = ggml_quantize_chunk(x, qtype)
        assert np.array_equal(ours, theirs), f"{qtype.name} {kind}: {(ours == theirs).mean():.6f} of bytes equal"


@pytest.mark.parametrize("qtype", K_TYPES)
def test_imatrix_bit_identical_with_ggml_quantize_chunk(qtype: T, ggml_quantize_chunk) -> None:
    rng = np.random.default_rng(100 + int(qtype))
    imatrices = {
        "random": rng.random(1024).astype(np.float32) * 10,
        "sparse": (rng.random(1024) * (rng.random(1024) < 0.1)).astype(np.float32),
        "zeros": np.zeros(1024, np.float32),
    }
    for kind in ["normal", "heavy", "sparse", "ties", "scales"]:
        x = _hard_cases(kind, 4, 1024, rng)
        for name, im in imatrices.items():
            with np.errstate(all="ignore"):
                ours = codecs.quantize(torch.from_numpy(x), qtype, imatrix=torch.from_numpy(im))
            theirs = ggml_quantize_chunk(x, qtype, im)
            assert np.array_equal(ours, theirs), f"{qtype.name} {kind}/{name}: {(ours == theirs).mean():.6f} equal"


@pytest.mark.parametrize("qtype", K_TYPES)
def test_bit_identical_across_numpy_block_edges(qtype: T, ggml_quantize_chunk, monkeypatch) -> None:
    """The CPU searches run numpy over blocks of groups; tiny blocks, a last block of one group, and a single
    group (where numpy would sum pairwise) must still give ggml's bytes."""
    from quant import kquant_search

    monkeypatch.setattr(kquant_search, "_NP_BLOCK", 32 * 17)
    rng = np.random.default_rng(11)
    for rows, cols in [(1, 256), (3, 768), (5, 1280)]:
        x = _hard_cases("heavy", rows, cols, rng)
        im = rng.random(cols).astype(np.float32) * 3
        assert np.array_equal(codecs.quantize(torch.from_numpy(x), qtype), ggml_quantize_chunk(x, qtype))
        assert np.array_equal(codecs.quantize(torch.from_numpy(x), qtype, imatrix=torch.from_numpy(im)),
                              ggml_quantize_chunk(x, qtype, im))


def write_tiny_llama_gguf(path: Path, seed: int = 0, n_layer: int = 2, n_embd: int = 256, n_ff: int = 256,
                          n_vocab: int = 256, n_expert: int = 2) -> dict[str, np.ndarray]:
    """A loadable llama-architecture F32 GGUF (MoE FFNs, so 3-D expert tensors too); returns name -> data."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}

    def add(name: str, *shape: int) -> None:
        scale = np.exp(rng.normal(0, 0.5, shape[:-1] + (1,)))  # per-row scale spread
        tensors[name] = (rng.standard_t(5, shape) * 0.02 * scale).astype(np.float32)

    def norm(name: str, n: int) -> None:
        tensors[name] = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    add("token_embd.weight", n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", n_embd)
        for t in ["attn_q", "attn_k", "attn_v", "attn_output"]:
            add(p + t + ".weight", n_embd, n_embd)
        norm(p + "ffn_norm.weight", n_embd)
        add(p + "ffn_gate_inp.weight", n_expert, n_embd)
        add(p + "ffn_gate_exps.weight", n_expert, n_ff, n_embd)
        add(p + "ffn_up_exps.weight", n_expert, n_ff, n_embd)
        add(p + "ffn_down_exps.weight", n_expert, n_embd, n_ff)
    norm("output_norm.weight", n_embd)
    add("output.weight", n_vocab, n_embd)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(n_embd // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(2)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0)  # ALL_F32
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def _llama_quantize(src: Path, dst: Path, ftype: int, imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama_model_quantize in a child process (tests.peers.llama_cpp): a llama.cpp crash fails the test only."""
    llama.isolated("quantize", str(src), str(dst), ftype, imatrix=imatrix)


_OURS: dict[tuple[str, int], np.ndarray] = {}  # (tensor, type) -> our bytes, shared by the ftype tests


def _ours(name: str, src: np.ndarray, qtype: T) -> np.ndarray:
    key = (name, int(qtype))
    if key not in _OURS:
        _OURS[key] = codecs.quantize(torch.from_numpy(src.reshape(-1, src.shape[-1])), qtype).reshape(-1)
    return _OURS[key]


def _compare_file(dst: Path, tensors: dict[str, np.ndarray], imatrix: dict[str, np.ndarray] | None = None
                  ) -> tuple[dict[str, int], int, int]:
    """Quantize each F32 source tensor to the type llama.cpp chose; return (types seen, equal bytes, bytes)."""
    seen: dict[str, int] = {}
    equal = total = 0
    for t in gguf.GGUFReader(str(dst)).tensors:
        qtype = T(t.tensor_type)
        src = tensors[t.name]
        if src.ndim == 1:
            continue
        seen[qtype.name] = seen.get(qtype.name, 0) + 1
        theirs = np.asarray(t.data).view(np.uint8).reshape(-1)
        im = None if imatrix is None else imatrix.get(t.name)
        rows = src.reshape(-1, src.shape[-1])
        if im is not None and src.ndim == 3:  # one imatrix slice per expert
            per_expert = im.reshape(src.shape[0], src.shape[-1])
            ours = np.concatenate([codecs.quantize(torch.from_numpy(e), qtype, imatrix=torch.from_numpy(m))
                                   for e, m in zip(src, per_expert)]).reshape(-1)
        elif im is not None:
            ours = codecs.quantize(torch.from_numpy(rows), qtype, imatrix=torch.from_numpy(im)).reshape(-1)
        else:
            ours = _ours(t.name, src, qtype)
        assert ours.size == theirs.size, t.name
        equal += int((ours == theirs).sum())
        total += ours.size
    return seen, equal, total


FTYPES = {  # llama_ftype -> types that must appear in the output
    "Q8_0": (7, {"Q8_0"}),
    "Q6_K": (18, {"Q6_K"}),
    "Q5_K_M": (17, {"Q5_K", "Q6_K"}),
    "Q4_K_M": (15, {"Q4_K", "Q6_K"}),
    "Q3_K_M": (12, {"Q3_K", "Q4_K"}),
    "Q2_K": (10, {"Q2_K", "Q3_K"}),
    "BF16": (32, {"BF16"}),
    "F16": (1, {"F16"}),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.mark.parametrize("ftype_name", list(FTYPES))
def test_bit_identical_with_llama_model_quantize(ftype_name: str, llama_cpp, tiny_model, tmp_path) -> None:
    src, tensors = tiny_model
    ftype, expected_types = FTYPES[ftype_name]
    dst = tmp_path / f"tiny-{ftype_name}.gguf"
    _llama_quantize(src, dst, ftype)
    seen, equal, total = _compare_file(dst, tensors)
    assert expected_types <= set(seen), seen
    assert equal == total, f"{ftype_name}: {equal}/{total} bytes equal ({seen})"


def test_imatrix_bit_identical_with_llama_model_quantize(llama_cpp, tiny_model, tmp_path) -> None:
    src, tensors = tiny_model
    rng = np.random.default_rng(7)
    imatrix = {name: (rng.random(a.shape[-1] * (a.shape[0] if a.ndim == 3 else 1)) * 4).astype(np.float32)
               for name, a in tensors.items() if a.ndim >= 2 and name != "token_embd.weight"}
    dst = tmp_path / "tiny-Q3_K_M-imatrix.gguf"
    _llama_quantize(src, dst, FTYPES["Q3_K_M"][0], imatrix)
    seen, equal, total = _compare_file(dst, tensors, imatrix)
    assert {"Q3_K", "Q4_K"} <= set(seen), seen
    assert equal == total, f"{equal}/{total} bytes equal ({seen})"


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_cuda_matches_cpu(qtype: T) -> None:
    x = _weights(16, 1024, seed=8)
    imatrix = torch.rand(1024, generator=torch.Generator().manual_seed(8))
    assert np.array_equal(codecs.quantize(x.cuda(), qtype), codecs.quantize(x, qtype))
    if qtype in K_TYPES:
        assert np.array_equal(codecs.quantize(x.cuda(), qtype, imatrix=imatrix.cuda()),
                              codecs.quantize(x, qtype, imatrix=imatrix))
    data = codecs.quantize(x, qtype)
    assert torch.equal(codecs.dequantize(torch.from_numpy(data).cuda(), qtype, 1024).cpu(),
                       codecs.dequantize(data, qtype, 1024))
