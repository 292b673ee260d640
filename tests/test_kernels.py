"""CPU expert kernels (offload.kernels) against gguf's dequantizer + float matmul."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from offload import kernels as K

C_TYPES = [Q.Q4_0, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# byte offsets of the fp16 super-block scales (d, dmin) inside one block
_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}

needs_c = pytest.mark.skipif(not K.available(), reason=f"compiled kernels unavailable: {K.load_error()}")


def make_weights(qt: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid quantized rows: real quantization for the legacy types, random blocks with sane fp16
    scales for K-quants (every bit pattern of quants and packed sub-scales is a valid block)."""
    if qt in (Q.Q8_0, Q.Q4_0, Q.Q5_0):
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)
    blk, nbytes = GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, (rows * cols // blk, nbytes), dtype=np.uint8)
    for off in _SCALE_OFFSETS[qt]:
        d = rng.uniform(0.002, 0.03, b.shape[0]).astype(np.float16)
        d[::7] *= -1  # negative super-block scales are legal too
        b[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, -1)


def act_block(qt: int) -> int:
    return 32 if qt in (Q.Q8_0, Q.Q4_0) else 256


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
@pytest.mark.parametrize("T", [1, 5])
def test_qmatmul_matches_dequant_reference(qt, T, isas):
    rng = np.random.default_rng(int(qt) * 10 + T)
    rows, cols = 37, 512
    w = make_weights(qt, rows, cols, rng)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    wd = dequantize(w, qt).astype(np.float64)
    exact = quant_act(x, act_block(qt)) @ wd.T  # same int8 activations the kernels use
    plain = x.astype(np.float64) @ wd.T
    outs = {}
    for name in isas:
        K.set_isa(name)
        y = K.qmatmul(torch.from_numpy(x), w, int(qt), cols).numpy()
        assert y.shape == (T, rows)
        assert rel(y, exact) < 2e-5, name
        assert rel(y, plain) < 2e-2, name
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
        w = make_weights(qt, 4, cols, rng)
        scales = set(_SCALE_OFFSETS[qt])
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
    w = make_weights(Q.Q4_K, rows, cols, rng)
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
def test_threads_give_identical_results():
    rng = np.random.default_rng(3)
    rows, cols = 301, 768
    w = make_weights(Q.Q3_K, rows, cols, rng)
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
    w = make_weights(qt, rows, cols, rng)
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


def test_row_bytes_and_support():
    assert K.row_bytes(int(Q.Q4_K), 7168) == 28 * 144
    assert K.row_bytes(int(Q.Q8_0), 64) == 68
    with pytest.raises(ValueError):
        K.row_bytes(int(Q.Q4_K), 100)
    assert K.supported(int(Q.Q2_K)) and not K.supported(int(Q.IQ2_XXS))
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
]


@needs_c
@pytest.mark.parametrize("types,hidden,inter,T", MOE_CASES, ids=lambda c: str(c))
def test_moe_experts_matches_reference(types, hidden, inter, T, isas):
    rng = np.random.default_rng(hidden + inter + T)
    E, Kk = 6, 3
    experts = [(make_weights(types[0], inter, hidden, rng), make_weights(types[1], inter, hidden, rng),
                make_weights(types[2], hidden, inter, rng)) for _ in range(E)]
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
def test_moe_experts_accumulate_and_empty():
    rng = np.random.default_rng(5)
    hidden, inter = 256, 256
    experts = [tuple(make_weights(Q.Q4_K, r, c, rng) for r, c in ((inter, hidden), (inter, hidden), (hidden, inter)))
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
        w = make_weights(qt, rows, cols, rng)
        x = rng.standard_normal((2, cols)).astype(np.float32)
        y = K.qmatmul(torch.from_numpy(x), w, int(qt), cols)
        assert rel(y.numpy(), x.astype(np.float64) @ dequantize(w, qt).astype(np.float64).T) < 1e-5
    types = (Q.Q4_K, Q.Q4_K, Q.Q6_K)
    hidden, inter = 256, 256
    experts = [(make_weights(types[0], inter, hidden, rng), make_weights(types[1], inter, hidden, rng),
                make_weights(types[2], hidden, inter, rng)) for _ in range(3)]
    x = rng.standard_normal((2, hidden)).astype(np.float32)
    idx = np.array([[0, 2], [2, -1]], dtype=np.int32)
    wts = np.array([[0.7, 0.3], [1.0, 0.0]], dtype=np.float32)
    y = K.moe_experts(torch.from_numpy(x), experts, [int(t) for t in types], idx, wts)
    ref = moe_reference(x, experts, types, idx, wts, hidden, inter, emulate=False)
    assert rel(y.numpy(), ref) < 1e-5


def test_types_without_c_kernel_use_fallback():
    """Q5_0 has no compiled kernel: qmatmul still answers (through gguf dequantization)."""
    rng = np.random.default_rng(7)
    w = make_weights(Q.Q5_0, 5, 64, rng)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    y = K.qmatmul(torch.from_numpy(x), w, int(Q.Q5_0), 64)
    assert rel(y.numpy(), x.astype(np.float64) @ dequantize(w, Q.Q5_0).astype(np.float64).T) < 1e-5


@needs_c
def test_read_bandwidth_positive():
    buf = np.ones((1 << 22) + 64, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64
    assert K.read_bandwidth(buf[off:off + (1 << 22)], reps=2) > 0.0
