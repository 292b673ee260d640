"""CPU expert kernels (offload.kernels) against gguf's dequantizer + float matmul.

IQ types are checked on bytes made by llama.cpp's own quantizer (ggml_quantize_chunk from llama-cpp-python, with an
importance matrix) and on random blocks; the AVX-512 paths also run on CPUs without AVX-512 when SIMDe's headers are
installed (libsimde-dev): the library is then built once more with the intrinsics emulated."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize

from offload import kernels as K
from quant.random_blocks import SCALE_OFFSETS, random_blocks

IQ_TYPES = [Q.IQ4_XS, Q.IQ4_NL, Q.IQ2_XXS, Q.IQ3_XXS, Q.IQ1_S, Q.IQ1_M, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_S]
C_TYPES = [Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K] + IQ_TYPES
needs_c = pytest.mark.skipif(not K.available(), reason=f"compiled kernels unavailable: {K.load_error()}")


def act_block(qt: int) -> int:
    return 32 if qt in (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.IQ4_NL) else 256


def quant_act(x: np.ndarray, blk: int) -> np.ndarray:
    """Emulate the kernels' int8 activation quantization (absmax / 127 per block, round to even)."""
    xb = x.astype(np.float32).reshape(x.shape[0], -1, blk)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -127, 127)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture
def isas():
    """Every instruction-set path this CPU can run; restores the best one afterwards."""
    if not K.available():
        pytest.skip("compiled kernels unavailable")
    names = []
    for name, full in (("generic", "generic"), ("avx2", "avx2"), ("avx512", "avx512-vnni"),
                       ("avx512-gfni", "avx512-vnni-gfni")):
        got = K.set_isa(name)
        if got == full and got not in names:
            names.append(got)
    yield names
    K.set_isa("best")


@needs_c
@pytest.mark.parametrize("qt", C_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("T", [1, 5, 20])  # 20: the many-token (prefill) kernels where a type has one
def test_qmatmul_matches_dequant_reference(qt, T, isas):
    rng = np.random.default_rng(int(qt) * 10 + T)
    rows, cols = 37, 512
    w = random_blocks(qt, rows, cols, rng)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    wd = dequantize(w, qt).astype(np.float64)
    exact = quant_act(x, act_block(qt)) @ wd.T  # same int8 activations the kernels use
    plain = x.astype(np.float64) @ wd.T
    outs = {}
    for name in isas:
        K.set_isa(name)
        for panel in (True, False) if T >= 8 else (True,):  # the decode-once GEMM (AVX-512) on and off
            K.set_panel_gemm(panel)
            y = K.qmatmul(torch.from_numpy(x), w, int(qt), cols).numpy()
            assert y.shape == (T, rows)
            assert rel(y, exact) < 2e-5, (name, panel)
            assert rel(y, plain) < 2e-2, (name, panel)
        K.set_panel_gemm(True)
        outs[name] = y
    ys = list(outs.values())
    for y in ys[1:]:
        assert rel(y, ys[0]) < 2e-6


@needs_c
def test_qmatmul_extreme_blocks(isas):
    """All-max and all-zero quants, and large activations, through every path."""
    rng = np.random.default_rng(1)
    cols = 256
    for qt in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        w = random_blocks(qt, 4, cols, rng)
        scales = set(SCALE_OFFSETS[qt])
        keep = np.zeros(w.shape[1], dtype=bool)
        for off in scales:
            keep[off:off + 2] = True
        w[0, ~keep] = 0xFF
        w[1, ~keep] = 0x00
        x = (rng.standard_normal((2, cols)) * 1e3).astype(np.float32)
        x[1, :] = 0.0  # all-zero activation row
        exact = quant_act(x, 256) @ dequantize(w, qt).astype(np.float64).T
        for name in isas:
            K.set_isa(name)
            y = K.qmatmul(torch.from_numpy(x), w, int(qt), cols).numpy()
            assert rel(y[0], exact[0]) < 2e-5, (qt.name, name)
            assert np.all(y[1] == 0.0)


@needs_c
def test_qmatmul_inputs_and_batches():
    rng = np.random.default_rng(2)
    rows, cols = 9, 256
    w = random_blocks(Q.Q4_K, rows, cols, rng)
    wd = dequantize(w, Q.Q4_K).astype(np.float64)
    # 1-D activation, torch weights, flat bytes
    x1 = rng.standard_normal(cols).astype(np.float32)
    y1 = K.qmatmul(torch.from_numpy(x1), torch.from_numpy(w.reshape(-1)), int(Q.Q4_K), cols)
    assert y1.shape == (rows,)
    assert rel(y1.numpy(), quant_act(x1[None], 256)[0] @ wd.T) < 2e-5
    # more tokens than one kernel call takes (64) and a preallocated output
    xb = rng.standard_normal((70, cols)).astype(np.float32)
    out = torch.full((70, rows), float("nan"))
    K.qmatmul(torch.from_numpy(xb), w, int(Q.Q4_K), cols, out=out)
    assert rel(out.numpy(), quant_act(xb, 256) @ wd.T) < 2e-5
    with pytest.raises(ValueError):
        K.qmatmul(torch.zeros(2, 100), w, int(Q.Q4_K), 100)


@needs_c
@pytest.mark.parametrize("layout", range(5))
def test_activation_quantization_same_bytes_on_every_isa(layout, isas):
    """The vectorized int8 activation quantization writes exactly the portable version's bytes (values, block
    scales, block sums; every layout), including round-half-to-even ties, all-zero blocks and outliers."""
    rng = np.random.default_rng(layout)
    cols = 1024
    x = rng.standard_normal(cols).astype(np.float32)
    x[256:512] = 0.0  # an all-zero block
    x[600] = 1e6  # one outlier flattens its block
    # exact ties: with amax 127 every value maps to itself, so k + 0.5 sits exactly halfway
    x[768:1024] = (np.arange(256) % 64 - 32 + 0.5).astype(np.float32)
    x[768] = 127.0
    lib = K._load()
    n = lib.k2k_act_bytes(cols)
    out = {}
    for name in isas:
        K.set_isa(name)
        buf = np.zeros(n, np.uint8)
        assert lib.k2k_quantize_act(x.ctypes.data, cols, layout, buf.ctypes.data) == 0
        out[name] = buf
    assert lib.k2k_quantize_act(x.ctypes.data, 1000, layout, out[isas[0]].ctypes.data) == -2  # not whole blocks
    q = out[isas[0]][:cols].view(np.int8)
    blk = 32 if layout == 3 else 256
    assert (q[:cols].reshape(-1, blk) != 0).any(axis=1).tolist() == [b not in range(256 // blk, 512 // blk)
                                                                     for b in range(cols // blk)]
    for name in isas[1:]:
        assert np.array_equal(out[name], out[isas[0]]), name


@needs_c
@pytest.mark.parametrize("qt,T", [(Q.Q8_0, 1), (Q.Q8_0, 70), (Q.Q4_K, 3)], ids=lambda v: getattr(v, "name", str(v)))
def test_per_head_matmul_matches_reference(qt, T, isas):
    """QHeads (MLA's absorbed k_b / v_b kept quantized): every head's own matrix against its own activations,
    on every ISA and thread count, also past the kernel's 64-token tile."""
    rng = np.random.default_rng(int(qt) + T)
    heads, rows, cols = 5, 48, 512
    w = random_blocks(qt, heads * rows, cols, rng)
    x = torch.from_numpy(rng.standard_normal((heads, T, cols)).astype(np.float32))
    wd = dequantize(w, qt).astype(np.float64).reshape(heads, rows, cols)
    exact = np.stack([quant_act(x[h].numpy(), act_block(qt)) @ wd[h].T for h in range(heads)])
    mm = K.QHeads(w, int(qt), heads, cols)
    assert mm.rows == rows
    before = K.get_threads()
    try:
        for name in isas:
            K.set_isa(name)
            for n in (1, 3):
                K.set_threads(n)
                y = mm(x)
                assert y.shape == (heads, T, rows)
                assert rel(y.numpy(), exact) < 2e-5, (name, n)
    finally:
        K.set_threads(before)
    with pytest.raises(ValueError, match="expected"):
        mm(x[:, :, :256])


@needs_c
@pytest.mark.parametrize("cols", [32, 64, 128])
def test_short_q8_0_rows_one_token(cols, isas):
    """Rows of 1-4 Q8_0 blocks (MLA's k_b has 128 columns) for one token, on every ISA: right, and bit-identical
    however the rows are split between threads and heads (the short-row kernel takes several rows per step)."""
    rng = np.random.default_rng(cols)
    heads, rows = 3, 45  # odd: the last step of each head is partial
    w = random_blocks(Q.Q8_0, heads * rows, cols, rng)
    x = torch.from_numpy(rng.standard_normal((heads, 1, cols)).astype(np.float32))
    wd = dequantize(w, Q.Q8_0).astype(np.float64).reshape(heads, rows, cols)
    exact = np.stack([quant_act(x[h].numpy(), 32) @ wd[h].T for h in range(heads)])
    mm = K.QHeads(w, int(Q.Q8_0), heads, cols)
    before = K.get_threads()
    try:
        for name in isas:
            K.set_isa(name)
            K.set_threads(1)
            y1 = mm(x)
            assert rel(y1.numpy(), exact) < 2e-5, name
            for h in range(heads):  # one head as its own matrix, then rows one at a time
                one = K.qmatmul(x[h], w[h * rows:(h + 1) * rows], int(Q.Q8_0), cols)
                assert torch.equal(one, y1[h]), name
                assert torch.equal(torch.cat([K.qmatmul(x[h], w[h * rows + r:h * rows + r + 1], int(Q.Q8_0), cols)
                                              for r in range(rows)], 1), y1[h]), name
            for n in (2, 3):
                K.set_threads(n)
                assert torch.equal(mm(x), y1), (name, n)
    finally:
        K.set_threads(before)


@needs_c
def test_threads_give_identical_results():
    rng = np.random.default_rng(3)
    rows, cols = 301, 768
    w = random_blocks(Q.Q3_K, rows, cols, rng)
    x = torch.from_numpy(rng.standard_normal((3, cols)).astype(np.float32))
    before = K.get_threads()
    try:
        K.set_threads(1)
        y1 = K.qmatmul(x, w, int(Q.Q3_K), cols)
        for n in (2, 3):
            assert K.set_threads(n, pin=(n == 3)) == n
            assert K.get_threads() == n
            assert torch.equal(K.qmatmul(x, w, int(Q.Q3_K), cols), y1)
    finally:
        K.set_threads(before)


@needs_c
@pytest.mark.parametrize("qt", C_TYPES, ids=lambda q: q.name)
def test_single_token_row_pairs_bit_identical(qt, isas):
    """One token runs two weight rows per kernel call where a pair kernel exists; the result must equal
    the one-row kernels bit for bit, whatever the thread count (chunk edges move the pairing) and for
    odd row counts (a lone last row)."""
    rng = np.random.default_rng(int(qt) + 100)
    rows, cols = 75, 768
    w = random_blocks(qt, rows, cols, rng)
    x = torch.from_numpy(rng.standard_normal((1, cols)).astype(np.float32))
    exact = quant_act(x.numpy(), act_block(qt)) @ dequantize(w, qt).astype(np.float64).T
    before, pairs_before = K.get_threads(), K.set_row_pairs()
    try:
        for name in isas:
            K.set_isa(name)
            K.set_row_pairs(False)
            K.set_threads(1)
            ref = K.qmatmul(x, w, int(qt), cols)
            assert rel(ref.numpy(), exact) < 2e-5, name
            assert K.set_row_pairs(True)
            for n in (1, 2, 3):
                K.set_threads(n)
                assert torch.equal(K.qmatmul(x, w, int(qt), cols), ref), (name, n)
    finally:
        K.set_row_pairs(pairs_before)
        K.set_threads(before)


@pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")), reason="no C compiler")
def test_kernels_compile_where_a_compiler_exists():
    """With a C compiler at hand the library must build and load: a compile error would otherwise turn every
    kernel test into a skip."""
    if os.environ.get("K2LOCAL_KERNELS", "").lower() == "torch":
        pytest.skip("torch fallback forced")
    assert K.available(), K.load_error()


def test_row_bytes_and_support():
    assert K.row_bytes(int(Q.Q4_K), 7168) == 28 * 144
    assert K.row_bytes(int(Q.Q8_0), 64) == 68
    with pytest.raises(ValueError):
        K.row_bytes(int(Q.Q4_K), 100)
    assert all(K.supported(int(q)) for q in C_TYPES) and not K.supported(int(Q.Q4_1))
    assert K.row_bytes(int(Q.IQ2_XXS), 7168) == 28 * 66 and K.row_bytes(int(Q.IQ4_NL), 64) == 36
    assert K.isa() in ("avx512-vnni-gfni", "avx512-vnni", "avx2", "generic", "torch")
    assert K.numa_nodes() >= 1 and K.default_threads() >= 1


def moe_reference(x, experts, types, idx, wts, hidden, inter, emulate: bool) -> np.ndarray:
    """float64 reference; emulate=True also applies the kernels' int8 quantization of x and h."""
    tg, tu, td = types
    y = np.zeros((x.shape[0], hidden))
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            if e < 0:
                continue
            g, u, d = (dequantize(m, q).astype(np.float64) for m, q in zip(experts[e], types))
            xg = quant_act(x[t:t + 1], act_block(tg))[0] if emulate else x[t].astype(np.float64)
            xu = quant_act(x[t:t + 1], act_block(tu))[0] if emulate else x[t].astype(np.float64)
            a, b = g @ xg, u @ xu
            h = a / (1 + np.exp(-a)) * b
            if emulate:
                h = quant_act(h[None].astype(np.float32), act_block(td))[0]
            y[t] += wts[t, k] * (d @ h)
    return y


MOE_CASES = [
    # (gate, up, down), hidden, inter, T
    ((Q.Q4_K, Q.Q4_K, Q.Q6_K), 512, 768, 1),
    ((Q.Q2_K, Q.Q4_K, Q.Q3_K), 256, 512, 5),  # gate/up with different activation layouts
    ((Q.Q8_0, Q.Q8_0, Q.Q8_0), 256, 96, 4),   # inter not a multiple of 256
    ((Q.Q5_K, Q.Q5_K, Q.Q4_0), 256, 256, 3),
    # Unsloth-style mixes: IQ gate/up, another IQ or K-quant down
    ((Q.IQ2_XXS, Q.IQ2_XXS, Q.IQ3_XXS), 512, 256, 1),
    ((Q.IQ1_S, Q.IQ1_M, Q.IQ4_XS), 256, 512, 3),
    ((Q.IQ4_XS, Q.IQ4_XS, Q.IQ4_NL), 256, 96, 8),   # IQ4_XS gate/up in another activation order than IQ4_NL down
    ((Q.IQ2_XS, Q.IQ3_S, Q.IQ2_S), 256, 256, 8),
    ((Q.IQ3_XXS, Q.Q2_K, Q.Q4_K), 768, 256, 3),
    ((Q.Q4_K, Q.Q8_0, Q.IQ4_XS), 512, 256, 5),   # gate and up with other block sizes (256 / 32 values)
    ((Q.IQ4_XS, Q.Q4_K, Q.Q6_K), 256, 512, 40),  # prefill-sized: experts with 8+ tokens (many-token GEMMs)
]


@needs_c
@pytest.mark.parametrize("types,hidden,inter,T", MOE_CASES, ids=lambda c: str(c))
def test_moe_experts_matches_reference(types, hidden, inter, T, isas):
    rng = np.random.default_rng(hidden + inter + T)
    E, Kk = 6, 3
    experts = [(random_blocks(types[0], inter, hidden, rng), random_blocks(types[1], inter, hidden, rng),
                random_blocks(types[2], hidden, inter, rng)) for _ in range(E)]
    x = rng.standard_normal((T, hidden)).astype(np.float32)
    idx = np.stack([rng.choice(E, Kk, replace=False) for _ in range(T)]).astype(np.int32)
    if T > 1:
        idx[1, 2] = -1  # skipped slot
        idx[-1] = idx[0]  # two tokens sharing all experts
    wts = rng.uniform(0.1, 1.0, idx.shape).astype(np.float32)
    exact = moe_reference(x, experts, types, idx, wts, hidden, inter, emulate=True)
    plain = moe_reference(x, experts, types, idx, wts, hidden, inter, emulate=False)
    results = []
    for name in isas:
        K.set_isa(name)
        for threads in (1, 3):
            K.set_threads(threads)
            y = K.moe_experts(torch.from_numpy(x), experts, [int(t) for t in types], idx, wts).numpy()
            assert rel(y, exact) < 2e-3, (name, threads)
            assert rel(y, plain) < 3e-2, (name, threads)
            results.append(y)
    K.set_threads(None)
    for y in results[1:]:
        assert rel(y, results[0]) < 1e-5


@needs_c
@needs_c
def test_moe_one_row_given_k_times_as_a_stride_0_view(isas):
    """A decode step passes one token's row K times (one output row per routed expert) as a stride-0 view, which the
    kernel quantizes once: same bits as K real copies, on every ISA, and with differing gate/up layouts."""
    rng = np.random.default_rng(9)
    hidden, inter, E = 512, 256, 4
    for types in ((Q.Q4_K,) * 3, (Q.Q4_K, Q.Q2_K, Q.Q6_K)):
        experts = [tuple(random_blocks(t, r, c, rng) for t, (r, c) in zip(types, ((inter, hidden), (inter, hidden),
                                                                               (hidden, inter)))) for _ in range(E)]
        row = torch.from_numpy(rng.standard_normal((1, hidden)).astype(np.float32))
        idx = np.arange(E, dtype=np.int32).reshape(E, 1)
        ones = np.ones((E, 1), dtype=np.float32)
        for name in isas:
            K.set_isa(name)
            view = K.moe_experts(row.expand(E, hidden), experts, [int(t) for t in types], idx, ones)
            copies = K.moe_experts(row.repeat(E, 1), experts, [int(t) for t in types], idx, ones)
            assert torch.equal(view, copies), name


def test_moe_experts_accumulate_and_empty():
    rng = np.random.default_rng(5)
    hidden, inter = 256, 256
    experts = [tuple(random_blocks(Q.Q4_K, r, c, rng) for r, c in ((inter, hidden), (inter, hidden), (hidden, inter)))
               for _ in range(2)]
    x = torch.from_numpy(rng.standard_normal((2, hidden)).astype(np.float32))
    idx = np.array([[0, 1], [1, -1]], dtype=np.int32)
    wts = np.ones((2, 2), dtype=np.float32)
    y = K.moe_experts(x, experts, int(Q.Q4_K), idx, wts)
    base = torch.ones(2, hidden)
    out = base.clone()
    K.moe_experts(x, experts, int(Q.Q4_K), idx, wts, out=out, accumulate=True)
    assert torch.allclose(out, base + y, rtol=1e-5, atol=1e-5)
    none = np.full((2, 2), -1, dtype=np.int32)
    out2 = torch.full((2, hidden), 7.0)
    assert torch.all(K.moe_experts(x, experts, int(Q.Q4_K), none, wts, out=out2) == 0)


def test_torch_fallback_matches_float_reference(monkeypatch):
    monkeypatch.setenv("K2LOCAL_KERNELS", "torch")
    assert not K.available() and K.backend() == "torch" and K.isa() == "torch"
    rng = np.random.default_rng(6)
    rows, cols = 13, 256
    for qt in (Q.Q4_K, Q.Q8_0, Q.Q3_K):
        w = random_blocks(qt, rows, cols, rng)
        x = rng.standard_normal((2, cols)).astype(np.float32)
        y = K.qmatmul(torch.from_numpy(x), w, int(qt), cols)
        assert rel(y.numpy(), x.astype(np.float64) @ dequantize(w, qt).astype(np.float64).T) < 1e-5
    types = (Q.Q4_K, Q.Q4_K, Q.Q6_K)
    hidden, inter = 256, 256
    experts = [(random_blocks(types[0], inter, hidden, rng), random_blocks(types[1], inter, hidden, rng),
                random_blocks(types[2], hidden, inter, rng)) for _ in range(3)]
    x = rng.standard_normal((2, hidden)).astype(np.float32)
    idx = np.array([[0, 2], [2, -1]], dtype=np.int32)
    wts = np.array([[0.7, 0.3], [1.0, 0.0]], dtype=np.float32)
    y = K.moe_experts(torch.from_numpy(x), experts, [int(t) for t in types], idx, wts)
    ref = moe_reference(x, experts, types, idx, wts, hidden, inter, emulate=False)
    assert rel(y.numpy(), ref) < 1e-5


def test_types_without_c_kernel_use_fallback():
    """Q4_1 has no compiled kernel: qmatmul still answers (through gguf dequantization)."""
    rng = np.random.default_rng(7)
    w = random_blocks(Q.Q4_1, 5, 64, rng)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    y = K.qmatmul(torch.from_numpy(x), w, int(Q.Q4_1), 64)
    assert rel(y.numpy(), x.astype(np.float64) @ dequantize(w, Q.Q4_1).astype(np.float64).T) < 1e-5


@needs_c
def test_read_bandwidth_positive():
    buf = np.ones((1 << 22) + 64, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64
    assert K.read_bandwidth(buf[off:off + (1 << 22)], reps=2) > 0.0


# ---------------------------------------------------------------------------------------------- IQ types

def llama_weights(ggml_quantize_chunk, qt: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    return ggml_quantize_chunk(w, qt, rng.uniform(0.1, 2.0, cols))


@needs_c
@pytest.mark.parametrize("qt", IQ_TYPES, ids=lambda q: q.name)
def test_iq_qmatmul_on_llama_cpp_bytes(qt, isas, ggml_quantize_chunk):
    """llama.cpp-quantized rows (odd row count, 3 super-blocks) at batch 1, 3 and 8 on every ISA path."""
    rng = np.random.default_rng(int(qt))
    rows, cols = 37, 768
    w = llama_weights(ggml_quantize_chunk, qt, rows, cols, rng)
    wd = dequantize(w, qt).astype(np.float64)
    assert np.isfinite(wd).all() and np.abs(wd).max() > 0
    for T in (1, 3, 8):
        x = rng.standard_normal((T, cols)).astype(np.float32)
        exact = quant_act(x, act_block(qt)) @ wd.T
        plain = x.astype(np.float64) @ wd.T
        outs = []
        for name in isas:
            K.set_isa(name)
            y = K.qmatmul(torch.from_numpy(x), w, int(qt), cols).numpy()
            assert rel(y, exact) < 2e-5, (name, T)
            assert rel(y, plain) < 2e-2, (name, T)
            outs.append(y)
        for y in outs[1:]:
            assert rel(y, outs[0]) < 2e-6


@needs_c
@pytest.mark.parametrize("T", [1, 3, 8])
def test_iq_moe_on_llama_cpp_bytes(T, isas, ggml_quantize_chunk):
    """Fused experts on llama.cpp bytes: gate IQ2_XXS, up IQ1_M, down IQ3_XXS (types differ per matrix, as in
    Unsloth's files)."""
    rng = np.random.default_rng(40 + T)
    types = (Q.IQ2_XXS, Q.IQ1_M, Q.IQ3_XXS)
    hidden, inter, E, Kk = 512, 256, 4, 2
    experts = [(llama_weights(ggml_quantize_chunk, types[0], inter, hidden, rng),
                llama_weights(ggml_quantize_chunk, types[1], inter, hidden, rng),
                llama_weights(ggml_quantize_chunk, types[2], hidden, inter, rng)) for _ in range(E)]
    x = rng.standard_normal((T, hidden)).astype(np.float32)
    idx = np.stack([rng.choice(E, Kk, replace=False) for _ in range(T)]).astype(np.int32)
    wts = rng.uniform(0.1, 1.0, idx.shape).astype(np.float32)
    exact = moe_reference(x, experts, types, idx, wts, hidden, inter, emulate=True)
    for name in isas:
        K.set_isa(name)
        y = K.moe_experts(torch.from_numpy(x), experts, [int(t) for t in types], idx, wts).numpy()
        assert rel(y, exact) < 2e-3, name


def test_iq_grids_come_from_gguf_and_bad_tables_are_refused():
    """The codebooks are gguf's; the library checks what it is handed (sizes, value ranges, sign parity)."""
    tables = K.iq_tables()
    assert {16, 17, 18, 19, 20, 21, 22, K._GRID_KSIGNS} <= set(tables)
    assert set(np.unique(tables[16])) == {8, 25, 43} and set(np.unique(tables[19])) == {-1, 0, 1}
    lib = K._load()
    if lib is None:
        pytest.skip("compiled kernels unavailable")
    g = tables[16]
    assert lib.k2k_set_grid(16, g.ctypes.data, g.nbytes - 8) == -2  # wrong size
    bad = g.copy()
    bad[5] = 200  # 64 + 200 does not fit the unsigned-byte trick
    assert lib.k2k_set_grid(16, bad.ctypes.data, bad.nbytes) == -3
    ks = tables[K._GRID_KSIGNS].copy()
    ks[3] ^= 0x80  # parity bit the SIMD kernels would compute differently
    assert lib.k2k_set_grid(K._GRID_KSIGNS, ks.ctypes.data, ks.nbytes) == -3
    assert lib.k2k_set_grid(99, g.ctypes.data, g.nbytes) == -1
    assert K.supported(int(Q.IQ2_XXS))  # the good tables are still in place


# ---------------------------------------------------------------------------------------------- AVX-512 (emulated)

def _simde_include() -> str | None:
    for d in [os.environ.get("SIMDE_INCLUDE"), "/usr/include", "/usr/local/include"]:
        if d and (Path(d) / "simde" / "x86" / "avx512.h").exists():
            return d
    return None


@pytest.fixture(scope="module")
def emulated_avx512(tmp_path_factory):
    """The library built with -DK2K_EMULATE_AVX512 (AVX-512 intrinsics from SIMDe) when the CPU lacks AVX-512."""
    if not K.available():
        pytest.skip("compiled kernels unavailable")
    if K.set_isa("best").startswith("avx512"):
        pytest.skip("this CPU runs the AVX-512 kernels natively (test_* above cover them)")
    inc, cc = _simde_include(), os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if inc is None or cc is None or K.isa() != "avx2":
        pytest.skip("needs SIMDe headers (libsimde-dev), a C compiler and an AVX2 CPU")
    lib = _build_variant(tmp_path_factory, cc, "emu", ["-DK2K_EMULATE_AVX512", f"-I{inc}"])
    assert lib.k2k_isa_hw() == 3
    return lib


def _build_variant(tmp_path_factory, cc: str, tag: str, flags: list[str]) -> ctypes.CDLL:
    """The library (csrc/*.c) built once more (AVX2 baseline, -O1) with test-only flags, loaded and set up as the
    package's own."""
    out = tmp_path_factory.mktemp(tag) / f"k2kern-{tag}.so"
    cmd = [cc, "-O1", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-mavx2", "-mfma", "-mf16c", "-mbmi2",
           *flags, f'-DK2K_SRC_TAG="{tag}"', "-o", str(out), *map(str, K._build.sources()), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lib = ctypes.CDLL(str(out))
    K._declare(lib)
    K._set_grids(lib)
    lib.k2k_set_threads(2, 0)
    return lib


def _lib_matmul(lib, x: np.ndarray, w: np.ndarray, qt: Q, cols: int) -> np.ndarray:
    rows = w.shape[0]
    y = np.zeros((x.shape[0], rows), np.float32)
    rc = lib.k2k_matmul(int(qt), w.ctypes.data, rows, cols, w.shape[1], x.ctypes.data, x.shape[0], cols,
                        y.ctypes.data, rows)
    assert rc == 0
    return y


@pytest.mark.parametrize("qt", C_TYPES, ids=lambda q: q.name)
def test_avx512_kernels_emulated(qt, emulated_avx512):
    """Every AVX-512 kernel (with and without GFNI, one-row and row-pair) against the reference, through SIMDe."""
    lib = emulated_avx512
    rng = np.random.default_rng(int(qt) + 300)
    rows, cols = 19, 512
    w = random_blocks(qt, rows, cols, rng)
    wd = dequantize(w, qt).astype(np.float64)
    for T in (1, 3, 5, 20, 37):  # 20, 37: the many-token GEMMs where the type has one, with and without them
        x = rng.standard_normal((T, cols)).astype(np.float32)
        exact = quant_act(x, act_block(qt)) @ wd.T
        for level in (3, 2):
            assert lib.k2k_set_isa(level) == level
            for pairs, panel in ((0, 1), (1, 1), (0, 0)):
                lib.k2k_set_pairs(pairs)
                lib.k2k_set_panel(panel)
                assert rel(_lib_matmul(lib, x, w, qt, cols), exact) < 2e-5, (level, pairs, panel, T)
    lib.k2k_set_pairs(0)
    lib.k2k_set_panel(1)
    if qt == Q.Q8_0:  # the short-row kernel (rows of 4 blocks, one token) and the many-token one
        for T, c in ((1, 128), (20, 256)):
            w = random_blocks(qt, rows, c, rng)
            x = rng.standard_normal((T, c)).astype(np.float32)
            assert rel(_lib_matmul(lib, x, w, qt, c), quant_act(x, 32) @ dequantize(w, qt).astype(np.float64).T) < 2e-5


@pytest.mark.parametrize("types,T", [((Q.IQ4_XS, Q.IQ2_XXS, Q.IQ1_S), 3),
                                     # prefill: experts with 8+ tokens go through the many-token GEMMs (decode-once
                                     # for IQ4_XS / Q4_K / Q6_K and the codebook types, Q8_0's own), others through
                                     # the per-row kernels
                                     ((Q.IQ4_XS, Q.Q4_K, Q.Q6_K), 40), ((Q.Q4_K, Q.Q8_0, Q.IQ4_XS), 70),
                                     ((Q.IQ2_XXS, Q.IQ1_M, Q.IQ3_S), 40), ((Q.IQ1_S, Q.IQ2_S, Q.IQ3_XXS), 24)],
                         ids=lambda c: str(c))
def test_avx512_moe_emulated(types, T, emulated_avx512):
    lib = emulated_avx512
    rng = np.random.default_rng(77)
    hidden, inter, E, Kk = 256, 512, 3, 2
    experts = [(random_blocks(types[0], inter, hidden, rng), random_blocks(types[1], inter, hidden, rng),
                random_blocks(types[2], hidden, inter, rng)) for _ in range(E)]
    x = rng.standard_normal((T, hidden)).astype(np.float32)
    if T == 3:
        idx = np.array([[0, 2], [1, -1], [2, 1]], dtype=np.int32)
    else:  # expert 0 gets most tokens, expert 2 a few
        idx = np.stack([rng.choice(E, Kk, replace=False, p=[0.6, 0.3, 0.1]) for _ in range(T)]).astype(np.int32)
        idx[1, 1] = -1
    lib.k2k_set_isa(3)
    _check_lib_moe(lib, x, experts, types, idx, rng.uniform(0.1, 1.0, idx.shape).astype(np.float32))


def _check_lib_moe(lib, x, experts, types, idx, wts) -> None:
    """lib's k2k_moe with the decode-once paths on and off, against the float reference."""
    T, hidden = x.shape
    inter, E = experts[0][0].shape[0], len(experts)  # gate rows
    exact = moe_reference(x, experts, types, idx, wts, hidden, inter, emulate=True)
    ptrs = [(ctypes.c_void_p * E)(*[e[m].ctypes.data for e in experts]) for m in range(3)]
    for panel in (1, 0):
        lib.k2k_set_panel(panel)
        y = np.zeros((T, hidden), np.float32)
        rc = lib.k2k_moe(T, hidden, inter, x.ctypes.data, hidden, E, ptrs[0], ptrs[1], ptrs[2],
                         *[int(t) for t in types], idx.shape[1], idx.ctypes.data, wts.ctypes.data, y.ctypes.data,
                         hidden, 0)
        assert rc == 0
        assert rel(y, exact) < 2e-3, (panel, rel(y, exact))
    lib.k2k_set_panel(1)


# ---------------------------------------------------------------------------------------------- end to end

def _greedy(path: Path, n: int = 5) -> tuple[list[int], torch.Tensor]:
    from k2local.weights.hf_checkpoint import open_checkpoint
    from k2local.engine import LoadOptions
    from k2local.model import KimiK2Model
    from k2local.placement import build_backend

    src = open_checkpoint(path)
    backend = build_backend(src, LoadOptions(experts_on="ram", extra={"save_routing_stats": False}),
                            torch.device("cpu"), torch.float32)
    try:
        m = KimiK2Model(src, experts=backend, device="cpu", dtype=torch.float32)
        cache = m.new_cache()
        lg = m.forward([5, 17, 33, 2, 9, 100, 7, 8], cache)[-1]
        toks, logits = [], [lg]
        for _ in range(n):
            toks.append(int(lg.argmax()))
            lg = m.forward([toks[-1]], cache)[-1]
            logits.append(lg)
        return toks, torch.stack(logits)
    finally:
        backend.close()


@needs_c
def test_iq_gguf_decodes_same_tokens_as_torch(iq_gguf, monkeypatch):
    import gguf

    from tests.conftest import IQ_EXPERT_TYPES

    types = {Q(t.tensor_type) for t in gguf.GGUFReader(str(iq_gguf)).tensors if "_exps" in t.name}
    assert types == {Q(q) for lt in IQ_EXPERT_TYPES for q in lt.values()} and all(K.supported(int(q)) for q in types)
    torch.set_num_threads(1)
    c_toks, c_logits = _greedy(iq_gguf)
    monkeypatch.setenv("K2LOCAL_KERNELS", "torch")
    assert K.backend() == "torch"
    t_toks, t_logits = _greedy(iq_gguf)
    assert c_toks == t_toks
    # the C kernels quantize activations to 8 bits (as llama.cpp does): logits close, not equal
    assert (c_logits - t_logits).abs().max() < 0.05 * t_logits.abs().max()


@needs_c
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5])
def test_q8_0_block_counts_off_the_unroll(T, isas):
    """Q8_0 rows of 1..7 blocks (the AVX2 kernel walks 4 or 2 blocks per step, then the rest one by one)."""
    rng = np.random.default_rng(300 + T)
    for nblk in range(1, 8):
        rows, cols = 11, 32 * nblk
        w = random_blocks(Q.Q8_0, rows, cols, rng)
        x = rng.standard_normal((T, cols)).astype(np.float32)
        exact = quant_act(x, 32) @ dequantize(w, Q.Q8_0).astype(np.float64).T
        for name in isas:
            K.set_isa(name)
            y = K.qmatmul(torch.from_numpy(x), w, int(Q.Q8_0), cols).numpy()
            assert rel(y, exact) < 2e-5, (name, nblk)


@needs_c
@pytest.mark.parametrize("qt", C_TYPES, ids=lambda q: q.name)
def test_avx2_level_with_and_without_avxvnni(qt, isas):
    """The AVX2-level kernels with AVX-VNNI (vpdpbusd / vpdpwssd) and without: same integer sums, same float order,
    so the same bits; both against the reference (the "on" part only where the CPU has AVX-VNNI)."""
    if "avx2" not in isas:
        pytest.skip("no AVX2")
    rng = np.random.default_rng(400 + int(qt))
    rows, cols = 37, 512
    w = random_blocks(qt, rows, cols, rng)
    wd = dequantize(w, qt).astype(np.float64)
    K.set_isa("avx2")
    had = K.set_avxvnni(None)
    modes = [False] + ([True] if K.set_avxvnni(True) else [])
    try:
        for T in (1, 2, 3, 4, 5, 9, 20):
            x = rng.standard_normal((T, cols)).astype(np.float32)
            x[0, :64] *= 100.0  # large activations in one block
            exact = quant_act(x, act_block(qt)) @ wd.T
            ys = []
            for on in modes:
                assert K.set_avxvnni(on) == on
                y = K.qmatmul(torch.from_numpy(x), w, int(qt), cols).numpy()
                assert rel(y, exact) < 2e-5, (on, T)
                ys.append(y)
            if len(ys) == 2 and T <= 4:  # above, Q8_0's many-token kernel exists only with AVX-VNNI
                assert np.array_equal(ys[0], ys[1]), T
        for case in MOE_CASES:
            if qt not in case[0]:
                continue
            types, hidden, inter, T = case
            experts = [(random_blocks(types[0], inter, hidden, rng), random_blocks(types[1], inter, hidden, rng),
                        random_blocks(types[2], hidden, inter, rng)) for _ in range(4)]
            x = rng.standard_normal((T, hidden)).astype(np.float32)
            idx = np.stack([rng.choice(4, 2, replace=False) for _ in range(T)]).astype(np.int32)
            wts = rng.uniform(0.1, 1.0, idx.shape).astype(np.float32)
            exact = moe_reference(x, experts, types, idx, wts, hidden, inter, emulate=True)
            ys = []
            for on in modes:
                K.set_avxvnni(on)
                y = K.moe_experts(torch.from_numpy(x), experts, [int(t) for t in types], idx, wts).numpy()
                assert rel(y, exact) < 2e-3, (on, case)
                ys.append(y)
            if len(ys) == 2:
                assert rel(ys[1], ys[0]) < 1e-5, case
    finally:
        K.set_avxvnni(had)


# ---------------------------------------------------------------------------------------------- AVX-VNNI (stand-in)

@pytest.fixture(scope="module")
def fake_avxvnni(tmp_path_factory):
    """The library built with -DK2K_FAKE_AVXVNNI: the AVX-VNNI kernels on any AVX2 CPU (vpdpbusd / vpdpwssd as AVX2
    sequences with the same integer results), so that CPUs without AVX-VNNI, CI's included, check them."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not K.available() or cc is None or K.set_isa("best") not in ("avx2", "avx512-vnni", "avx512-vnni-gfni"):
        pytest.skip("needs the compiled kernels, a C compiler and an AVX2 CPU")
    lib = _build_variant(tmp_path_factory, cc, "fakevnni", ["-DK2K_FAKE_AVXVNNI"])
    assert lib.k2k_set_isa(1) == 1 and lib.k2k_set_avxvnni(1) == 1  # AVX2 level
    return lib


@pytest.mark.parametrize("qt", C_TYPES, ids=lambda q: q.name)
def test_avxvnni_kernels_on_a_stand_in(qt, fake_avxvnni):
    """The AVX-VNNI kernels (per-row, many-token, decode-once) against the reference at 1-37 tokens; with the same
    bits as the AVX2 ones up to 4 tokens (one kernel tile: the same integer sums in the same float order)."""
    lib = fake_avxvnni
    rng = np.random.default_rng(int(qt) + 500)
    rows, cols = 19, 512
    w = random_blocks(qt, rows, cols, rng)
    wd = dequantize(w, qt).astype(np.float64)
    try:
        for T in (1, 2, 3, 5, 9, 20, 37):
            x = rng.standard_normal((T, cols)).astype(np.float32)
            x[0, :64] *= 100.0
            exact = quant_act(x, act_block(qt)) @ wd.T
            ys = []
            for on in (1, 0):
                lib.k2k_set_avxvnni(on)
                for panel in (1, 0):
                    lib.k2k_set_panel(panel)
                    ys.append(_lib_matmul(lib, x, w, qt, cols))
                    assert rel(ys[-1], exact) < 2e-5, (on, panel, T)
            if T <= 3:
                assert all(np.array_equal(y, ys[0]) for y in ys), T
    finally:
        lib.k2k_set_avxvnni(1)
        lib.k2k_set_panel(1)


@pytest.mark.parametrize("case", [c for c in MOE_CASES if c[3] > 1] + [((Q.IQ2_XXS, Q.IQ1_M, Q.IQ3_S), 256, 256, 24)],
                         ids=lambda c: str(c))
def test_avxvnni_moe_on_a_stand_in(case, fake_avxvnni):
    lib = fake_avxvnni
    types, hidden, inter, T = case
    rng = np.random.default_rng(T + 600)
    E, Kk = 4, 2
    experts = [(random_blocks(types[0], inter, hidden, rng), random_blocks(types[1], inter, hidden, rng),
                random_blocks(types[2], hidden, inter, rng)) for _ in range(E)]
    x = rng.standard_normal((T, hidden)).astype(np.float32)
    idx = np.stack([rng.choice(E, Kk, replace=False, p=[0.55, 0.25, 0.15, 0.05]) for _ in range(T)]).astype(np.int32)
    _check_lib_moe(lib, x, experts, types, idx, rng.uniform(0.1, 1.0, idx.shape).astype(np.float32))
