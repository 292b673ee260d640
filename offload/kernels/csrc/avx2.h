/* AVX2 helpers shared by the files that hold AVX2, AVX-VNNI and AVX-512 code (x86 only): the target attributes,
 * horizontal sums, fp16 broadcasts, scale shuffles, the VNNI-or-not dot steps and the wrappers that turn a body
 * written for a compile-time token count into a kernel (NT_BODY, NT_DISPATCH, NT_DISPATCH4_SPLIT). */
#ifndef K2K_AVX2_H
#define K2K_AVX2_H
#include "common.h"
#if K2K_X86
#define T256 __attribute__((target("avx2,fma,f16c,bmi2")))

AI T256 float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
AI T256 float h2f_256(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }
/* fp16 at p broadcast to 8 floats */
AI T256 __m256 h2f_bc256(const uint8_t *p) { return _mm256_cvtph_ps(_mm_set1_epi16((short)rd16(p))); }

/* Q3_K: 16 signed scales (value - 32) from the 12 packed bytes at b + 96; reads b + 94 .. b + 109.
 * As 32-bit words (a0, a1, a2 = bytes 0-3, 4-7, 8-11): word k of the result is the low (k < 2) or high
 * (k >= 2) nibbles of a0 / a1 / a0 / a1, or'ed with bits 2k, 2k+1 of each byte of a2 moved to bits 4, 5
 * (shift left 4, 2, 0 / right 2): two in-lane byte shuffles and three variable shifts build all four words
 * at once (10 instructions, no cross-lane unpack). */
AI T256 __m128i q3_scales(const uint8_t *b) {
    const __m128i x = _mm_loadu_si128((const __m128i *)(b + 94));
    const __m128i lo = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi8(x, _mm_setr_epi8(2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6, 7, 8, 9)),
                                                     _mm_setr_epi32(0, 0, 4, 4)),
                                      _mm_set1_epi8(0x0F));
    const __m128i h = _mm_shuffle_epi8(x, _mm_setr_epi8(10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13));
    const __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_sllv_epi32(h, _mm_setr_epi32(4, 2, 0, 0)), _mm_setr_epi32(0, 0, 0, 2)),
                                     _mm_set1_epi8(0x30));
    return _mm_sub_epi8(_mm_or_si128(lo, hi), _mm_set1_epi8(32));
}

/* broadcast int16 scale pairs: from 8 int16 (one 128 half), produce [s[2j] x8 | s[2j+1] x8] */
static const uint8_t pair_mask[4][32] __attribute__((aligned(32))) = {
    {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3},
    {4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7},
    {8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11},
    {12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15},
};
AI T256 __m256i pair_scales(__m256i half_bcast, int j) {
    return _mm256_shuffle_epi8(half_bcast, _mm256_load_si256((const __m256i *)pair_mask[j]));
}
/* acc + the int16 pair products of a and b: one vpdpwssd where VN (AVX-VNNI), else vpmaddwd + vpaddd.  The VNNI
 * builtins, not the intrinsics: GCC will not inline the avxvnni intrinsic into these T256 bodies even on the dead
 * branch, while a builtin is only checked where it is expanded (the TVNNI instantiations, VN = 1).  Unoptimized
 * builds keep the dead branch, so there the VNNI variants use the AVX2 instructions (same results). */
AI T256 __m256i dpwssd_v(__m256i acc, __m256i a, __m256i b, const int VN) {
#if defined(__OPTIMIZE__) && !defined(K2K_FAKE_AVXVNNI)
    if (VN) return (__m256i)__builtin_ia32_vpdpwssd_v8si((__v8si)acc, (__v8si)a, (__v8si)b);
#endif
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
}
/* the dword sums of 4 products of unsigned u and signed s bytes, where no pair sum saturates int16: one vpdpbusd
 * where VN, else vpmaddubsw + vpmaddwd with ones */
AI T256 __m256i dpbusd_v(__m256i u, __m256i s, const int VN) {
#if defined(__OPTIMIZE__) && !defined(K2K_FAKE_AVXVNNI)
    if (VN) return (__m256i)__builtin_ia32_vpdpbusd_v8si((__v8si)_mm256_setzero_si256(), (__v8si)u, (__v8si)s);
#endif
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* The bodies (avx2.c, avx2_iq.c) take VN (0: AVX2, 1: AVX-VNNI, same integer sums) and get a T256 and a TVNNI
 * instantiation through this wrapper. */
#define NT_BODY(name, body, ATTR, VN)                                                                             \
    AI ATTR void name##_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os,      \
                           const uint8_t *pf) {                                                                   \
        body(w, nb, a, NT, out, os, pf, VN);                                                                      \
    }

/* Kernels are written for a compile-time token count NT (always_inline + constant folding keeps
 * the per-token accumulators in registers); this wrapper walks the tokens in tiles of TILE. */
#define NT_DISPATCH(name, ATTR, TILE)                                                                  \
    ATTR void name(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,             \
                          const uint8_t *pf) {                                                             \
        for (int t0 = 0; t0 < nt; t0 += TILE, pf = NULL) { /* later tiles re-read the row from cache */   \
            const int n = nt - t0 < TILE ? nt - t0 : TILE;                                                 \
            if (n == TILE) name##_nt(w, nb, a + t0, TILE, out + t0 * os, os, pf);                          \
            else if (n == 1) name##_nt(w, nb, a + t0, 1, out + t0 * os, os, pf);                           \
            else if (n == 2) name##_nt(w, nb, a + t0, 2 < TILE ? 2 : 1, out + t0 * os, os, pf);            \
            else name##_nt(w, nb, a + t0, 3 < TILE ? 3 : 1, out + t0 * os, os, pf);                        \
        }                                                                                                  \
    }

/* As NT_DISPATCH with TILE 4, but each token count gets its own (not inlined) function: in one function the
 * compiler's register choices for one count spilled the constants of another (Q3_K T=1 5% slower with the
 * 3- and 4-token loops beside it). */
#define NT_DISPATCH4_SPLIT(name, ATTR)                                                                         \
    ATTR static __attribute__((noinline)) void name##_1(const uint8_t *w, int nb, const act_t *a, float *out,     \
                                                        ptrdiff_t os, const uint8_t *pf) {                        \
        name##_nt(w, nb, a, 1, out, os, pf);                                                                      \
    }                                                                                                             \
    ATTR static __attribute__((noinline)) void name##_2(const uint8_t *w, int nb, const act_t *a, float *out,     \
                                                        ptrdiff_t os, const uint8_t *pf) {                        \
        name##_nt(w, nb, a, 2, out, os, pf);                                                                      \
    }                                                                                                             \
    ATTR static __attribute__((noinline)) void name##_3(const uint8_t *w, int nb, const act_t *a, float *out,     \
                                                        ptrdiff_t os, const uint8_t *pf) {                        \
        name##_nt(w, nb, a, 3, out, os, pf);                                                                      \
    }                                                                                                             \
    ATTR static __attribute__((noinline)) void name##_4(const uint8_t *w, int nb, const act_t *a, float *out,     \
                                                        ptrdiff_t os, const uint8_t *pf) {                        \
        name##_nt(w, nb, a, 4, out, os, pf);                                                                      \
    }                                                                                                             \
    ATTR void name(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,                    \
                          const uint8_t *pf) {                                                                    \
        for (int t0 = 0; t0 < nt; t0 += 4, pf = NULL) {                                                           \
            const int n = nt - t0 < 4 ? nt - t0 : 4;                                                              \
            if (n == 4) name##_4(w, nb, a + t0, out + t0 * os, os, pf);                                           \
            else if (n == 1) name##_1(w, nb, a + t0, out + t0 * os, os, pf);                                      \
            else if (n == 2) name##_2(w, nb, a + t0, out + t0 * os, os, pf);                                      \
            else name##_3(w, nb, a + t0, out + t0 * os, os, pf);                                                  \
        }                                                                                                         \
    }


/* AVX-VNNI (AVX2 CPUs with vpdpbusd: Alder Lake and later Intel desktops, Zen 4 / 5): the AVX2 bodies instantiated
 * with VN = 1 (avx2.c, avx2_iq.c) and the 8-lane Q8_0 GEMM (gemm.c) */
#ifndef K2K_FAKE_AVXVNNI
#define TVNNI __attribute__((target("avx2,fma,f16c,bmi2,avxvnni")))
#else
/* Test builds only (-DK2K_FAKE_AVXVNNI, tests/test_kernels.py): the AVX-VNNI kernels on any AVX2 CPU, with vpdpbusd
 * and vpdpwssd replaced by AVX2 sequences of the same exact integer results, so that machines without AVX-VNNI (CI)
 * check these kernels and their dispatch. */
#define TVNNI T256
AI T256 __m256i k2k_fake_dpbusd(__m256i acc, __m256i u, __m256i s) { /* u unsigned, s signed, no saturation */
    const __m256i m = _mm256_set1_epi16(0xFF);
    const __m256i e = _mm256_madd_epi16(_mm256_and_si256(u, m), _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8));
    const __m256i o = _mm256_madd_epi16(_mm256_srli_epi16(u, 8), _mm256_srai_epi16(s, 8));
    return _mm256_add_epi32(acc, _mm256_add_epi32(e, o));
}
#define _mm256_dpbusd_avx_epi32(acc, u, s) k2k_fake_dpbusd(acc, u, s)
#endif
#endif /* K2K_X86 */
#endif /* K2K_AVX2_H */
