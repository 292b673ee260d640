/* Included by avx512.h instead of the AVX-512 target attributes in test builds only (-DK2K_EMULATE_AVX512). */
#ifndef K2K_EMU512_H
#define K2K_EMU512_H
/* Test builds only (-DK2K_EMULATE_AVX512 -mavx2 -mfma -mf16c -mbmi2, tests/test_kernels.py): the AVX-512 kernels
 * compiled against SIMDe's portable implementations of the intrinsics, so that CPUs without AVX-512 can check
 * them against the other paths. */
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/gfni.h>
#define T512 T256
#define T512V T256
#undef _mm512_madd_epi16 /* SIMDe 0.7.4's alias takes 4 arguments */
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
#undef _mm512_zextsi256_si512
#undef _mm512_zextsi128_si512
#define _mm512_zextsi256_si512(a) simde_mm512_inserti64x4(simde_mm512_setzero_si512(), a, 0)
#define _mm512_zextsi128_si512(a) simde_mm512_inserti32x4(simde_mm512_setzero_si512(), a, 0)
static inline __m512 k2k_emu_cvtepi32_ps(__m512i v) {
    int32_t x[16];
    float f[16];
    _mm512_storeu_si512((void *)x, v);
    for (int k = 0; k < 16; k++) f[k] = (float)x[k];
    return _mm512_loadu_ps(f);
}
static inline float k2k_emu_reduce_add_ps(__m512 v) { /* same tree as the native sequence */
    float f[16];
    _mm512_storeu_ps(f, v);
    for (int w = 8; w >= 1; w /= 2)
        for (int k = 0; k < w; k++) f[k] += f[k + w];
    return f[0];
}
#define K2K_EMU_CVT(name, TI, TO, N)                                                                            \
    static inline __m512i k2k_emu_##name(__m128i v) {                                                           \
        TI x[16 / sizeof(TI)];                                                                                  \
        TO r[N];                                                                                                \
        _mm_storeu_si128((__m128i *)x, v);                                                                      \
        for (int k = 0; k < N; k++) r[k] = (TO)x[k];                                                            \
        return _mm512_loadu_si512((const void *)r);                                                             \
    }
K2K_EMU_CVT(cvtepi8_epi32, int8_t, int32_t, 16)
K2K_EMU_CVT(cvtepu8_epi32, uint8_t, int32_t, 16)
K2K_EMU_CVT(cvtepu8_epi64, uint8_t, int64_t, 8)
K2K_EMU_CVT(cvtepu16_epi64, uint16_t, int64_t, 8)
static inline long long k2k_emu_reduce_add_epi64(__m512i v) {
    int64_t x[8], s = 0;
    _mm512_storeu_si512((void *)x, v);
    for (int k = 0; k < 8; k++) s += x[k];
    return s;
}
#undef _mm512_cvtepi8_epi32
#undef _mm512_cvtepu8_epi32
#undef _mm512_cvtepu8_epi64
#undef _mm512_cvtepu16_epi64
#undef _mm512_reduce_add_epi64
#define _mm512_cvtepi8_epi32(v) k2k_emu_cvtepi8_epi32(v)
#define _mm512_cvtepu8_epi32(v) k2k_emu_cvtepu8_epi32(v)
#define _mm512_cvtepu8_epi64(v) k2k_emu_cvtepu8_epi64(v)
#define _mm512_cvtepu16_epi64(v) k2k_emu_cvtepu16_epi64(v)
#define _mm512_reduce_add_epi64(v) k2k_emu_reduce_add_epi64(v)
#undef _mm512_cvtepi32_ps
#undef _mm512_reduce_add_ps
#define _mm512_cvtepi32_ps(v) k2k_emu_cvtepi32_ps(v)
#define _mm512_reduce_add_ps(v) k2k_emu_reduce_add_ps(v)
#endif /* K2K_EMU512_H */
