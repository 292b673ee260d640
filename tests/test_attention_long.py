"""Long-context attention: the blocked (online-softmax) absorbed form and the MHA form after a cached prefix give
the same results as the direct computation, and a chunked prefill the same logits as a one-shot one."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import k2local.model as km
from k2local.model import KimiK2Model
from k2local.weights.hf_checkpoint import SafetensorsSource


def _direct(q_lat, q_pe, lat, kpe, pos, scale):
    h, t, _ = q_lat.shape
    s = lat.shape[0]
    sc = (q_lat @ lat.t() + q_pe @ kpe.t()) * scale
    sc = sc.masked_fill(torch.arange(s)[None, :] > (pos + torch.arange(t))[:, None], float("-inf"))
    return sc.softmax(-1) @ lat


@pytest.mark.parametrize("t", [1, 5])
def test_blocked_absorbed_attention_matches_direct(monkeypatch: pytest.MonkeyPatch, t: int) -> None:
    g = torch.Generator().manual_seed(0)
    h, c, r, s = 4, 32, 8, 1000
    q_lat, q_pe = torch.randn(h, t, c, generator=g), torch.randn(h, t, r, generator=g)
    lat, kpe = torch.randn(s, c, generator=g), torch.randn(s, r, generator=g)
    want = _direct(q_lat, q_pe, lat, kpe, s - t, 0.2)
    monkeypatch.setattr(km, "SCORE_BLOCK_BYTES", 4 * h * t * 300)  # blocks of 300 keys: 4 blocks, the last partial
    got = km._absorbed_attention(q_lat, q_pe, lat, kpe, s - t, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_expanded_attention_after_prefix_matches_absorbed(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    h, nope, r, c, vd, s, t = 4, 16, 8, 32, 16, 300, 40
    w_uk, w_uv = torch.randn(h, nope, c, generator=g) / 6, torch.randn(h, vd, c, generator=g) / 6
    lw = SimpleNamespace(w_uk=w_uk, w_uv=w_uv)  # the only LayerWeights fields the MHA form reads
    q_nope, q_pe = torch.randn(t, h, nope, generator=g), torch.randn(t, h, r, generator=g)
    lat, kpe = torch.randn(s, c, generator=g), torch.randn(s, r, generator=g)
    pl = _direct(torch.bmm(q_nope.transpose(0, 1), w_uk), q_pe.transpose(0, 1), lat, kpe, s - t, 0.3)
    want = torch.bmm(pl, w_uv.transpose(1, 2)).transpose(0, 1)
    monkeypatch.setattr(km, "EXPAND_BYTES", 1)  # one head at a time
    got = km._expanded_attention(lw, q_nope, q_pe, lat, kpe, s - t, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_matches_one_shot(tiny_k2, monkeypatch: pytest.MonkeyPatch) -> None:
    model = KimiK2Model(SafetensorsSource(tiny_k2))
    ids = torch.randint(3, 200, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    want = model.forward(ids, model.new_cache())
    monkeypatch.setattr(km, "MHA_MIN_TOKENS", 16)  # chunks of 30 take the MHA form, the last 10 the absorbed one
    monkeypatch.setattr(km, "SCORE_BLOCK_BYTES", 1)  # and that one walks the keys in blocks
    cache = model.new_cache()
    got = torch.cat([model.forward(ids[a:a + 30], cache) for a in range(0, 70, 30)])
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("pos,score_bytes", [(0, 64 << 20), (37, 64 << 20), (37, 1)])
def test_causal_attention_blocks_match_sdpa(monkeypatch: pytest.MonkeyPatch, pos: int, score_bytes: int) -> None:
    """The MHA form's attention in query blocks (several, the last partial), with and without key blocks (online
    softmax), equals torch's SDPA with the causal mask, for MLA's unequal key / value head sizes."""
    g = torch.Generator().manual_seed(3)
    h, t, d, dv = 3, 45, 24, 16
    s = pos + t
    q, k, v = torch.randn(h, t, d, generator=g), torch.randn(h, s, d, generator=g), torch.randn(h, s, dv, generator=g)
    mask = ~km._causal_mask(t, s, pos, 0, q.device)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    monkeypatch.setattr(km, "QUERY_BLOCK", 16)
    monkeypatch.setattr(km, "SCORE_BLOCK_BYTES", score_bytes)  # 1: keys in blocks of QUERY_BLOCK
    got = torch.empty(h, t, dv)
    km._causal_attention(q, k, v, pos, 0.3, got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parts", [2, 3])
def test_split_decode_attention_matches_direct(monkeypatch: pytest.MonkeyPatch, parts: int) -> None:
    """A decode step's keys split over threads (each range in key blocks too) merge to the direct result."""
    g = torch.Generator().manual_seed(4)
    h, c, r, s = 4, 32, 8, 1000
    q_lat, q_pe = torch.randn(h, 1, c, generator=g), torch.randn(h, 1, r, generator=g)
    lat, kpe = torch.randn(s, c, generator=g), torch.randn(s, r, generator=g)
    want = _direct(q_lat, q_pe, lat, kpe, s - 1, 0.2)
    monkeypatch.setattr(km, "SCORE_BLOCK_BYTES", 4 * h * 300)
    got = km._split_decode_attention(q_lat, q_pe, lat, kpe, 0.2, parts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
