/* The row runner shared by the matmul (matmul.c) and MoE (moe.c) drivers: rows of one matrix against up to MAXNT
 * tokens through a type's kernel table entry, with the prefetch stream running into the next segment. */
#ifndef K2K_RUN_H
#define K2K_RUN_H
#include "common.h"

#define MAXNT 64 /* tokens per kernel call; larger batches loop */
#ifndef RUN_ROWS
#define RUN_ROWS 16 /* rows per block when tokens come in several tiles (run_rows); 8-32 about the same */
#endif
#define RUN_TILE 4 /* tokens per kernel call there: the kernels' own tile */
#define PREQUANT_MAX 65536 /* quantize activations in the calling thread up to this many values */

/* Rows [r0, r1) of w.  The prefetch stream runs g_pfd bytes ahead and, past r1, continues into
 * `next` (the segment this thread reads next, or NULL when unknown). */
static inline void run_rows(const kern_t *k, const uint8_t *w, int64_t row_stride, int nb, int64_t r0, int64_t r1,
                            const act_t *acts, int nt, float *out, ptrdiff_t os, const uint8_t *next) {
    const uint8_t *end = w + r1 * row_stride;
    const int64_t pfd = g_pfd;
    const int pairs = nt == 1 && k->fn2 && !g_no_pairs;
    if (k->fnb) { /* a row-interleaved layout: r0 and r1 are multiples of its group (matmul.c checks) */
        k->fnb(w + r0 * row_stride, r1 - r0, nb, acts, nt, out, os, next);
        return;
    }
    if (nt == 1 && k->fnr && k->fnr(w + r0 * row_stride, (ptrdiff_t)row_stride, r1 - r0, nb, acts, out)) return;
    if (nt > RUN_TILE && k->udec) { /* decode each row once, then every 4-token tile over the decoded bytes */
        uint8_t *pan = thread_rows_buf((size_t)UPAN_BPB * nb);
        for (int64_t r = r0; r < r1; r++) {
            k->udec(w + r * row_stride, nb, pan);
            k->upan(pan, nb, acts, nt, out + (r - r0), os, NULL);
        }
        return;
    }
    if (nt > RUN_TILE) {
        /* More tokens than a kernel call takes: a few rows at a time, each tile of tokens over those rows, so the
         * tile's activations stay in L1 while the rows are read again from it (row by row with all tiles read
         * every token's activations per row, from L2 once they outgrow L1).  One core, Q4_K / Q2_K [2048 x 7168] at
         * 8-64 tokens: 1.3-1.5x (Q4_K at 21 tokens 89 -> 135 GMAC/s), [7168 x 2048] 1.0-1.3x; same bits. */
        for (int64_t rb = r0; rb < r1; rb += RUN_ROWS) {
            const int64_t re = rb + RUN_ROWS < r1 ? rb + RUN_ROWS : r1;
            for (int t0 = 0; t0 < nt; t0 += RUN_TILE)
                for (int64_t r = rb; r < re; r++) {
                    const uint8_t *row = w + r * row_stride, *pf = NULL;
                    if (t0 == 0 && pfd > 0) {
                        pf = row + pfd;
                        if (pf >= end) pf = next ? next + (pf - end) : NULL;
                    }
                    k->fn(row, nb, acts + t0, nt - t0 < RUN_TILE ? nt - t0 : RUN_TILE, out + t0 * os + (r - r0), os, pf);
                }
        }
        return;
    }
    for (int64_t r = r0; r < r1;) {
        const uint8_t *row = w + r * row_stride, *pf = NULL, *pf1 = NULL;
        if (pfd > 0) {
            pf = row + pfd;
            if (pf >= end) pf = next ? next + (pf - end) : NULL;
        }
        if (pairs && r + 1 < r1) {
            if (pfd > 0) {
                pf1 = row + row_stride + pfd;
                if (pf1 >= end) pf1 = next ? next + (pf1 - end) : NULL;
            }
            k->fn2(row, (ptrdiff_t)row_stride, nb, acts, out + (r - r0), pf, pf1);
            r += 2;
        } else {
            k->fn(row, nb, acts, nt, out + (r - r0), os, pf);
            r++;
        }
    }
}

static inline int64_t pick_chunk(int64_t items_rows, int nth, int64_t lo, int64_t hi) {
    /* aim for >= 8 chunks per thread, within [lo, hi], power of two */
    int64_t c = hi;
    while (c > lo && items_rows / c < 8 * (int64_t)nth) c /= 2;
    return c;
}

#endif /* K2K_RUN_H */
