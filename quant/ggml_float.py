"""Float32 arithmetic that reproduces ggml's C reference code bit for bit.

ggml's reference quantizers are plain scalar C compiled without fast-math or FMA contraction, so every
operation is one IEEE float32 rounding in source order.  Torch elementwise ops are too, with four traps
handled here: reductions (torch reorders sums, so sums are done element by element in C order),
division by a scalar (torch may turn it into a multiply by the reciprocal, so divisors are always
tensors), torch's CPU float32 sqrt (not always correctly rounded) and C's nearest_int / roundf rules.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_POS_ZERO = np.float32(0.0)
_NEG_ZERO = np.float32(-0.0)
_MAGIC = 12582912.0  # 1.5 * 2**23: adding it rounds a float32 to an integer in the low mantissa bits
GROUP_MAX_EPS = float(np.float32(1e-15))


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 value (a C `float` literal)."""
    return float(np.float32(x))


def f32_mul(a: float, b: float) -> float:
    """C float product a*b of two float32 values."""
    return float(np.float32(a) * np.float32(b))


def f32_add(a: float, b: float) -> float:
    """C float sum a+b of two float32 values."""
    return float(np.float32(a) + np.float32(b))


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int(): round half to even via the 1.5*2^23 trick, as int32, garbage-compatible
    with C outside |x| <= 4194303 (inf/nan included)."""
    v = (x + _MAGIC).view(torch.int32)
    return (v & 0x007FFFFF) - 0x00400000


def nearest_int_clamped(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(x))) as float32 (small integers are exact in float)."""
    return nearest_int(x).clamp_(lo, hi).to(torch.float32)


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf(): round half away from zero, exactly (no x+0.5 double rounding)."""
    t = torch.trunc(x)
    frac = (x - t).abs()  # exact for float32
    return t + torch.where(frac >= 0.5, torch.sign(x), torch.zeros_like(x))


def sqrtf(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (C sqrtf).  torch's own float sqrt may be off by one ulp, so take a
    float64 estimate and settle the rounding exactly: squares of float32 midpoints are exact in float64."""
    y = torch.sqrt(x.to(torch.float64)).to(torch.float32)
    xd = x.to(torch.float64)
    up = torch.nextafter(y, torch.full_like(y, float("inf")))
    down = torch.nextafter(y, torch.zeros_like(y))
    mid_up = (y.to(torch.float64) + up.to(torch.float64)) * 0.5
    mid_down = (y.to(torch.float64) + down.to(torch.float64)) * 0.5
    y = torch.where(mid_up * mid_up < xd, up, y)
    return torch.where(mid_down * mid_down > xd, down, y)


def div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """IEEE a/b with a tensor divisor (torch's scalar division may multiply by a reciprocal)."""
    if not isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor)
        b = torch.full_like(a, f32(b))
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, f32(a))
    return torch.div(a, b)


def _on_numpy(t: torch.Tensor) -> bool:
    """CPU float32 tensors take the numpy versions below (one call instead of a Python loop of torch ops)."""
    return t.device.type == "cpu" and t.dtype == torch.float32


def np_seq_sum(a: np.ndarray, axis: int = 0, initial: np.float32 = _POS_ZERO) -> np.ndarray:
    """`float s = initial; for (i...) s += a[i];` along `axis` of a float32 array, in C order.

    numpy reduces a C-contiguous array along a non-innermost axis row after row: one IEEE float32 addition per
    element, in index order, no pairwise summation, no wider accumulator; exactly the C loop, in one call. When
    the reduced axis would become numpy's inner loop (non-contiguous input, or nothing left beside it) numpy sums
    pairwise, so those cases add row by row here."""
    if a.flags.c_contiguous and axis != a.ndim - 1 and math.prod(a.shape[axis + 1:]) >= 16:
        return np.add.reduce(a, axis=axis, initial=initial)
    acc = np.full(a.shape[:axis] + a.shape[axis + 1:], initial, np.float32)
    for i in range(a.shape[axis]):
        np.add(acc, np.take(a, i, axis=axis), out=acc)
    return acc


def seq_sum(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`float s = 0; for (i...) s += t[i];` along `dim`, in C order."""
    if _on_numpy(t):
        return torch.from_numpy(np_seq_sum(t.detach().contiguous().numpy(), dim % t.dim(), _POS_ZERO))
    acc = torch.zeros_like(t.select(dim, 0))
    for i in range(t.shape[dim]):
        acc.add_(t.select(dim, i))
    return acc


def seq_sum_from_first(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`float s = t[0]; for (i = 1...) s += t[i];` along `dim` (starting from -0.0 is the same: -0 + x == x)."""
    if _on_numpy(t):
        return torch.from_numpy(np_seq_sum(t.detach().contiguous().numpy(), dim % t.dim(), _NEG_ZERO))
    acc = t.select(dim, 0).clone()
    for i in range(1, t.shape[dim]):
        acc.add_(t.select(dim, i))
    return acc


def first_absmax_np(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """first_absmax along axis 0 of a numpy array: C's `if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }`."""
    amax = np.zeros(x.shape[1:], np.float32)
    xmax = np.zeros(x.shape[1:], np.float32)
    ax = np.abs(x)
    for i in range(x.shape[0]):
        better = ax[i] > amax  # NaN never wins
        np.copyto(xmax, x[i], where=better)
        np.copyto(amax, ax[i], where=better)
    return amax, xmax


def first_absmax(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """C's `amax = 0, max = 0; if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }` along dim:
    the first largest |x| and its signed value (NaNs never win; +0 when nothing beats 0)."""
    if _on_numpy(x):
        amax, xmax = first_absmax_np(np.moveaxis(x.detach().contiguous().numpy(), dim, 0))
        return torch.from_numpy(amax), torch.from_numpy(xmax)
    ax = x.abs()
    ax = torch.where(torch.isnan(ax), torch.zeros_like(ax), ax)
    idx = ax.argmax(dim=dim, keepdim=True)  # first maximal index, documented
    amax = ax.gather(dim, idx).squeeze(dim)
    xmax = torch.where(amax > 0, x.gather(dim, idx).squeeze(dim), torch.zeros_like(amax))
    return amax, xmax


def positive_max(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """C's `m = 0; if (x[i] > m) m = x[i];` along dim (NaNs never win)."""
    m = torch.where(torch.isnan(x), torch.zeros_like(x), x).amax(dim)
    return torch.where(m > 0, m, torch.zeros_like(m))


def c_max_scan(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """C's `m = 0; m = MAX(m, x[i]);` with MAX(a, b) = a > b ? a : b, NaN behaviour included."""
    m = torch.zeros_like(x.select(dim, 0))
    for i in range(x.shape[dim]):
        xi = x.select(dim, i)
        m = torch.where(m > xi, m, xi)
    return m


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 (round to nearest even, like ggml's software conversion) as float16."""
    return x.to(torch.float16)


def fp16_bytes(h: torch.Tensor) -> torch.Tensor:
    """Little-endian bytes of a float16 tensor: shape [..., 2] uint8."""
    return h.contiguous().view(torch.uint8).reshape(*h.shape, 2)


def bytes_to_fp16(b: torch.Tensor) -> torch.Tensor:
    """Inverse of fp16_bytes for a [..., 2] uint8 tensor: float32 values."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)
