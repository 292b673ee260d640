"""ggml's scale searches for K-quants, vectorized over many sub-blocks at once.

Each function mirrors one static helper of ggml-quants.c (make_qkx2_quants, make_qkx3_quants,
make_qx_quants, make_q3_quants, make_qp_quants) with the same float32 operation order.  Inputs are
element-major: x has shape [n, S] (n values of each of S independent groups); per-group results have
shape [S].  Quant levels are returned as float32 tensors holding small integers.
"""

from __future__ import annotations

import torch

from .ggml_float import (
    GROUP_MAX_EPS,
    c_max_scan,
    div,
    f32,
    f32_add,
    f32_mul,
    first_absmax,
    nearest_int,
    nearest_int_clamped,
    seq_sum,
    seq_sum_from_first,
)


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
