/* Decoding IQ blocks with AVX2 (x86 only): grid rows, signs, indices and scales of the codebook types, 32 weights
 * (iq_chunk_256) or a whole block (iq_u64_block) at a time as unsigned bytes.  Used by the AVX2 / AVX-VNNI IQ kernels
 * (avx2_iq.c), the AVX-512 ones (avx512_iq.c: indices, signs, scales) and the decode-once GEMM's row decoder (gemm.c). */
#ifndef K2K_AVX2_IQ_H
#define K2K_AVX2_IQ_H
#include "common.h"
#if K2K_X86
#include "avx2.h"

/* Grid types (IQ2_*, IQ3_*, IQ1_*): each 32 weights become unsigned bytes u = OFF + (signed integer weight):
 * OFF = 64 for the sign + magnitude grids (|w| <= 63), 9 for IQ1 (8 g +- 1, g in {-1, 0, 1}).  Then the K-quant
 * path: maddubs(u, x) (u <= 127: no saturation), madd with one int16 scale per 16 weights, and the OFF term taken
 * back with the activation sums per 16.  All integer inside a block; a float factor folds 1/8, 1/4. */
/* IQD_PAN: not a GGUF type but a row of any of them decoded once (iq_udec_body, for many tokens): per block its 256 u
 * bytes with OFF = 64, the 16 int16 scales, the float block scale (times the type's factor) */
enum { IQD_2XXS, IQD_2XS, IQD_2S, IQD_3XXS, IQD_3S, IQD_1S, IQD_1M, IQD_PAN };

AI T256 int iq_bpb(const int TY) {
    return TY == IQD_2XXS ? 66 : TY == IQD_2XS ? 74 : TY == IQD_2S ? 82 : TY == IQD_3XXS ? 98 : TY == IQD_3S ? 110
         : TY == IQD_1S ? 50 : TY == IQD_1M ? 56 : UPAN_BPB;
}
AI T256 int iq_off(const int TY) { return TY == IQD_1S || TY == IQD_1M ? 9 : 64; }
AI T256 float iq_fac(const int TY) { return TY == IQD_3S || TY == IQD_PAN ? 1.f : TY == IQD_3XXS ? 0.25f : 0.125f; }

/* u = 64 + g, or 64 - g where the byte mask m is 0xFF */
AI T256 __m256i u_masked_256(__m256i g, __m256i m) {
    return _mm256_add_epi8(_mm256_set1_epi8(64), _mm256_sub_epi8(_mm256_xor_si256(g, m), m));
}
/* 8 int16 (one per 32 weights) -> 16 int16 (one per 16 weights) */
AI T256 __m256i dup16(__m128i s8) { return _mm256_set_m128i(_mm_unpackhi_epi16(s8, s8), _mm_unpacklo_epi16(s8, s8)); }
/* 8 nibbles (4 bytes) -> 8 int16 odd scales 2 n + 1 in nibble order */
AI T256 __m128i nib_scales8(uint32_t v) {
    const __m128i x = _mm_cvtsi32_si128((int)v);
    const __m128i n = _mm_and_si128(_mm_unpacklo_epi8(x, _mm_srli_epi16(x, 4)), _mm_set1_epi8(0x0F));
    const __m128i s = _mm_cvtepu8_epi16(n);
    return _mm_add_epi16(_mm_add_epi16(s, s), _mm_set1_epi16(1));
}

/* the block's 16 int16 scales (one per 16 weights) */
AI T256 __m256i iq_scales(const uint8_t *b, const int TY) {
    const __m256i one = _mm256_set1_epi16(1);
    switch (TY) {
    case IQD_PAN: return _mm256_load_si256((const __m256i *)(b + 256));
    case IQD_2XXS: { /* 4 high bits of the second uint32 of each 8-byte sub-block */
        const __m256i t0 = _mm256_srli_epi64(_mm256_loadu_si256((const __m256i *)(b + 2)), 60);
        const __m256i t1 = _mm256_srli_epi64(_mm256_loadu_si256((const __m256i *)(b + 34)), 60);
        const __m256i p = _mm256_packs_epi32(_mm256_or_si256(t0, _mm256_slli_epi64(t0, 32)), _mm256_or_si256(t1, _mm256_slli_epi64(t1, 32)));
        const __m256i s = _mm256_permute4x64_epi64(p, 0xD8);
        return _mm256_add_epi16(_mm256_add_epi16(s, s), one);
    }
    case IQD_3XXS: { /* 4 high bits of each uint32 at b + 66 */
        __m256i t = _mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)(b + 66)), 28);
        t = _mm256_or_si256(t, _mm256_slli_epi32(t, 16));
        return _mm256_add_epi16(_mm256_add_epi16(t, t), one);
    }
    case IQD_2XS: case IQD_2S: { /* 16 nibbles at b + 66 / b + 74 */
        const uint8_t *p = b + (TY == IQD_2XS ? 66 : 74);
        return _mm256_set_m128i(nib_scales8(rd32(p + 4)), nib_scales8(rd32(p)));
    }
    case IQD_3S: return dup16(nib_scales8(rd32(b + 106))); /* 8 nibbles, one per 32 */
    case IQD_1S: { /* bits 12..14 of each uint16 at b + 34 */
        const __m128i h = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i *)(b + 34)), 12), _mm_set1_epi16(7));
        return dup16(_mm_add_epi16(_mm_add_epi16(h, h), _mm_set1_epi16(1)));
    }
    default: { /* IQ1_M: 4 x uint16 at b + 48, 3 bits per 16 weights (shift left by multiplying, then right by 9) */
        const __m128i r = _mm_loadl_epi64((const __m128i *)(b + 48));
        const __m128i w01 = _mm_shuffle_epi8(r, _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3));
        const __m128i w23 = _mm_shuffle_epi8(r, _mm_setr_epi8(4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7));
        __m256i s = _mm256_mullo_epi16(_mm256_set_m128i(w23, w01), _mm256_setr_epi16(512, 64, 8, 1, 512, 64, 8, 1, 512, 64, 8, 1, 512, 64, 8, 1));
        s = _mm256_and_si256(_mm256_srli_epi16(s, 9), _mm256_set1_epi16(7));
        return _mm256_add_epi16(_mm256_add_epi16(s, s), one);
    }
    }
}

AI T256 float iq_d(const uint8_t *b, const int TY) {
    if (TY == IQD_PAN) {
        float d;
        memcpy(&d, b + 288, 4);
        return d;
    }
    if (TY == IQD_1M) {
        const uint32_t s0 = rd16(b + 48), s1 = rd16(b + 50), s2 = rd16(b + 52), s3 = rd16(b + 54);
        return _cvtsh_ss((uint16_t)((s0 >> 12) | ((s1 >> 8) & 0xF0) | ((s2 >> 4) & 0xF00) | (s3 & 0xF000)));
    }
    return _cvtsh_ss(rd16(b));
}

/* four 8-byte grid rows */
/* Grid indices are read 4 or 8 at a time as one 64-bit word and split with shifts (the empty asm keeps the
 * compiler from turning that back into one byte / word load per index: loads are the scarcer resource here) */
AI uint64_t idx_word(const void *p) {
    uint64_t x;
    memcpy(&x, p, 8);
    __asm__("" : "+r"(x));
    return x;
}
/* four 8-byte grid rows */
AI T256 __m256i rows4(const uint64_t *tab, uint32_t i0, uint32_t i1, uint32_t i2, uint32_t i3) {
    return _mm256_set_epi64x((long long)tab[i3], (long long)tab[i2], (long long)tab[i1], (long long)tab[i0]);
}
/* the same, indices in the W-bit fields of x */
AI T256 __m256i rows4x(const uint64_t *tab, uint64_t x, const int W) {
    const uint64_t m = W == 8 ? 0xFF : 0xFFFF;
    return rows4(tab, (uint32_t)(x & m), (uint32_t)((x >> W) & m), (uint32_t)((x >> 2 * W) & m), (uint32_t)((x >> 3 * W) & m));
}
/* four rows with the indices at ix */
AI T256 __m256i rows4ix(const uint64_t *tab, const uint16_t *ix) {
    return rows4x(tab, idx_word(ix), 16);
}
/* eight 4-byte grid rows (IQ3), indices in the W-bit fields of x0 (then x1 for W = 16) */
AI T256 __m256i rows8dx(const uint32_t *t, uint64_t x0, uint64_t x1, const int W) {
    const uint64_t m = W == 8 ? 0xFF : 0xFFFF;
#define K2K_Q(j) (uint32_t)(W == 8 ? (x0 >> (8 * (j))) & m : ((j) < 4 ? x0 >> (16 * (j)) : x1 >> (16 * ((j) - 4))) & m)
    return _mm256_setr_epi32((int)t[K2K_Q(0)], (int)t[K2K_Q(1)], (int)t[K2K_Q(2)], (int)t[K2K_Q(3)], (int)t[K2K_Q(4)],
                             (int)t[K2K_Q(5)], (int)t[K2K_Q(6)], (int)t[K2K_Q(7)]);
#undef K2K_Q
}

/* Sign bytes of a whole IQ2_XXS / IQ3_XXS block at once: the 8 uint32 words holding four 7-bit sign indices each
 * (IQ2_XXS: sub-blocks in the dword order 0 1 4 5 2 3 6 7) -> 32 sign bytes (index | parity << 7, as ksigns), one
 * dword per 32 weights.  ~20 vector instructions per block instead of ~12 per 32 weights. */
AI T256 __m256i ksign_bytes_vec(__m256i d) {
    const __m256i m7 = _mm256_set1_epi32(0x7F);
    __m256i x = _mm256_or_si256(_mm256_and_si256(d, m7), _mm256_and_si256(_mm256_slli_epi32(d, 1), _mm256_slli_epi32(m7, 8)));
    x = _mm256_or_si256(x, _mm256_and_si256(_mm256_slli_epi32(d, 2), _mm256_slli_epi32(m7, 16)));
    x = _mm256_or_si256(x, _mm256_and_si256(_mm256_slli_epi32(d, 3), _mm256_slli_epi32(m7, 24)));
    const __m256i plut = _mm256_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0,
                                          0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i par = _mm256_xor_si256(_mm256_shuffle_epi8(plut, _mm256_and_si256(x, m4)),
                                         _mm256_shuffle_epi8(plut, _mm256_and_si256(_mm256_srli_epi16(x, 4), m4)));
    return _mm256_or_si256(x, par);
}
/* the block's sign dwords (IQ2_XXS: odd dwords of its two 32-byte halves; IQ3_XXS: the 8 words at b + 66) */
AI T256 __m256i iq_signs_vec(const uint8_t *b, const int TY) {
    if (TY == IQD_2XXS) {
        const __m256 l0 = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(b + 2)));
        const __m256 l1 = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(b + 34)));
        return ksign_bytes_vec(_mm256_castps_si256(_mm256_shuffle_ps(l0, l1, 0xDD))); /* ib 0 1 4 5 | 2 3 6 7 */
    }
    if (TY == IQD_3XXS) return ksign_bytes_vec(_mm256_loadu_si256((const __m256i *)(b + 66)));
    if (TY == IQD_2XS) { /* 7-bit index in the top bits of each uint16: pack to bytes, add the parity bit */
        const __m256i s0 = _mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(b + 2)), 9);
        const __m256i s1 = _mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(b + 34)), 9);
        const __m256i x = _mm256_permute4x64_epi64(_mm256_packus_epi16(s0, s1), 0xD8);
        const __m256i plut = _mm256_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0,
                                              0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0);
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        return _mm256_or_si256(x, _mm256_xor_si256(_mm256_shuffle_epi8(plut, _mm256_and_si256(x, m4)),
                                                   _mm256_shuffle_epi8(plut, _mm256_and_si256(_mm256_srli_epi16(x, 4), m4))));
    }
    if (TY == IQD_2S) return _mm256_loadu_si256((const __m256i *)(b + 34)); /* explicit sign bits */
    if (TY == IQD_3S) return _mm256_loadu_si256((const __m256i *)(b + 74));
    return _mm256_setzero_si256();
}
/* 32 sign bits (dword `pos` of sv) -> 32 bytes, 0xFF where set */
AI T256 __m256i sign_dword_to_bytes(__m256i sv, int pos) {
    const __m256i v = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(sv, _mm256_set1_epi32(pos)),
                                          _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}
/* IQ2_XXS (sv in the order 0 1 4 5 | 2 3 6 7 of sub-blocks): the sign dwords of sub-blocks 4h .. 4h + 3 brought to
 * both 128-bit lanes by one vpermq per half block, then one vpshufb with a constant mask per sub-block.  Kernel-only,
 * one core, Zen 3, one token: 1.16-1.22x over sign_dword_to_bytes's vpermd by an index vector; the same change made
 * IQ2_XS / IQ2_S 0.84-0.91x and IQ3_* 0.98-1.00x, so they keep that. */
#define K2K_S8(x) x, x, x, x, x, x, x, x
static const int8_t sign_spread[4][32] __attribute__((aligned(32))) = {
    {K2K_S8(0), K2K_S8(1), K2K_S8(2), K2K_S8(3)},     {K2K_S8(4), K2K_S8(5), K2K_S8(6), K2K_S8(7)},
    {K2K_S8(8), K2K_S8(9), K2K_S8(10), K2K_S8(11)},   {K2K_S8(12), K2K_S8(13), K2K_S8(14), K2K_S8(15)}};
#undef K2K_S8
AI T256 __m256i sign_bytes_2xxs(__m256i sv, int c) {
    const __m256i h = c < 4 ? _mm256_permute4x64_epi64(sv, 0x88) : _mm256_permute4x64_epi64(sv, 0xDD);
    const __m256i v = _mm256_shuffle_epi8(h, _mm256_load_si256((const __m256i *)sign_spread[c % 4]));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

/* types whose grid index mixes bits from two places: true when iq_index_vec fills ix */
AI T256 int iq_has_ix(const int TY) { return TY == IQD_1S || TY == IQD_1M || TY == IQD_2XS || TY == IQD_2S || TY == IQD_3S; }

/* The block's grid indices at once, 16 per vector, stored for the row loads (IQ1_S / IQ1_M / IQ2_XS / IQ2_S: 32,
 * IQ3_S: 64); a scalar shift-mask-or per index cost more than the row load itself. */
AI T256 void iq_index_vec(const uint8_t *b, const int TY, uint16_t *ix) {
    if (TY == IQD_2XS) { /* low 9 bits of each uint16 */
        for (int k = 0; k < 2; k++)
            _mm256_store_si256((__m256i *)(ix + 16 * k), _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(b + 2 + 32 * k)),
                                                                          _mm256_set1_epi16(511)));
    } else if (TY == IQD_2S) { /* qs[g] | bits 2 (g % 4), +1 of qh[g / 4], << 8 */
        const __m128i qh = _mm_loadl_epi64((const __m128i *)(b + 66));
        const __m256i mul = _mm256_setr_epi16(256, 64, 16, 4, 256, 64, 16, 4, 256, 64, 16, 4, 256, 64, 16, 4);
        for (int k = 0; k < 2; k++) {
            const __m256i q = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 2 + 16 * k)));
            const __m128i rep = _mm_shuffle_epi8(qh, k ? _mm_setr_epi8(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7)
                                                       : _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
            const __m256i h = _mm256_and_si256(_mm256_mullo_epi16(_mm256_cvtepu8_epi16(rep), mul), _mm256_set1_epi16(0x300));
            _mm256_store_si256((__m256i *)(ix + 16 * k), _mm256_or_si256(q, h));
        }
    } else if (TY == IQD_3S) { /* qs[k] | bit k of the 64-bit qh, << 8 */
        const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, -32768);
        for (int k = 0; k < 4; k++) {
            const __m256i q = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 2 + 16 * k)));
            const __m256i hb = _mm256_and_si256(_mm256_set1_epi16((short)rd16(b + 66 + 2 * k)), bit);
            const __m256i h = _mm256_and_si256(_mm256_cmpeq_epi16(hb, bit), _mm256_set1_epi16(256));
            _mm256_store_si256((__m256i *)(ix + 16 * k), _mm256_or_si256(q, h));
        }
    } else if (TY == IQD_1S) { /* qs[g] | bits 3 (g % 4) .. +2 of the uint16 qh[g / 4], << 8 */
        const __m256i hv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(b + 34)));
        for (int k = 0; k < 2; k++) {
            const __m256i q = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 2 + 16 * k)));
            const __m256i h = _mm256_shuffle_epi8(hv, k ? _mm256_setr_epi8(8, 9, 8, 9, 8, 9, 8, 9, 10, 11, 10, 11, 10, 11, 10, 11,
                                                                           12, 13, 12, 13, 12, 13, 12, 13, 14, 15, 14, 15, 14, 15, 14, 15)
                                                        : _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3,
                                                                           4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7));
            /* (h >> 3l) << 8: h * 2^(8 - 3l) for l < 3, h >> 1 for l = 3 */
            const __m256i lo = _mm256_mullo_epi16(h, _mm256_setr_epi16(256, 32, 4, 0, 256, 32, 4, 0, 256, 32, 4, 0, 256, 32, 4, 0));
            const __m256i hi = _mm256_srli_epi16(h, 1);
            const __m256i sh = _mm256_blend_epi16(lo, hi, 0x88);
            _mm256_store_si256((__m256i *)(ix + 16 * k), _mm256_or_si256(q, _mm256_and_si256(sh, _mm256_set1_epi16(0x700))));
        }
    } else { /* IQ1_M: qs[g] | low 3 bits of nibble g % 2 of qh[g / 2], << 8 */
        const __m128i qh = _mm_loadu_si128((const __m128i *)(b + 32));
        const __m256i mul = _mm256_setr_epi16(256, 16, 256, 16, 256, 16, 256, 16, 256, 16, 256, 16, 256, 16, 256, 16);
        for (int k = 0; k < 2; k++) {
            const __m256i q = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 16 * k)));
            const __m256i h = _mm256_cvtepu8_epi16(k ? _mm_unpackhi_epi8(qh, qh) : _mm_unpacklo_epi8(qh, qh));
            const __m256i sh = _mm256_and_si256(_mm256_mullo_epi16(h, mul), _mm256_set1_epi16(0x700));
            _mm256_store_si256((__m256i *)(ix + 16 * k), _mm256_or_si256(q, sh));
        }
        /* per-group offset byte after the 32 indices: 2 for delta +1/8 (bit 3 of the nibble clear), 0 for -1/8 */
        const __m128i lo = _mm_and_si128(qh, _mm_set1_epi8(0x08)), hi = _mm_and_si128(_mm_srli_epi16(qh, 4), _mm_set1_epi8(0x08));
        const __m128i two = _mm_set1_epi8(2), z = _mm_setzero_si128();
        _mm_store_si128((__m128i *)(ix + 32), _mm_and_si128(_mm_cmpeq_epi8(_mm_unpacklo_epi8(lo, hi), z), two));
        _mm_store_si128((__m128i *)(ix + 40), _mm_and_si128(_mm_cmpeq_epi8(_mm_unpackhi_epi8(lo, hi), z), two));
    }
}

/* the sign-and-magnitude types: grid magnitudes |w| of weights 32c .. 32c+31 and their sign mask (0xFF where
 * negative); sv: iq_signs_vec of the block, ix: iq_index_vec */
AI T256 int iq_signed(const int TY) { return TY != IQD_1S && TY != IQD_1M && TY != IQD_PAN; }
AI T256 __m256i iq_mag_256(const uint8_t *b, int c, const int TY, __m256i sv, const uint16_t *ix, __m256i *m) {
    switch (TY) {
    case IQD_2XXS: {
        const uint8_t *q = b + 2 + 8 * c;
        *m = sign_bytes_2xxs(sv, c);
        return rows4(g_iq2xxs, q[0], q[1], q[2], q[3]);
    }
    case IQD_2XS: *m = sign_dword_to_bytes(sv, c); return rows4ix(g_iq2xs, ix + 4 * c);
    case IQD_2S: *m = sign_dword_to_bytes(sv, c); return rows4ix(g_iq2s, ix + 4 * c);
    case IQD_3XXS: {
        const uint8_t *q = b + 2 + 8 * c; /* scalar loads beat vpgatherdd here */
        *m = sign_dword_to_bytes(sv, c);
        return _mm256_setr_epi32((int)g_iq3xxs[q[0]], (int)g_iq3xxs[q[1]], (int)g_iq3xxs[q[2]], (int)g_iq3xxs[q[3]],
                                 (int)g_iq3xxs[q[4]], (int)g_iq3xxs[q[5]], (int)g_iq3xxs[q[6]], (int)g_iq3xxs[q[7]]);
    }
    default: /* IQD_3S */
        *m = sign_dword_to_bytes(sv, c);
        return rows8dx(g_iq3s, idx_word(ix + 8 * c), idx_word(ix + 8 * c + 4), 16);
    }
}
/* weights 32c .. 32c+31 of the block as u bytes (sv: iq_signs_vec of the block, ix: iq_index_vec) */
AI T256 __m256i iq_chunk_256(const uint8_t *b, int c, const int TY, __m256i sv, const uint16_t *ix) {
    switch (TY) {
    case IQD_PAN: return _mm256_load_si256((const __m256i *)(b + 32 * c));
    case IQD_1S: {
        const uint32_t h = rd16(b + 34 + 2 * c);
        const __m256i g = rows4ix(g_iq1s, ix + 4 * c);
        return _mm256_add_epi8(g, _mm256_set1_epi8((char)(2 - 2 * (h >> 15)))); /* +1/8: + 2, -1/8: + 0 */
    }
    case IQD_1M: {
        const __m256i g = rows4ix(g_iq1s, ix + 4 * c);
        /* the four groups' offset bytes (see iq_index_vec), each spread over its 8 weights */
        const __m256i dv = _mm256_shuffle_epi8(_mm256_set1_epi32((int)rd32((const uint8_t *)(ix + 32) + 4 * c)),
                                               _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                                2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
        return _mm256_add_epi8(g, dv);
    }
    default: {
        __m256i m;
        const __m256i g = iq_mag_256(b, c, TY, sv, ix, &m);
        return u_masked_256(g, m);
    }
    }
}

/* block b's 256 weights as u bytes with OFF 64 for every type (the decoded rows of both decode-once paths) */
AI T256 void iq_u64_block(const uint8_t *b, const int TY, uint8_t *u) {
    const __m256i to64 = _mm256_set1_epi8((char)(64 - iq_off(TY)));
    uint16_t ix[64] __attribute__((aligned(32)));
    if (iq_has_ix(TY)) iq_index_vec(b, TY, ix);
    const __m256i sv = iq_signs_vec(b, TY);
    for (int c = 0; c < 8; c++) _mm256_storeu_si256((__m256i *)(u + 32 * c), _mm256_add_epi8(iq_chunk_256(b, c, TY, sv, ix), to64));
}
#endif /* K2K_X86 */
#endif /* K2K_AVX2_IQ_H */
