"""Q8_0 matrices repacked 16 rows interleaved (QMatrix(repack=True), csrc k2k_repack_q8_0_r16): the same products as
gguf's layout, at every token count and ISA level, and only where the layout applies."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from offload import kernels as K
from quant.random_blocks import random_blocks

needs_c = pytest.mark.skipif(not K.available(), reason=f"compiled kernels unavailable: {K.load_error()}")
needs_512 = pytest.mark.skipif(not K.available() or K._load().k2k_isa_hw() < 2,
                               reason="the repacked layout is used at the AVX-512 level only")


@pytest.fixture
def best_isa():
    yield
    K.set_isa("best")
    K.set_repack(None)


def _w(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return random_blocks(Q.Q8_0, rows, cols, np.random.default_rng(seed))


@needs_512
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 9, 10, 17, 64, 65, 130])
@pytest.mark.parametrize("rows,cols", [(16, 32), (48, 96), (256, 1024)])
def test_repacked_matches_gguf_layout(rows: int, cols: int, T: int, best_isa) -> None:
    w = _w(rows, cols, T)
    plain, packed = K.QMatrix(w, Q.Q8_0, cols), K.QMatrix(w, Q.Q8_0, cols, repack=True)
    assert packed.repacked and not plain.repacked
    x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T))
    ref, got = plain(x), packed(x)
    # the same integer block sums; only the order of the float sums over blocks differs
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(packed.dequantize(), plain.dequantize(), rtol=0, atol=0)  # w is still gguf's bytes


@needs_512
def test_repacked_portable_kernel_is_exact(best_isa) -> None:
    """Bound under AVX-512, run under the portable C kernel (the ISA capped later): bit-identical to gguf's layout
    there, since both sum the blocks of a row in order."""
    w = _w(64, 256, 1)
    packed = K.QMatrix(w, Q.Q8_0, 256, repack=True)
    x = torch.randn(3, 256)
    K.set_isa("generic")
    assert torch.equal(packed(x), K.QMatrix(w, Q.Q8_0, 256)(x))


@needs_512
@pytest.mark.parametrize("T", [1, 3, 6, 17])
def test_repacked_avx2_kernel(T: int, best_isa) -> None:
    """The AVX2-level kernel of the layout (not picked for binding there: it streamed no faster than gguf's layout on
    this AVX-512 CPU at that level, 25.9 vs 25.8 GB/s) gives the same products."""
    w = _w(48, 512, T)
    packed = K.QMatrix(w, Q.Q8_0, 512, repack=True)
    x = torch.randn(T, 512)
    ref = K.QMatrix(w, Q.Q8_0, 512)(x)
    K.set_isa("avx2")
    torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_c
def test_repack_only_where_it_applies(best_isa) -> None:
    assert not K.QMatrix(_w(40, 64), Q.Q8_0, 64, repack=True).repacked  # not a multiple of 16 rows
    assert not K.QMatrix(random_blocks(Q.Q6_K, 16, 256, np.random.default_rng(0)), Q.Q6_K, 256, repack=True).repacked
    K.set_repack(False)
    assert not K.QMatrix(_w(16, 64), Q.Q8_0, 64, repack=True).repacked
    K.set_isa("avx2")
    K.set_repack(None)
    assert not K.QMatrix(_w(16, 64), Q.Q8_0, 64, repack=True).repacked  # no AVX-512: gguf's layout


@needs_c
def test_library_rejects_bad_repacked_shapes() -> None:
    lib = K._load()
    w = np.zeros((40, 68), dtype=np.uint8)
    out = np.zeros_like(w)
    assert lib.k2k_repack_q8_0_r16(w.ctypes.data, 40, 2, out.ctypes.data) == -1
    x, y = torch.zeros(1, 64), torch.zeros(1, 40)
    assert lib.k2k_matmul(K.Q8_0_R16, w.ctypes.data, 40, 64, 68, x.data_ptr(), 1, 64, y.data_ptr(), 40) == -2
