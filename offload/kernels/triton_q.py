"""Fused dequantize-matmul GPU kernels (Triton) on raw GGUF block bytes: y = x @ W^T, W never materialized.

    y = qmatmul_gpu(x, w_bytes, qtype, cols)
    y = swiglu_qmatmul_gpu(gu, w_bytes, qtype, cols)   # (SiLU(g) * u) @ W^T for gu = [g | u]: an expert's down

x: [M, K] (bf16 / fp16 / fp32) on the device; w_bytes: uint8 [N, row_bytes] (or flat), the matrix's rows exactly as
a GGUF file stores them (ggml block layouts: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, and the codebook types of
Unsloth's low-bit quants, IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS, whose grids are
loaded once per device from the installed gguf package). Output [M, N] in x's dtype, accumulated in fp32. Each
weight block is decoded in registers, 32 columns ("a piece") at a time: a super-block of 256 values is 8 pieces
(8 consecutive blocks of the 32-value types), and every piece covers 32 consecutive columns, so activations are
read in plain order. Decoded weights are exact fp32 values; the GEMV multiplies them in fp32, tl.dot takes them
rounded to x's dtype (the values a dequantized matrix in that dtype holds).

Two kernels: decode-sized batches (M <= 8) use a GEMV-style kernel over blocks of rows, split over K when there
are few row blocks (fp32 partial sums added afterwards, in a fixed order); larger batches use tl.dot on decoded
tiles. Both can apply SiLU(g) * u to their input as they load it, so an expert is two launches: gate and up rows
stored as one matrix, then the down projection reading [g | u] (plus a partial-sum add where K is split).
On a CPU tensor the kernels run only under Triton's interpreter (TRITON_INTERPRET=1 set before triton is
imported), which is how the tests exercise them without a GPU.

Environment: K2LOCAL_TRITON=0 turns the fused path off, =1 turns it on where it can run (CUDA, or CPU under the
interpreter); by default it is on for CUDA tensors when triton imports.
"""
from __future__ import annotations

import logging
import os

import torch

from quant import types as qtypes

try:  # optional: a CUDA build of torch installs it; `pip install k2local[gpu]` otherwise
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover (depends on the environment)
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

__all__ = ["QTYPES", "available", "disable", "enabled", "qmatmul_gpu", "row_bytes", "supported",
           "swiglu_qmatmul_gpu"]

log = logging.getLogger(__name__)

# ggml type id -> (name, values per block, bytes per block) of the types with a kernel here (quant.types'
# TRITON_KERNEL_TYPES); a "super-block" below is 256 values (Q8_0: 8 blocks)
QTYPES: dict[int, tuple[str, int, int]] = {
    int(t): (t.name, qtypes.block_size(t), qtypes.type_size(t)) for t in qtypes.TRITON_KERNEL_TYPES
}
# codebook types -> the type whose table (offload.kernels.iq_tables: rows of 8 bytes for IQ2_* / IQ1_*, 4 for
# IQ3_*, the 16 IQ4_NL values) they read
GRID_OF: dict[int, int] = {16: 16, 17: 17, 22: 22, 18: 18, 21: 21, 19: 19, 29: 19, 20: 20, 23: 20}
SB = 256  # values per super-block (8 pieces of 32)
GEMV_MAX_M = 8

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
_disabled: str | None = None


def supported(qtype: int) -> bool:
    """Whether a fused kernel exists for this ggml type id (regardless of whether triton is installed)."""
    try:
        return int(qtype) in QTYPES
    except (TypeError, ValueError):
        return False


def available(device: torch.device | str | None = None) -> bool:
    """Whether the kernels can run on `device` (default: CUDA): triton imports, and the device is CUDA, or the
    CPU with triton's interpreter on. False after `disable()`."""
    if triton is None or _disabled is not None:
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type == "cuda":
        return not _INTERPRET and torch.cuda.is_available()
    return dev.type == "cpu" and _INTERPRET


def enabled(device: torch.device | str) -> bool:
    """The K2LOCAL_TRITON policy: 0 = off; 1 = on wherever `available`; unset = on for CUDA only."""
    flag = os.environ.get("K2LOCAL_TRITON", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    dev = torch.device(device)
    if flag in ("1", "on", "true", "yes"):
        return available(dev)
    return dev.type == "cuda" and available(dev)


def disable(reason: str) -> None:
    """Turn the fused path off for the rest of the process (after a compile or launch failure); warns once."""
    global _disabled
    if _disabled is None:
        log.warning("Triton dequant-matmul kernels disabled, falling back to dequantize + matmul: %s", reason)
        _disabled = reason


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes of one row of `cols` values; ValueError for unsupported types or partial blocks."""
    if not supported(qtype):
        raise ValueError(f"no Triton kernel for ggml type {qtype!r}; supported: "
                         f"{', '.join(n for n, _, _ in QTYPES.values())}")
    name, bs, _ = QTYPES[int(qtype)]
    if cols <= 0 or cols % bs:
        raise ValueError(f"{name} rows need a multiple of {bs} values, got {cols}")
    return qtypes.row_bytes(qtype, cols)


def _jit(fn=None, **kw):
    """triton.jit when triton imports (else the plain function, never called)."""
    if fn is None:
        return lambda f: _jit(f, **kw)
    return triton.jit(fn, **kw) if triton is not None else fn


# ---------------------------------------------------------------------------------------------- block decoding
# Every decoder takes `b`: uint8 pointers to the super-block start of each row (shape [BN, 1] or [1, BN]), `l`:
# lane 0..31 within the piece (shape [1, 32] or [32, 1]), `pv`: whether the piece lies inside the row (only Q8_0
# rows may end inside a super-block), and the piece index P (constexpr, 0..7); it returns the piece's 32 values
# of each row as fp32, broadcast to the shape of b + l. The arithmetic follows ggml's dequantize_row_* (and our
# quant.kquants), in the same order.


@_jit
def _ufloat(q, OFF: tl.constexpr):
    """float(q) - OFF for small unsigned integers q (< 2^23), exactly, without an int -> float conversion
    instruction (quarter rate on NVIDIA GPUs): the bits of 2^23 + q, minus 2^23 + OFF."""
    return (q.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFF)


@_jit
def _f16(p, pv):
    lo = tl.load(p, mask=pv, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=pv, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@_jit
def _k4_scale_min(b, P: tl.constexpr):
    """get_scale_min_k4(P) from the 12 scale bytes at b + 4 (Q4_K, Q5_K): (scale, min) as fp32."""
    if P < 4:
        sc = tl.load(b + 4 + P) & 63
        m = tl.load(b + 8 + P) & 63
    else:
        hi = tl.load(b + 12 + (P - 4))
        sc = (hi & 0xF) | ((tl.load(b + 4 + (P - 4)) >> 6) << 4)
        m = (hi >> 4) | ((tl.load(b + 8 + (P - 4)) >> 6) << 4)
    return sc.to(tl.float32), m.to(tl.float32)


@_jit
def _deq_q4_k(b, l, pv, P: tl.constexpr):
    # block_q4_K: d, dmin (fp16), scales[12], qs[128]; piece P = sub-block P, nibble P % 2 of qs[32 * (P // 2) + l]
    d = _f16(b, pv)
    dmin = _f16(b + 2, pv)
    sc, m = _k4_scale_min(b, P)
    q = tl.load(b + 16 + (P // 2) * 32 + l)
    if P % 2 == 0:
        q = q & 0xF
    else:
        q = q >> 4
    return (d * sc) * _ufloat(q, 0) - dmin * m


@_jit
def _deq_q5_k(b, l, pv, P: tl.constexpr):
    # block_q5_K: d, dmin, scales[12], qh[32], qs[128]; high bit P of qh[l]
    d = _f16(b, pv)
    dmin = _f16(b + 2, pv)
    sc, m = _k4_scale_min(b, P)
    q = tl.load(b + 48 + (P // 2) * 32 + l)
    if P % 2 == 0:
        q = q & 0xF
    else:
        q = q >> 4
    h = (tl.load(b + 16 + l) >> P) & 1
    return (d * sc) * _ufloat(q | (h << 4), 0) - dmin * m


@_jit
def _deq_q6_k(b, l, pv, P: tl.constexpr):
    # block_q6_K: ql[128], qh[64], scales[16] (int8), d; half H = P // 4, quarter Q = P % 4
    H: tl.constexpr = P // 4
    Q: tl.constexpr = P % 4
    ql = tl.load(b + H * 64 + (Q % 2) * 32 + l)
    if Q < 2:
        ql = ql & 0xF
    else:
        ql = ql >> 4
    qh = (tl.load(b + 128 + H * 32 + l) >> (2 * Q)) & 3
    s0 = tl.load(b + 192 + 2 * P).to(tl.int8, bitcast=True).to(tl.float32)
    s1 = tl.load(b + 193 + 2 * P).to(tl.int8, bitcast=True).to(tl.float32)
    sc = tl.where(l < 16, s0, s1)
    d = _f16(b + 208, pv)
    return (d * sc) * _ufloat(ql | (qh << 4), 32)


@_jit
def _q3_scale(b, T: tl.constexpr):
    """Signed 6-bit scale T (0..15) of block_q3_K from its 12 bytes at b + 96, as fp32."""
    if T < 8:
        low = tl.load(b + 96 + T) & 0xF
    else:
        low = tl.load(b + 96 + (T - 8)) >> 4
    high = (tl.load(b + 104 + (T % 4)) >> (2 * (T // 4))) & 3
    return ((low | (high << 4)).to(tl.int32) - 32).to(tl.float32)


@_jit
def _deq_q3_k(b, l, pv, P: tl.constexpr):
    # block_q3_K: hmask[32], qs[64], scales[12], d; 2-bit q at qs[32 * (P // 4) + l] >> 2 * (P % 4), high bit P
    q2 = (tl.load(b + 32 + (P // 4) * 32 + l) >> (2 * (P % 4))) & 3
    hb = (tl.load(b + l) >> P) & 1  # q = q2 - 4 where the high bit is clear
    sc = tl.where(l < 16, _q3_scale(b, 2 * P), _q3_scale(b, 2 * P + 1))
    d = _f16(b + 108, pv)
    return (d * sc) * _ufloat(q2 | (hb << 2), 4)


@_jit
def _deq_q2_k(b, l, pv, P: tl.constexpr):
    # block_q2_K: scales[16] (scale | min << 4), qs[64], d, dmin
    q = (tl.load(b + 16 + (P // 4) * 32 + l) >> (2 * (P % 4))) & 3
    s = tl.where(l < 16, tl.load(b + 2 * P), tl.load(b + 2 * P + 1))
    d = _f16(b + 80, pv)
    dmin = _f16(b + 82, pv)
    return (d * (s & 0xF).to(tl.float32)) * _ufloat(q, 0) - dmin * (s >> 4).to(tl.float32)


@_jit
def _deq_q8_0(b, l, pv, P: tl.constexpr):
    # block_q8_0: d (fp16), qs[32] int8; the super-block is 8 consecutive blocks
    d = _f16(b + 34 * P, pv)
    q = tl.load(b + 34 * P + 2 + l, mask=pv, other=0)  # int8 as uint8: value = (q ^ 0x80) - 128
    return _ufloat(q ^ 0x80, 128) * d


@_jit
def _u16(p, pv):
    return tl.load(p, mask=pv, other=0).to(tl.int32) | (tl.load(p + 1, mask=pv, other=0).to(tl.int32) << 8)


@_jit
def _u32(p, pv):
    return _u16(p, pv) | (_u16(p + 2, pv) << 16)


@_jit
def _deq_q4_5(b, l, pv, QT: tl.constexpr, P: tl.constexpr):
    # block P of Q4_0 (d, qs[16]), Q4_1 (d, m, qs), Q5_0 (d, qh u32, qs), Q5_1 (d, m, qh, qs): value j of the block
    # is the low nibble of qs[j] (j < 16) or the high nibble of qs[j - 16], plus bit j of qh as bit 4 (Q5_*);
    # Q4_0 / Q5_0 centre it (- 8, - 16), Q4_1 / Q5_1 add the block minimum m
    BB: tl.constexpr = 18 if QT == 2 else 20 if QT == 3 else 22 if QT == 6 else 24
    QS: tl.constexpr = 2 if QT == 2 else 4 if QT == 3 else 6 if QT == 6 else 8
    p = b + BB * P
    d = _f16(p, pv)
    qb = tl.load(p + QS + (l % 16), mask=pv, other=0).to(tl.int32)
    q = tl.where(l < 16, qb & 0xF, qb >> 4)
    if QT == 6 or QT == 7:
        qh = _u32(p + QS - 4, pv)
        q = q | (((qh >> l) & 1) << 4)
    if QT == 2:
        w = _ufloat(q, 8) * d
    elif QT == 6:
        w = _ufloat(q, 16) * d
    else:
        w = d * _ufloat(q, 0) + _f16(p + 2, pv)
    return w


@_jit
def _ksign_bit(s7, j):
    """Bit j (0..7) of ggml's ksigns for the 7-bit sign index s7: its bits, the 8th making the parity even."""
    t = s7 ^ (s7 >> 4)
    t = t ^ (t >> 2)
    t = t ^ (t >> 1)
    return tl.where(j == 7, t & 1, (s7 >> j) & 1)


@_jit
def _signed(v, bit):
    return tl.where(bit != 0, -v, v)


@_jit
def _deq_iq2(b, l, pv, g, QT: tl.constexpr, P: tl.constexpr):
    # IQ2_XXS: d, then per 32 values 4 grid bytes + u32 (4 x 7-bit sign index, scale in the top 4 bits);
    # IQ2_XS: d, qs u16[32] (9-bit grid index | 7-bit sign index << 9), scales[8] (a nibble per 16 values);
    # IQ2_S: d, qs[32] grid index low bits, signs[32] (explicit), qh[8] (2 high index bits per group), scales[8]
    grp = l // 8
    j = l % 8
    d = _f16(b, pv)
    if QT == 16:
        idx = tl.load(b + 2 + 8 * P + grp).to(tl.int32)
        aux = _u32(b + 6 + 8 * P, pv)
        bit = _ksign_bit((aux >> (7 * grp)) & 127, j)
        db = d * (0.5 + ((aux >> 28) & 0xF).to(tl.float32)) * 0.25
    else:
        if QT == 17:
            q = _u16(b + 2 + 2 * (4 * P + grp), pv)
            idx = q & 511
            bit = _ksign_bit(q >> 9, j)
            sc = tl.load(b + 66 + P).to(tl.int32)
        else:
            qh = tl.load(b + 66 + P).to(tl.int32)
            idx = tl.load(b + 2 + 4 * P + grp).to(tl.int32) | ((qh << (8 - 2 * grp)) & 0x300)
            bit = (tl.load(b + 34 + 4 * P + grp).to(tl.int32) >> j) & 1
            sc = tl.load(b + 74 + P).to(tl.int32)
        db = d * (0.5 + tl.where(grp < 2, sc & 0xF, sc >> 4).to(tl.float32)) * 0.25
    gv = tl.load(g + idx * 8 + j).to(tl.float32)
    return _signed(db * gv, bit)


@_jit
def _deq_iq3(b, l, pv, g, QT: tl.constexpr, P: tl.constexpr):
    # IQ3_XXS: d, qs[64] grid indices (4-byte rows, two per 8 values), u32[8] (4 x 7-bit sign index, scale << 28);
    # IQ3_S: d, qs[64], qh[8] (the 9th index bit), signs[32] (explicit), scales[4] (a nibble per 32 values)
    grp = l // 8
    j = l % 8
    k = 2 * grp + (j >= 4).to(tl.int32)
    d = _f16(b, pv)
    idx = tl.load(b + 2 + 8 * P + k).to(tl.int32)
    if QT == 18:
        aux = _u32(b + 66 + 4 * P, pv)
        bit = _ksign_bit((aux >> (7 * grp)) & 127, j)
        db = d * (0.5 + ((aux >> 28) & 0xF).to(tl.float32)) * 0.5
    else:
        idx = idx | ((tl.load(b + 66 + P).to(tl.int32) << (8 - k)) & 256)
        bit = (tl.load(b + 74 + 4 * P + grp).to(tl.int32) >> j) & 1
        sc = tl.load(b + 106 + P // 2).to(tl.int32)
        if P % 2 == 0:
            sc = sc & 0xF
        else:
            sc = sc >> 4
        db = d * (1 + 2 * sc).to(tl.float32)
    gv = tl.load(g + idx * 4 + (j % 4)).to(tl.float32)
    return _signed(db * gv, bit)


@_jit
def _deq_iq1(b, l, pv, g, QT: tl.constexpr, P: tl.constexpr):
    # values dl * (grid + delta), grid in {-1, 0, 1} (int8 table rows of 8), delta = +-1/8.
    # IQ1_S: d, qs[32] (index low byte), qh u16[8] (3 index bits per group, scale bits 12..14, delta sign bit 15);
    # IQ1_M: qs[32], qh[16] (a nibble per group: 3 index bits, delta sign), scales u16[4] (3 bits per 16 values,
    # the fp16 d spread over their top nibbles)
    grp = l // 8
    j = l % 8
    if QT == 19:
        d = _f16(b, pv)
        qh = _u16(b + 34 + 2 * P, pv)
        idx = tl.load(b + 2 + 4 * P + grp).to(tl.int32) | (((qh >> (3 * grp)) & 7) << 8)
        dl = d * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
        neg = qh & 0x8000
    else:
        dbits = ((_u16(b + 48, pv) >> 12) | ((_u16(b + 50, pv) >> 8) & 0xF0) | ((_u16(b + 52, pv) >> 4) & 0xF00)
                 | (_u16(b + 54, pv) & 0xF000))
        d = dbits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        nib = tl.load(b + 32 + 2 * P + grp // 2).to(tl.int32) >> (4 * (grp % 2))
        idx = tl.load(b + 4 * P + grp).to(tl.int32) | ((nib & 7) << 8)
        s = (_u16(b + 48 + 2 * (P // 2), pv) >> (6 * (P % 2) + 3 * (grp // 2))) & 7
        dl = d * (2 * s + 1).to(tl.float32)
        neg = nib & 8
    gv = tl.load(g + idx * 8 + j).to(tl.float32)
    return dl * (gv + tl.where(neg != 0, -0.125, 0.125))


@_jit
def _deq_iq4(b, l, pv, g, QT: tl.constexpr, P: tl.constexpr):
    # IQ4_NL: blocks of 32 (d, qs[16]); IQ4_XS: d, scales_h u16, scales_l[4], qs[128] (6-bit scale per 32 values,
    # minus 32); nibbles index the 16 non-linear int8 values
    if QT == 20:
        p = b + 18 * P
        dl = _f16(p, pv)
        qb = tl.load(p + 2 + (l % 16), mask=pv, other=0).to(tl.int32)
    else:
        ls = ((tl.load(b + 4 + P // 2).to(tl.int32) >> (4 * (P % 2))) & 0xF) | (((_u16(b + 2, pv) >> (2 * P)) & 3) << 4)
        dl = _f16(b, pv) * (ls - 32).to(tl.float32)
        qb = tl.load(b + 8 + 16 * P + (l % 16)).to(tl.int32)
    kv = tl.load(g + tl.where(l < 16, qb & 0xF, qb >> 4)).to(tl.float32)
    return dl * kv


@_jit
def _deq(b, l, pv, g, QT: tl.constexpr, P: tl.constexpr):
    if QT == 2 or QT == 3 or QT == 6 or QT == 7:
        w = _deq_q4_5(b, l, pv, QT, P)
    elif QT == 16 or QT == 17 or QT == 22:
        w = _deq_iq2(b, l, pv, g, QT, P)
    elif QT == 18 or QT == 21:
        w = _deq_iq3(b, l, pv, g, QT, P)
    elif QT == 19 or QT == 29:
        w = _deq_iq1(b, l, pv, g, QT, P)
    elif QT == 20 or QT == 23:
        w = _deq_iq4(b, l, pv, g, QT, P)
    elif QT == 8:
        w = _deq_q8_0(b, l, pv, P)
    elif QT == 10:
        w = _deq_q2_k(b, l, pv, P)
    elif QT == 11:
        w = _deq_q3_k(b, l, pv, P)
    elif QT == 12:
        w = _deq_q4_k(b, l, pv, P)
    elif QT == 13:
        w = _deq_q5_k(b, l, pv, P)
    else:
        w = _deq_q6_k(b, l, pv, P)
    return w


@_jit
def _round_to(w, DT: tl.constexpr, RNE_BY_HAND: tl.constexpr):
    """fp32 w rounded to dtype DT (round to nearest even), returned as fp32. RNE_BY_HAND: do the bf16 rounding
    with integer ops, for the interpreter, whose fp32 -> bf16 cast does not round to nearest."""
    if DT == tl.float32:
        r = w
    elif RNE_BY_HAND and DT == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        r = bits.to(tl.float32, bitcast=True)
    else:
        r = w.to(DT).to(tl.float32)
    return r


# ---------------------------------------------------------------------------------------------- kernels
@_jit
def _load_x(ptrs, mask, up_off, DT: tl.constexpr, SWIGLU: tl.constexpr, INTERPRET: tl.constexpr):
    """Activations as fp32. SWIGLU: the rows hold [gate | up] (up at +up_off) and the value is SiLU(gate) * up,
    each step rounded to DT as torch's F.silu(g) * u in that dtype would be."""
    if SWIGLU:
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(ptrs + up_off, mask=mask, other=0.0).to(tl.float32)
        s = _round_to(g / (1.0 + tl.exp(-g)), DT, INTERPRET)
        r = _round_to(s * u, DT, INTERPRET)
    else:
        r = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return r


@_jit(do_not_specialize=["M", "sb_per_split"])  # vary per call: one compile for all their values
def _qgemv_kernel(x_ptr, w_ptr, g_ptr, out_ptr, M, N, K, stride_xm, up_off, row_bytes, sb_per_split,
                  QT: tl.constexpr, SB_BYTES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  SWIGLU: tl.constexpr, INTERPRET: tl.constexpr):
    """out[split, m, n] = sum over this split's super-blocks of x[m, k] * W[n, k] (fp32 sums, stored in out's
    dtype: the result itself when there is one split)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rows = tl.minimum(rn, N - 1).to(tl.int64)  # rows past N decode row N-1 and are not stored
    rm = tl.arange(0, BM)
    l = tl.arange(0, 32)
    wrow = w_ptr + rows[:, None] * row_bytes  # [BN, 1]
    xrow = x_ptr + rm[:, None].to(tl.int64) * stride_xm  # [BM, 1]
    mmask = rm[:, None] < M
    nsb = tl.cdiv(K, 256)
    sb0 = pid_k * sb_per_split
    sb1 = tl.minimum(sb0 + sb_per_split, nsb)
    if BM == 1:  # decode of one token: a 2-D accumulator in the weights' own layout
        acc = tl.zeros([BN, 32], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN, 32], dtype=tl.float32)
    for sb in range(sb0, sb1):
        b = wrow + sb * SB_BYTES
        for P in tl.static_range(8):
            col = sb * 256 + P * 32
            pv = col < K
            w = _deq(b, l[None, :], pv, g_ptr, QT, P)  # [BN, 32], exact fp32 values (not rounded to x's dtype)
            xv = _load_x(xrow + col + l[None, :], mmask & ((col + l[None, :]) < K), up_off,
                         x_ptr.dtype.element_ty, SWIGLU, INTERPRET)  # [BM, 32]
            if BM == 1:
                acc += xv * w
            else:
                acc += xv[:, None, :] * w[None, :, :]
    if BM == 1:
        res = tl.sum(acc, axis=1)[None, :]
    else:
        res = tl.sum(acc, axis=2)
    optr = out_ptr + pid_k.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(optr, res.to(out_ptr.dtype.element_ty), mask=mmask & (rn[None, :] < N))


@_jit(do_not_specialize=["M"])
def _qgemm_kernel(x_ptr, w_ptr, g_ptr, out_ptr, M, N, K, stride_xm, up_off, stride_om, row_bytes,
                  QT: tl.constexpr, SB_BYTES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  PREC: tl.constexpr, SWIGLU: tl.constexpr, INTERPRET: tl.constexpr):
    """out[m, n] = x[m, :] @ W[n, :] with tl.dot on decoded [32, BN] weight tiles. Under the interpreter (whose
    bf16 dot and casts are wrong) the dot is fed fp32 holding the same bf16 values, with the same products."""
    pid_m = tl.program_id(0)  # fastest: programs sharing a weight tile run together (it stays in L2)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rows = tl.minimum(rn, N - 1).to(tl.int64)
    l = tl.arange(0, 32)
    wcol = w_ptr + rows[None, :] * row_bytes  # [1, BN]
    xrow = x_ptr + rm[:, None].to(tl.int64) * stride_xm  # [BM, 1]
    mmask = rm[:, None] < M
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for sb in range(tl.cdiv(K, 256)):
        b = wcol + sb * SB_BYTES
        for P in tl.static_range(8):
            col = sb * 256 + P * 32
            pv = col < K
            w = _deq(b, l[:, None], pv, g_ptr, QT, P)  # [32, BN]
            xptrs = xrow + col + l[None, :]
            xmask = mmask & ((col + l[None, :]) < K)
            if INTERPRET:
                w = _round_to(w, x_ptr.dtype.element_ty, True)
                xv = _load_x(xptrs, xmask, up_off, x_ptr.dtype.element_ty, SWIGLU, True)
                acc = tl.dot(xv, w, acc, input_precision="ieee")
            else:
                if SWIGLU:
                    xv = _load_x(xptrs, xmask, up_off, x_ptr.dtype.element_ty, True, False)
                    xv = xv.to(x_ptr.dtype.element_ty)
                else:
                    xv = tl.load(xptrs, mask=xmask, other=0.0)
                acc = tl.dot(xv, w.to(x_ptr.dtype.element_ty), acc, input_precision=PREC)
    optr = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=mmask & (rn[None, :] < N))


# ---------------------------------------------------------------------------------------------- entry points
_tables: dict[tuple[int, torch.device], torch.Tensor] = {}


def _table(qtype: int, device: torch.device) -> torch.Tensor:
    """The codebook the IQ type reads (GRID_OF; IQ1 grids and IQ4 values as int8), on `device`,
    made once per device from the installed gguf package (as the CPU kernels take it)."""
    tid = GRID_OF[qtype]
    key = (tid, device)
    if key not in _tables:
        from offload.kernels import iq_tables  # noqa: PLC0415 (the CPU kernels' package; numpy only here)

        t = iq_tables().get(tid)
        if t is None:
            raise RuntimeError(f"the installed gguf package has no {QTYPES[qtype][0]} codebook")
        _tables[key] = torch.from_numpy(t.copy()).to(device)
    return _tables[key]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _n_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def qmatmul_gpu(x: torch.Tensor, w_bytes: torch.Tensor, qtype: int, cols: int) -> torch.Tensor:
    """y[m, n] = sum_k x[m, k] * W[n, k], W given as its GGUF bytes (uint8 [N, row_bytes] or flat) on x's device.

    x: [..., cols] (leading dims flattened), bf16 / fp16 / fp32. Returns [..., N] in x's dtype (fp32 accumulation).
    Raises ValueError on bad shapes or types, RuntimeError when triton cannot run here."""
    return _qmatmul(x, w_bytes, qtype, cols, swiglu=False)


def swiglu_qmatmul_gpu(gu: torch.Tensor, w_bytes: torch.Tensor, qtype: int, cols: int) -> torch.Tensor:
    """(SiLU(g) * u) @ W^T where gu = [g | u]: [..., 2 * cols] (a fused gate/up output), without materializing
    SiLU(g) * u; each step rounded to gu's dtype as torch would. An expert's down projection."""
    return _qmatmul(gu, w_bytes, qtype, cols, swiglu=True)


def _qmatmul(x: torch.Tensor, w_bytes: torch.Tensor, qtype: int, cols: int, swiglu: bool) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed (pip install triton; CUDA builds of torch include it)")
    rb = row_bytes(qtype, cols)
    if w_bytes.dtype != torch.uint8:
        raise ValueError(f"weight bytes must be uint8, got {w_bytes.dtype}")
    if w_bytes.numel() % rb:
        raise ValueError(f"{w_bytes.numel()} bytes is not a whole number of {QTYPES[int(qtype)][0]} rows of "
                         f"{cols} values ({rb} bytes each)")
    xcols = 2 * cols if swiglu else cols
    if x.shape[-1] != xcols:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight needs {xcols}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if x.device != w_bytes.device:
        raise ValueError(f"x is on {x.device}, the weight bytes on {w_bytes.device}")
    if x.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    n = w_bytes.numel() // rb
    w = w_bytes.reshape(n, rb)
    if not w.is_contiguous():
        w = w.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, xcols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    qt = int(qtype)
    sb_bytes = QTYPES[qt][2] * (SB // QTYPES[qt][1])
    g = _table(qt, x.device) if qt in GRID_OF else w  # (other types: any pointer, never read)
    if m == 0 or n == 0:
        return x.new_zeros(*lead, n)
    # the interpreter's fp32 -> bf16 store truncates: there the kernels write fp32 and torch rounds
    odt = torch.float32 if _INTERPRET else x.dtype
    if m <= GEMV_MAX_M:
        bm = _pow2_at_least(m)
        nsb = -(-cols // SB)
        if x2.device.type == "cpu":  # the interpreter: few big programs are fastest
            bn, split = min(256, _pow2_at_least(n)), 1
        else:
            bn = 32 if bm <= 2 else 16  # no register spills for any type on sm_90 (ptxas)
            want = 4 * _n_sms(x2.device)  # enough programs to keep every SM streaming weights
            split = max(1, min(nsb, -(-want // -(-n // bn))))
        per = -(-nsb // split)
        split = -(-nsb // per)
        y = torch.empty(split, m, n, dtype=odt if split == 1 else torch.float32, device=x.device)
        _qgemv_kernel[(triton.cdiv(n, bn), split)](
            x2, w, g, y, m, n, cols, x2.stride(0), cols, rb, per, QT=qt, SB_BYTES=sb_bytes, BM=bm, BN=bn,
            SWIGLU=swiglu, INTERPRET=_INTERPRET, num_warps=4)
        y = y[0] if split == 1 else y.sum(0)
    else:
        y = torch.empty(m, n, dtype=odt, device=x.device)
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        bn = 64
        prec = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
        # warps: Q3_K and the types added later (legacy 32-value, codebook) use up to 255 registers at 4 warps and
        # spill hundreds of bytes on sm_80 / sm_90 (ptxas); at 8 warps at most ~100 bytes
        _qgemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            x2, w, g, y, m, n, cols, x2.stride(0), cols, y.stride(0), rb, QT=qt, SB_BYTES=sb_bytes, BM=bm, BN=bn,
            PREC=prec, SWIGLU=swiglu, INTERPRET=_INTERPRET, num_warps=4 if qt in (8, 10, 12, 13, 14) else 8)
    return y.to(x.dtype).reshape(*lead, n)
