/* Many-token kernels (prefill): the Q8_0 int8 GEMMs with the tokens in the vector lanes (AVX-512 VNNI: 16 lanes,
 * AVX-VNNI: 8) and the decode-once panel GEMM of Q4_K, Q6_K, IQ4_XS and the codebook types (AVX-512), with their
 * activation packing; isa.c attaches them to a type's kernel table entry (kern_t.fng / fnp). */
#include "common.h"
#if K2K_X86
#include "avx2.h"
#include "avx2_iq.h"
#include "avx512.h"
#include "kernels.h"

/* Q8_0 against many tokens (prefill): an int8 GEMM with VNNI.  The vector lanes are tokens: each dpbusd takes four
 * weight bytes broadcast from the row and four activation bytes of 16 lanes, so a 32-value block is 8 dpbusd per row
 * with no horizontal sums.  One core, 64 tokens: 160-194 GMAC/s against 80-86 for the per-row kernel, close to one
 * dpbusd per cycle at 60 useful multiply-adds each (a 15-token tile wastes lanes at 16-30 tokens).  Activations are
 * packed once per call (q8_0_512_pack): per block, 8 vectors whose lane t holds bytes 4k .. 4k+3 of token t + 128
 * (dpbusd wants them unsigned), lane 15 holding 1s so that it sums the weight block itself (the +128's correction),
 * then the 16 tokens' block scales (0 in lanes without a token). */
/* the packing for L lanes (16: AVX-512, 8: AVX-VNNI): per block, 8 vectors of L dwords, then L float scales */
static void q8_0_pack_lanes(const act_t *a, int nt, int nb, uint8_t *X, const int L) {
    const size_t xb = (size_t)(8 * 4 * L + 4 * L);
    for (int b = 0; b < nb; b++) {
        uint32_t *v = (uint32_t *)(X + xb * b);
        float *dx = (float *)(X + xb * b + 32 * L);
        for (int k = 0; k < 8; k++)
            for (int t = 0; t < L; t++) {
                uint32_t q = 0;
                if (t < nt) memcpy(&q, a[t].q + 32 * b + 4 * k, 4), q ^= 0x80808080u;
                v[L * k + t] = t == L - 1 ? 0x01010101u : q;
            }
        for (int t = 0; t < L; t++) dx[t] = t < nt ? a[t].d[b] : 0.f;
    }
}
#ifndef Q8G_ROWS
#define Q8G_ROWS 6 /* rows per step (4: 10-15% slower, 8: no faster) */
#endif
static void q8_0_512_pack(const act_t *a, int nt, int nb, uint8_t *X) { q8_0_pack_lanes(a, nt, nb, X, 16); }
static void q8_0_vnni_pack(const act_t *a, int nt, int nb, uint8_t *X) { q8_0_pack_lanes(a, nt, nb, X, 8); }
T512 static void q8_0_512_gemm(const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const uint8_t *X, int nt,
                               float *out, ptrdiff_t os) {
    const __m512i lane15 = _mm512_set1_epi32(15);
    for (int64_t r = 0; r < nrows; r += Q8G_ROWS) {
        const int nr = nrows - r < Q8G_ROWS ? (int)(nrows - r) : Q8G_ROWS;
        __m512 acc[Q8G_ROWS];
        for (int j = 0; j < Q8G_ROWS; j++) acc[j] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const uint8_t *xb = X + (size_t)Q8G_XBYTES * b;
            __m512i xv[8];
            for (int k = 0; k < 8; k++) xv[k] = _mm512_load_si512((const void *)(xb + 64 * k));
            const __m512 dx = _mm512_load_ps((const float *)(xb + 512));
            for (int j = 0; j < Q8G_ROWS; j++) {
                if (j >= nr) break;
                const uint8_t *blk = w + (r + j) * rs + 34 * b;
                /* two chains of four (a dpbusd waits ~5 cycles for the one before it) */
                __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xv[0], _mm512_set1_epi32((int)rd32(blk + 2)));
                __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xv[1], _mm512_set1_epi32((int)rd32(blk + 6)));
                for (int k = 2; k < 8; k += 2) {
                    s0 = _mm512_dpbusd_epi32(s0, xv[k], _mm512_set1_epi32((int)rd32(blk + 2 + 4 * k)));
                    s1 = _mm512_dpbusd_epi32(s1, xv[k + 1], _mm512_set1_epi32((int)rd32(blk + 6 + 4 * k)));
                }
                __m512i s = _mm512_add_epi32(s0, s1);
                /* lane 15 = the block's weight sum: take 128 x it back from every lane */
                s = _mm512_sub_epi32(s, _mm512_slli_epi32(_mm512_permutexvar_epi32(lane15, s), 7));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dx, _mm512_set1_ps(_cvtsh_ss(rd16(blk)))), acc[j]);
            }
        }
        for (int j = 0; j < nr; j++) {
            float t[16];
            _mm512_storeu_ps(t, acc[j]);
            for (int k = 0; k < nt; k++) out[k * os + r + j] = t[k];
        }
    }
}

/* AVX-VNNI (AVX2 CPUs with vpdpbusd: Alder Lake and later Intel desktops, Zen 4 / 5): the many-token Q8_0 kernel
 * above (q8_0_512_gemm, which explains it) on 8 lanes, 7 tokens a tile.  One core (Zen 5 VM, AVX2 level), 64 tokens: ~105 GMAC/s against ~50
 * for the AVX2 per-row kernel; 1.2x at 10 tokens. */
TVNNI static void q8_0_vnni_gemm(const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const uint8_t *X, int nt,
                                 float *out, ptrdiff_t os) {
    const __m256i lane7 = _mm256_set1_epi32(7);
    for (int64_t r = 0; r < nrows; r += 6) {
        const int nr = nrows - r < 6 ? (int)(nrows - r) : 6;
        __m256 acc[6];
        for (int j = 0; j < 6; j++) acc[j] = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const uint8_t *xb = X + (size_t)Q8V_XBYTES * b;
            __m256i xv[8];
            for (int k = 0; k < 8; k++) xv[k] = _mm256_load_si256((const __m256i *)(xb + 32 * k));
            const __m256 dx = _mm256_load_ps((const float *)(xb + 256));
            for (int j = 0; j < 6; j++) {
                if (j >= nr) break;
                const uint8_t *blk = w + (r + j) * rs + 34 * b;
                __m256i s0 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), xv[0], _mm256_set1_epi32((int)rd32(blk + 2)));
                __m256i s1 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), xv[1], _mm256_set1_epi32((int)rd32(blk + 6)));
                for (int k = 2; k < 8; k += 2) {
                    s0 = _mm256_dpbusd_avx_epi32(s0, xv[k], _mm256_set1_epi32((int)rd32(blk + 2 + 4 * k)));
                    s1 = _mm256_dpbusd_avx_epi32(s1, xv[k + 1], _mm256_set1_epi32((int)rd32(blk + 6 + 4 * k)));
                }
                __m256i s = _mm256_add_epi32(s0, s1);
                s = _mm256_sub_epi32(s, _mm256_slli_epi32(_mm256_permutevar8x32_epi32(s, lane7), 7));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dx, _mm256_set1_ps(_cvtsh_ss(rd16(blk)))), acc[j]);
            }
        }
        for (int j = 0; j < nr; j++) {
            float t[8];
            _mm256_storeu_ps(t, acc[j]);
            for (int k = 0; k < nt; k++) out[k * os + r + j] = t[k];
        }
    }
}

/* The Q8_0 GEMMs over all tiles */
void q8_0_512_gemm_all(const kern_t *k, const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const uint8_t *X,
                       size_t xgb, int T, float *out, ptrdiff_t os) {
    for (int t0 = 0, i = 0; t0 < T; t0 += k->gtok, i++)
        q8_0_512_gemm(w, rs, nrows, nb, X + xgb * i, T - t0 < k->gtok ? T - t0 : k->gtok, out + t0 * os, os);
}
void q8_0_vnni_gemm_all(const kern_t *k, const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const uint8_t *X,
                        size_t xgb, int T, float *out, ptrdiff_t os) {
    for (int t0 = 0, i = 0; t0 < T; t0 += k->gtok, i++)
        q8_0_vnni_gemm(w, rs, nrows, nb, X + xgb * i, T - t0 < k->gtok ? T - t0 : k->gtok, out + t0 * os, os);
}
void q8_0_512_pack_l(const act_t *a, int nt, int nb, uint8_t *X, int layout, int blk) {
    (void)layout, (void)blk;
    q8_0_512_pack(a, nt, nb, X);
}
void q8_0_vnni_pack_l(const act_t *a, int nt, int nb, uint8_t *X, int layout, int blk) {
    (void)layout, (void)blk;
    q8_0_vnni_pack(a, nt, nb, X);
}

/* ------------------------------------------------------------------ decode-once GEMM (prefill, AVX-512) */

/* With many tokens the per-row kernels decode every weight block again for each 4-token tile.  Here PNL_ROWS rows
 * are decoded once into a panel -- unsigned bytes q in natural order, and per pg (16 or 32) values a float scale dw
 * and offset mw: value = dw * q - mw -- and each tile of 16 tokens runs over it with the tokens in the vector lanes,
 * as the Q8_0 GEMM does: four weight bytes broadcast against four activation bytes of 16 tokens per dpbusd, no
 * horizontal sums.  Types whose values are signed store q + 2^SH (IQ4_XS: + 128, Q6_K: the raw q of (q - 32), the
 * codebook types: + 64, the u bytes of iq_u64_block); the integer 2^SH * (activation sum) is taken from the dot
 * before it meets the float scales, so those sums are as exact as in the per-row kernels.  Types with a real min (Q4_K) subtract mw * dx * (activation sum) in float.
 * Packed per 32 values and 16 tokens: 8 vectors of four activation bytes a lane, the activation scales dx, the int8
 * activation sums of the two 16-value halves (int32), and those sums times dx (float). */
#define PNL_XBYTES (13 * 64)
#define PNL_ROWS 6
#define PNL_TOK 16
#ifndef PNL_MIN_T
#define PNL_MIN_T 8 /* tokens from which the decode-once GEMM is used */
#endif

static void pnl_pack(const act_t *a, int nt, int nb, uint8_t *X, int layout, int blk) {
    const int n32 = nb * blk / 32, q80 = layout == LAYOUT_Q8_0;
    int inv[16];
    for (int p = 0; p < 16; p++) inv[layout_src[q80 ? 0 : layout][p]] = p;
    for (int j = 0; j < n32; j++) {
        uint8_t *xb = X + (size_t)PNL_XBYTES * j;
        uint32_t *v = (uint32_t *)xb;
        float *dx = (float *)(xb + 512), *fa = (float *)(xb + 704), *fb = (float *)(xb + 768);
        int32_t *sa = (int32_t *)(xb + 576), *sb = (int32_t *)(xb + 640);
        for (int t = 0; t < PNL_TOK; t++) {
            if (t >= nt) {
                for (int k = 0; k < 8; k++) v[PNL_TOK * k + t] = 0;
                dx[t] = fa[t] = fb[t] = 0.f;
                sa[t] = sb[t] = 0;
                continue;
            }
            const int8_t *q0, *q1;
            float d;
            int s0, s1;
            if (q80) { /* 32-blocks: one sum per block */
                q0 = a[t].q + 32 * j, q1 = q0 + 16, d = a[t].d[j], s0 = a[t].bs16[j], s1 = 0;
            } else {
                const int B = j / 8, c = 2 * (j % 8);
                q0 = a[t].q + 256 * B + 16 * inv[c], q1 = a[t].q + 256 * B + 16 * inv[c + 1], d = a[t].d[B];
                s0 = a[t].bs16[16 * B + c], s1 = a[t].bs16[16 * B + c + 1];
            }
            for (int k = 0; k < 4; k++) memcpy(&v[PNL_TOK * k + t], q0 + 4 * k, 4), memcpy(&v[PNL_TOK * (k + 4) + t], q1 + 4 * k, 4);
            dx[t] = d, sa[t] = s0, sb[t] = s1, fa[t] = d * (float)s0, fb[t] = d * (float)s1;
        }
    }
}

static void pnl_gemm(const kern_t *k, const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const uint8_t *X,
                     size_t xgb, int T, float *out, ptrdiff_t os) {
    const int cols = nb * k->blk, n32 = cols / 32;
    const size_t pstride = ((size_t)cols + 8 * (size_t)(cols / k->pg) + 63) & ~(size_t)63;
    uint8_t *const pnl = thread_rows_buf(PNL_ROWS * pstride);
    for (int64_t r = 0; r < nrows; r += PNL_ROWS) {
        const int nr = nrows - r < PNL_ROWS ? (int)(nrows - r) : PNL_ROWS;
        for (int j = 0; j < nr; j++) {
            uint8_t *p = pnl + pstride * j;
            float *dw = (float *)(p + cols);
            k->pdec(w + (r + j) * rs, nb, p, dw, dw + cols / k->pg);
        }
        for (int t0 = 0, i = 0; t0 < T; t0 += PNL_TOK, i++)
            k->ptile(pnl, pstride, nr, n32, X + xgb * i, T - t0 < PNL_TOK ? T - t0 : PNL_TOK, out + t0 * os + r, os);
    }
}

AI T512 void pnl_tile_body(const uint8_t *pnl, size_t pstride, int nr, int n32, const uint8_t *X, int nt, float *out,
                           ptrdiff_t os, const int G, const int SH, const int MIN) {
    const int cols = 32 * n32, ng = cols / G;
    __m512 acc[PNL_ROWS];
    for (int j = 0; j < PNL_ROWS; j++) acc[j] = _mm512_setzero_ps();
    for (int b = 0; b < n32; b++) {
        const uint8_t *xb = X + (size_t)PNL_XBYTES * b;
        __m512i xv[8];
        for (int k = 0; k < 8; k++) xv[k] = _mm512_load_si512((const void *)(xb + 64 * k));
        const __m512 dx = _mm512_load_ps((const float *)(xb + 512));
        __m512i sa = _mm512_load_si512((const void *)(xb + 576)), sb = _mm512_load_si512((const void *)(xb + 640));
        __m512 fa = _mm512_load_ps((const float *)(xb + 704)), fb = _mm512_load_ps((const float *)(xb + 768));
        if (G == 32) sa = _mm512_add_epi32(sa, sb), fa = _mm512_add_ps(fa, fb);
        if (SH) sa = _mm512_slli_epi32(sa, SH), sb = _mm512_slli_epi32(sb, SH);
        for (int j = 0; j < PNL_ROWS; j++) {
            if (j >= nr) break;
            const uint8_t *q = pnl + pstride * j + 32 * b;
            const float *dw = (const float *)(pnl + pstride * j + cols), *mw = dw + ng;
            /* two chains (a dpbusd waits ~5 cycles for the one before it); G = 16: one per half */
            __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi32((int)rd32(q)), xv[0]);
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi32((int)rd32(q + 16)), xv[4]);
            for (int k = 1; k < 4; k++) {
                s0 = _mm512_dpbusd_epi32(s0, _mm512_set1_epi32((int)rd32(q + 4 * k)), xv[k]);
                s1 = _mm512_dpbusd_epi32(s1, _mm512_set1_epi32((int)rd32(q + 16 + 4 * k)), xv[k + 4]);
            }
            if (G == 32) {
                __m512i s = _mm512_add_epi32(s0, s1);
                if (SH) s = _mm512_sub_epi32(s, sa);
                acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), dx), _mm512_set1_ps(dw[b]), acc[j]);
                if (MIN) acc[j] = _mm512_fnmadd_ps(_mm512_set1_ps(mw[b]), fa, acc[j]);
            } else {
                if (SH) s0 = _mm512_sub_epi32(s0, sa), s1 = _mm512_sub_epi32(s1, sb);
                acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s0), dx), _mm512_set1_ps(dw[2 * b]), acc[j]);
                acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s1), dx), _mm512_set1_ps(dw[2 * b + 1]), acc[j]);
                if (MIN) {
                    acc[j] = _mm512_fnmadd_ps(_mm512_set1_ps(mw[2 * b]), fa, acc[j]);
                    acc[j] = _mm512_fnmadd_ps(_mm512_set1_ps(mw[2 * b + 1]), fb, acc[j]);
                }
            }
        }
    }
    for (int j = 0; j < nr; j++) {
        float t[16];
        _mm512_storeu_ps(t, acc[j]);
        for (int k = 0; k < nt; k++) out[k * os + j] = t[k];
    }
}
#define PNL_TILE(name, G, SH, MIN)                                                                                      \
    T512 static void name(const uint8_t *pnl, size_t pstride, int nr, int n32, const uint8_t *X, int nt, float *out,  \
                          ptrdiff_t os) {                                                                               \
        pnl_tile_body(pnl, pstride, nr, n32, X, nt, out, os, G, SH, MIN);                                             \
    }
PNL_TILE(pnl_tile_32_s7, 32, 7, 0) /* IQ4_XS, IQ4_NL: value + 128 */
PNL_TILE(pnl_tile_32_min, 32, 0, 1) /* Q4_K, Q5_K */
PNL_TILE(pnl_tile_16_s5, 16, 5, 0) /* Q6_K: q - 32 */
PNL_TILE(pnl_tile_16_s6, 16, 6, 0) /* codebook types: u - 64 */

/* IQ4_XS: codebook value + 128; the nibbles of 16 bytes are values 0..15 (lo) and 16..31 (hi) of a sub-block */
T512 static void pdec_iq4xs(const uint8_t *w, int nb, uint8_t *q, float *dw, float *mw) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)g_kvu));
    const __m512i ia = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), ib = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + 136 * i;
        for (int h = 0; h < 2; h++) {
            const __m512i x = _mm512_loadu_si512((const void *)(b + 8 + 64 * h));
            const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(x, m4));
            const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(x, 4), m4));
            _mm512_storeu_si512((void *)(q + 256 * i + 128 * h), _mm512_permutex2var_epi64(lo, ia, hi));
            _mm512_storeu_si512((void *)(q + 256 * i + 128 * h + 64), _mm512_permutex2var_epi64(lo, ib, hi));
        }
        const float d = fp16_to_f32(rd16(b));
        const uint32_t sh = rd16(b + 2);
        for (int j = 0; j < 8; j++) {
            const int ls = ((b[4 + j / 2] >> 4 * (j % 2)) & 0xF) | (((sh >> 2 * j) & 3) << 4);
            dw[8 * i + j] = d * (float)(ls - 32), mw[8 * i + j] = 0.f;
        }
    }
}

/* Q4_K: 32 bytes of nibbles are sub-blocks 2c (lo) and 2c + 1 (hi); value = d * sc * q - dmin * m */
T512 static void pdec_q4k(const uint8_t *w, int nb, uint8_t *q, float *dw, float *mw) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + 144 * i;
        for (int h = 0; h < 2; h++) {
            const __m512i x = _mm512_loadu_si512((const void *)(b + 16 + 64 * h));
            const __m512i lo = _mm512_and_si512(x, m4), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
            _mm512_storeu_si512((void *)(q + 256 * i + 128 * h), _mm512_shuffle_i64x2(lo, hi, 0x44));
            _mm512_storeu_si512((void *)(q + 256 * i + 128 * h + 64), _mm512_shuffle_i64x2(lo, hi, 0xEE));
        }
        uint32_t u[4];
        unpack_k4(b + 4, u);
        const uint8_t *sm = (const uint8_t *)u; /* 8 scales, 8 mins */
        const float d = fp16_to_f32(rd16(b)), dm = fp16_to_f32(rd16(b + 2));
        for (int j = 0; j < 8; j++) dw[8 * i + j] = d * (float)sm[j], mw[8 * i + j] = dm * (float)sm[8 + j];
    }
}

/* Q6_K: per 128 values 64 bytes of low nibbles and 32 of 2-bit highs; q is the raw 6-bit (value + 32) */
T512 static void pdec_q6k(const uint8_t *w, int nb, uint8_t *q, float *dw, float *mw) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m3 = _mm512_set1_epi8(3);
    const __m512i sh01 = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2), sh23 = _mm512_setr_epi64(4, 4, 4, 4, 6, 6, 6, 6);
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + 210 * i;
        for (int h = 0; h < 2; h++) {
            const __m512i L = _mm512_loadu_si512((const void *)(b + 64 * h));
            const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h)));
            const __m512i v01 = _mm512_or_si512(_mm512_and_si512(L, m4),
                                                _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(H, sh01), m3), 4));
            const __m512i v23 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m4),
                                                _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(H, sh23), m3), 4));
            _mm512_storeu_si512((void *)(q + 256 * i + 128 * h), v01);
            _mm512_storeu_si512((void *)(q + 256 * i + 128 * h + 64), v23);
        }
        const float d = fp16_to_f32(rd16(b + 208));
        for (int j = 0; j < 16; j++) dw[16 * i + j] = d * (float)(int8_t)b[192 + j], mw[16 * i + j] = 0.f;
    }
}

/* The codebook types: the u bytes of iq_u64_block, per 16 values d * factor * scale */
AI T256 void pdec_iq_body(const uint8_t *w, int nb, uint8_t *q, float *dw, float *mw, const int TY) {
    const int bpb = iq_bpb(TY);
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + (size_t)bpb * i;
        iq_u64_block(b, TY, q + 256 * i);
        const __m256i sc = iq_scales(b, TY);
        const __m256 d = _mm256_set1_ps(iq_d(b, TY) * iq_fac(TY));
        _mm256_storeu_ps(dw + 16 * i, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(sc)))));
        _mm256_storeu_ps(dw + 16 * i + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(sc, 1)))));
        _mm256_storeu_ps(mw + 16 * i, _mm256_setzero_ps());
        _mm256_storeu_ps(mw + 16 * i + 8, _mm256_setzero_ps());
    }
}
#define IQ_PDEC(name, TY)                                                                                            \
    T256 static void name(const uint8_t *w, int nb, uint8_t *q, float *dw, float *mw) { pdec_iq_body(w, nb, q, dw, mw, TY); }
IQ_PDEC(pdec_iq2xxs, IQD_2XXS)
IQ_PDEC(pdec_iq2xs, IQD_2XS)
IQ_PDEC(pdec_iq2s, IQD_2S)
IQ_PDEC(pdec_iq3xxs, IQD_3XXS)
IQ_PDEC(pdec_iq3s, IQD_3S)
IQ_PDEC(pdec_iq1s, IQD_1S)
IQ_PDEC(pdec_iq1m, IQD_1M)

/* the decode-once GEMM for this type at this ISA level, if it has one */
void pnl_attach(kern_t *k, int type, int isa) {
    if (isa < ISA_AVX512 || k->fng) return;
    switch (type) {
    case GT_IQ4_XS: k->pdec = pdec_iq4xs, k->ptile = pnl_tile_32_s7, k->pg = 32; break;
    case GT_Q4_K: k->pdec = pdec_q4k, k->ptile = pnl_tile_32_min, k->pg = 32; break;
    case GT_Q6_K: k->pdec = pdec_q6k, k->ptile = pnl_tile_16_s5, k->pg = 16; break;
    case GT_IQ2_XXS: k->pdec = pdec_iq2xxs, k->ptile = pnl_tile_16_s6, k->pg = 16; break;
    case GT_IQ2_XS: k->pdec = pdec_iq2xs, k->ptile = pnl_tile_16_s6, k->pg = 16; break;
    case GT_IQ2_S: k->pdec = pdec_iq2s, k->ptile = pnl_tile_16_s6, k->pg = 16; break;
    case GT_IQ3_XXS: k->pdec = pdec_iq3xxs, k->ptile = pnl_tile_16_s6, k->pg = 16; break;
    case GT_IQ3_S: k->pdec = pdec_iq3s, k->ptile = pnl_tile_16_s6, k->pg = 16; break;
    case GT_IQ1_S: k->pdec = pdec_iq1s, k->ptile = pnl_tile_16_s6, k->pg = 16; break;
    case GT_IQ1_M: k->pdec = pdec_iq1m, k->ptile = pnl_tile_16_s6, k->pg = 16; break;
    default: return;
    }
    k->fng = pnl_gemm, k->fnp = pnl_pack, k->gtok = PNL_TOK, k->xbytes = PNL_XBYTES * k->blk / 32, k->gmin = PNL_MIN_T;
}
#endif /* K2K_X86 */
