/* AVX2 per-row kernels (NAT layout) of the K-quants, Q8_0 and Q4_0 / Q5_0 / Q5_1, each body also instantiated
 * for AVX-VNNI (TVNNI, VN = 1: vpdpwssd / vpdpbusd, the same integer sums); the IQ types are in avx2_iq.c. */
#include "common.h"
#if K2K_X86
#include "avx2.h"
#include "kernels.h"

/* Q4_K/Q5_K scales (bytes 0..7) and mins (8..15), in a register (no store-forwarding stall) */
AI T256 __m128i k4_scales(const uint8_t *s) {
    uint32_t u[4];
    unpack_k4(s, u);
    return _mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]);
}
/* broadcast int16 scale k (k in 0..7 of the 128 half) to all 16 lanes */
AI T256 __m256i one_scale(__m256i half_bcast, int k) {
    return _mm256_shuffle_epi8(half_bcast, _mm256_set1_epi16((short)((2 * k) | ((2 * k + 1) << 8))));
}

/* Q4_K/Q5_K scales (bytes 0..7) and mins (8..15) as k4_scales, in both 128 halves, unpacked in SIMD from one load
 * of the 12 packed bytes s (reads s .. s + 15): dwords (s0-3, s8-11, s4-7, s8-11) shifted right by (0, 0, 0, 4) and
 * masked to 6 / 4 / 6 / 4 bits, or'ed with bits 6-7 of (-, s0-3, -, s4-7) moved to 4-5 (8 instructions instead of
 * ~13 scalar ones and four inserts). */
AI T256 __m256i k4_scales_bc(const uint8_t *s) {
    const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)s));
    const __m256i lo = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(x, _mm256_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11,
                                                                                                  0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11)),
                                                         _mm256_setr_epi32(0, 0, 0, 4, 0, 0, 0, 4)),
                                        _mm256_setr_epi32(0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F));
    const __m256i h = _mm256_shuffle_epi8(x, _mm256_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7,
                                                              -1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    return _mm256_or_si256(lo, _mm256_and_si256(_mm256_srli_epi32(h, 2), _mm256_set1_epi8(0x30)));
}
/* unsigned scale byte k (of each 128 half) zero-extended to all 16 int16 lanes */
AI T256 __m256i one_scale_u8(__m256i bytes_bcast, int k) {
    return _mm256_shuffle_epi8(bytes_bcast, _mm256_set1_epi16((short)(k | 0x8000)));
}
/* the mins (bytes 8..15 of k4_scales_bc) as 8 int16 */
AI T256 __m128i k4_mins16(__m256i sm) {
    return _mm_shuffle_epi8(_mm256_castsi256_si128(sm), _mm_setr_epi8(8, -1, 9, -1, 10, -1, 11, -1, 12, -1, 13, -1, 14, -1, 15, -1));
}

AI T256 void q4k_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf,
           const int VN) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + 144 * i;
        pf_block(pf, i, 144);
        /* one token: SIMD unpack; more: the scalar one (GPR ports, idle while the vector ones are the limit) */
        const __m256i sm16 = NT == 1 ? _mm256_setzero_si256() : _mm256_cvtepu8_epi16(k4_scales(b + 4));
        const __m256i scb = NT == 1 ? k4_scales_bc(b + 4) : _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm16));
        __m256i sumi[4], sumh[4];
        for (int t = 0; t < NT && !VN; t++) sumi[t] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * j));
            const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            const __m256i s0 = NT == 1 ? one_scale_u8(scb, 2 * j) : one_scale(scb, 2 * j);
            const __m256i s1 = NT == 1 ? one_scale_u8(scb, 2 * j + 1) : one_scale(scb, 2 * j + 1);
            for (int t = 0; t < NT; t++) {
                const int8_t *aq = a[t].q + 256 * i + 64 * j;
                if (VN) { /* 1-2 tokens: two chains (low, high nibbles), summed after the block; 3-4: one (fewer registers) */
                    const __m256i m0 = _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)aq));
                    const __m256i m1 = _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(aq + 32)));
                    sumi[t] = j ? dpwssd_v(sumi[t], m0, s0, VN) : _mm256_madd_epi16(m0, s0);
                    if (NT >= 3) sumi[t] = dpwssd_v(sumi[t], m1, s1, VN);
                    else sumh[t] = j ? dpwssd_v(sumh[t], m1, s1, VN) : _mm256_madd_epi16(m1, s1);
                    continue;
                }
                __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)aq)), s0);
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(aq + 32))), s1);
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(p0, p1));
            }
        }
        for (int t = 0; t < NT && VN && NT < 3; t++) sumi[t] = _mm256_add_epi32(sumi[t], sumh[t]);
        const __m128i mins = NT == 1 ? k4_mins16(scb) : _mm256_extracti128_si256(sm16, 1);
        const __m256 dw = h2f_bc256(b);
        const __m128 dmw = _mm256_castps256_ps128(h2f_bc256(b + 2));
        for (int t = 0; t < NT; t++) {
            /* one accumulator: the mins' 4 products go in as the zeroed-upper low half */
            const __m256 da = _mm256_broadcast_ss(a[t].d + i);
            const __m128i pm = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)(a[t].bs32 + 8 * i)));
            const __m256 f = _mm256_fmsub_ps(_mm256_cvtepi32_ps(sumi[t]), dw, _mm256_zextps128_ps256(_mm_mul_ps(_mm_cvtepi32_ps(pm), dmw)));
            acc[t] = _mm256_fmadd_ps(f, da, acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * os] = hsum256(acc[t]);
}
NT_BODY(q4k_avx2, q4k_body, T256, 0)
NT_DISPATCH4_SPLIT(q4k_avx2, T256)

AI T256 void q5k_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf,
           const int VN) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + 176 * i;
        pf_block(pf, i, 176);
        /* one token: SIMD unpack; more: the scalar one (GPR ports, idle while the vector ones are the limit) */
        const __m256i sm16 = NT == 1 ? _mm256_setzero_si256() : _mm256_cvtepu8_epi16(k4_scales(b + 4));
        const __m256i scb = NT == 1 ? k4_scales_bc(b + 4) : _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm16));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
        __m256i sumi[4], sumh[4];
        for (int t = 0; t < NT && !VN; t++) sumi[t] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * j));
            __m256i hlo, hhi;
            /* bit 2j -> bit 4, bit 2j+1 -> bit 4 */
            switch (j) {
            case 0: hlo = _mm256_slli_epi16(qh, 4); hhi = _mm256_slli_epi16(qh, 3); break;
            case 1: hlo = _mm256_slli_epi16(qh, 2); hhi = _mm256_slli_epi16(qh, 1); break;
            case 2: hlo = qh; hhi = _mm256_srli_epi16(qh, 1); break;
            default: hlo = _mm256_srli_epi16(qh, 2); hhi = _mm256_srli_epi16(qh, 3); break;
            }
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(q, m4), _mm256_and_si256(hlo, b4));
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), _mm256_and_si256(hhi, b4));
            const __m256i s0 = NT == 1 ? one_scale_u8(scb, 2 * j) : one_scale(scb, 2 * j);
            const __m256i s1 = NT == 1 ? one_scale_u8(scb, 2 * j + 1) : one_scale(scb, 2 * j + 1);
            for (int t = 0; t < NT; t++) {
                const int8_t *aq = a[t].q + 256 * i + 64 * j;
                if (VN) { /* 1-2 tokens: two chains (low, high nibbles), summed after the block; 3-4: one (fewer registers) */
                    const __m256i m0 = _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)aq));
                    const __m256i m1 = _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(aq + 32)));
                    sumi[t] = j ? dpwssd_v(sumi[t], m0, s0, VN) : _mm256_madd_epi16(m0, s0);
                    if (NT >= 3) sumi[t] = dpwssd_v(sumi[t], m1, s1, VN);
                    else sumh[t] = j ? dpwssd_v(sumh[t], m1, s1, VN) : _mm256_madd_epi16(m1, s1);
                    continue;
                }
                __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)aq)), s0);
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(aq + 32))), s1);
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(p0, p1));
            }
        }
        for (int t = 0; t < NT && VN && NT < 3; t++) sumi[t] = _mm256_add_epi32(sumi[t], sumh[t]);
        const __m128i mins = NT == 1 ? k4_mins16(scb) : _mm256_extracti128_si256(sm16, 1);
        const __m256 dw = h2f_bc256(b);
        const __m128 dmw = _mm256_castps256_ps128(h2f_bc256(b + 2));
        for (int t = 0; t < NT; t++) {
            /* one accumulator: the mins' 4 products go in as the zeroed-upper low half */
            const __m256 da = _mm256_broadcast_ss(a[t].d + i);
            const __m128i pm = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)(a[t].bs32 + 8 * i)));
            const __m256 f = _mm256_fmsub_ps(_mm256_cvtepi32_ps(sumi[t]), dw, _mm256_zextps128_ps256(_mm_mul_ps(_mm_cvtepi32_ps(pm), dmw)));
            acc[t] = _mm256_fmadd_ps(f, da, acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * os] = hsum256(acc[t]);
}
NT_BODY(q5k_avx2, q5k_body, T256, 0)
NT_DISPATCH4_SPLIT(q5k_avx2, T256)

/* vpshufb masks for the 2-bit K-quants: mask k spreads scale byte 2k over the int16 lanes of the low 128 half and
 * byte 2k+1 over the high half (the 16 scale bytes broadcast to both halves), for plane k = 4n + j (sub-blocks
 * 8n + 2j, 8n + 2j + 1).  LO: byte zero-extended; HI: byte in the high half of the int16 (256 x the signed byte,
 * a sign-extension for free). */
#define K2K_SPL(a) a, -128, a, -128, a, -128, a, -128, a, -128, a, -128, a, -128, a, -128
#define K2K_SPH(a) -128, a, -128, a, -128, a, -128, a, -128, a, -128, a, -128, a, -128, a
static const int8_t sc2_lo_mask[8][32] __attribute__((aligned(32))) = {
    {K2K_SPL(0), K2K_SPL(1)},   {K2K_SPL(2), K2K_SPL(3)},   {K2K_SPL(4), K2K_SPL(5)},   {K2K_SPL(6), K2K_SPL(7)},
    {K2K_SPL(8), K2K_SPL(9)},   {K2K_SPL(10), K2K_SPL(11)}, {K2K_SPL(12), K2K_SPL(13)}, {K2K_SPL(14), K2K_SPL(15)}};
static const int8_t sc2_hi_mask[8][32] __attribute__((aligned(32))) = {
    {K2K_SPH(0), K2K_SPH(1)},   {K2K_SPH(2), K2K_SPH(3)},   {K2K_SPH(4), K2K_SPH(5)},   {K2K_SPH(6), K2K_SPH(7)},
    {K2K_SPH(8), K2K_SPH(9)},   {K2K_SPH(10), K2K_SPH(11)}, {K2K_SPH(12), K2K_SPH(13)}, {K2K_SPH(14), K2K_SPH(15)}};
#undef K2K_SPL
#undef K2K_SPH
AI T256 __m256i sc2_lo(__m256i sc, int k) { return _mm256_shuffle_epi8(sc, _mm256_load_si256((const __m256i *)sc2_lo_mask[k])); }
AI T256 __m256i sc2_hi(__m256i sc, int k) { return _mm256_shuffle_epi8(sc, _mm256_load_si256((const __m256i *)sc2_hi_mask[k])); }

/* Q2_K: planes 0..2 stay in place (q & 3 << 2j = 4^j v, at most 48: maddubs cannot saturate), plane 3 is shifted
 * down, and the scales take 16 / 4^j (16 for plane 3; one vpmullw per block on the scale bytes, at most 240), so
 * every product is 16 x the true one; the mins come 16 x as well (high nibble masked in place), and 1/16 is applied
 * once at the end.  Each 32 weights' int16 scale pair is one vpshufb of the scale bytes. */
AI T256 void q2k_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf,
           const int VN) {
    const __m256i m3 = _mm256_set1_epi8(3), mC = _mm256_set1_epi8(0x0C), m30 = _mm256_set1_epi8(0x30), m4 = _mm256_set1_epi8(0x0F);
    /* int16 lane k of the scale bytes holds sub-blocks 2k, 2k+1, plane k % 4 */
    const __m256i pmul = _mm256_setr_epi16(16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1, 16);
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + 84 * i;
        pf_block(pf, i, 84);
        const __m128i raw = _mm_loadu_si128((const __m128i *)b);
        const __m256i sc = _mm256_mullo_epi16(_mm256_and_si256(_mm256_broadcastsi128_si256(raw), m4), pmul);
        __m256i sumi[4], e[4];
        for (int n = 0; n < 2; n++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * n));
            for (int j = 0; j < 4; j++) {
                const __m256i v = j == 0 ? _mm256_and_si256(q, m3) : j == 1 ? _mm256_and_si256(q, mC)
                                : j == 2 ? _mm256_and_si256(q, m30) : _mm256_and_si256(_mm256_srli_epi16(q, 6), m3);
                const __m256i s = sc2_lo(sc, 4 * n + j);
                for (int t = 0; t < NT; t++) { /* sums as a tree: ((p0 + p1) + (p2 + p3)) per 128 (the source order
                                                * is the schedule: computing all planes first spilled) */
                    const __m256i m = _mm256_maddubs_epi16(v, _mm256_load_si256((const __m256i *)(a[t].q + 256 * i + 128 * n + 32 * j)));
                    if (VN) { /* 1-2 tokens: two chains (planes 0-1, 2-3), summed after the block; 3-4: one */
                        if (j < 2 || NT >= 3) sumi[t] = n || j ? dpwssd_v(sumi[t], m, s, VN) : _mm256_madd_epi16(m, s);
                        else e[t] = n || j == 3 ? dpwssd_v(e[t], m, s, VN) : _mm256_madd_epi16(m, s);
                        continue;
                    }
                    const __m256i p = _mm256_madd_epi16(m, s);
                    if (j == 0 || j == 2) e[t] = p;
                    else if (j == 1) sumi[t] = n ? _mm256_add_epi32(sumi[t], _mm256_add_epi32(e[t], p)) : _mm256_add_epi32(e[t], p);
                    else sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(e[t], p));
                }
            }
        }
        for (int t = 0; t < NT && VN && NT < 3; t++) sumi[t] = _mm256_add_epi32(sumi[t], e[t]);
        const __m256i mn = _mm256_and_si256(_mm256_cvtepu8_epi16(raw), _mm256_set1_epi16(0xF0)); /* 16 x min */
        const __m256 dw = h2f_bc256(b + 80), dmw = h2f_bc256(b + 82);
        for (int t = 0; t < NT; t++) {
            const __m256i pm = _mm256_madd_epi16(mn, _mm256_loadu_si256((const __m256i *)(a[t].bs16 + 16 * i)));
            const __m256 f = _mm256_fmsub_ps(_mm256_cvtepi32_ps(sumi[t]), dw, _mm256_mul_ps(_mm256_cvtepi32_ps(pm), dmw));
            acc[t] = _mm256_fmadd_ps(f, _mm256_broadcast_ss(a[t].d + i), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * os] = hsum256(acc[t]) * (1.f / 16.f);
}

/* Q3_K scales as q3_scales, in both 128 halves */
AI T256 __m256i q3_scales_bc(const uint8_t *b) {
    const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(b + 94)));
    const __m256i lo = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(x, _mm256_setr_epi8(2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                                                  2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6, 7, 8, 9)),
                                                         _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4)),
                                        _mm256_set1_epi8(0x0F));
    const __m256i h = _mm256_shuffle_epi8(x, _mm256_setr_epi8(10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13,
                                                              10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13));
    const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_sllv_epi32(h, _mm256_setr_epi32(4, 2, 0, 0, 4, 2, 0, 0)),
                                                          _mm256_setr_epi32(0, 0, 0, 2, 0, 0, 0, 2)),
                                        _mm256_set1_epi8(0x30));
    return _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
}

/* Q3_K: weights as unsigned 0..7 (2-bit plane | high bit << 2, 4 too many), signed scales as 256 x int16 straight
 * from one vpshufb (sc2_hi), so the block sum is 256 x the true one; the -4 offset is integer too (1024 x scales
 * against the activation sums per 16) and leaves the block as one int32 vector. */
AI T256 void q3k_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf,
           const int VN) {
    const __m256i m3 = _mm256_set1_epi8(3), bit2 = _mm256_set1_epi8(4);
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + 110 * i;
        pf_block(pf, i, 110);
        const __m256i sc = q3_scales_bc(b);
        const __m256i hm = _mm256_loadu_si256((const __m256i *)b);
        __m256i sumi[4], e[4];
        for (int n = 0; n < 2; n++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 32 + 32 * n));
            __m256i v[4], s[4];
            for (int j = 0; j < 4; j++) {
                const int bit = 4 * n + j;
                const __m256i h = bit <= 2 ? _mm256_slli_epi16(hm, 2 - bit) : _mm256_srli_epi16(hm, bit - 2);
                v[j] = _mm256_or_si256(_mm256_and_si256(j ? _mm256_srli_epi16(q, 2 * j) : q, m3), _mm256_and_si256(h, bit2));
                s[j] = sc2_hi(sc, 4 * n + j);
                if (NT >= 3) continue; /* 3-4 tokens: all four planes first (the other order spilled there) */
                for (int t = 0; t < NT; t++) { /* as Q2_K */
                    const __m256i m = _mm256_maddubs_epi16(v[j], _mm256_load_si256((const __m256i *)(a[t].q + 256 * i + 128 * n + 32 * j)));
                    if (VN) { /* 1-2 tokens: two chains (planes 0-1, 2-3), summed after the block; 3-4: one */
                        if (j < 2 || NT >= 3) sumi[t] = n || j ? dpwssd_v(sumi[t], m, s[j], VN) : _mm256_madd_epi16(m, s[j]);
                        else e[t] = n || j == 3 ? dpwssd_v(e[t], m, s[j], VN) : _mm256_madd_epi16(m, s[j]);
                        continue;
                    }
                    const __m256i p = _mm256_madd_epi16(m, s[j]);
                    if (j == 0 || j == 2) e[t] = p;
                    else if (j == 1) sumi[t] = n ? _mm256_add_epi32(sumi[t], _mm256_add_epi32(e[t], p)) : _mm256_add_epi32(e[t], p);
                    else sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(e[t], p));
                }
            }
            for (int t = 0; t < NT && NT >= 3; t++) {
                const int8_t *aq = a[t].q + 256 * i + 128 * n;
                __m256i p[4];
                for (int j = 0; j < 4 && VN; j++) { /* as above */
                    const __m256i m = _mm256_maddubs_epi16(v[j], _mm256_load_si256((const __m256i *)(aq + 32 * j)));
                    if (j < 2 || NT >= 3) sumi[t] = n || j ? dpwssd_v(sumi[t], m, s[j], VN) : _mm256_madd_epi16(m, s[j]);
                    else e[t] = n || j == 3 ? dpwssd_v(e[t], m, s[j], VN) : _mm256_madd_epi16(m, s[j]);
                }
                if (VN) continue;
                for (int j = 0; j < 4; j++)
                    p[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(v[j], _mm256_load_si256((const __m256i *)(aq + 32 * j))), s[j]);
                const __m256i g = _mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3]));
                sumi[t] = n ? _mm256_add_epi32(sumi[t], g) : g;
            }
        }
        for (int t = 0; t < NT && VN && NT < 3; t++) sumi[t] = _mm256_add_epi32(sumi[t], e[t]);
        const __m256i sck = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(sc)), 10); /* -32768 .. 31744 */
        const __m256 dw = h2f_bc256(b + 108);
        for (int t = 0; t < NT; t++) {
            const __m256i pm = _mm256_madd_epi16(sck, _mm256_loadu_si256((const __m256i *)(a[t].bs16 + 16 * i)));
            const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sumi[t], pm)), dw);
            acc[t] = _mm256_fmadd_ps(f, _mm256_broadcast_ss(a[t].d + i), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * os] = hsum256(acc[t]) * (1.f / 256.f);
}
NT_BODY(q2k_avx2, q2k_body, T256, 0)
NT_BODY(q3k_avx2, q3k_body, T256, 0)
NT_DISPATCH4_SPLIT(q2k_avx2, T256)
NT_DISPATCH4_SPLIT(q3k_avx2, T256)

/* Q6_K: weights unsigned 0..63; the -32 offset is integer too (32 x scales against the activation sums per 16),
 * so each block leaves one int32 vector and one accumulator per token. */
AI T256 void q6k_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf,
           const int VN) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + 210 * i;
        pf_block(pf, i, 210);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
        const __m256i half[2] = {_mm256_permute4x64_epi64(sc16, 0x44), _mm256_permute4x64_epi64(sc16, 0xEE)};
        __m256i sumi[4], e[4];
        for (int n = 0; n < 2; n++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(b + 64 * n));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(b + 64 * n + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n));
            for (int k = 0; k < 4; k++) {
                __m256i lo = (k & 1) ? l1 : l0;
                lo = (k & 2) ? _mm256_and_si256(_mm256_srli_epi16(lo, 4), m4) : _mm256_and_si256(lo, m4);
                __m256i h;
                switch (k) {
                case 0: h = _mm256_slli_epi16(qh, 4); break;
                case 1: h = _mm256_slli_epi16(qh, 2); break;
                case 2: h = qh; break;
                default: h = _mm256_srli_epi16(qh, 2); break;
                }
                const __m256i v = _mm256_or_si256(lo, _mm256_and_si256(h, m30)), s = pair_scales(half[n], k);
                for (int t = 0; t < NT; t++) { /* sums as a tree: ((p0 + p1) + (p2 + p3)) per 128 */
                    const __m256i m = _mm256_maddubs_epi16(v, _mm256_load_si256((const __m256i *)(a[t].q + 256 * i + 128 * n + 32 * k)));
                    if (VN) { /* 1-2 tokens: two chains (k 0-1, 2-3), summed after the block; 3-4: one */
                        if (k < 2 || NT >= 3) sumi[t] = n || k ? dpwssd_v(sumi[t], m, s, VN) : _mm256_madd_epi16(m, s);
                        else e[t] = n || k == 3 ? dpwssd_v(e[t], m, s, VN) : _mm256_madd_epi16(m, s);
                        continue;
                    }
                    const __m256i p = _mm256_madd_epi16(m, s);
                    if (k == 0 || k == 2) e[t] = p;
                    else if (k == 1) sumi[t] = n ? _mm256_add_epi32(sumi[t], _mm256_add_epi32(e[t], p)) : _mm256_add_epi32(e[t], p);
                    else sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(e[t], p));
                }
            }
        }
        for (int t = 0; t < NT && VN && NT < 3; t++) sumi[t] = _mm256_add_epi32(sumi[t], e[t]);
        const __m256i sc32 = _mm256_slli_epi16(sc16, 5); /* |32 s| <= 4096 */
        const __m256 dw = h2f_bc256(b + 208);
        for (int t = 0; t < NT; t++) {
            const __m256i pm = _mm256_madd_epi16(sc32, _mm256_loadu_si256((const __m256i *)(a[t].bs16 + 16 * i)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sumi[t], pm)), _mm256_mul_ps(dw, _mm256_broadcast_ss(a[t].d + i)), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * os] = hsum256(acc[t]);
}
NT_BODY(q6k_avx2, q6k_body, T256, 0)
NT_DISPATCH4_SPLIT(q6k_avx2, T256)

/* Q8_0: |w| against the activations with w's sign (maddubs, madd), one fmadd per block, four blocks per step: their
 * fp16 scales converted as one vector and multiplied by each token's four activation scales at once (a vpermps per
 * block instead of a scalar convert, multiply and broadcast), and 4 (one token) or 2 accumulators per token in turn
 * (with one, the fmadd latency chain was the limit: T=1 8.0 -> 6.2 ns per 256, then 5.5 with the vector scales).
 * (Reducing the four blocks with vphaddd to one fmadd per four blocks, the AVX-512 idea, gained only 5%.) */
AI T256 void q8_0_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf,
           const int VN) {
    __m256 acc[4][4];
    for (int t = 0; t < NT; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 4 <= nb; i += 4) {
        /* the four blocks' fp16 scales as one vector, times each token's four activation scales, one vpermps each */
        const uint8_t *b0 = w + 34 * i;
        __m128i h = _mm_cvtsi32_si128((int)rd16(b0));
        h = _mm_insert_epi16(h, (short)rd16(b0 + 34), 1);
        h = _mm_insert_epi16(h, (short)rd16(b0 + 68), 2);
        h = _mm_insert_epi16(h, (short)rd16(b0 + 102), 3);
        const __m128 dw = _mm_cvtph_ps(h);
        /* the products go through memory: four broadcast loads instead of four vpermps (shuffle ports) */
        float f[4][4] __attribute__((aligned(16)));
        for (int t = 0; t < NT; t++) _mm_store_ps(f[t], _mm_mul_ps(dw, _mm_loadu_ps(a[t].d + i)));
        if (pf) for (int k = 0; k < 3; k++) pf_block(pf + 34 * i, k, 64); /* the 136 bytes of the four blocks */
        for (int k = 0; k < 4; k++) {
            const uint8_t *b = b0 + 34 * k;
            const __m256i wq = _mm256_loadu_si256((const __m256i *)(b + 2));
            const __m256i aw = _mm256_sign_epi8(wq, wq);
            for (int t = 0; t < NT; t++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(a[t].q + 32 * (i + k)));
                const __m256i p = dpbusd_v(aw, _mm256_sign_epi8(x, wq), VN);
                const int u = NT == 1 ? k : k & 1; /* 4 accumulators at one token, else 2 */
                acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(&f[t][k]), acc[t][u]);
            }
        }
    }
    for (; i < nb; i++) { /* the last nb % 4 blocks */
        const uint8_t *b = w + 34 * i;
        const __m256i wq = _mm256_loadu_si256((const __m256i *)(b + 2));
        const __m256i aw = _mm256_sign_epi8(wq, wq);
        const float dw = h2f_256(b);
        for (int t = 0; t < NT; t++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(a[t].q + 32 * i));
            __m256i p = dpbusd_v(aw, _mm256_sign_epi8(x, wq), VN);
            acc[t][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * a[t].d[i]), acc[t][0]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * os] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])));
}
NT_BODY(q8_0_avx2, q8_0_body, T256, 0)
NT_DISPATCH4_SPLIT(q8_0_avx2, T256)

/* Q4_0 (KIND 0; value q - 8), Q5_0 (2; 5th bit from qh, value q - 16) and Q5_1 (3; value q + m / d): 32-value blocks
 * of unsigned 0..31 values dotted with dpbusd_v (no int16 pair sum can saturate: 2 * 31 * 127), the offset taken
 * back with the activation block sums; the 5th bits are spread to bytes with one byte shuffle, a mask and a compare */
AI T256 void q4_32_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf,
                        const int KIND, const int VN) {
    const int Q5 = KIND >= 2, M = KIND == 3, bpb = M ? 24 : Q5 ? 22 : 18, qs = M ? 8 : Q5 ? 6 : 2;
    const __m256i m4 = _mm256_set1_epi8(0x0F), b16 = _mm256_set1_epi8(16);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const float off = M ? -1.f : Q5 ? 16.f : 8.f; /* Q5_1: the correction is + m * sum(x) */
    __m256 acc[4];
    float corr[4] = {0, 0, 0, 0};
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + bpb * i;
        pf_block(pf, i, bpb);
        const __m128i q = _mm_loadu_si128((const __m128i *)(b + qs));
        __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4);
        if (Q5) {
            const __m256i hb = _mm256_shuffle_epi8(_mm256_set1_epi32((int)rd32(b + qs - 4)), spread);
            v = _mm256_or_si256(v, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, bit), bit), b16));
        }
        const float dw = h2f_256(b), mw = M ? h2f_256(b + 2) : 0.f;
        for (int t = 0; t < NT; t++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(a[t].q + 32 * i));
            __m256i p = dpbusd_v(v, x, VN);
            const float s = dw * a[t].d[i];
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc[t]);
            corr[t] += (M ? mw * a[t].d[i] : s) * (float)a[t].bs16[i];
        }
    }
    for (int t = 0; t < NT; t++) out[t * os] = hsum256(acc[t]) - off * corr[t];
}
#define Q4_32_BODY(name, KIND)                                                                                     \
    AI T256 void name(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os,             \
                      const uint8_t *pf, const int VN) {                                                            \
        q4_32_body(w, nb, a, NT, out, os, pf, KIND, VN);                                                            \
    }
Q4_32_BODY(q4_0_body, 0)
Q4_32_BODY(q5_0_body, 2)
Q4_32_BODY(q5_1_body, 3)
NT_BODY(q4_0_avx2, q4_0_body, T256, 0)
NT_DISPATCH4_SPLIT(q4_0_avx2, T256)
NT_BODY(q5_0_avx2, q5_0_body, T256, 0)
NT_DISPATCH(q5_0_avx2, T256, 4)
NT_BODY(q5_1_avx2, q5_1_body, T256, 0)
NT_DISPATCH(q5_1_avx2, T256, 4)


/* the AVX2 per-row kernels with vpdpwssd / vpdpbusd (the same bodies, VN = 1) */
NT_BODY(q4k_vnni, q4k_body, TVNNI, 1)
NT_BODY(q5k_vnni, q5k_body, TVNNI, 1)
NT_BODY(q2k_vnni, q2k_body, TVNNI, 1)
NT_BODY(q3k_vnni, q3k_body, TVNNI, 1)
NT_BODY(q6k_vnni, q6k_body, TVNNI, 1)
NT_BODY(q8_0_vnni, q8_0_body, TVNNI, 1)
NT_BODY(q4_0_vnni, q4_0_body, TVNNI, 1)
NT_BODY(q5_0_vnni, q5_0_body, TVNNI, 1)
NT_BODY(q5_1_vnni, q5_1_body, TVNNI, 1)
NT_DISPATCH4_SPLIT(q4k_vnni, TVNNI)
NT_DISPATCH4_SPLIT(q5k_vnni, TVNNI)
NT_DISPATCH4_SPLIT(q2k_vnni, TVNNI)
NT_DISPATCH4_SPLIT(q3k_vnni, TVNNI)
NT_DISPATCH4_SPLIT(q6k_vnni, TVNNI)
NT_DISPATCH4_SPLIT(q8_0_vnni, TVNNI)
NT_DISPATCH(q4_0_vnni, TVNNI, 2)
NT_DISPATCH(q5_0_vnni, TVNNI, 4)
NT_DISPATCH(q5_1_vnni, TVNNI, 4)

/* GT_Q8_0_R16 (k2k_repack_q8_0_r16) at the AVX2 level: each 64-byte quad of 16 rows is two 8-row vectors; the
 * weights go back to signed (xor 0x80) and through |w| and sign(x, w) so that vpmaddubsw cannot saturate (one
 * vpdpbusd where VN); per block 8 row sums per vector, no horizontal sums.  Tiles of up to 4 tokens. */
AI T256 void q8r16_body(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                        const uint8_t *pf, const int VN) {
    const int64_t gbytes = 544 * (int64_t)nb, ng = nrows / 16, pfd = g_pfd_r16;
    const uint8_t *end = w + ng * gbytes;
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *wg = w + g * gbytes;
        for (int t0 = 0; t0 < nt; t0 += 4) {
            const int n = nt - t0 < 4 ? nt - t0 : 4;
            __m256 acc[4][2];
            for (int t = 0; t < n; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
            for (int i = 0; i < nb; i++) {
                const uint8_t *b = wg + 544 * i;
                if (t0 == 0 && pfd > 0) r16_prefetch(b, pfd, end, pf, 9);
                for (int h = 0; h < 2; h++) {
                    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16 * h)));
                    for (int t = 0; t < n; t++) {
                        const uint8_t *x = (const uint8_t *)(a[t0 + t].q + 32 * i);
                        __m256i s = _mm256_setzero_si256();
                        for (int q = 0; q < 8; q++) {
                            const __m256i wq = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(b + 32 + 64 * q + 32 * h)), bias);
                            const __m256i xq = _mm256_set1_epi32((int32_t)rd32(x + 4 * q));
                            s = _mm256_add_epi32(s, dpbusd_v(_mm256_abs_epi8(wq), _mm256_sign_epi8(xq, wq), VN));
                        }
                        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(a[t0 + t].d[i])), acc[t][h]);
                    }
                }
            }
            for (int t = 0; t < n; t++)
                for (int h = 0; h < 2; h++) _mm256_storeu_ps(out + (t0 + t) * os + 16 * g + 8 * h, acc[t][h]);
        }
    }
}
T256 void q8r16_avx2(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                     const uint8_t *pf) {
    q8r16_body(w, nrows, nb, a, nt, out, os, pf, 0);
}
TVNNI void q8r16_vnni(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                      const uint8_t *pf) {
    q8r16_body(w, nrows, nb, a, nt, out, os, pf, 1);
}

/* streaming read used by the bandwidth probe */
T256 uint64_t read_sum_256(const uint8_t *p, size_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    return (uint64_t)_mm256_extract_epi64(a0, 0) ^ (uint64_t)_mm256_extract_epi64(a0, 3);
}
#endif /* K2K_X86 */
