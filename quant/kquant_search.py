"""ggml's scale searches for K-quants, vectorized over many sub-blocks at once.

Each function mirrors one static helper of ggml-quants.c (make_qkx2_quants, make_qkx3_quants,
make_qx_quants, make_q3_quants, make_qp_quants) with the same float32 operation order.  Inputs are
element-major: x has shape [n, S] (n values of each of S independent groups); per-group results have
shape [S].  Quant levels are returned as float32 tensors holding small integers.

On the CPU the two hot searches (make_qkx_quants, make_qx_quants) run in numpy over blocks of _NP_BLOCK values:
numpy's per-call overhead is a fraction of torch's and its `out=` ufuncs reuse a few buffers that stay in the L2
cache, which makes them several times faster.  Same float32 operations in the same order, so the same bits.
"""

from __future__ import annotations

import numpy as np
import torch

from .ggml_float import (
    GROUP_MAX_EPS,
    c_max_scan,
    div,
    f32,
    f32_add,
    f32_mul,
    first_absmax,
    first_absmax_np,
    nearest_int,
    nearest_int_clamped,
    np_seq_sum,
    seq_sum,
    seq_sum_from_first,
)

_NEG_ZERO = np.float32(-0.0)
_POS_ZERO = np.float32(0.0)
_F32 = np.float32
_MAGIC = np.float32(12582912.0)  # as ggml_float.nearest_int
_clip = getattr(getattr(np, "_core", None), "umath", np).clip  # the ufunc itself: np.clip's wrapper costs more
_NP_BLOCK = 1 << 16  # values per numpy block on the CPU (128 KB per work array: the few arrays stay in L2)


def make_qkx_quants(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants / make_qkx3_quants (identical for given weights): asymmetric levels 0..nmax.

    Returns (L [n, S], scale [S], the_min [S]) where x ~= scale * L - the_min.
    """
    if x.device.type == "cpu":
        return _blockwise(_qkx_np, (x, w), 3, nmax, rmin, rdelta, nstep, use_mad)
    return _make_qkx_quants_torch(x, w, nmax, rmin, rdelta, nstep, use_mad)


def _make_qkx_quants_torch(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                           use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`make_qkx_quants` in torch ops (any device; the CPU takes the numpy twin `_qkx_np`)."""
    n = x.shape[0]
    xmin = x.amin(0)
    xmax = x.amax(0)
    sum_w = seq_sum_from_first(w)
    sum_x = seq_sum_from_first(w * x)
    xmin = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)
    degenerate = xmax == xmin  # also covers max <= min
    xmin0 = xmin

    def error(scale: torch.Tensor, levels: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        diff = scale * levels + mn - x
        diff = diff.abs() if use_mad else diff * diff
        return seq_sum(w * diff)

    iscale = div(float(nmax), xmax - xmin)
    scale = div(1.0, iscale)
    best = error(scale, nearest_int_clamped(iscale * (x - xmin), 0, nmax), xmin)
    # The levels of the best candidate are recomputed at the end from the (iscale, min) that made them.
    best_iscale, best_from = iscale, xmin
    if nstep >= 1:
        prod = torch.empty((3, n) + x.shape[1:], dtype=x.dtype, device=x.device)
        for step in range(nstep + 1):
            num = f32_add(f32_add(f32(rmin), f32_mul(rdelta, step)), float(nmax))
            iscale = div(num, xmax - xmin)
            laux = nearest_int_clamped(iscale * (x - xmin), 0, nmax)
            torch.mul(w, laux, out=prod[0])
            torch.mul(prod[0], laux, out=prod[1])
            torch.mul(prod[0], x, out=prod[2])
            sum_l, sum_l2, sum_xl = seq_sum(prod, dim=1)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = div(sum_w * sum_xl - sum_x * sum_l, D)
            this_min = div(sum_l2 * sum_x - sum_l * sum_xl, D)
            pos = this_min > 0
            this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
            this_scale = torch.where(pos, div(sum_xl, sum_l2), this_scale)
            cur = error(this_scale, laux, this_min)
            better = (D > 0) & (cur < best)
            best_iscale = torch.where(better, iscale, best_iscale)
            best_from = torch.where(better, xmin, best_from)
            best = torch.where(better, cur, best)
            scale = torch.where(better, this_scale, scale)
            xmin = torch.where(better, this_min, xmin)
    zero = torch.zeros_like(scale)
    best_iscale = torch.where(degenerate, zero, best_iscale)  # -> all levels 0
    L = nearest_int_clamped(best_iscale * (x - best_from), 0, nmax)
    scale = torch.where(degenerate, zero, scale)
    return L, scale, -torch.where(degenerate, xmin0, xmin)


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants with rmse_type=1: symmetric levels, returns (L = l + nmax in [0, 2*nmax-1], scale)."""
    if x.device.type == "cpu":
        return _blockwise(_qx_np, (x, x * x if qw is None else qw), 2, nmax)  # type: ignore[return-value]
    return _make_qx_quants_torch(x, nmax, qw)


def _make_qx_quants_torch(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    amax, xmax = first_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    w = qw if qw is not None else x * x
    wx = w * x

    def levels(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        l = nearest_int_clamped(iscale * x, -nmax, nmax - 1)
        wl = w * l
        return l, seq_sum(wx * l), seq_sum(wl * l)

    iscale = div(float(-nmax), xmax)
    _, sumlx, suml2 = levels(iscale)
    best_iscale = iscale
    scale = torch.where(suml2 != 0, div(sumlx, suml2), torch.zeros_like(suml2))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -f32_add(float(nmax), f32_mul(0.1, step))
        iscale = div(num, xmax)
        _, sumlx, suml2 = levels(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(better, iscale, best_iscale)
        scale = torch.where(better, div(sumlx, suml2), scale)
        best = torch.where(better, scale * sumlx, best)
    L = nearest_int_clamped(best_iscale * x, -nmax, nmax - 1) + nmax
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return L, scale


# ------------------------------------------------------------------------------------------ numpy (CPU) kernels
def _blockwise(fn, ins: tuple[torch.Tensor, ...], n_out: int, *args) -> tuple[torch.Tensor, ...]:
    """Run numpy kernel `fn(*blocks, *args)` over column blocks of the [n, S] (or [1, S]) inputs; the first
    output is [n, S], the others [S]."""
    arrs = [t.detach().to(torch.float32).contiguous().numpy() for t in ins]
    n, S = arrs[0].shape
    outs = [np.empty((n, S) if i == 0 else (S,), np.float32) for i in range(n_out)]
    step = max(64, _NP_BLOCK // n)
    with np.errstate(all="ignore"):  # inf / NaN arise exactly where the C code has them
        for s0 in range(0, S, step):
            s1 = min(S, s0 + step)
            res = fn(*(np.ascontiguousarray(a[:, s0:s1]) for a in arrs), *args)
            outs[0][:, s0:s1] = res[0]
            for o, r in zip(outs[1:], res[1:]):
                o[s0:s1] = r
    return tuple(torch.from_numpy(o) for o in outs)


def _nic(y: np.ndarray, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """out = MAX(lo, MIN(hi, nearest_int(y))) as float32; y is overwritten (ggml_float.nearest_int's trick)."""
    np.add(y, _MAGIC, out=y)
    v = y.view(np.int32)
    np.bitwise_and(v, 0x007FFFFF, out=v)
    np.subtract(v, 0x00400000, out=v)
    np.copyto(out, v, casting="unsafe")  # small integers: exact in float32
    return _clip(out, _F32(lo), _F32(hi), out=out)  # numpy's float clip is much faster than its int max/min


def _sum0(a: np.ndarray, initial: np.float32 = _POS_ZERO) -> np.ndarray:
    return np_seq_sum(a, 0, initial)


def _qkx_np(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
            use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """_make_qkx_quants_torch on one numpy block, op for op."""
    xmin = np.minimum.reduce(x, axis=0)
    xmax = np.maximum.reduce(x, axis=0)
    sum_w = _sum0(w, _NEG_ZERO)
    t = np.multiply(w, x)
    sum_x = _sum0(t, _NEG_ZERO)
    xmin = np.where(xmin > 0, _POS_ZERO, xmin)
    degenerate = xmax == xmin
    xmin0 = xmin
    laux, d = np.empty_like(x), np.empty_like(x)
    prod = np.empty((3,) + x.shape, np.float32)

    def error(scale: np.ndarray, levels: np.ndarray, mn: np.ndarray) -> np.ndarray:
        np.multiply(scale, levels, out=d)
        np.add(d, mn, out=d)
        np.subtract(d, x, out=d)
        if use_mad:
            np.abs(d, out=d)
        else:
            np.multiply(d, d, out=d)
        np.multiply(w, d, out=d)
        return _sum0(d)

    def levels(iscale: np.ndarray, mn: np.ndarray) -> np.ndarray:
        np.subtract(x, mn, out=t)
        np.multiply(iscale, t, out=t)
        return _nic(t, 0, nmax, laux)

    iscale = _F32(nmax) / (xmax - xmin)
    scale = _F32(1.0) / iscale
    best = error(scale, levels(iscale, xmin), xmin)
    best_iscale, best_from = iscale, xmin
    if nstep >= 1:
        for step in range(nstep + 1):
            num = f32_add(f32_add(f32(rmin), f32_mul(rdelta, step)), float(nmax))
            iscale = _F32(num) / (xmax - xmin)
            levels(iscale, xmin)
            np.multiply(w, laux, out=prod[0])
            np.multiply(prod[0], laux, out=prod[1])
            np.multiply(prod[0], x, out=prod[2])
            sum_l, sum_l2, sum_xl = np_seq_sum(prod, 1)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, _POS_ZERO, this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, laux, this_min)
            better = (D > 0) & (cur < best)
            best_iscale = np.where(better, iscale, best_iscale)
            best_from = np.where(better, xmin, best_from)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            xmin = np.where(better, this_min, xmin)
    best_iscale = np.where(degenerate, _POS_ZERO, best_iscale)  # -> all levels 0
    L = levels(best_iscale, best_from).copy()
    scale = np.where(degenerate, _POS_ZERO, scale)
    return L, scale, -np.where(degenerate, xmin0, xmin)


def _qx_np(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """_make_qx_quants_torch on one numpy block (w = importance or x*x), op for op."""
    amax, xmax = first_absmax_np(x)
    zero = amax < _F32(GROUP_MAX_EPS)
    wx = np.multiply(w, x)
    t, l = np.empty_like(x), np.empty_like(x)

    def levels(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.multiply(iscale, x, out=t)
        _nic(t, -nmax, nmax - 1, l)
        np.multiply(wx, l, out=t)
        sumlx = _sum0(t)
        np.multiply(w, l, out=t)
        np.multiply(t, l, out=t)
        return sumlx, _sum0(t)

    iscale = _F32(-nmax) / xmax
    sumlx, suml2 = levels(iscale)
    best_iscale = iscale
    scale = np.where(suml2 != 0, sumlx / suml2, _POS_ZERO)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -f32_add(float(nmax), f32_mul(0.1, step))
        iscale = _F32(num) / xmax
        sumlx, suml2 = levels(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = np.where(better, iscale, best_iscale)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    np.multiply(best_iscale, x, out=t)
    L = _nic(t, -nmax, nmax - 1, l) + _F32(nmax)
    L[:, zero] = 0
    return L, np.where(zero, _POS_ZERO, scale)


def _descend(
    x: torch.Tensor,
    w: torch.Tensor,
    L: torch.Tensor,
    sumlx: torch.Tensor,
    suml2: torch.Tensor,
    lo: int | None,
    hi: int,
    require_sl2_pos_first: bool,
    wrap_u8: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 5-pass coordinate descent shared by make_q3_quants and make_qp_quants.

    C stops a group after a pass without changes; such a group's state is final, so only groups that
    changed in the previous pass are carried into the next one.
    """
    if x.device.type == "cpu":
        arrs = [t.detach().to(torch.float32).contiguous().numpy() for t in (x, w, L, sumlx, suml2)]
        with np.errstate(all="ignore"):
            res = _descend_np(*arrs, lo, hi, require_sl2_pos_first, wrap_u8)
        return tuple(torch.from_numpy(r) for r in res)  # type: ignore[return-value]
    L, sumlx, suml2 = L.clone(), sumlx.clone(), suml2.clone()
    active = torch.arange(x.shape[1], device=x.device)
    for _ in range(5):
        xa, wa, La = x[:, active], w[:, active], L[:, active]
        slxa, sl2a = sumlx[active], suml2[active]
        wxa = wa * xa
        changed = torch.zeros_like(slxa, dtype=torch.bool)
        for i in range(x.shape[0]):
            li, wi, xi, wxi = La[i], wa[i], xa[i], wxa[i]
            slx = slxa - wxi * li
            sl2 = sl2a - (wi * li) * li
            ok = slx > 0
            if require_sl2_pos_first:
                ok = ok & (sl2 > 0)
            new_l = nearest_int(div(xi * sl2, slx))
            new_l = new_l.clamp(max=hi) if lo is None else new_l.clamp(lo, hi)
            new_f = new_l.to(torch.float32)
            slx2 = slx + wxi * new_f
            sl22 = sl2 + (wi * new_f) * new_f
            accept = ok & (new_f != li) & ((slx2 * slx2) * sl2a > (slxa * slxa) * sl22)
            if not require_sl2_pos_first:
                accept = accept & (sl22 > 0)
            stored = (new_l & 0xFF).to(torch.float32) if wrap_u8 else new_f
            La[i] = torch.where(accept, stored, li)
            slxa = torch.where(accept, slx2, slxa)
            sl2a = torch.where(accept, sl22, sl2a)
            changed |= accept
        L[:, active], sumlx[active], suml2[active] = La, slxa, sl2a
        active = active[changed]
        if active.numel() == 0:
            break
    return L, sumlx, suml2


def _descend_np(x: np.ndarray, w: np.ndarray, L: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray, lo: int | None,
                hi: int, require_sl2_pos_first: bool, wrap_u8: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """_descend's torch code on numpy arrays, op for op (in-place masked updates instead of torch.where)."""
    L, sumlx, suml2 = L.copy(), sumlx.copy(), suml2.copy()
    active = np.arange(x.shape[1])
    for _ in range(5):
        xa, wa, La = x[:, active], w[:, active], L[:, active]
        slxa, sl2a = sumlx[active], suml2[active]
        wxa = wa * xa
        changed = np.zeros(slxa.shape, bool)
        for i in range(x.shape[0]):
            li, wi, xi, wxi = La[i], wa[i], xa[i], wxa[i]
            slx = slxa - wxi * li
            sl2 = sl2a - (wi * li) * li
            ok = slx > 0
            if require_sl2_pos_first:
                ok &= sl2 > 0
            q = (xi * sl2) / slx
            q += _MAGIC
            new_l = q.view(np.int32)
            new_l &= 0x007FFFFF
            new_l -= 0x00400000
            if lo is None:
                np.minimum(new_l, hi, out=new_l)
            else:
                _clip(new_l, lo, hi, out=new_l)
            new_f = new_l.astype(np.float32)
            slx2 = slx + wxi * new_f
            sl22 = sl2 + (wi * new_f) * new_f
            accept = ok & (new_f != li) & ((slx2 * slx2) * sl2a > (slxa * slxa) * sl22)
            if not require_sl2_pos_first:
                accept &= sl22 > 0
            if wrap_u8:
                new_l &= 0xFF
                np.copyto(new_f, new_l, casting="unsafe")
            np.copyto(li, new_f, where=accept)
            np.copyto(slxa, slx2, where=accept)
            np.copyto(sl2a, sl22, where=accept)
            changed |= accept
        L[:, active], sumlx[active], suml2[active] = La, slxa, sl2a
        active = active[changed]
        if active.size == 0:
            break
    return L, sumlx, suml2


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants with do_rmse=true: returns (L = l + nmax, scale)."""
    amax, xmax = first_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    l = nearest_int_clamped(div(float(-nmax), xmax) * x, -nmax, nmax - 1)
    sumlx = seq_sum((w * x) * l)
    suml2 = seq_sum((w * l) * l)
    l, sumlx, suml2 = _descend(x, w, l, sumlx, suml2, -nmax, nmax - 1, False, False)
    scale = torch.where(suml2 > 0, div(sumlx, suml2), torch.zeros_like(suml2))
    L = torch.where(zero, torch.zeros_like(l), l + nmax)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return L, scale


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants: non-negative levels 0..nmax for (positive) sub-block scales, weighted by qw.

    Returns (L as uint8 values in float32, scale).
    """
    xmax = c_max_scan(x, 0)
    zero = xmax < GROUP_MAX_EPS
    iscale = div(float(nmax), xmax)
    L = (nearest_int(iscale * x) & 0xFF).to(torch.float32)
    scale = div(1.0, iscale)

    def mse(s: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        diff = x - s * levels
        return seq_sum((qw * diff) * diff)

    best = mse(scale, L)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = div(f32_add(f32_mul(0.1, step), float(nmax)), xmax)
        l = nearest_int(iscale_is * x).clamp(max=nmax).to(torch.float32)
        cur = mse(div(1.0, iscale_is), l)
        better = cur < best
        best = torch.where(better, cur, best)
        iscale = torch.where(better, iscale_is, iscale)
    li = nearest_int(iscale * x).clamp(max=nmax)
    l = li.to(torch.float32)
    L = (li & 0xFF).to(torch.float32)
    sumlx = seq_sum((qw * x) * l)
    suml2 = seq_sum((qw * l) * l)
    L, sumlx, suml2 = _descend(x, qw, L, sumlx, suml2, None, nmax, True, True)
    scale = torch.where(suml2 > 0, div(sumlx, suml2), torch.zeros_like(suml2))
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return L, scale
