/* AVX-512 VNNI per-row kernels of IQ4_XS and the codebook types (IQ3_XXS / IQ3_S also with AVX512_VBMI lookups). */
#include "common.h"
#if K2K_X86
#include "avx2.h"
#include "avx2_iq.h"
#include "avx512.h"
#include "kernels.h"

/* IQ4_XS with LAYOUT_IQ4X activations: 64 packed bytes = 4 sub-blocks; lo nibbles meet activation bytes 0..63,
 * hi nibbles 64..127.  dpbusd of (value + 128) leaves int32 lane 4k..4k+3 in sub-block k: scaled with one
 * vpmulld; the +128 is taken back per block as 128 * sum(scale * activation sum of the sub-block). */
AI T512 void iq4xs_512_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)g_kvu));
    const __m512i ixa = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i ixb = _mm512_add_epi32(ixa, _mm512_set1_epi32(4));
    __m512 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + 136 * i;
        pf_block(pf, i, 136);
        /* 8 six-bit scales - 32: low 4 bits from b[4..7] nibbles, high 2 bits from the uint16 at b + 2 */
        const uint32_t sh = rd16(b + 2);
        const __m128i sl = _mm_cvtsi32_si128((int)rd32(b + 4));
        const __m128i lo4 = _mm_and_si128(_mm_unpacklo_epi8(sl, _mm_srli_epi16(sl, 4)), _mm_set1_epi8(0x0F));
        const __m128i hi2 = _mm_cvtsi64_si128((long long)(_pdep_u64(sh, 0x0303030303030303ULL) << 4));
        const __m128i sc8 = _mm_sub_epi8(_mm_or_si128(lo4, hi2), _mm_set1_epi8(32)); /* 8 int8 */
        const __m512i sc32 = _mm512_cvtepi8_epi32(sc8);
        const __m512i sa = _mm512_permutexvar_epi32(ixa, sc32), sb = _mm512_permutexvar_epi32(ixb, sc32);
        const __m128i sc16 = _mm_cvtepi8_epi16(sc8);
        const __m512i q0 = _mm512_loadu_si512((const void *)(b + 8)), q1 = _mm512_loadu_si512((const void *)(b + 72));
        const __m512i v0 = _mm512_shuffle_epi8(lut, _mm512_and_si512(q0, m4));
        const __m512i v1 = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4));
        const __m512i v2 = _mm512_shuffle_epi8(lut, _mm512_and_si512(q1, m4));
        const __m512i v3 = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4));
        const float dw = _cvtsh_ss(rd16(b));
        for (int t = 0; t < NT; t++) {
            const int8_t *aq = a[t].q + 256 * i;
            __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v0, _mm512_load_si512((const void *)aq));
            p0 = _mm512_dpbusd_epi32(p0, v1, _mm512_load_si512((const void *)(aq + 64)));
            __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v2, _mm512_load_si512((const void *)(aq + 128)));
            p1 = _mm512_dpbusd_epi32(p1, v3, _mm512_load_si512((const void *)(aq + 192)));
            __m512i s = _mm512_add_epi32(_mm512_mullo_epi32(p0, sa), _mm512_mullo_epi32(p1, sb));
            const __m128i c = _mm_madd_epi16(sc16, _mm_loadu_si128((const __m128i *)(a[t].bs32 + 8 * i)));
            s = _mm512_sub_epi32(s, _mm512_zextsi128_si512(_mm_slli_epi32(c, 7)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(dw * a[t].d[i]), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * os] = _mm512_reduce_add_ps(acc[t]);
}
NT_DISPATCH(iq4xs_512, T512, 4)

/* Grid types, 64 weights per step.  Rows come from the "+64" copy of the IQ2 / IQ3 grids (G = 64 + |g|, see
 * "IQ codebooks"), so the sign is one masked byte subtract: u = G, or 128 - G where the weight's sign bit is set,
 * with the 64 sign bits of the step in a mask register (IQ2_S / IQ3_S store them as plain bits; IQ2_XXS /
 * IQ2_XS / IQ3_XXS as ksign bytes, built for the whole block at once).  IQ1: u = row + 2 on the weights with
 * delta +1/8 (masked add).  Then maddubs + dpwssd on 512 bits as before. */
/* 4 / 8 rows of 8 bytes: scalar loads merged with masked broadcasts (ALU blends; measured faster than vpinsrq /
 * vinserti128 and than vpgatherqq) */
AI T512 __m256i rows4_512(const uint64_t *t, uint32_t i0, uint32_t i1, uint32_t i2, uint32_t i3) {
    __m256i v = _mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)(t + i0)));
    v = _mm256_mask_blend_epi64(0x2, v, _mm256_set1_epi64x((long long)t[i1]));
    v = _mm256_mask_blend_epi64(0x4, v, _mm256_set1_epi64x((long long)t[i2]));
    return _mm256_mask_blend_epi64(0x8, v, _mm256_set1_epi64x((long long)t[i3]));
}
/* 4 rows of 8 bytes, indices in the W-bit fields of x */
AI T512 __m256i rows4w_512(const uint64_t *t, uint64_t x, const int W) {
    const uint64_t m = W == 8 ? 0xFF : 0xFFFF;
    return rows4_512(t, (uint32_t)(x & m), (uint32_t)((x >> W) & m), (uint32_t)((x >> 2 * W) & m), (uint32_t)((x >> 3 * W) & m));
}
AI T512 __m512i rows8w_512(const uint64_t *t, uint64_t x0, uint64_t x1, const int W) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(rows4w_512(t, x0, W)), rows4w_512(t, x1, W), 1);
}
/* 8 rows of 4 bytes (IQ3), indices in the W-bit fields of x0 (then x1 for W = 16) */
AI T512 __m256i rows8d_512(const uint32_t *t, uint64_t x0, uint64_t x1, const int W) {
    const uint64_t m = W == 8 ? 0xFF : 0xFFFF;
#define K2K_Q(j) (uint32_t)(W == 8 ? (x0 >> (8 * (j))) & m : ((j) < 4 ? x0 >> (16 * (j)) : x1 >> (16 * ((j) - 4))) & m)
    __m256i v = _mm256_castsi128_si256(_mm_cvtsi32_si128((int)t[K2K_Q(0)]));
    v = _mm256_mask_blend_epi32(0x02, v, _mm256_set1_epi32((int)t[K2K_Q(1)]));
    v = _mm256_mask_blend_epi32(0x04, v, _mm256_set1_epi32((int)t[K2K_Q(2)]));
    v = _mm256_mask_blend_epi32(0x08, v, _mm256_set1_epi32((int)t[K2K_Q(3)]));
    v = _mm256_mask_blend_epi32(0x10, v, _mm256_set1_epi32((int)t[K2K_Q(4)]));
    v = _mm256_mask_blend_epi32(0x20, v, _mm256_set1_epi32((int)t[K2K_Q(5)]));
    v = _mm256_mask_blend_epi32(0x40, v, _mm256_set1_epi32((int)t[K2K_Q(6)]));
    return _mm256_mask_blend_epi32(0x80, v, _mm256_set1_epi32((int)t[K2K_Q(7)]));
#undef K2K_Q
}
/* 16 IQ3 rows: indices bytes at q8 (IQ3_XXS) or uint16 at q16 (IQ3_S) */
AI T512 __m512i rows16d_512(const uint32_t *t, const uint8_t *q8, const uint16_t *q16) {
    __m256i lo, hi;
    if (q8) {
        lo = rows8d_512(t, idx_word(q8), 0, 8), hi = rows8d_512(t, idx_word(q8 + 8), 0, 8);
    } else {
        lo = rows8d_512(t, idx_word(q16), idx_word(q16 + 4), 16), hi = rows8d_512(t, idx_word(q16 + 8), idx_word(q16 + 12), 16);
    }
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
AI T512 __m512i rows8ix_512(const uint64_t *t, const uint16_t *ix) { return rows8w_512(t, idx_word(ix), idx_word(ix + 4), 16); }

/* the 64 sign bits of step k (weights 64k .. 64k+63); sq: the block's ksign bytes (iq_signs_vec) */
AI T512 __mmask64 iq_smask_512(const uint8_t *b, int k, const int TY, const uint64_t *sq) {
    if (TY == IQD_2S) return (__mmask64)rd64(b + 34 + 8 * k);
    if (TY == IQD_3S) return (__mmask64)rd64(b + 74 + 8 * k);
    if (TY == IQD_2XXS) return (__mmask64)sq[k == 1 ? 2 : k == 2 ? 1 : k]; /* iq_signs_vec's order */
    return (__mmask64)sq[k];
}
/* weights 64k .. 64k+63 of the block as u bytes */
AI T512 __m512i iq_chunk_512(const uint8_t *b, int k, const int TY, const uint64_t *sq, const uint16_t *ix) {
    const __m512i c128 = _mm512_set1_epi8((char)128), two = _mm512_set1_epi8(2);
    __m512i g;
    switch (TY) {
    case IQD_2XXS: {
        const uint8_t *q = b + 2 + 16 * k;
        g = rows8w_512(g_iq2xxs + 256, idx_word(q), idx_word(q + 8), 8);
        break;
    }
    case IQD_2XS: {
        const uint8_t *q = b + 2 + 16 * k; /* low 9 bits of each uint16 */
        const uint64_t m9 = 0x01FF01FF01FF01FFULL;
        g = rows8w_512(g_iq2xs + 512, idx_word(q) & m9, idx_word(q + 8) & m9, 16);
        break;
    }
    case IQD_2S: g = rows8ix_512(g_iq2s + 1024, ix + 8 * k); break;
    case IQD_3XXS: g = rows16d_512(g_iq3xxs + 256, b + 2 + 16 * k, NULL); break;
    case IQD_3S: g = rows16d_512(g_iq3s + 512, NULL, ix + 16 * k); break;
    case IQD_1S: {
        g = rows8ix_512(g_iq1s, ix + 8 * k);
        /* +2 on the 32 weights of each sub-block whose delta is +1/8 (bit 15 of its qh clear) */
        const uint64_t m = (rd16(b + 34 + 4 * k) >> 15 ? 0 : 0xFFFFFFFFULL) | (rd16(b + 36 + 4 * k) >> 15 ? 0 : 0xFFFFFFFF00000000ULL);
        return _mm512_mask_add_epi8(g, (__mmask64)m, g, two);
    }
    default: { /* IQ1_M: +2 on the 8 weights of each group whose nibble has bit 3 clear */
        g = rows8ix_512(g_iq1s, ix + 8 * k);
        const uint64_t plus = _pdep_u64(~_pext_u32(rd32(b + 32 + 4 * k), 0x88888888u) & 0xFF, 0x0101010101010101ULL) * 0xFF;
        return _mm512_mask_add_epi8(g, (__mmask64)plus, g, two);
    }
    }
    return _mm512_mask_sub_epi8(g, iq_smask_512(b, k, TY, sq), c128, g);
}

/* A block's ksign bytes and grid indices, stored one block ahead of their use (a load right after the vector store
 * it reads from waits for the store: much slower than a load from L1) */
AI T512 void iq_prep_512(const uint8_t *b, const int TY, uint64_t *sq, uint16_t *ix) {
    if (TY == IQD_2XXS || TY == IQD_2XS || TY == IQD_3XXS) _mm256_store_si256((__m256i *)sq, iq_signs_vec(b, TY));
    if (iq_has_ix(TY) && TY != IQD_2XS) iq_index_vec(b, TY, ix);
}
/* One decoded IQ block (256 unsigned weights u0..u3 = value + offset, int16 sub-block scales s0..s3 / sc16) against
 * NT tokens: the offset comes back out through the activations' 16-value sums. */
AI T512 void iq_dot_tokens_512(__m512i u0, __m512i u1, __m512i u2, __m512i u3, __m512i s0, __m512i s1, __m512i s2,
                               __m512i s3, __m256i sc16, __m256i offv, float dw, const act_t *a, int i, const int NT,
                               __m512 *acc) {
    for (int t = 0; t < NT; t++) {
        const int8_t *aq = a[t].q + 256 * i;
        __m512i s = _mm512_madd_epi16(_mm512_maddubs_epi16(u0, _mm512_load_si512((const void *)aq)), s0);
        s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(u1, _mm512_load_si512((const void *)(aq + 64))), s1);
        s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(u2, _mm512_load_si512((const void *)(aq + 128))), s2);
        s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(u3, _mm512_load_si512((const void *)(aq + 192))), s3);
        const __m256i c = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)(a[t].bs16 + 16 * i)));
        s = _mm512_sub_epi32(s, _mm512_zextsi256_si512(_mm256_mullo_epi32(c, offv)));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(dw * a[t].d[i]), acc[t]);
    }
}

AI T512 void iq_512_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf, const int TY) {
    const int bpb = iq_bpb(TY);
    const __m512i ix0 = IXLOAD(ix_q6, 0), ix1 = IXLOAD(ix_q6, 1), ix2 = IXLOAD(ix_q6, 2), ix3 = IXLOAD(ix_q6, 3);
    const __m256i offv = _mm256_set1_epi32(iq_off(TY));
    __m512 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    uint64_t sqb[2][4] __attribute__((aligned(32)));
    uint16_t ixb[2][64] __attribute__((aligned(32)));
    if (nb > 0) iq_prep_512(w, TY, sqb[0], ixb[0]);
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + (size_t)bpb * i;
        pf_block(pf, i, bpb);
        const __m256i sc16 = iq_scales(b, TY);
        const __m512i scz = _mm512_castsi256_si512(sc16);
        const __m512i s0 = _mm512_permutexvar_epi16(ix0, scz), s1 = _mm512_permutexvar_epi16(ix1, scz);
        const __m512i s2 = _mm512_permutexvar_epi16(ix2, scz), s3 = _mm512_permutexvar_epi16(ix3, scz);
        const uint64_t *sq = sqb[i & 1];
        const uint16_t *ix = ixb[i & 1];
        const __m512i u0 = iq_chunk_512(b, 0, TY, sq, ix), u1 = iq_chunk_512(b, 1, TY, sq, ix);
        const __m512i u2 = iq_chunk_512(b, 2, TY, sq, ix), u3 = iq_chunk_512(b, 3, TY, sq, ix);
        if (i + 1 < nb) iq_prep_512(b + bpb, TY, sqb[(i + 1) & 1], ixb[(i + 1) & 1]);
        const float dw = iq_d(b, TY) * iq_fac(TY);
        iq_dot_tokens_512(u0, u1, u2, u3, s0, s1, s2, s3, sc16, offv, dw, a, i, NT, acc);
    }
    for (int t = 0; t < NT; t++) out[t * os] = _mm512_reduce_add_ps(acc[t]);
}
#define IQ512(name, TY)                                                                                            \
    AI T512 void name##_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os,         \
                           const uint8_t *pf) {                                                                     \
        iq_512_body(w, nb, a, NT, out, os, pf, TY);                                                                 \
    }                                                                                                               \
    NT_DISPATCH(name, T512, 4)
IQ512(iq2xxs_512, IQD_2XXS)
IQ512(iq2xs_512, IQD_2XS)
IQ512(iq2s_512, IQD_2S)
IQ512(iq3xxs_512, IQD_3XXS)
IQ512(iq3s_512, IQD_3S)
IQ512(iq1s_512, IQD_1S)
IQ512(iq1m_512, IQD_1M)

/* IQ3_XXS / IQ3_S with AVX512_VBMI: the 256 / 512-row grid (+64) held as four 256 / 512-byte planes (byte p of
 * every row, see "IQ codebooks") and looked up with vpermi2b, 64 indices per 2 (IQ3_S: 4) lookups and blends,
 * instead of 64 scalar row loads.  The
 * four planes are interleaved back into rows with two rounds of in-lane unpacks; the indices are pre-permuted
 * (transposing 4-row groups) so that the unpacks leave rows 16k .. 16k+15 in vector k. */
static const uint8_t iq3_vperm[64] __attribute__((aligned(64))) = {
     0,  1,  2,  3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51,  4,  5,  6,  7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
     8,  9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
AI T512V void iq3_vbmi_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf, const int TY) {
    const int S = TY == IQD_3S, bpb = iq_bpb(TY); /* IQ3_S: 512 rows, index bit 8 from the qh bits at b + 66 */
    const uint8_t *pl = S ? (const uint8_t *)(g_iq3s + 1024) : (const uint8_t *)(g_iq3xxs + 512); /* after rows, rows + 64 */
    const __m512i ix0 = IXLOAD(ix_q6, 0), ix1 = IXLOAD(ix_q6, 1), ix2 = IXLOAD(ix_q6, 2), ix3 = IXLOAD(ix_q6, 3);
    const __m512i perm = _mm512_load_si512((const void *)iq3_vperm), c128 = _mm512_set1_epi8((char)128);
    const __m256i offv = _mm256_set1_epi32(64);
    __m512 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    uint64_t sqb[2][4] __attribute__((aligned(32)));
    if (nb > 0 && !S) _mm256_store_si256((__m256i *)sqb[0], iq_signs_vec(w, TY));
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + (size_t)bpb * i;
        pf_block(pf, i, bpb);
        const __m256i sc16 = iq_scales(b, TY);
        const __m512i scz = _mm512_castsi256_si512(sc16);
        const __m512i s0 = _mm512_permutexvar_epi16(ix0, scz), s1 = _mm512_permutexvar_epi16(ix1, scz);
        const __m512i s2 = _mm512_permutexvar_epi16(ix2, scz), s3 = _mm512_permutexvar_epi16(ix3, scz);
        const uint64_t *sq = sqb[i & 1]; /* (IQ3_S: plain sign bits at b + 74) */
        const __m512i ixp = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512((const void *)(b + 2)));
        const __mmask64 hi = _mm512_movepi8_mask(ixp);
        __m512i P[4];
        if (S) {
            const __mmask64 h8 = _mm512_movepi8_mask(_mm512_permutexvar_epi8(perm, _mm512_movm_epi8((__mmask64)rd64(b + 66))));
            for (int p = 0; p < 4; p++) {
                const __m512i *T = (const __m512i *)(pl + 512 * p);
                const __m512i lo = _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(_mm512_load_si512(T), ixp, _mm512_load_si512(T + 1)),
                                                          _mm512_permutex2var_epi8(_mm512_load_si512(T + 2), ixp, _mm512_load_si512(T + 3)));
                const __m512i up = _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(_mm512_load_si512(T + 4), ixp, _mm512_load_si512(T + 5)),
                                                          _mm512_permutex2var_epi8(_mm512_load_si512(T + 6), ixp, _mm512_load_si512(T + 7)));
                P[p] = _mm512_mask_blend_epi8(h8, lo, up);
            }
        } else {
            for (int p = 0; p < 4; p++) {
                const __m512i *T = (const __m512i *)(pl + 256 * p);
                P[p] = _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(_mm512_load_si512(T), ixp, _mm512_load_si512(T + 1)),
                                              _mm512_permutex2var_epi8(_mm512_load_si512(T + 2), ixp, _mm512_load_si512(T + 3)));
            }
        }
        const __m512i l01 = _mm512_unpacklo_epi8(P[0], P[1]), h01 = _mm512_unpackhi_epi8(P[0], P[1]);
        const __m512i l23 = _mm512_unpacklo_epi8(P[2], P[3]), h23 = _mm512_unpackhi_epi8(P[2], P[3]);
        __m512i u0 = _mm512_unpacklo_epi16(l01, l23), u1 = _mm512_unpackhi_epi16(l01, l23);
        __m512i u2 = _mm512_unpacklo_epi16(h01, h23), u3 = _mm512_unpackhi_epi16(h01, h23);
        u0 = _mm512_mask_sub_epi8(u0, (__mmask64)(S ? rd64(b + 74) : sq[0]), c128, u0);
        u1 = _mm512_mask_sub_epi8(u1, (__mmask64)(S ? rd64(b + 82) : sq[1]), c128, u1);
        u2 = _mm512_mask_sub_epi8(u2, (__mmask64)(S ? rd64(b + 90) : sq[2]), c128, u2);
        u3 = _mm512_mask_sub_epi8(u3, (__mmask64)(S ? rd64(b + 98) : sq[3]), c128, u3);
        if (!S && i + 1 < nb) _mm256_store_si256((__m256i *)sqb[(i + 1) & 1], iq_signs_vec(b + bpb, TY));
        const float dw = iq_d(b, TY) * iq_fac(TY);
        iq_dot_tokens_512(u0, u1, u2, u3, s0, s1, s2, s3, sc16, offv, dw, a, i, NT, acc);
    }
    for (int t = 0; t < NT; t++) out[t * os] = _mm512_reduce_add_ps(acc[t]);
}
AI T512V void iq3xxs_vbmi_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf) {
    iq3_vbmi_body(w, nb, a, NT, out, os, pf, IQD_3XXS);
}
NT_DISPATCH(iq3xxs_vbmi, T512V, 4)
AI T512V void iq3s_vbmi_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf) {
    iq3_vbmi_body(w, nb, a, NT, out, os, pf, IQD_3S);
}
NT_DISPATCH(iq3s_vbmi, T512V, 4)

#endif /* K2K_X86 */
