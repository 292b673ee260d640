/* y = x W^T on quantized rows (and per-head products for MLA's absorbed k_b / v_b): quantize the activations, pack
 * them for a many-token kernel where one applies, then row chunks handed out to the pool. */
#include "common.h"
#include "k2kern.h"
#include "run.h"

typedef struct {
    kern_t k;
    const uint8_t *w;
    int64_t rows, cols, row_stride, T, ldx, ldy, chunk;
    int64_t heads, w_hs, x_hs, y_hs; /* independent matrices (attention heads): bytes / floats between heads */
    int nb;
    const float *x;
    float *y;
    uint8_t *abuf;   /* heads x T activation buffers */
    size_t abytes;
    int prequant; /* activations already quantized by the caller: no barrier needed */
    uint8_t *xg;  /* many-token kernel (k.fng): heads x ntiles packed activation tiles of xgb bytes, else NULL */
    size_t xgb;
    int64_t ntiles;
    _Atomic int64_t next;
} mm_ctx;

static void mm_quantize(mm_ctx *c, int64_t i) { /* activation row i = head * T + token */
    quantize_act(c->x + (i / c->T) * c->x_hs + (i % c->T) * c->ldx, c->cols, c->k.layout, c->abuf + i * c->abytes);
}

static void mm_task(void *vctx, int tid, int nth) {
    mm_ctx *c = (mm_ctx *)vctx;
    int sense = 0;
    if (!c->prequant) {
        for (int64_t i = tid; i < c->heads * c->T; i += nth) mm_quantize(c, i);
        pool_barrier(nth, &sense);
    }
    act_t acts[MAXNT];
    if (c->xg) { /* pack each (head, tile of gtok tokens) for the many-token kernel */
        for (int64_t u = tid; u < c->heads * c->ntiles; u += nth) {
            const int64_t h = u / c->ntiles, t0 = (u % c->ntiles) * c->k.gtok, n = c->T - t0 < c->k.gtok ? c->T - t0 : c->k.gtok;
            for (int64_t t = 0; t < n; t++) acts[t] = act_view(c->abuf + (h * c->T + t0 + t) * c->abytes, c->cols);
            c->k.fnp(acts, (int)n, c->nb, c->xg + u * c->xgb, c->k.layout, c->k.blk);
        }
        pool_barrier(nth, &sense);
    }
    int64_t hcur = -1;
    const int64_t nch = (c->rows + c->chunk - 1) / c->chunk, nchunks = nch * c->heads;
    for (;;) {
        int64_t ci = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (ci >= nchunks) break;
        const int64_t h = ci / nch, r0 = (ci % nch) * c->chunk, r1 = r0 + c->chunk < c->rows ? r0 + c->chunk : c->rows;
        if (c->xg) {
            c->k.fng(&c->k, c->w + h * c->w_hs + r0 * c->row_stride, (ptrdiff_t)c->row_stride, r1 - r0, c->nb,
                     c->xg + h * c->ntiles * c->xgb, c->xgb, (int)c->T, c->y + h * c->y_hs + r0, (ptrdiff_t)c->ldy);
            continue;
        }
        if (h != hcur) {
            for (int64_t t = 0; t < c->T; t++) acts[t] = act_view(c->abuf + (h * c->T + t) * c->abytes, c->cols);
            hcur = h;
        }
        const uint8_t *w = c->w + h * c->w_hs;
        /* keep prefetching into the following rows (read by this or a neighbouring thread), not past the matrix */
        const uint8_t *nx = r1 < c->rows ? w + r1 * c->row_stride : (h + 1 < c->heads ? w + c->w_hs : NULL);
        run_rows(&c->k, w, c->row_stride, c->nb, r0, r1, acts, (int)c->T, c->y + h * c->y_hs + r0, (ptrdiff_t)c->ldy, nx);
    }
}

/* y[t, r] = sum_c x[t, c] * W[r, c] for t < T; W rows are ggml blocks, row_stride bytes apart. */
/* heads independent products y[h, t, r] = sum_c x[h, t, c] * W_h[r, c]; W_h = w + h * w_hs bytes, x/y heads
 * x_hs / y_hs floats apart, tokens ldx / ldy apart */
static int matmul_heads(int type, const uint8_t *w, int64_t heads, int64_t w_hs, int64_t rows, int64_t cols,
                        int64_t row_stride, const float *x, int64_t x_hs, int64_t T, int64_t ldx, float *y, int64_t y_hs,
                        int64_t ldy) {
    const tinfo_t *ti = tinfo(type);
    if (!ti || !grids_ready(type)) return -1;
    if (cols <= 0 || cols % ti->blk || rows < 0 || T < 0 || heads < 0 || row_stride < k2k_row_bytes(type, cols)) return -2;
    if (IS_R16(type) && (rows % R16_ROWS || row_stride != k2k_row_bytes(type, cols))) return -2;
    if (rows == 0 || T == 0 || heads == 0) return 0;
    call_lock();
    ensure_init();
    int rc = 0;
    for (int64_t t0 = 0; t0 < T; t0 += MAXNT) {
        mm_ctx c;
        memset(&c, 0, sizeof c);
        c.k = get_kernel(type);
        c.w = w;
        c.rows = rows;
        c.cols = cols;
        c.row_stride = row_stride;
        c.heads = heads;
        c.w_hs = w_hs;
        c.x_hs = x_hs;
        c.y_hs = y_hs;
        c.T = T - t0 < MAXNT ? T - t0 : MAXNT;
        c.ldx = ldx;
        c.ldy = ldy;
        c.nb = (int)(cols / ti->blk);
        c.x = x + t0 * ldx;
        c.y = y + t0 * ldy;
        c.abytes = al64(act_bytes(cols));
        const int gemm = c.k.fng && c.T >= c.k.gmin;
        c.ntiles = gemm ? (c.T + c.k.gtok - 1) / c.k.gtok : 0;
        c.xgb = gemm ? al64((size_t)c.k.xbytes * (size_t)c.nb) : 0;
        const size_t abytes_all = al64(c.abytes * (size_t)(c.T * heads));
        c.abuf = (uint8_t *)scratch(abytes_all + c.xgb * (size_t)(c.ntiles * heads));
        if (!c.abuf) {
            rc = -3;
            break;
        }
        c.xg = gemm ? c.abuf + abytes_all : NULL;
        c.chunk = pick_chunk(rows * heads, pool_threads(), 16, 128);
        c.prequant = pool_threads() <= 1 || heads * c.T * cols <= PREQUANT_MAX;
        if (c.prequant)
            for (int64_t i = 0; i < heads * c.T; i++) mm_quantize(&c, i);
        atomic_store(&c.next, 0);
        pool_run(mm_task, &c);
    }
    call_unlock();
    return rc;
}

/* y[t, r] = sum_c x[t, c] * W[r, c] for t < T; W rows are ggml blocks, row_stride bytes apart. */
int k2k_matmul(int type, const void *w, int64_t rows, int64_t cols, int64_t row_stride, const float *x, int64_t T,
               int64_t ldx, float *y, int64_t ldy) {
    return matmul_heads(type, (const uint8_t *)w, 1, 0, rows, cols, row_stride, x, 0, T, ldx, y, 0, ldy);
}

/* Per-head products (MLA's absorbed k_b / v_b): y[h, t, :] = x[h, t, :] @ W_h.T for heads stacked matrices
 * W_h [rows, cols] (w_hs bytes apart); x [heads, T, cols] and y [heads, T, rows] contiguous. */
int k2k_matmul_heads(int type, const void *w, int64_t heads, int64_t w_hs, int64_t rows, int64_t cols,
                     int64_t row_stride, const float *x, int64_t T, float *y) {
    return matmul_heads(type, (const uint8_t *)w, heads, w_hs, rows, cols, row_stride, x, T * cols, T, cols, y,
                        T * rows, rows);
}

