/* AVX2 per-row kernels of the IQ types (IQ4_NL, IQ4_XS and the codebook types), each also instantiated for AVX-VNNI,
 * and the AVX2-level decode-once path of the codebook types (a row decoded once, then every 4-token tile over it). */
#include "common.h"
#if K2K_X86
#include "avx2.h"
#include "avx2_iq.h"
#include "kernels.h"

/* ------------------------------------------------------------------ AVX2 IQ kernels */

/* IQ4_NL: codebook lookup with vpshufb; maddubs on |v| and the activations with v's sign */
AI T256 void iq4nl_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf,
           const int VN) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)g_kv));
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + 18 * i;
        pf_block(pf, i, 18);
        const __m128i q = _mm_loadu_si128((const __m128i *)(b + 2));
        const __m256i v = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4));
        const __m256i av = _mm256_sign_epi8(v, v);
        const float dw = h2f_256(b);
        for (int t = 0; t < NT; t++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(a[t].q + 32 * i));
            __m256i p = dpbusd_v(av, _mm256_sign_epi8(x, v), VN);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * a[t].d[i]), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * os] = hsum256(acc[t]);
}
NT_BODY(iq4nl_avx2, iq4nl_body, T256, 0)
NT_DISPATCH4_SPLIT(iq4nl_avx2, T256)

/* IQ4_XS 8 six-bit scales - 32 as int8 (low 8 bytes) */
AI T256 __m128i iq4xs_scales8(const uint8_t *b) {
    const uint32_t sh = rd16(b + 2);
    const __m128i sl = _mm_cvtsi32_si128((int)rd32(b + 4));
    const __m128i lo4 = _mm_and_si128(_mm_unpacklo_epi8(sl, _mm_srli_epi16(sl, 4)), _mm_set1_epi8(0x0F));
    const __m128i hi2 = _mm_cvtsi64_si128((long long)(_pdep_u64(sh, 0x0303030303030303ULL) << 4));
    return _mm_sub_epi8(_mm_or_si128(lo4, hi2), _mm_set1_epi8(32));
}

/* IQ4_XS with LAYOUT_IQ4X activations (32 packed bytes = 2 sub-blocks: lo nibbles, then hi nibbles 64 further) */
AI T256 void iq4xs_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf,
           const int VN) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)g_kv));
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + 136 * i;
        pf_block(pf, i, 136);
        const __m256i half = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(iq4xs_scales8(b)));
        const float dw = h2f_256(b);
        __m256i sumi[4];
        for (int t = 0; t < NT; t++) sumi[t] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 8 + 32 * j));
            const __m256i vl = _mm256_shuffle_epi8(lut, _mm256_and_si256(q, m4));
            const __m256i vh = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(q, 4), m4));
            const __m256i al = _mm256_sign_epi8(vl, vl), ah = _mm256_sign_epi8(vh, vh);
            const __m256i s = pair_scales(half, j);
            for (int t = 0; t < NT; t++) {
                const int8_t *aq = a[t].q + 256 * i + 128 * (j / 2) + 32 * (j % 2);
                const __m256i xl = _mm256_load_si256((const __m256i *)aq), xh = _mm256_load_si256((const __m256i *)(aq + 64));
                const __m256i pl = _mm256_maddubs_epi16(al, _mm256_sign_epi8(xl, vl));
                const __m256i ph = _mm256_maddubs_epi16(ah, _mm256_sign_epi8(xh, vh));
                /* each pair sum is up to 2 * 127 * 127: add after widening */
                if (VN) sumi[t] = dpwssd_v(dpwssd_v(sumi[t], pl, s, VN), ph, s, VN);
                else sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(_mm256_madd_epi16(pl, s), _mm256_madd_epi16(ph, s)));
            }
        }
        for (int t = 0; t < NT; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_set1_ps(dw * a[t].d[i]), acc[t]);
    }
    for (int t = 0; t < NT; t++) out[t * os] = hsum256(acc[t]);
}
NT_BODY(iq4xs_avx2, iq4xs_body, T256, 0)
NT_DISPATCH4_SPLIT(iq4xs_avx2, T256)

AI T256 void iq_avx2_body(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf, const int TY,
                          const int VN) {
    const int bpb = iq_bpb(TY);
    const __m256i offv = _mm256_set1_epi32(iq_off(TY));
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    uint16_t ixb[2][64] __attribute__((aligned(32))); /* grid indices (IQ1_M: 32, then 32 offset bytes), */
    if (iq_has_ix(TY) && nb > 0) iq_index_vec(w, TY, ixb[0]);  /* stored one block ahead (see iq_prep_512) */
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + (size_t)bpb * i;
        pf_block(pf, i, bpb);
        const __m256i sc16 = iq_scales(b, TY), sv = iq_signs_vec(b, TY);
        const uint16_t *ix = ixb[i & 1];
        if (iq_has_ix(TY) && i + 1 < nb) iq_index_vec(b + bpb, TY, ixb[(i + 1) & 1]);
        const __m256i half[2] = {_mm256_broadcastsi128_si256(_mm256_castsi256_si128(sc16)),
                                 _mm256_broadcastsi128_si256(_mm256_extracti128_si256(sc16, 1))};
        const float dw = iq_d(b, TY) * iq_fac(TY);
        __m256i sumi[4];
        for (int t = 0; t < NT; t++) sumi[t] = _mm256_setzero_si256();
        if (NT == 1 && iq_signed(TY)) { /* one token: the signs go onto the activations (2 ops, no offset term) */
            for (int c = 0; c < 8; c++) {
                __m256i m;
                const __m256i g = iq_mag_256(b, c, TY, sv, ix, &m), s = pair_scales(half[c / 4], c % 4);
                const __m256i x = _mm256_load_si256((const __m256i *)(a[0].q + 256 * i + 32 * c));
                sumi[0] = dpwssd_v(sumi[0], _mm256_maddubs_epi16(g, _mm256_sub_epi8(_mm256_xor_si256(x, m), m)), s, VN);
            }
            acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[0]), _mm256_set1_ps(dw * a[0].d[i]), acc[0]);
            continue;
        }
        for (int c = 0; c < 8; c++) {
            const __m256i u = iq_chunk_256(b, c, TY, sv, ix), s = pair_scales(half[c / 4], c % 4);
            for (int t = 0; t < NT; t++) {
                const __m256i x = _mm256_load_si256((const __m256i *)(a[t].q + 256 * i + 32 * c));
                sumi[t] = dpwssd_v(sumi[t], _mm256_maddubs_epi16(u, x), s, VN);
            }
        }
        if (VN) { /* the offset as one more vpdpwssd: -OFF x scales (|.| <= 31 x 64) against the sums per 16 */
            const __m256i nso = _mm256_mullo_epi16(sc16, _mm256_set1_epi16((short)-iq_off(TY)));
            for (int t = 0; t < NT; t++) {
                const __m256i s = dpwssd_v(sumi[t], nso, _mm256_loadu_si256((const __m256i *)(a[t].bs16 + 16 * i)), VN);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw * a[t].d[i]), acc[t]);
            }
            continue;
        }
        for (int t = 0; t < NT; t++) {
            const __m256i cr = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)(a[t].bs16 + 16 * i)));
            const __m256i s = _mm256_sub_epi32(sumi[t], _mm256_mullo_epi32(cr, offv));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw * a[t].d[i]), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * os] = hsum256(acc[t]);
}
#define IQ256(name, TY, ATTR, VN)                                                                                  \
    AI ATTR void name##_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os,         \
                           const uint8_t *pf) {                                                                     \
        iq_avx2_body(w, nb, a, NT, out, os, pf, TY, VN);                                                            \
    }                                                                                                               \
    NT_DISPATCH(name, ATTR, 4)
IQ256(iq2xxs_avx2, IQD_2XXS, T256, 0)
IQ256(iq2xs_avx2, IQD_2XS, T256, 0)
IQ256(iq2s_avx2, IQD_2S, T256, 0)
IQ256(iq3xxs_avx2, IQD_3XXS, T256, 0)
IQ256(iq3s_avx2, IQD_3S, T256, 0)
IQ256(iq1s_avx2, IQD_1S, T256, 0)
IQ256(iq1m_avx2, IQD_1M, T256, 0)

/* Codebook types against many tokens (AVX2, with or without VNNI): each row is decoded once (iq_udec) into the
 * IQD_PAN form, and every 4-token tile runs iq_avx2_body over those bytes (the K-quant-like integer dot) instead of
 * decoding the grid rows again per tile.  IQ1's u bytes (OFF 9, at most 18) take 55 more: one OFF for all. */
AI T256 void iq_udec_body(const uint8_t *w, int nb, uint8_t *pan, const int TY) {
    const int bpb = iq_bpb(TY);
    for (int i = 0; i < nb; i++) {
        const uint8_t *b = w + (size_t)bpb * i;
        uint8_t *p = pan + (size_t)UPAN_BPB * i;
        iq_u64_block(b, TY, p);
        _mm256_store_si256((__m256i *)(p + 256), iq_scales(b, TY));
        const float dw = iq_d(b, TY) * iq_fac(TY);
        memcpy(p + 288, &dw, 4);
    }
}
IQ256(iqpan_avx2, IQD_PAN, T256, 0)
#define IQ_UDEC(name, TY)                                                                                            \
    T256 static void name(const uint8_t *w, int nb, uint8_t *pan) { iq_udec_body(w, nb, pan, TY); }
IQ_UDEC(udec_iq2xxs, IQD_2XXS)
IQ_UDEC(udec_iq2xs, IQD_2XS)
IQ_UDEC(udec_iq2s, IQD_2S)
IQ_UDEC(udec_iq3xxs, IQD_3XXS)
IQ_UDEC(udec_iq3s, IQD_3S)
IQ_UDEC(udec_iq1s, IQD_1S)
IQ_UDEC(udec_iq1m, IQD_1M)



/* the AVX-VNNI instantiations (VN = 1) */
NT_BODY(iq4nl_vnni, iq4nl_body, TVNNI, 1)
NT_BODY(iq4xs_vnni, iq4xs_body, TVNNI, 1)
NT_DISPATCH(iq4nl_vnni, TVNNI, 2)
NT_DISPATCH(iq4xs_vnni, TVNNI, 2)
IQ256(iq2xxs_vnni, IQD_2XXS, TVNNI, 1)
IQ256(iq2xs_vnni, IQD_2XS, TVNNI, 1)
IQ256(iq2s_vnni, IQD_2S, TVNNI, 1)
IQ256(iq3xxs_vnni, IQD_3XXS, TVNNI, 1)
IQ256(iq3s_vnni, IQD_3S, TVNNI, 1)
IQ256(iq1s_vnni, IQD_1S, TVNNI, 1)
IQ256(iq1m_vnni, IQD_1M, TVNNI, 1)
IQ256(iqpan_vnni, IQD_PAN, TVNNI, 1)

/* the AVX2-level decode-once path of the codebook types */
void upan_attach(kern_t *k, int type) {
    switch (type) {
    case GT_IQ2_XXS: k->udec = udec_iq2xxs; break;
    case GT_IQ2_XS: k->udec = udec_iq2xs; break;
    case GT_IQ2_S: k->udec = udec_iq2s; break;
    case GT_IQ3_XXS: k->udec = udec_iq3xxs; break;
    case GT_IQ3_S: k->udec = udec_iq3s; break;
    case GT_IQ1_S: k->udec = udec_iq1s; break;
    case GT_IQ1_M: k->udec = udec_iq1m; break;
    default: return;
    }
    k->upan = g_avxvnni ? iqpan_vnni : iqpan_avx2;
}

#endif /* K2K_X86 */
