"""GGUF K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): quantize and dequantize super-blocks of 256 values.

Quantizers reproduce ggml's quantize_row_*_ref (no importance weights) and quantize_row_*_impl (with
importance weights), bytes laid out as ggml's block_q*_K structs.  Inputs are x: [NB, 256] float32
(one row per super-block) and optional qw: [NB, 256] importance weights; outputs are uint8 [NB, block_bytes].
"""

from __future__ import annotations

import torch

from . import types as qtypes
from .ggml_float import (
    bytes_to_fp16,
    div,
    first_absmax,
    fp16_bytes,
    nearest_int,
    nearest_int_clamped,
    positive_max,
    seq_sum,
    sqrtf,
    to_fp16,
)
from .kquant_search import make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants

QK_K = 256
BLOCK_BYTES = {n: qtypes.type_size(n) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}  # quant.types

_U8 = torch.uint8


def _sub_major(x: torch.Tensor, n: int) -> torch.Tensor:
    """[NB, 256] -> element-major sub-blocks [n, NB*256/n]."""
    return x.reshape(-1, n).t().contiguous()


def _block_major(L: torch.Tensor, nb: int) -> torch.Tensor:
    """Inverse of _sub_major: [n, NB*256/n] -> [NB, 256]."""
    return L.t().reshape(nb, QK_K)


def _row_sigma_sum(x: torch.Tensor) -> torch.Tensor:
    """`float s = 0; for (j < 256) s += x[j]*x[j];` per super-block -> [NB]."""
    xt = x.t().contiguous()
    return seq_sum(xt * xt)


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    return (t.to(torch.int32) & 0xFF).to(_U8)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """qs[j/4 + l] = L[j+l] | L[j+l+32]<<2 | L[j+l+64]<<4 | L[j+l+96]<<6 for j in {0, 128}: [NB, 64]."""
    q = L.to(torch.int32).reshape(-1, 2, 4, 32)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return _as_u8(packed.reshape(-1, 64))


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """[NB, 64] -> [NB, 256] values 0..3 in element order."""
    q = qs.to(torch.int32).reshape(-1, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=qs.device).reshape(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------------------- 6-bit scale packing


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K 12-byte scales from 8 scales and 8 mins (uint8 semantics): [NB, 12]."""
    ls = ls.to(torch.int32) & 0xFF
    lm = lm.to(torch.int32) & 0xFF
    lo = torch.cat([ls[:, :4], lm[:, :4]], dim=1)  # bytes 0..7 before the high bits are or-ed in
    lo = lo | torch.cat([(ls[:, 4:] >> 4) << 6, (lm[:, 4:] >> 4) << 6], dim=1)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return _as_u8(torch.cat([lo, hi], dim=1))


def _unpack_k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: ([NB, 8] scales, [NB, 8] mins) as int32."""
    s = s.to(torch.int32)
    sc_lo, m_lo = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc_hi = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    m_hi = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([sc_lo, sc_hi], dim=1), torch.cat([m_lo, m_hi], dim=1)


def _pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """Q3_K 12-byte scales from 16 6-bit values (0..63): [NB, 12]."""
    l = l.to(torch.int32)
    low = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    h = (l >> 4).reshape(-1, 4, 4)  # [NB, j//4, j%4]
    high = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return _as_u8(torch.cat([low, high], dim=1))


def _unpack_q3_scales(s: torch.Tensor) -> torch.Tensor:
    """16 signed scales (value - 32) from Q3_K's 12 bytes: [NB, 16] int32."""
    s = s.to(torch.int32)
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    j = torch.arange(16, device=s.device)
    high = (s[:, 8 + (j % 4)] >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


# ---------------------------------------------------------------------------------------------- requantization


def _requant_asym(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor,
                  sc: torch.Tensor, m: torch.Tensor, n: int, nmax: int) -> torch.Tensor:
    """Final levels l = nearest_int((x + dm)/d) per sub-block of n; sub-blocks with d == 0 keep L."""
    nb = x.shape[0]
    dl = (d.to(torch.float32).unsqueeze(1) * sc.to(torch.float32)).reshape(nb, -1, 1)
    ml = (dmin.to(torch.float32).unsqueeze(1) * m.to(torch.float32)).reshape(nb, -1, 1)
    xs = x.reshape(nb, -1, n)
    l = nearest_int_clamped(div(xs + ml, dl.expand_as(xs)), 0, nmax)
    return torch.where(dl != 0, l, L.reshape(nb, -1, n)).reshape(nb, QK_K)


def _requant_sym(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, sc: torch.Tensor, nmax: int) -> torch.Tensor:
    """Final levels l = nearest_int(x/d) + nmax per sub-block of 16; sub-blocks with d == 0 keep L."""
    nb = x.shape[0]
    dl = (d.to(torch.float32).unsqueeze(1) * sc.to(torch.float32)).reshape(nb, 16, 1)
    xs = x.reshape(nb, 16, 16)
    l = nearest_int_clamped(div(xs, dl.expand_as(xs)), -nmax, nmax - 1) + nmax
    return torch.where(dl != 0, l, L.reshape(nb, 16, 16)).reshape(nb, QK_K)


# ---------------------------------------------------------------------------------------------- Q4_K / Q5_K


_K4Front = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _quantize_k4_scales(x: torch.Tensor, qw: torch.Tensor | None, nmax: int, ref_search: tuple[float, float, int],
                        clamp_impl: bool) -> _K4Front:
    """Shared Q4_K/Q5_K front half: (L [NB,256], d, dmin fp16 [NB], sc, m [NB,8], packed scales [NB,12])."""
    nb = x.shape[0]
    X = _sub_major(x, 32)
    if qw is None:
        sum_x2 = seq_sum(X * X)
        av_x = sqrtf(div(sum_x2, 32.0))
        W = av_x + X.abs()
        L, scales, mins = make_qkx_quants(X, W, nmax, *ref_search, False)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale = positive_max(scales, 1)
        max_min = positive_max(mins, 1)
        zero = torch.zeros_like(max_scale)
        inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), zero)
        inv_min = torch.where(max_min > 0, div(63.0, max_min), zero)
        ls = (nearest_int(inv_scale.unsqueeze(1) * scales) & 0xFF).clamp(max=63)
        lm = (nearest_int(inv_min.unsqueeze(1) * mins) & 0xFF).clamp(max=63)
        d = to_fp16(div(max_scale, 63.0))
        dmin = to_fp16(div(max_min, 63.0))
    else:
        sigma2 = div(2 * _row_sigma_sum(x), float(QK_K))
        Q = _sub_major(qw, 32)
        W = Q * sqrtf(sigma2.repeat_interleave(8).unsqueeze(0) + X * X)
        sw = seq_sum(W).reshape(nb, 8).t()
        L, scales, mins = make_qkx_quants(X, W, nmax, -0.9, 0.05, 36, False)
        Ls, d_block = make_qp_quants(scales.reshape(nb, 8).t(), 63, sw)
        Lm, m_block = make_qp_quants(mins.reshape(nb, 8).t(), 63, sw)
        ls, lm = Ls.t().to(torch.int32), Lm.t().to(torch.int32)
        if clamp_impl:
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        d, dmin = to_fp16(d_block), to_fp16(m_block)
    packed = _pack_k4_scales(ls, lm)
    sc, m = _unpack_k4_scales(packed)
    return _block_major(L, nb), d, dmin, sc, m, packed


def quantize_q4_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """block_q4_K: d, dmin (fp16), scales[12], qs[128]."""
    L, d, dmin, sc, m, packed = _quantize_k4_scales(x, qw, 15, (-1.0, 0.1, 20), False)
    L = _requant_asym(x, L, d, dmin, sc, m, 32, 15).to(torch.int32).reshape(-1, 4, 2, 32)
    qs = _as_u8((L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128))
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), packed, qs], dim=1)


def quantize_q5_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """block_q5_K: d, dmin (fp16), scales[12], qh[32], qs[128]."""
    L, d, dmin, sc, m, packed = _quantize_k4_scales(x, qw, 31, (-0.5, 0.1, 15), True)
    L = _requant_asym(x, L, d, dmin, sc, m, 32, 31).to(torch.int32).reshape(-1, 4, 2, 32)
    qs = _as_u8(((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(-1, 128))
    hi = L >> 4  # 0/1
    shifts = torch.arange(8, dtype=torch.int32, device=x.device).reshape(1, 4, 2, 1)
    qh = _as_u8((hi << shifts).sum(dim=(1, 2)))
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), packed, qh, qs], dim=1)


# ---------------------------------------------------------------------------------------------- Q6_K


def quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """block_q6_K: ql[128], qh[64], scales[16] (int8), d (fp16)."""
    nb = x.shape[0]
    X = _sub_major(x, 16)
    L, scales = make_qx_quants(X, 32, None if qw is None else _sub_major(qw, 16))
    L = _block_major(L, nb)
    scales = scales.reshape(nb, 16)
    max_abs, max_scale = first_absmax(scales, 1)
    empty = max_abs < 1e-15
    iscale = div(-128.0, max_scale)
    d = to_fp16(div(1.0, iscale))
    sc = nearest_int(iscale.unsqueeze(1) * scales).clamp(max=127)
    sc = ((sc + 128) & 0xFF) - 128  # int -> int8_t
    L = _requant_sym(x, L, d, sc, 32).to(torch.int32).reshape(nb, 2, 4, 32)
    ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                    (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], dim=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = torch.cat([_as_u8(ql), _as_u8(qh), _as_u8(sc), fp16_bytes(d)], dim=1)
    return torch.where(empty.unsqueeze(1), torch.zeros_like(out), out)


# ---------------------------------------------------------------------------------------------- Q3_K


def quantize_q3_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """block_q3_K: hmask[32], qs[64], scales[12], d (fp16)."""
    nb = x.shape[0]
    X = _sub_major(x, 16)
    if qw is None:
        L, scales = make_q3_quants(X, 4)
        scales = scales.reshape(nb, 16)
        _, max_scale = first_absmax(scales, 1)
        has = max_scale != 0
        iscale = div(-32.0, max_scale)
        l = nearest_int(iscale.unsqueeze(1) * scales)
        l = (((l + 128) & 0xFF) - 128).clamp(-32, 31) + 32  # int8_t, then MAX/MIN
        l = torch.where(has.unsqueeze(1), l, torch.zeros_like(l))
        d = to_fp16(torch.where(has, div(1.0, iscale), torch.zeros_like(iscale)))
        packed = torch.where(has.unsqueeze(1), _pack_q3_scales(l), torch.zeros(1, 12, dtype=_U8, device=x.device))
    else:
        sigma2 = div(2 * _row_sigma_sum(x), float(QK_K))
        Q = _sub_major(qw, 16)
        W = Q * sqrtf(sigma2.repeat_interleave(16).unsqueeze(0) + X * X)
        sw = seq_sum(W).reshape(nb, 16).t()
        L, scales = make_qx_quants(X, 4, W)
        Ls, d_block = make_qx_quants(scales.reshape(nb, 16).t(), 32, sw)
        packed = _pack_q3_scales(Ls.t())
        d = to_fp16(d_block)
    sc = _unpack_q3_scales(packed)
    L = _requant_sym(x, _block_major(L, nb), d, sc, 4).to(torch.int32)
    high = (L > 3).to(torch.int32).reshape(nb, 8, 32)  # element j -> byte j % 32, bit j // 32
    shifts = torch.arange(8, dtype=torch.int32, device=x.device).reshape(1, 8, 1)
    hmask = _as_u8((high << shifts).sum(dim=1))
    qs = _pack_2bit(L & 3)
    return torch.cat([hmask, qs, packed, fp16_bytes(d)], dim=1)


# ---------------------------------------------------------------------------------------------- Q2_K


def quantize_q2_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """block_q2_K: scales[16] (4-bit scale | 4-bit min << 4), qs[64], d, dmin (fp16)."""
    nb = x.shape[0]
    X = _sub_major(x, 16)
    if qw is None:
        L, scales, mins = make_qkx_quants(X, X.abs(), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        max_scale = positive_max(scales, 1)
        max_min = positive_max(mins, 1)
        zero = torch.zeros_like(max_scale)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = nearest_int(torch.where(has_s, div(15.0, max_scale), zero).unsqueeze(1) * scales) & 0xFF
        ls = torch.where(has_s.unsqueeze(1), ls, torch.zeros_like(ls))
        lm = nearest_int(torch.where(has_m, div(15.0, max_min), zero).unsqueeze(1) * mins)
        sc = torch.where(has_m.unsqueeze(1), (ls | (lm << 4)) & 0xFF, ls)
        d = to_fp16(torch.where(has_s, div(max_scale, 15.0), zero))
        dmin = to_fp16(torch.where(has_m, div(max_min, 15.0), zero))
    else:
        sigma2 = div(_row_sigma_sum(x), float(QK_K))
        Q = _sub_major(qw, 16)
        W = Q * sqrtf(sigma2.repeat_interleave(16).unsqueeze(0) + X * X)
        sw = seq_sum(W).reshape(nb, 16).t()
        L, scales, mins = make_qkx_quants(X, W, 3, -0.9, 0.05, 36, False)
        Ls, dm = make_qp_quants(scales.reshape(nb, 16).t(), 15, sw)
        Lm, mm = make_qp_quants(mins.reshape(nb, 16).t(), 15, sw)
        sc = (Ls.t().to(torch.int32) | (Lm.t().to(torch.int32) << 4)) & 0xFF
        d, dmin = to_fp16(dm), to_fp16(mm)
    L = _requant_asym(x, _block_major(L, nb), d, dmin, sc & 0xF, sc >> 4, 16, 3)
    return torch.cat([_as_u8(sc), _pack_2bit(L), fp16_bytes(d), fp16_bytes(dmin)], dim=1)


# ---------------------------------------------------------------------------------------------- dequantize


def dequantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    sc = b[:, 0:16].to(torch.int32)
    q = _unpack_2bit(b[:, 16:80]).reshape(-1, 16, 16).to(torch.float32)
    d, dmin = bytes_to_fp16(b[:, 80:82]), bytes_to_fp16(b[:, 82:84])
    dl = (d.unsqueeze(1) * (sc & 0xF).to(torch.float32)).unsqueeze(2)
    ml = (dmin.unsqueeze(1) * (sc >> 4).to(torch.float32)).unsqueeze(2)
    return (dl * q - ml).reshape(-1, QK_K)


def dequantize_q3_k(b: torch.Tensor) -> torch.Tensor:
    hm = b[:, 0:32].to(torch.int32).reshape(-1, 1, 32)
    bits = torch.arange(8, dtype=torch.int32, device=b.device).reshape(1, 8, 1)
    high = ((hm >> bits) & 1).reshape(-1, QK_K)
    q = (_unpack_2bit(b[:, 32:96]) - 4 * (1 - high)).to(torch.float32).reshape(-1, 16, 16)
    sc = _unpack_q3_scales(b[:, 96:108]).to(torch.float32)
    d = bytes_to_fp16(b[:, 108:110])
    return ((d.unsqueeze(1) * sc).unsqueeze(2) * q).reshape(-1, QK_K)


def _dequantize_k4(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    d, dmin = bytes_to_fp16(b[:, 0:2]), bytes_to_fp16(b[:, 2:4])
    sc, m = _unpack_k4_scales(b[:, 4:16])
    dl = (d.unsqueeze(1) * sc.to(torch.float32)).unsqueeze(2)
    ml = (dmin.unsqueeze(1) * m.to(torch.float32)).unsqueeze(2)
    return (dl * q.to(torch.float32).reshape(-1, 8, 32) - ml).reshape(-1, QK_K)


def dequantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    qs = b[:, 16:144].to(torch.int32).reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2)
    return _dequantize_k4(b, q)


def dequantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    qh = b[:, 16:48].to(torch.int32).reshape(-1, 1, 1, 32)
    qs = b[:, 48:176].to(torch.int32).reshape(-1, 4, 1, 32)
    shifts = torch.arange(8, dtype=torch.int32, device=b.device).reshape(1, 4, 2, 1)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2) + 16 * ((qh >> shifts) & 1)
    return _dequantize_k4(b, q)


def dequantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[:, 0:128].to(torch.int32).reshape(-1, 2, 2, 32)
    qh = b[:, 128:192].to(torch.int32).reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = bytes_to_fp16(b[:, 208:210])
    low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # quarter order 0, 1, 2, 3 -> (ql0 lo, ql1 lo, ql0 hi, ql1 hi)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=b.device).reshape(1, 1, 4, 1)
    q = (low | (((qh >> shifts) & 3) << 4)) - 32
    dl = (d.unsqueeze(1) * sc).unsqueeze(2)
    return (dl * q.to(torch.float32).reshape(-1, 16, 16)).reshape(-1, QK_K)
