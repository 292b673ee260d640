"""Q4_K rows interleaved 16 at a time (GT_Q4_K_R16, csrc k2k_repack_q4_k_r16): the same products as gguf's layout at
every token count and ISA level, in place, in the fused MoE call, and in the RAM tier's expert slots."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from offload import kernels as K
from quant.random_blocks import random_blocks
from tests.test_repack_q8 import best_isa, needs_512  # noqa: F401 (a fixture)


def _w(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return random_blocks(Q.Q4_K, rows, cols, np.random.default_rng(seed))


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    # the same integer sums per super-block; only the order of the float sums differs
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_512
@pytest.mark.parametrize("T", [1, 2, 4, 5, 9, 17, 65])
@pytest.mark.parametrize("rows,cols", [(16, 256), (48, 512), (128, 2048)])
def test_q4k_repacked_matches_gguf_layout(rows: int, cols: int, T: int, best_isa) -> None:
    w = _w(rows, cols, T)
    plain, packed = K.QMatrix(w, Q.Q4_K, cols), K.QMatrix(w, Q.Q4_K, cols, repack=True)
    assert packed.repacked and packed._ktype == K.Q4_K_R16
    x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T))
    ref = plain(x)
    _close(packed(x), ref)
    for isa in ("avx512", "generic"):  # without GFNI, and the portable kernel (bound above, capped later)
        K.set_isa(isa)
        _close(packed(x), ref)
        K.set_isa("best")


@needs_512
def test_repack_in_place_equals_out_of_place() -> None:
    w = _w(64, 512, 3)
    out = np.empty_like(w)
    assert K.repack_r16(Q.Q4_K, w, 64, 512, out) == K.Q4_K_R16
    t = torch.from_numpy(w.copy())
    K.repack_r16(Q.Q4_K, t, 64, 512)
    assert np.array_equal(t.numpy(), out) and not np.array_equal(out, w)
    q8 = random_blocks(Q.Q8_0, 32, 64, np.random.default_rng(1))
    o8, t8 = np.empty_like(q8), torch.from_numpy(q8.copy())
    K.repack_r16(Q.Q8_0, q8, 32, 64, o8)
    K.repack_r16(Q.Q8_0, t8, 32, 64)
    assert np.array_equal(t8.numpy(), o8)


@needs_512
@pytest.mark.parametrize("T", [1, 3, 40])
def test_moe_on_interleaved_experts(T: int, best_isa) -> None:
    """k2k_moe with gate / up / down in the interleaved layouts (Q4_K gate/up, Q8_0 down) against gguf's bytes."""
    hidden, inter, n = 512, 256, 4
    rng = np.random.default_rng(T)
    experts = [(_w(inter, hidden, 10 * e), _w(inter, hidden, 10 * e + 1),
                random_blocks(Q.Q8_0, hidden, inter, rng)) for e in range(n)]
    packed = []
    for g, u, d in experts:
        pg, pu, pd = (np.empty_like(m) for m in (g, u, d))
        K.repack_r16(Q.Q4_K, g, inter, hidden, pg)
        K.repack_r16(Q.Q4_K, u, inter, hidden, pu)
        K.repack_r16(Q.Q8_0, d, hidden, inter, pd)
        packed.append((pg, pu, pd))
    x = torch.randn(T, hidden)
    idx = torch.from_numpy(rng.integers(0, n, size=(T, 2)).astype(np.int32))
    wts = torch.rand(T, 2)
    ref = K.moe_experts(x, experts, (Q.Q4_K, Q.Q4_K, Q.Q8_0), idx, wts)
    got = K.moe_experts(x, packed, (K.Q4_K_R16, K.Q4_K_R16, K.Q8_0_R16), idx, wts)
    _close(got, ref)


@pytest.mark.skipif(not K.available(), reason="compiled kernels unavailable")
def test_library_rejects_bad_interleaved_shapes() -> None:
    lib = K._load()
    w = np.zeros((40, 144), dtype=np.uint8)
    assert lib.k2k_repack_q4_k_r16(w.ctypes.data, 40, 1, w.ctypes.data) == -1  # not a multiple of 16 rows
    x, y = torch.zeros(1, 256), torch.zeros(1, 40)
    assert lib.k2k_matmul(K.Q4_K_R16, w.ctypes.data, 40, 256, 144, x.data_ptr(), 1, 256, y.data_ptr(), 40) == -2
    assert K.r16_type(Q.Q4_K, 40) is None and K.r16_type(Q.Q6_K, 64) is None


@needs_512
def test_ram_tier_holds_q4k_experts_interleaved(tiny_k2, tmp_path) -> None:
    """A q4 GGUF (experts Q4_K): the RAM tier rewrites its expert slots interleaved as it reads them, the disk tier
    keeps gguf's bytes; both give the same tokens."""
    from k2local.convert.to_gguf import convert
    from k2local.placement import build_backend
    from k2local.weights.hf_checkpoint import open_checkpoint
    from tests.test_offload import assert_same_run, greedy_run, opts

    out = tmp_path / "tiny-q4.gguf"
    convert(tiny_k2, out, "q4")
    src = open_checkpoint(out)
    runs = {}
    for name, o in [("ram", opts(experts_on="ram")), ("disk", opts(experts_on="disk", ram=0.004))]:
        b = build_backend(src, o, torch.device("cpu"), torch.float32)
        try:
            entry = b.layout.entries[b.layout.moe_layers[0]][0]
            assert [f.qtype for f in entry.formats] == [Q.Q4_K] * 3
            runs[name] = (greedy_run(src, b, n=4), b.store.kernel_types(entry.formats))
        finally:
            b.close()
    assert runs["ram"][1] == (K.Q4_K_R16,) * 3 and runs["disk"][1] == (None,) * 3
    assert_same_run(*runs["ram"][0], *runs["disk"][0])
