/* AVX-512 VNNI per-row kernels: the K-quants (with and without GFNI bit unpacking, one-row and row-pair), Q8_0 (and its
 * short-row kernel for MLA's k_b), Q4_0 / Q5_0 / Q5_1 and IQ4_NL (one 32-value body); IQ4_XS and the codebook types are
 * in avx512_iq.c, the many-token GEMMs in gemm.c. */
#include "common.h"
#if K2K_X86
#include "avx2.h"
#include "avx512.h"
#include "kernels.h"

/* GFNI bit gather: each byte of x through the 8x8 bit matrix A (vgf2p8affineqb), e.g. bits k, k+1 -> bits 0, 1
 * in one instruction instead of a shift and a mask.  Inline asm so that the kernels need no gfni target
 * attribute; only the *g kernels use it, and they are picked only when the CPU reports GFNI. */
AI T512 __m512i gf_affine(__m512i x, __m512i A) {
#ifndef K2K_EMULATE_AVX512
    __m512i r;
    __asm__("vgf2p8affineqb $0, %2, %1, %0" : "=v"(r) : "v"(x), "v"(A));
    return r;
#else
    return simde_mm512_gf2p8affine_epi64_epi8(x, A, 0);
#endif
}
/* matrix moving bits k .. k+n-1 of every byte to bits 0 .. n-1 (others cleared) */
static inline uint64_t gf_matrix(int k, int n) {
    uint64_t m = 0;
    for (int i = 0; i < n; i++) m |= (uint64_t)(1u << (k + i)) << (8 * (7 - i));
    return m;
}
#define GF_M(k, n) _mm512_set1_epi64((long long)gf_matrix(k, n))

/* fp16 super-block scales straight into a vector register (the scalar _cvtsh_ss path costs an insert per
 * value): two adjacent fp16 at p -> lanes 0, 1; one fp16 -> lane 0 */
AI T512 __m128 h2x2_512(const uint8_t *p) { return _mm_cvtph_ps(_mm_cvtsi32_si128((int)rd32(p))); }
AI T512 __m128 h1_512(const uint8_t *p) { return _mm_cvtph_ps(_mm_cvtsi32_si128((int)rd16(p))); }

AI T512 float hsum128_512(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Q4_K / Q5_K packed 6-bit scales -> 16 bytes (8 scales, 8 mins) as unpack_k4 writes them, in the vector unit:
 * the dwords are arranged as [u0, u2, u1, u2] and [0, u0, 0, u1] by two byte shuffles, then shifted and masked
 * (8 instructions instead of ~20 scalar ones and the inserts that move them into a register).  Reads s .. s+15
 * (the 12 scale bytes and the first 4 of what follows in the block). */
AI T512 __m128i k4_scales_512(const uint8_t *s) {
    const __m128i x = _mm_loadu_si128((const __m128i *)s);
    const __m128i a = _mm_shuffle_epi8(x, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    const __m128i lo = _mm_and_si128(_mm_srlv_epi32(a, _mm_setr_epi32(0, 0, 0, 4)),
                                     _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    const __m128i h = _mm_shuffle_epi8(x, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    return _mm_or_si128(lo, _mm_and_si128(_mm_srli_epi32(h, 2), _mm_set1_epi8(0x30)));
}
/* byte-shuffle masks that widen those scale bytes to int16 lanes (high byte zeroed) for dpwssd: applied to the 16
 * bytes broadcast to all four 128-bit lanes, mask k gives scale 2k - (k & 1) in the low 256 bits and the one two
 * further in the high 256 (the P64 layout's sub-blocks); a vpshufb each instead of a cvt and a cross-lane vpermw */
#define K2K_W8(j) j, -1, j, -1, j, -1, j, -1, j, -1, j, -1, j, -1, j, -1
#define K2K_W16(j) K2K_W8(j), K2K_W8(j)
static const int8_t wb_p45[4][64] __attribute__((aligned(64))) = {
    {K2K_W16(0), K2K_W16(2)}, {K2K_W16(1), K2K_W16(3)}, {K2K_W16(4), K2K_W16(6)}, {K2K_W16(5), K2K_W16(7)}};

/* The K-quant bodies below take NR weight rows (1 or 2; row r at w + r * rs, its result at out[t * os + r])
 * and NT tokens.  Per row the arithmetic is exactly that of NR = 1 (same integer sums, same float
 * operation order), so pairing rows never changes a result bit; a pair shares the activation loads,
 * the per-call constants and the final reductions, and gives the core two independent chains. */

/* Q4_K / Q5_K with LAYOUT_P64 activations: 64 packed bytes -> two 64-weight vectors */
AI T512 void q45k_512_rows(const uint8_t *w, ptrdiff_t rs, const int NR, int nb, const act_t *a, const int NT, float *out,
                           ptrdiff_t os, const uint8_t *pf0, const uint8_t *pf1, const int five, const int gf) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), b4 = _mm512_set1_epi8(0x10), g_hi4 = GF_M(4, 4);
    const __m512i wb0 = IXLOAD(wb_p45, 0), wb1 = IXLOAD(wb_p45, 1), wb2 = IXLOAD(wb_p45, 2), wb3 = IXLOAD(wb_p45, 3);
    const int bpb = five ? 176 : 144;
    __m512 acc[2][4];
    __m128 accm[2][4];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps(), accm[r][t] = _mm_setzero_ps();
    for (int i = 0; i < nb; i++) {
        __m512i v[2][4], sc[2][4];
        __m128i mins[2];
        __m128 dd[2]; /* [d, dmin] */
        for (int r = 0; r < NR; r++) {
            const uint8_t *b = w + r * rs + (size_t)bpb * i;
            pf_block(r ? pf1 : pf0, i, bpb);
            const uint8_t *qs = b + (five ? 48 : 16);
            const __m128i s8 = k4_scales_512(b + 4);
            const __m512i sbc = _mm512_broadcast_i32x4(s8);
            sc[r][0] = _mm512_shuffle_epi8(sbc, wb0), sc[r][1] = _mm512_shuffle_epi8(sbc, wb1);
            sc[r][2] = _mm512_shuffle_epi8(sbc, wb2), sc[r][3] = _mm512_shuffle_epi8(sbc, wb3);
            mins[r] = _mm_unpackhi_epi8(s8, _mm_setzero_si128());
            dd[r] = h2x2_512(b);
            const __m512i q0 = _mm512_loadu_si512((const void *)qs), q1 = _mm512_loadu_si512((const void *)(qs + 64));
            v[r][0] = _mm512_and_si512(q0, m4), v[r][2] = _mm512_and_si512(q1, m4);
            if (gf) {
                v[r][1] = gf_affine(q0, g_hi4), v[r][3] = gf_affine(q1, g_hi4);
            } else {
                v[r][1] = _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4), v[r][3] = _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4);
            }
            if (five) {
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
                const __m512i hq = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
                v[r][0] = _mm512_ternarylogic_epi32(v[r][0], _mm512_slli_epi16(hq, 4), b4, 0xF8); /* v | (h & b4) */
                v[r][1] = _mm512_ternarylogic_epi32(v[r][1], _mm512_slli_epi16(hq, 3), b4, 0xF8);
                v[r][2] = _mm512_ternarylogic_epi32(v[r][2], hq, b4, 0xF8);
                v[r][3] = _mm512_ternarylogic_epi32(v[r][3], _mm512_srli_epi16(hq, 1), b4, 0xF8);
            }
        }
        for (int t = 0; t < NT; t++) {
            const int8_t *aq = a[t].q + 256 * i;
            const __m512i x0 = _mm512_load_si512((const void *)aq), x1 = _mm512_load_si512((const void *)(aq + 64));
            const __m512i x2 = _mm512_load_si512((const void *)(aq + 128)), x3 = _mm512_load_si512((const void *)(aq + 192));
            const __m128i bs = _mm_loadu_si128((const __m128i *)(a[t].bs32 + 8 * i));
            const float da = a[t].d[i];
            for (int r = 0; r < NR; r++) {
                __m512i s = _mm512_madd_epi16(_mm512_maddubs_epi16(v[r][0], x0), sc[r][0]);
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(v[r][1], x1), sc[r][1]);
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(v[r][2], x2), sc[r][2]);
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(v[r][3], x3), sc[r][3]);
                const __m128 sd = _mm_mul_ps(dd[r], _mm_set1_ps(da)); /* [d * da, dmin * da] */
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_broadcastss_ps(sd), acc[r][t]);
                __m128i pm = _mm_madd_epi16(mins[r], bs);
                accm[r][t] = _mm_fmadd_ps(_mm_cvtepi32_ps(pm), _mm_shuffle_ps(sd, sd, 0x55), accm[r][t]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++) out[t * os + r] = _mm512_reduce_add_ps(acc[r][t]) - hsum128_512(accm[r][t]);
}
/* per type: one-row kernels (NT tokens) and row-pair kernels, without (name) and with GFNI (name##g) */
#define K512_KERNELS(name, body, variant)                                                                      \
    AI T512 void name##_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os,         \
                           const uint8_t *pf) {                                                                     \
        body(w, 0, 1, nb, a, NT, out, os, pf, NULL, variant, 0);                                                    \
    }                                                                                                               \
    AI T512 void name##g_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os,        \
                            const uint8_t *pf) {                                                                    \
        body(w, 0, 1, nb, a, NT, out, os, pf, NULL, variant, 1);                                                    \
    }                                                                                                               \
    NT_DISPATCH(name, T512, 4)                                                                                      \
    NT_DISPATCH(name##g, T512, 4)                                                                                   \
    T512 void name##_r2(const uint8_t *w, ptrdiff_t rs, int nb, const act_t *a, float *out, const uint8_t *pf0, \
                               const uint8_t *pf1) {                                                                \
        body(w, rs, 2, nb, a, 1, out, 0, pf0, pf1, variant, 0);                                                     \
    }                                                                                                               \
    T512 void name##g_r2(const uint8_t *w, ptrdiff_t rs, int nb, const act_t *a, float *out, const uint8_t *pf0, \
                                const uint8_t *pf1) {                                                               \
        body(w, rs, 2, nb, a, 1, out, 0, pf0, pf1, variant, 1);                                                     \
    }
K512_KERNELS(q4k_512, q45k_512_rows, 0)
K512_KERNELS(q5k_512, q45k_512_rows, 1)

/* Q2_K / Q3_K with LAYOUT_P2 activations: one 64-byte load covers both 128-halves */
AI T512 void q23k_512_rows(const uint8_t *w, ptrdiff_t rs, const int NR, int nb, const act_t *a, const int NT, float *out,
                           ptrdiff_t os, const uint8_t *pf0, const uint8_t *pf1, const int three, const int gf) {
    const __m512i m3 = _mm512_set1_epi8(3), bit2 = _mm512_set1_epi8(4);
    const __m512i g_b2 = GF_M(2, 2), g_b4 = GF_M(4, 2), g_b6 = GF_M(6, 2);
    const __m128i m4x = _mm_set1_epi8(0x0F);
    const __m512i ix0 = IXLOAD(ix_q23, 0), ix1 = IXLOAD(ix_q23, 1), ix2 = IXLOAD(ix_q23, 2), ix3 = IXLOAD(ix_q23, 3);
    const int bpb = three ? 110 : 84;
    __m512 acc[2][4];
    __m256 accm[2][4];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps(), accm[r][t] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        __m512i v[2][4], sc[2][4];
        __m256i mn16[2];
        __m128 dd[2]; /* Q2_K: [d, dmin]; Q3_K: [d] (its offset term is accumulated / 4, see below) */
        for (int r = 0; r < NR; r++) {
            const uint8_t *b = w + r * rs + (size_t)bpb * i;
            pf_block(r ? pf1 : pf0, i, bpb);
            __m256i sc16;
            if (three) {
                sc16 = _mm256_cvtepi8_epi16(q3_scales(b));
                mn16[r] = sc16;
                dd[r] = h1_512(b + 108);
                const __m512i q = _mm512_loadu_si512((const void *)(b + 32));
                const __m256i hm = _mm256_loadu_si256((const __m256i *)b);
                const __m512i hm2 = _mm512_inserti64x4(_mm512_castsi256_si512(hm), _mm256_srli_epi16(hm, 4), 1);
                /* u = low2 | (hbit << 2), hbit of plane j is bit j of hm2 */
                __m512i l1, l2, l3;
                if (gf) {
                    l1 = gf_affine(q, g_b2), l2 = gf_affine(q, g_b4), l3 = gf_affine(q, g_b6);
                } else {
                    l1 = _mm512_and_si512(_mm512_srli_epi16(q, 2), m3), l2 = _mm512_and_si512(_mm512_srli_epi16(q, 4), m3);
                    l3 = _mm512_and_si512(_mm512_srli_epi16(q, 6), m3);
                }
                v[r][0] = _mm512_ternarylogic_epi32(_mm512_and_si512(q, m3), _mm512_slli_epi16(hm2, 2), bit2, 0xF8);
                v[r][1] = _mm512_ternarylogic_epi32(l1, _mm512_slli_epi16(hm2, 1), bit2, 0xF8);
                v[r][2] = _mm512_ternarylogic_epi32(l2, hm2, bit2, 0xF8);
                v[r][3] = _mm512_ternarylogic_epi32(l3, _mm512_srli_epi16(hm2, 1), bit2, 0xF8);
            } else {
                const __m128i raw = _mm_loadu_si128((const __m128i *)b);
                sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, m4x));
                mn16[r] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4x));
                dd[r] = h2x2_512(b + 80);
                const __m512i q = _mm512_loadu_si512((const void *)(b + 16));
                v[r][0] = _mm512_and_si512(q, m3);
                if (gf) {
                    v[r][1] = gf_affine(q, g_b2), v[r][2] = gf_affine(q, g_b4), v[r][3] = gf_affine(q, g_b6);
                } else {
                    v[r][1] = _mm512_and_si512(_mm512_srli_epi16(q, 2), m3);
                    v[r][2] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m3);
                    v[r][3] = _mm512_and_si512(_mm512_srli_epi16(q, 6), m3);
                }
            }
            const __m512i scz = _mm512_castsi256_si512(sc16);
            sc[r][0] = _mm512_permutexvar_epi16(ix0, scz), sc[r][1] = _mm512_permutexvar_epi16(ix1, scz);
            sc[r][2] = _mm512_permutexvar_epi16(ix2, scz), sc[r][3] = _mm512_permutexvar_epi16(ix3, scz);
        }
        for (int t = 0; t < NT; t++) {
            const int8_t *aq = a[t].q + 256 * i;
            const __m512i x0 = _mm512_load_si512((const void *)aq), x1 = _mm512_load_si512((const void *)(aq + 64));
            const __m512i x2 = _mm512_load_si512((const void *)(aq + 128)), x3 = _mm512_load_si512((const void *)(aq + 192));
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(a[t].bs16 + 16 * i));
            const float da = a[t].d[i];
            for (int r = 0; r < NR; r++) {
                __m512i s = _mm512_madd_epi16(_mm512_maddubs_epi16(v[r][0], x0), sc[r][0]);
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(v[r][1], x1), sc[r][1]);
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(v[r][2], x2), sc[r][2]);
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(v[r][3], x3), sc[r][3]);
                const __m128 sd = _mm_mul_ps(dd[r], _mm_set1_ps(da));
                const __m512 sb = _mm512_broadcastss_ps(sd);
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sb, acc[r][t]);
                __m256i pm = _mm256_madd_epi16(mn16[r], bs);
                /* Q3_K: the -4 offset term is summed with d * da and scaled by 4 at the end (exact) */
                const __m256 sm = three ? _mm512_castps512_ps256(sb) : _mm256_broadcastss_ps(_mm_movehdup_ps(sd));
                accm[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pm), sm, accm[r][t]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++) {
            __m256 m = accm[r][t];
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            out[t * os + r] = _mm512_reduce_add_ps(acc[r][t]) - (three ? 4.f : 1.f) * hsum128_512(s);
        }
}
K512_KERNELS(q2k_512, q23k_512_rows, 0)
K512_KERNELS(q3k_512, q23k_512_rows, 1)

/* Q6_K, natural layout */
AI T512 void q6k_512_rows(const uint8_t *w, ptrdiff_t rs, const int NR, int nb, const act_t *a, const int NT, float *out,
                          ptrdiff_t os, const uint8_t *pf0, const uint8_t *pf1, const int six, const int gf) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30), g_hi4 = GF_M(4, 4);
    (void)six;
    const __m512i ix00 = IXLOAD(ix_q6, 0), ix01 = IXLOAD(ix_q6, 1), ix10 = IXLOAD(ix_q6, 2), ix11 = IXLOAD(ix_q6, 3);
    __m512 acc[2][4];
    __m256 accm[2][4];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps(), accm[r][t] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        __m512i v[2][4], sc[2][4];
        __m256i sc16[2];
        __m128 dd[2];
        for (int r = 0; r < NR; r++) {
            const uint8_t *b = w + r * rs + (size_t)210 * i;
            pf_block(r ? pf1 : pf0, i, 210);
            sc16[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
            const __m512i scz = _mm512_castsi256_si512(sc16[r]);
            sc[r][0] = _mm512_permutexvar_epi16(ix00, scz), sc[r][1] = _mm512_permutexvar_epi16(ix01, scz);
            sc[r][2] = _mm512_permutexvar_epi16(ix10, scz), sc[r][3] = _mm512_permutexvar_epi16(ix11, scz);
            dd[r] = h1_512(b + 208);
            for (int n = 0; n < 2; n++) {
                const __m512i L = _mm512_loadu_si512((const void *)(b + 64 * n));
                const __m256i H = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n));
                const __m512i H2 = _mm512_inserti64x4(_mm512_castsi256_si512(H), _mm256_srli_epi16(H, 2), 1);
                v[r][2 * n] = _mm512_ternarylogic_epi32(_mm512_and_si512(L, m4), _mm512_slli_epi16(H2, 4), m30, 0xF8);
                const __m512i Lh = gf ? gf_affine(L, g_hi4) : _mm512_and_si512(_mm512_srli_epi16(L, 4), m4);
                v[r][2 * n + 1] = _mm512_ternarylogic_epi32(Lh, H2, m30, 0xF8);
            }
        }
        for (int t = 0; t < NT; t++) {
            const int8_t *aq = a[t].q + 256 * i;
            const __m512i x0 = _mm512_load_si512((const void *)aq), x1 = _mm512_load_si512((const void *)(aq + 64));
            const __m512i x2 = _mm512_load_si512((const void *)(aq + 128)), x3 = _mm512_load_si512((const void *)(aq + 192));
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(a[t].bs16 + 16 * i));
            const float da = a[t].d[i];
            for (int r = 0; r < NR; r++) {
                __m512i s = _mm512_madd_epi16(_mm512_maddubs_epi16(v[r][0], x0), sc[r][0]);
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(v[r][1], x1), sc[r][1]);
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(v[r][2], x2), sc[r][2]);
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(v[r][3], x3), sc[r][3]);
                const __m512 sb = _mm512_broadcastss_ps(_mm_mul_ss(dd[r], _mm_set_ss(da)));
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sb, acc[r][t]);
                __m256i pm = _mm256_madd_epi16(sc16[r], bs);
                /* the -32 offset term is summed with d * da and scaled by 32 at the end (exact) */
                accm[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pm), _mm512_castps512_ps256(sb), accm[r][t]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++) {
            __m256 m = accm[r][t];
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            out[t * os + r] = _mm512_reduce_add_ps(acc[r][t]) - 32.f * hsum128_512(s);
        }
}
K512_KERNELS(q6k_512, q6k_512_rows, 0)

/* Q8_0: two 34-byte blocks per step, dpbusd on |w| and sign-transferred activations */
/* The 8 block sums of p[0..3] (each: two 32-value blocks' 8 int32 lane sums, low and high 256 bits), natural order */
AI T512 __m256i q8_0_sum8(const __m512i p[4]) {
    /* 32-bit then 64-bit interleaves pair up the lanes of two blocks at a time; after them 128-bit lane k holds
     * partial sums of blocks (0 2 4 6) for k < 2 and (1 3 5 7) for k >= 2 */
    const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(p[0], p[1]), _mm512_unpackhi_epi32(p[0], p[1]));
    const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(p[2], p[3]), _mm512_unpackhi_epi32(p[2], p[3]));
    const __m512i c = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    const __m256i lo = _mm512_castsi512_si256(c), hi = _mm512_extracti64x4_epi64(c, 1);
    const __m256i d = _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
    return _mm256_permutevar8x32_epi32(d, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Eight Q8_0 blocks at b: their quants + 128 (unsigned, for dpbusd) as four 64-byte vectors, and their scales */
AI T512 __m256 q8_0_load8(const uint8_t *b, __m512i wq[4]) {
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    for (int j = 0; j < 4; j++)
        wq[j] = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b + 68 * j + 2))),
                                                     _mm256_loadu_si256((const __m256i *)(b + 68 * j + 36)), 1), bias);
    return _mm256_cvtph_ps(_mm_setr_epi16((short)rd16(b), (short)rd16(b + 34), (short)rd16(b + 68), (short)rd16(b + 102),
                                          (short)rd16(b + 136), (short)rd16(b + 170), (short)rd16(b + 204), (short)rd16(b + 238)));
}

/* Q8_0: eight 32-value blocks per step. Weights go unsigned (w + 128, the block's activation sum takes the offset
 * back), each block's dot product is reduced to one int32 and the eight are scaled as one vector. */
AI T512 void q8_0_512_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf) {
    __m256 acc[4];
    float tail[4] = {0, 0, 0, 0};
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= nb; i += 8) {
        const uint8_t *b = w + 34 * i;
        if (pf)
            for (int k = 0; k < 5; k++) pf_block(pf + 34 * i, k, 64); /* the 272 bytes of the eight blocks */
        __m512i wq[4];
        const __m256 dw = q8_0_load8(b, wq);
        for (int t = 0; t < NT; t++) {
            const int8_t *x = a[t].q + 32 * i;
            __m512i p[4];
            for (int j = 0; j < 4; j++) p[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[j], _mm512_loadu_si512((const void *)(x + 64 * j)));
            const __m256i off = _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(a[t].bs16 + i))), 7);
            const __m256 s = _mm256_cvtepi32_ps(_mm256_sub_epi32(q8_0_sum8(p), off));
            acc[t] = _mm256_fmadd_ps(s, _mm256_mul_ps(dw, _mm256_loadu_ps(a[t].d + i)), acc[t]);
        }
    }
    for (; i < nb; i++) { /* the last nb % 8 blocks */
        const uint8_t *b = w + 34 * i;
        const __m256i wq = _mm256_loadu_si256((const __m256i *)(b + 2));
        const __m256i aw = _mm256_abs_epi8(wq);
        const float dw = _cvtsh_ss(rd16(b));
        for (int t = 0; t < NT; t++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(a[t].q + 32 * i));
            const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, _mm256_sign_epi8(x, wq));
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
            tail[t] += dw * a[t].d[i] * (float)_mm_cvtsi128_si32(h);
        }
    }
    for (int t = 0; t < NT; t++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        out[t * os] = hsum128_512(s) + tail[t];
    }
}
NT_DISPATCH(q8_0_512, T512, 4)

/* Q8_0 rows of 1, 2 or 4 blocks (MLA's absorbed k_b: 128 columns), one token: rows are contiguous, so eight blocks
 * in a row of memory are 8 / nb whole rows, done as one step of the kernel above with the activation blocks
 * repeated; each row's blocks are then summed in a fixed tree (the same whichever rows share the step, so results do
 * not depend on how rows were split between threads).  The one-row kernel's eight-block loop never runs on such a
 * row: Kimi K2's k_b per layer (64 heads x 512 rows x 128) took 612 us on one core, this 142-169 us. */
T512 int q8_0_512_short(const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const act_t *a, float *out) {
    if ((nb != 1 && nb != 2 && nb != 4) || rs != 34 * nb) return 0;
    int8_t xr[256] __attribute__((aligned(64)));
    int32_t offr[8];
    float dxr[8];
    for (int j = 0; j < 8; j++) {
        memcpy(xr + 32 * j, a->q + 32 * (j % nb), 32);
        offr[j] = (int32_t)a->bs16[j % nb] * 128;
        dxr[j] = a->d[j % nb];
    }
    __m512i xv[4];
    for (int j = 0; j < 4; j++) xv[j] = _mm512_load_si512((const void *)(xr + 64 * j));
    const __m256i off = _mm256_loadu_si256((const __m256i *)offr);
    const __m256 dx = _mm256_loadu_ps(dxr);
    const int per = 8 / nb; /* rows per step */
    for (int64_t r = 0; r < nrows; r += per) {
        const uint8_t *b = w + 34 * nb * r;
        uint8_t tail[272];
        if (nrows - r < per) { /* the last rows: a step of zero blocks after them adds exactly 0 */
            memset(tail, 0, sizeof tail);
            memcpy(tail, b, (size_t)(34 * nb * (nrows - r)));
            b = tail;
        }
        __m512i p[4];
        const __m256 dw = q8_0_load8(b, p);
        for (int j = 0; j < 4; j++) p[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), p[j], xv[j]);
        const __m256 s = _mm256_cvtepi32_ps(_mm256_sub_epi32(q8_0_sum8(p), off));
        __m256 v = _mm256_mul_ps(s, _mm256_mul_ps(dw, dx)); /* lane j: block j's share of its row */
        if (nb >= 2) v = _mm256_hadd_ps(v, v);              /* [01 23 01 23 | 45 67 45 67] */
        if (nb == 4) v = _mm256_hadd_ps(v, v);              /* [0123 x4 | 4567 x4] */
        const int n = nrows - r < per ? (int)(nrows - r) : per;
        if (n == per && nb == 1) {
            _mm256_storeu_ps(out + r, v);
        } else {
            float t[8];
            _mm256_storeu_ps(t, v);
            for (int k = 0; k < n; k++) out[r + k] = nb == 1 ? t[k] : nb == 2 ? t[(k & 1) + 4 * (k >> 1)] : t[4 * k];
        }
    }
    return 1;
}

/* Q4_0 (NL = 0) and IQ4_NL (NL = 1): 32-value blocks of nibbles, dpbusd on unsigned bytes. Q4_0 uses the nibble
 * (value + 8), IQ4_NL looks up the 16-value codebook + 128 (g_kvu) with vpshufb; the offset is taken back with
 * the block's activation sum. */
AI T512 void q4_32_512_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf, const int KIND) {
    const int NL = KIND == 1, Q5 = KIND >= 2, M = KIND == 3; /* IQ4_NL; Q5_0 / Q5_1: 5th bit from qh; Q5_1: + m */
    const int bpb = KIND == 3 ? 24 : KIND == 2 ? 22 : 18, qs = Q5 ? (M ? 8 : 6) : 2;
    const __m256i m4 = _mm256_set1_epi8(0x0F), b16 = _mm256_set1_epi8(16);
    const __m256i lut = NL ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)g_kvu)) : _mm256_setzero_si256();
    const float off = M ? -1.f : NL ? 128.f : KIND == 2 ? 16.f : 8.f; /* Q5_1: the correction is + m * sum(x) */
    __m256 acc[4];
    float corr[4] = {0, 0, 0, 0};
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + bpb * i;
        pf_block(pf, i, bpb);
        const __m128i q = _mm_loadu_si128((const __m128i *)(b + qs));
        __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4);
        if (NL) v = _mm256_shuffle_epi8(lut, v);
        if (Q5) v = _mm256_or_si256(v, _mm256_maskz_mov_epi8((__mmask32)rd32(b + qs - 4), b16)); /* bit j -> 16 */
        const float dw = _cvtsh_ss(rd16(b)), mw = M ? _cvtsh_ss(rd16(b + 2)) : 0.f;
        for (int t = 0; t < NT; t++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(a[t].q + 32 * i));
            __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), v, x);
            const float s = dw * a[t].d[i];
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc[t]);
            corr[t] += (M ? mw * a[t].d[i] : s) * (float)a[t].bs16[i];
        }
    }
    for (int t = 0; t < NT; t++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        out[t * os] = hsum128_512(s) - off * corr[t];
    }
}
AI T512 void q4_0_512_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf) {
    q4_32_512_body(w, nb, a, NT, out, os, pf, 0);
}
NT_DISPATCH(q4_0_512, T512, 4)
AI T512 void q5_0_512_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf) {
    q4_32_512_body(w, nb, a, NT, out, os, pf, 2);
}
NT_DISPATCH(q5_0_512, T512, 4)
AI T512 void q5_1_512_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf) {
    q4_32_512_body(w, nb, a, NT, out, os, pf, 3);
}
NT_DISPATCH(q5_1_512, T512, 4)

/* IQ4_NL: the same body with the codebook lookup */
AI T512 void iq4nl_512_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf) {
    q4_32_512_body(w, nb, a, NT, out, os, pf, 1);
}
NT_DISPATCH(iq4nl_512, T512, 4)


/* streaming read used by the bandwidth probe */
T512 uint64_t read_sum_512(const uint8_t *p, size_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        a0 = _mm512_xor_si512(a0, _mm512_load_si512((const void *)(p + i)));
        a1 = _mm512_xor_si512(a1, _mm512_load_si512((const void *)(p + i + 64)));
        a2 = _mm512_xor_si512(a2, _mm512_load_si512((const void *)(p + i + 128)));
        a3 = _mm512_xor_si512(a3, _mm512_load_si512((const void *)(p + i + 192)));
    }
    a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    return (uint64_t)_mm512_reduce_add_epi64(a0);
}

/* GT_Q8_0_R16 (k2k_repack_q8_0_r16): per block, 8 dpbusd of the 16 rows' unsigned quants against a broadcast quad
 * of activations give the 16 rows' block sums in one vector (the +128 comes back through the block's activation sum);
 * scaled and added to 16 row accumulators: no shuffles, no horizontal sums, aligned full-vector loads.  One token
 * per pass over the group for decode, tiles of up to 4 tokens (the group's bytes then come again from L1/L2). */
#define R16_TILE 8
T512 void q8r16_512(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                    const uint8_t *pf) {
    const int64_t gbytes = 544 * (int64_t)nb, ng = nrows / 16, pfd = g_pfd_r16;
    const uint8_t *end = w + ng * gbytes;
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *wg = w + g * gbytes;
        for (int t0 = 0; t0 < nt; t0 += R16_TILE) {
            const int n = nt - t0 < R16_TILE ? nt - t0 : R16_TILE;
            __m512 acc[R16_TILE];
            for (int t = 0; t < n; t++) acc[t] = _mm512_setzero_ps();
            for (int i = 0; i < nb; i++) {
                const uint8_t *b = wg + 544 * i;
                if (t0 == 0 && pfd > 0) r16_prefetch(b, pfd, end, pf, 9);
                const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)b));
                __m512i wq[8];
                for (int q = 0; q < 8; q++) wq[q] = _mm512_loadu_si512((const void *)(b + 32 + 64 * q));
                for (int t = 0; t < n; t++) {
                    const act_t *at = a + t0 + t;
                    const int8_t *x = at->q + 32 * i;
                    __m512i s0 = _mm512_set1_epi32(-128 * (int32_t)at->bs16[i]), s1 = _mm512_setzero_si512();
                    for (int q = 0; q < 8; q += 2) {
                        s0 = _mm512_dpbusd_epi32(s0, wq[q], _mm512_set1_epi32((int32_t)rd32((const uint8_t *)x + 4 * q)));
                        s1 = _mm512_dpbusd_epi32(s1, wq[q + 1], _mm512_set1_epi32((int32_t)rd32((const uint8_t *)x + 4 * q + 4)));
                    }
                    const __m512 s = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                    acc[t] = _mm512_fmadd_ps(s, _mm512_mul_ps(dw, _mm512_set1_ps(at->d[i])), acc[t]);
                }
            }
            for (int t = 0; t < n; t++) _mm512_storeu_ps(out + (t0 + t) * os + 16 * g, acc[t]);
        }
    }
}

/* GT_Q4_K_R16 (k2k_repack_q4_k_r16): per 16-row group and super-block, 2304 bytes: the rows' d and dmin (f16 x 16
 * each), their 6-bit scales and mins (low 4 bits: byte 16j + r = sc | m << 4 of sub-block j; high 2 bits: byte
 * 16j + r, j < 4, holds those of sub-blocks j and j + 4), then per sub-block j four 64-byte vectors k whose byte
 * 4r + b holds row r's quants 32j + 8k + b (low nibble) and + 4 (high nibble).  A sub-block is 8 dpbusd of 16 rows'
 * quants against broadcast activation quads (natural order), times the rows' scale as one int32 vector; the mins
 * against the activations' 32-sums the same way: the integer sums of the gguf-layout kernel, no horizontal sums. */
#define Q4R16_TILE 4
AI T512 void q4kr16_512_body(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out,
                             ptrdiff_t os, const uint8_t *pf, const int gf) {
    const int64_t gbytes = 2304 * (int64_t)nb, ng = nrows / 16, pfd = g_pfd_r16;
    const uint8_t *end = w + ng * gbytes;
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30), g_hi4 = GF_M(4, 4);
    uint8_t scm[256] __attribute__((aligned(64))); /* sub-block j: scales at 16j, mins at 128 + 16j (row r: byte r) */
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *wg = w + g * gbytes;
        for (int t0 = 0; t0 < nt; t0 += Q4R16_TILE) {
            const int n = nt - t0 < Q4R16_TILE ? nt - t0 : Q4R16_TILE;
            __m512 acc[Q4R16_TILE];
            for (int t = 0; t < n; t++) acc[t] = _mm512_setzero_ps();
            for (int i = 0; i < nb; i++) {
                const uint8_t *b = wg + 2304 * (int64_t)i;
                if (t0 == 0 && pfd > 0) r16_prefetch(b, pfd, end, pf, 36);
                {
                    const __m512i L0 = _mm512_loadu_si512((const void *)(b + 64)), L1 = _mm512_loadu_si512((const void *)(b + 128));
                    const __m512i H = _mm512_loadu_si512((const void *)(b + 192));
                    /* sc = lo & 15 | hi bits moved to 4-5 (epi16 shifts: the masks drop what crosses a byte) */
                    _mm512_store_si512((void *)scm, _mm512_ternarylogic_epi32(_mm512_and_si512(L0, m4), _mm512_slli_epi16(H, 4), m30, 0xF8));
                    _mm512_store_si512((void *)(scm + 64), _mm512_ternarylogic_epi32(_mm512_and_si512(L1, m4), H, m30, 0xF8));
                    _mm512_store_si512((void *)(scm + 128), _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(L0, 4), m4),
                                                                                    _mm512_slli_epi16(H, 2), m30, 0xF8));
                    _mm512_store_si512((void *)(scm + 192), _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(L1, 4), m4),
                                                                                    _mm512_srli_epi16(H, 2), m30, 0xF8));
                }
                __m512i isum[Q4R16_TILE], imin[Q4R16_TILE];
                for (int t = 0; t < n; t++) isum[t] = _mm512_setzero_si512(), imin[t] = _mm512_setzero_si512();
                for (int j = 0; j < 8; j++) {
                    const uint8_t *qj = b + 256 + 256 * j;
                    __m512i v[8];
                    for (int k = 0; k < 4; k++) {
                        const __m512i L = _mm512_loadu_si512((const void *)(qj + 64 * k));
                        v[2 * k] = _mm512_and_si512(L, m4);
                        v[2 * k + 1] = gf ? gf_affine(L, g_hi4) : _mm512_and_si512(_mm512_srli_epi16(L, 4), m4);
                    }
                    const __m512i sc = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(scm + 16 * j)));
                    const __m512i mn = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(scm + 128 + 16 * j)));
                    for (int t = 0; t < n; t++) {
                        const act_t *at = a + t0 + t;
                        const uint8_t *x = (const uint8_t *)at->q + 256 * i + 32 * j;
                        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
                        for (int k = 0; k < 8; k += 2) {
                            s0 = _mm512_dpbusd_epi32(s0, v[k], _mm512_set1_epi32((int32_t)rd32(x + 4 * k)));
                            s1 = _mm512_dpbusd_epi32(s1, v[k + 1], _mm512_set1_epi32((int32_t)rd32(x + 4 * k + 4)));
                        }
                        isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(_mm512_add_epi32(s0, s1), sc));
                        imin[t] = _mm512_add_epi32(imin[t], _mm512_mullo_epi32(mn, _mm512_set1_epi32(at->bs32[8 * i + j])));
                    }
                }
                const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)b));
                const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + 32)));
                for (int t = 0; t < n; t++) {
                    const __m512 da = _mm512_set1_ps(a[t0 + t].d[i]);
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_mul_ps(dw, da), acc[t]);
                    acc[t] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(imin[t]), _mm512_mul_ps(mw, da), acc[t]);
                }
            }
            for (int t = 0; t < n; t++) _mm512_storeu_ps(out + (t0 + t) * os + 16 * g, acc[t]);
        }
    }
}
T512 void q4kr16_512(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                     const uint8_t *pf) {
    q4kr16_512_body(w, nrows, nb, a, nt, out, os, pf, 0);
}
T512 void q4kr16_512g(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                      const uint8_t *pf) {
    q4kr16_512_body(w, nrows, nb, a, nt, out, os, pf, 1);
}
#endif /* K2K_X86 */
