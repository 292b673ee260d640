"""Fused dequantize-matmul GPU kernels (Triton) on raw GGUF block bytes: y = x @ W^T, W never materialized.

    y = qmatmul_gpu(x, w_bytes, qtype, cols)
    y = swiglu_qmatmul_gpu(gu, w_bytes, qtype, cols)   # (SiLU(g) * u) @ W^T for gu = [g | u]: an expert's down

x: [M, K] (bf16 / fp16 / fp32) on the device; w_bytes: uint8 [N, row_bytes] (or flat), the matrix's rows exactly as
a GGUF file stores them (ggml block layouts: Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K). Output [M, N] in x's dtype,
accumulated in fp32. Each weight block is decoded in registers, 32 columns ("a piece") at a time: a K-quant
super-block of 256 values is 8 pieces, and every piece covers 32 consecutive columns, so activations are read
in plain order. Decoded weights are exact fp32 values; the GEMV multiplies them in fp32, tl.dot takes them
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

try:  # optional: a CUDA build of torch installs it; `pip install k2local[gpu]` otherwise
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover (depends on the environment)
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

__all__ = ["QTYPES", "available", "disable", "enabled", "qmatmul_gpu", "row_bytes", "supported",
           "swiglu_qmatmul_gpu"]

log = logging.getLogger(__name__)

# ggml type id -> (name, values per block, bytes per block); a "super-block" below is 256 values (Q8_0: 8 blocks)
QTYPES: dict[int, tuple[str, int, int]] = {
    8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
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
    name, bs, bb = QTYPES[int(qtype)]
    if cols <= 0 or cols % bs:
        raise ValueError(f"{name} rows need a multiple of {bs} values, got {cols}")
    return cols // bs * bb


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
def _deq(b, l, pv, QT: tl.constexpr, P: tl.constexpr):
    if QT == 8:
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
def _qgemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, up_off, row_bytes, sb_per_split,
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
            w = _deq(b, l[None, :], pv, QT, P)  # [BN, 32], exact fp32 values (not rounded to x's dtype)
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
def _qgemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, up_off, stride_om, row_bytes,
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
            w = _deq(b, l[:, None], pv, QT, P)  # [32, BN]
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
            x2, w, y, m, n, cols, x2.stride(0), cols, rb, per, QT=qt, SB_BYTES=sb_bytes, BM=bm, BN=bn,
            SWIGLU=swiglu, INTERPRET=_INTERPRET, num_warps=4)
        y = y[0] if split == 1 else y.sum(0)
    else:
        y = torch.empty(m, n, dtype=odt, device=x.device)
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        bn = 64
        prec = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
        _qgemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            x2, w, y, m, n, cols, x2.stride(0), cols, y.stride(0), rb, QT=qt, SB_BYTES=sb_bytes, BM=bm, BN=bn,
            PREC=prec, SWIGLU=swiglu, INTERPRET=_INTERPRET, num_warps=8 if qt == 11 else 4)  # Q3_K: 4 warps spill
    return y.to(x.dtype).reshape(*lead, n)
