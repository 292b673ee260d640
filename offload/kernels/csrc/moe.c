/* The fused routed-experts FFN of a MoE layer for T tokens (gate / up, SiLU * up, down, weighted sum) in one pool
 * task, grouped by expert. */
#include "common.h"
#include "k2kern.h"
#include "run.h"

typedef struct {
    int64_t T, hidden, inter, ldx, ldy;
    const float *x;
    float *y;
    int accumulate, prequant;
    kern_t kg, ku, kd;
    int nb_h, nb_u, nb_i; /* blocks per row: gate, up rows (hidden cols; the types may differ), down rows (inter) */
    int64_t rs_g, rs_u, rs_d;
    const uint8_t *const *gate, *const *up, *const *down;
    int nslots;
    const int *slot_exp;  /* slot -> expert index */
    const int *slot_off;  /* slot -> first pair (pairs grouped by slot), size nslots+1 */
    const int *pair_tok;  /* pair -> token */
    const float *pair_w;  /* pair -> routing weight */
    uint8_t *xa_g, *xa_u; /* per token activation buffers (hidden) */
    size_t xab, xas;      /* bytes of one buffer; bytes between tokens' buffers (0: every token is the same row) */
    int64_t Tq;           /* distinct rows to quantize: T, or 1 when x's row stride is 0 */
    float *h;             /* [npairs, inter] */
    uint8_t *ha;          /* per pair activation buffers (inter) */
    size_t hab;
    _Atomic int *span_done;
    int nspans;
    int64_t chunk1, nch1, chunk2;
    /* decode-once / many-token GEMM (kernel fng) for a slot's group of up to MAXNT pairs with >= gmin of them:
     * grp0[s] = the slot's first group; tiles of group g at xg_* + tb_*[g] * xgb_* (tb_*[g + 1] == tb_*[g]: none) */
    int *grp0;
    int64_t *tb_g, *tb_u, *tb_d;
    uint8_t *xg_g, *xg_u, *xg_d;
    size_t xgb_g, xgb_u, xgb_d;
    int ngroups, any_gemm1, any_gemm2, share_u; /* share_u: up uses gate's packed tiles */
    float *tmp;           /* per thread scratch */
    size_t tmp_per_thread;
    _Atomic int64_t next1, next2;
} moe_ctx;

#define SPAN 256
#ifndef CHUNK2_MAX
#define CHUNK2_MAX 256
#endif

static inline float silu(float v) { return v / (1.f + expf(-v)); }

/* pack group g's activations (pair p's buffer at buf + (pair_tok[p] or p) * stride) in tiles for kernel k */
static void moe_pack(const moe_ctx *c, const kern_t *k, int g, int s, const uint8_t *buf, size_t stride, int by_tok,
                     int64_t cols, const int64_t *tb, uint8_t *xg, size_t xgb, int nb) {
    if (tb[g + 1] == tb[g]) return;
    act_t acts[MAXNT];
    const int p0 = c->slot_off[s] + (g - c->grp0[s]) * MAXNT;
    const int nt = c->slot_off[s + 1] - p0 < MAXNT ? c->slot_off[s + 1] - p0 : MAXNT;
    for (int i = 0; i < nt; i++)
        acts[i] = act_view((uint8_t *)buf + (size_t)(by_tok ? c->pair_tok[p0 + i] : p0 + i) * stride, cols);
    for (int t0 = 0, i = 0; t0 < nt; t0 += k->gtok, i++)
        k->fnp(acts + t0, nt - t0 < k->gtok ? nt - t0 : k->gtok, nb, xg + (tb[g] + i) * xgb, k->layout, k->blk);
}

static inline int group_slot(const moe_ctx *c, int g) { /* the slot a group belongs to */
    int lo = 0, hi = c->nslots - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (c->grp0[mid] <= g) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

static void moe_task(void *vctx, int tid, int nth) {
    moe_ctx *c = (moe_ctx *)vctx;
    int sense = 0;
    /* phase 0: quantize x per token for gate (and up if its layout differs) */
    if (!c->prequant) {
        for (int64_t t = tid; t < c->Tq; t += nth) {
            quantize_act(c->x + t * c->ldx, c->hidden, c->kg.layout, c->xa_g + t * c->xas);
            if (c->xa_u != c->xa_g) quantize_act(c->x + t * c->ldx, c->hidden, c->ku.layout, c->xa_u + t * c->xas);
        }
        pool_barrier(nth, &sense);
    }
    if (c->any_gemm1) { /* pack gate/up activations of the groups that go through the GEMM */
        for (int g = tid; g < c->ngroups; g += nth) {
            const int s = group_slot(c, g);
            moe_pack(c, &c->kg, g, s, c->xa_g, c->xas, 1, c->hidden, c->tb_g, c->xg_g, c->xgb_g, c->nb_h);
            if (!c->share_u)
                moe_pack(c, &c->ku, g, s, c->xa_u, c->xas, 1, c->hidden, c->tb_u, c->xg_u, c->xgb_u, c->nb_u);
        }
        pool_barrier(nth, &sense);
    }
    float *tmp = c->tmp + (size_t)tid * c->tmp_per_thread;
    act_t ag[MAXNT], au[MAXNT];
    /* phase 1: gate/up rows -> h = silu(g) * u; the thread finishing a 256-row span quantizes it */
    const int64_t n1 = (int64_t)c->nslots * c->nch1;
    for (;;) {
        int64_t it = atomic_fetch_add_explicit(&c->next1, 1, memory_order_relaxed);
        if (it >= n1) break;
        const int s = (int)(it / c->nch1), e = c->slot_exp[s];
        const int64_t r0 = (it % c->nch1) * c->chunk1, r1 = r0 + c->chunk1 < c->inter ? r0 + c->chunk1 : c->inter;
        const int64_t nr = r1 - r0;
        for (int p0 = c->slot_off[s]; p0 < c->slot_off[s + 1]; p0 += MAXNT) {
            int nt = c->slot_off[s + 1] - p0 < MAXNT ? c->slot_off[s + 1] - p0 : MAXNT;
            const int grp = c->grp0[s] + (p0 - c->slot_off[s]) / MAXNT;
            const int gg = c->tb_g[grp + 1] > c->tb_g[grp], gu = c->tb_u[grp + 1] > c->tb_u[grp];
            for (int k = 0; k < nt && !(gg && gu); k++) {
                int t = c->pair_tok[p0 + k];
                ag[k] = act_view(c->xa_g + (size_t)t * c->xas, c->hidden);
                au[k] = act_view(c->xa_u + (size_t)t * c->xas, c->hidden);
            }
            float *g = tmp, *u = tmp + (size_t)MAXNT * c->chunk1;
            if (gg)
                c->kg.fng(&c->kg, c->gate[e] + r0 * c->rs_g, c->rs_g, nr, c->nb_h, c->xg_g + c->tb_g[grp] * c->xgb_g,
                          c->xgb_g, nt, g, (ptrdiff_t)c->chunk1);
            else
                run_rows(&c->kg, c->gate[e], c->rs_g, c->nb_h, r0, r1, ag, nt, g, (ptrdiff_t)c->chunk1, c->up[e] + r0 * c->rs_u);
            if (gu)
                c->ku.fng(&c->ku, c->up[e] + r0 * c->rs_u, c->rs_u, nr, c->nb_u, c->xg_u + c->tb_u[grp] * c->xgb_u,
                          c->xgb_u, nt, u, (ptrdiff_t)c->chunk1);
            else
                run_rows(&c->ku, c->up[e], c->rs_u, c->nb_u, r0, r1, au, nt, u, (ptrdiff_t)c->chunk1,
                         r1 < c->inter ? c->up[e] + r1 * c->rs_u : NULL);
            for (int k = 0; k < nt; k++) {
                float *hr = c->h + (size_t)(p0 + k) * c->inter;
                for (int64_t r = 0; r < nr; r++) hr[r0 + r] = silu(g[k * c->chunk1 + r]) * u[k * c->chunk1 + r];
            }
        }
        const int span = (int)(r0 / SPAN);
        const int64_t s0 = (int64_t)span * SPAN, s1 = s0 + SPAN < c->inter ? s0 + SPAN : c->inter;
        int prev = atomic_fetch_add_explicit(&c->span_done[s * c->nspans + span], (int)nr, memory_order_acq_rel);
        if (prev + nr == s1 - s0) {
            for (int p = c->slot_off[s]; p < c->slot_off[s + 1]; p++)
                quantize_act_range(c->h + (size_t)p * c->inter, c->inter, c->kd.layout, c->ha + (size_t)p * c->hab, s0, s1);
        }
    }
    pool_barrier(nth, &sense);
    if (c->any_gemm2) {
        for (int g = tid; g < c->ngroups; g += nth)
            moe_pack(c, &c->kd, g, group_slot(c, g), c->ha, c->hab, 0, c->inter, c->tb_d, c->xg_d, c->xgb_d, c->nb_i);
        pool_barrier(nth, &sense);
    }
    /* phase 2: down rows; each chunk of output rows loops over all slots and accumulates */
    const int64_t n2 = (c->hidden + c->chunk2 - 1) / c->chunk2;
    for (;;) {
        int64_t it = atomic_fetch_add_explicit(&c->next2, 1, memory_order_relaxed);
        if (it >= n2) break;
        const int64_t r0 = it * c->chunk2, r1 = r0 + c->chunk2 < c->hidden ? r0 + c->chunk2 : c->hidden;
        const int64_t nr = r1 - r0;
        if (!c->accumulate)
            for (int64_t t = 0; t < c->T; t++) memset(c->y + t * c->ldy + r0, 0, (size_t)nr * sizeof(float));
        for (int s = 0; s < c->nslots; s++) {
            const int e = c->slot_exp[s];
            for (int p0 = c->slot_off[s]; p0 < c->slot_off[s + 1]; p0 += MAXNT) {
                int nt = c->slot_off[s + 1] - p0 < MAXNT ? c->slot_off[s + 1] - p0 : MAXNT;
                const int grp = c->grp0[s] + (p0 - c->slot_off[s]) / MAXNT;
                if (c->tb_d[grp + 1] > c->tb_d[grp]) {
                    c->kd.fng(&c->kd, c->down[e] + r0 * c->rs_d, c->rs_d, nr, c->nb_i, c->xg_d + c->tb_d[grp] * c->xgb_d,
                              c->xgb_d, nt, tmp, (ptrdiff_t)c->chunk2);
                } else {
                    for (int k = 0; k < nt; k++) ag[k] = act_view(c->ha + (size_t)(p0 + k) * c->hab, c->inter);
                    const uint8_t *nx = s + 1 < c->nslots ? c->down[c->slot_exp[s + 1]] + r0 * c->rs_d : NULL;
                    run_rows(&c->kd, c->down[e], c->rs_d, c->nb_i, r0, r1, ag, nt, tmp, (ptrdiff_t)c->chunk2, nx);
                }
                for (int k = 0; k < nt; k++) {
                    float *yr = c->y + c->pair_tok[p0 + k] * c->ldy + r0;
                    const float wgt = c->pair_w[p0 + k];
                    const float *src = tmp + (size_t)k * c->chunk2;
                    for (int64_t r = 0; r < nr; r++) yr[r] += wgt * src[r];
                }
            }
        }
    }
}

/*
 * Routed experts of a MoE layer for T tokens:
 *   y[t] (+)= sum_k wts[t, k] * down_e( silu(gate_e x[t]) * up_e x[t] ),  e = idx[t, k]  (idx < 0: skipped)
 * gate/up/down are per-expert pointers to [inter, hidden] / [inter, hidden] / [hidden, inter] quantized rows.
 */
int k2k_moe(int64_t T, int64_t hidden, int64_t inter, const float *x, int64_t ldx, int nexp, const void *const *gate,
            const void *const *up, const void *const *down, int tg, int tu, int td, int K, const int32_t *idx,
            const float *wts, float *y, int64_t ldy, int accumulate) {
    const tinfo_t *ig = tinfo(tg), *iu = tinfo(tu), *id = tinfo(td);
    if (!ig || !iu || !id || !grids_ready(tg) || !grids_ready(tu) || !grids_ready(td)) return -1;
    if (hidden <= 0 || inter <= 0 || hidden % ig->blk || hidden % iu->blk || inter % id->blk || T < 0 || K < 0) return -2;
    const int r16 = IS_R16(tg) || IS_R16(tu) || IS_R16(td); /* row chunks then go by whole 16-row groups */
    if (((IS_R16(tg) || IS_R16(tu)) && inter % R16_ROWS) || (IS_R16(td) && hidden % R16_ROWS)) return -2;
    if (T == 0) return 0;
    for (int64_t i = 0; i < T * K; i++)
        if (idx[i] >= nexp) return -2;
    call_lock();
    ensure_init();
    int rc = 0;
    moe_ctx c;
    memset(&c, 0, sizeof c);
    c.T = T;
    c.hidden = hidden;
    c.inter = inter;
    c.ldx = ldx;
    c.ldy = ldy;
    c.x = x;
    c.y = y;
    c.accumulate = accumulate;
    c.kg = get_kernel(tg);
    c.ku = get_kernel(tu);
    c.kd = get_kernel(td);
    c.nb_h = (int)(hidden / ig->blk);
    c.nb_u = (int)(hidden / iu->blk);
    c.nb_i = (int)(inter / id->blk);
    c.rs_g = k2k_row_bytes(tg, hidden);
    c.rs_u = k2k_row_bytes(tu, hidden);
    c.rs_d = k2k_row_bytes(td, inter);
    c.gate = (const uint8_t *const *)gate;
    c.up = (const uint8_t *const *)up;
    c.down = (const uint8_t *const *)down;
    /* group (token, expert) pairs by expert, in order of first use */
    int64_t np = 0;
    for (int64_t i = 0; i < T * K; i++) np += idx[i] >= 0;
    const int nth = pool_threads();
    c.xab = al64(act_bytes(hidden));
    /* one token's row given K times as a stride-0 view (a decode step: one output row per routed expert) is
     * quantized once */
    c.Tq = ldx == 0 ? 1 : T;
    c.xas = ldx == 0 ? 0 : c.xab;
    c.hab = al64(act_bytes(inter));
    c.nspans = (int)((inter + SPAN - 1) / SPAN);
    c.chunk1 = pick_chunk((np ? np : 1) * inter, nth, r16 ? R16_ROWS : 8, 128);
    if (c.chunk1 > inter) c.chunk1 = inter;
    c.nch1 = (inter + c.chunk1 - 1) / c.chunk1;
    c.chunk2 = pick_chunk(hidden, nth, r16 ? R16_ROWS : 8, CHUNK2_MAX);
    c.tmp_per_thread = al64((size_t)2 * MAXNT * (size_t)(c.chunk1 > c.chunk2 ? c.chunk1 : c.chunk2) * sizeof(float)) / sizeof(float);
    const int diff_layout = c.ku.layout != c.kg.layout;
    size_t off = 0;
    const size_t o_slot_exp = off; off += al64(sizeof(int) * (size_t)(np + 1));
    const size_t o_slot_off = off; off += al64(sizeof(int) * (size_t)(np + 2));
    const size_t o_pair_tok = off; off += al64(sizeof(int) * (size_t)(np + 1));
    const size_t o_pair_w = off; off += al64(sizeof(float) * (size_t)(np + 1));
    const size_t o_first = off; off += al64(sizeof(int) * (size_t)nexp);
    const size_t o_xa = off; off += c.xab * (size_t)c.Tq * (diff_layout ? 2 : 1);
    const size_t o_h = off; off += al64(sizeof(float) * (size_t)(np * inter));
    const size_t o_ha = off; off += c.hab * (size_t)np;
    const size_t o_span = off; off += al64(sizeof(int) * (size_t)(np * c.nspans + 1));
    const size_t o_tmp = off; off += sizeof(float) * c.tmp_per_thread * (size_t)nth;
    /* many-token GEMM: group and tile tables, packed tiles (bounded by the pairs: a group has >= gmin of them) */
    const int64_t ngmax = np + np / MAXNT + 2;
    const size_t o_grp0 = off; off += al64(sizeof(int) * (size_t)(np + 2));
    const size_t o_tb = off; off += al64(3 * sizeof(int64_t) * (size_t)ngmax);
    const int share_u = c.ku.fng == c.kg.fng && c.ku.fnp == c.kg.fnp && !diff_layout && c.ku.xbytes == c.kg.xbytes &&
                        c.nb_u == c.nb_h;
    c.share_u = share_u;
    const kern_t *kk[3] = {&c.kg, &c.ku, &c.kd};
    size_t xgb[3], o_xg[3];
    for (int i = 0; i < 3; i++) {
        const kern_t *k = kk[i];
        xgb[i] = k->fng ? al64((size_t)k->xbytes * (size_t)(i == 2 ? c.nb_i : i ? c.nb_u : c.nb_h)) : 0;
        const int64_t tiles = k->fng ? np / k->gtok + np / k->gmin + 1 : 0;
        o_xg[i] = off;
        if (!(i == 1 && share_u)) off += xgb[i] * (size_t)tiles;
    }
    if (share_u) o_xg[1] = o_xg[0];
    uint8_t *base = (uint8_t *)scratch(off);
    if (!base) {
        call_unlock();
        return -3;
    }
    int *slot_exp = (int *)(base + o_slot_exp), *slot_off = (int *)(base + o_slot_off);
    int *pair_tok = (int *)(base + o_pair_tok), *first = (int *)(base + o_first);
    float *pair_w = (float *)(base + o_pair_w);
    /* counting sort of pairs by slot (slot order = first appearance) */
    for (int e = 0; e < nexp; e++) first[e] = -1;
    int ns = 0;
    for (int64_t i = 0; i < T * K; i++) {
        int e = idx[i];
        if (e < 0) continue;
        if (first[e] < 0) {
            first[e] = ns;
            slot_exp[ns] = e;
            slot_off[ns] = 0;
            ns++;
        }
        slot_off[first[e]]++;
    }
    int acc = 0;
    for (int s = 0; s < ns; s++) {
        int cnt = slot_off[s];
        slot_off[s] = acc;
        acc += cnt;
    }
    slot_off[ns] = acc;
    {
        int *fill = (int *)(base + o_span); /* temporary cursor, reset below */
        for (int s = 0; s < ns; s++) fill[s] = slot_off[s];
        for (int64_t i = 0; i < T * K; i++) {
            int e = idx[i];
            if (e < 0) continue;
            int p = fill[first[e]]++;
            pair_tok[p] = (int)(i / K);
            pair_w[p] = wts[i];
        }
    }
    c.nslots = ns;
    {
        c.grp0 = (int *)(base + o_grp0);
        int ng = 0;
        for (int si = 0; si < ns; si++) {
            c.grp0[si] = ng;
            ng += (slot_off[si + 1] - slot_off[si] + MAXNT - 1) / MAXNT;
        }
        c.grp0[ns] = ng;
        c.ngroups = ng;
        int64_t *tb[3];
        for (int i = 0; i < 3; i++) {
            tb[i] = (int64_t *)(base + o_tb) + (size_t)i * ngmax;
            const kern_t *k = kk[i];
            int64_t n = 0;
            for (int si = 0; si < ns; si++)
                for (int p0 = slot_off[si]; p0 < slot_off[si + 1]; p0 += MAXNT) {
                    const int nt = slot_off[si + 1] - p0 < MAXNT ? slot_off[si + 1] - p0 : MAXNT;
                    tb[i][c.grp0[si] + (p0 - slot_off[si]) / MAXNT] = n;
                    if (k->fng && nt >= k->gmin) n += (nt + k->gtok - 1) / k->gtok;
                }
            tb[i][ng] = n;
            if (i < 2) c.any_gemm1 |= n > 0;
            else c.any_gemm2 = n > 0;
        }
        c.tb_g = tb[0], c.tb_u = tb[1], c.tb_d = tb[2];
        c.xg_g = base + o_xg[0], c.xg_u = base + o_xg[1], c.xg_d = base + o_xg[2];
        c.xgb_g = xgb[0], c.xgb_u = xgb[1], c.xgb_d = xgb[2];
    }
    c.slot_exp = slot_exp;
    c.slot_off = slot_off;
    c.pair_tok = pair_tok;
    c.pair_w = pair_w;
    c.xa_g = base + o_xa;
    c.xa_u = diff_layout ? base + o_xa + c.xab * (size_t)c.Tq : c.xa_g;
    c.h = (float *)(base + o_h);
    c.ha = base + o_ha;
    c.span_done = (_Atomic int *)(base + o_span);
    for (int64_t i = 0; i < np * c.nspans; i++) atomic_store(&c.span_done[i], 0);
    c.tmp = (float *)(base + o_tmp);
    c.prequant = nth <= 1 || c.Tq * hidden <= PREQUANT_MAX;
    if (c.prequant)
        for (int64_t t = 0; t < c.Tq; t++) {
            quantize_act(x + t * ldx, hidden, c.kg.layout, c.xa_g + t * c.xas);
            if (diff_layout) quantize_act(x + t * ldx, hidden, c.ku.layout, c.xa_u + t * c.xas);
        }
    atomic_store(&c.next1, 0);
    atomic_store(&c.next2, 0);
    if (ns == 0) {
        if (!accumulate)
            for (int64_t t = 0; t < T; t++) memset(y + t * ldy, 0, (size_t)hidden * sizeof(float));
    } else {
        pool_run(moe_task, &c);
    }
    call_unlock();
    return rc;
}

