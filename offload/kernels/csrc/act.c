/* Activation quantization: each token's float row to int8 blocks in the layout its kernel reads (portable and AVX2,
 * the same bytes), and the dispatch between them. */
#include "common.h"
#if K2K_X86
#include "avx2.h"
#endif

/* quantize columns [c0, c1) (block aligned) of row x into the activation buffer buf (portable reference; the
 * AVX2 version below writes the same bytes) */
static void quantize_act_range_gen(const float *x, int64_t cols, int layout, uint8_t *buf, int64_t c0, int64_t c1) {
    act_t a = act_view(buf, cols);
    int8_t *q = (int8_t *)a.q;
    float *d = (float *)a.d;
    int16_t *bs16 = (int16_t *)a.bs16, *bs32 = (int16_t *)a.bs32;
    if (layout == LAYOUT_Q8_0) {
        for (int64_t b = c0 / 32; b < c1 / 32; b++) {
            const float *xb = x + 32 * b;
            float amax = 0.f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
            float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
            int s = 0;
            for (int i = 0; i < 32; i++) {
                int8_t v = q8round(xb[i] * id);
                q[32 * b + i] = v;
                s += v;
            }
            d[b] = dd;
            bs16[b] = (int16_t)s;
        }
        return;
    }
    const int *src = layout_src[layout];
    for (int64_t b = c0 / 256; b < c1 / 256; b++) {
        const float *xb = x + 256 * b;
        float amax = 0.f;
        for (int i = 0; i < 256; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int8_t tmp[256];
        for (int i = 0; i < 256; i++) tmp[i] = q8round(xb[i] * id);
        for (int k = 0; k < 16; k++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += tmp[16 * k + i];
            bs16[16 * b + k] = (int16_t)s;
        }
        for (int k = 0; k < 8; k++) bs32[8 * b + k] = (int16_t)(bs16[16 * b + 2 * k] + bs16[16 * b + 2 * k + 1]);
        for (int p = 0; p < 16; p++) memcpy(q + 256 * b + 16 * p, tmp + 16 * src[p], 16);
        d[b] = dd;
    }
}

#if K2K_X86
/* ------------------------------------------------------------------ AVX2 activation quantization */
/* 32 floats times id -> 32 int8 in natural order, rounded to nearest-even (as lrintf) and clamped to +-127 */
AI T256 __m256i q8_round32(const float *x, __m256 id) {
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    __m256i v[4];
    for (int k = 0; k < 4; k++)
        v[k] = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), id)), hi), lo);
    /* the packs work per 128-bit lane: 32-bit groups come out as a0 b0 c0 d0 a1 b1 c1 d1 */
    const __m256i r = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    return _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
/* max |x| over n (multiple of 8) floats; NaNs are skipped as fmaxf skips them */
AI T256 float absmax_avx2(const float *x, int n) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), m);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
/* sums of the int8 lanes 0..15 and 16..31 (via unsigned sums of q ^ 0x80) */
AI T256 void sums16(__m256i q, int16_t *s) {
    const __m256i u = _mm256_sad_epu8(_mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)), _mm256_setzero_si256());
    s[0] = (int16_t)(_mm256_extract_epi64(u, 0) + _mm256_extract_epi64(u, 1) - 2048);
    s[1] = (int16_t)(_mm256_extract_epi64(u, 2) + _mm256_extract_epi64(u, 3) - 2048);
}
T256 static void quantize_act_range_avx2(const float *x, int64_t cols, int layout, uint8_t *buf, int64_t c0, int64_t c1) {
    act_t a = act_view(buf, cols);
    int8_t *q = (int8_t *)a.q;
    float *d = (float *)a.d;
    int16_t *bs16 = (int16_t *)a.bs16, *bs32 = (int16_t *)a.bs32;
    if (layout == LAYOUT_Q8_0) {
        for (int64_t b = c0 / 32; b < c1 / 32; b++) {
            const float amax = absmax_avx2(x + 32 * b, 32);
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            const __m256i v = q8_round32(x + 32 * b, _mm256_set1_ps(id));
            _mm256_storeu_si256((__m256i *)(q + 32 * b), v);
            int16_t s[2];
            sums16(v, s);
            d[b] = amax / 127.f;
            bs16[b] = (int16_t)(s[0] + s[1]);
        }
        return;
    }
    const int *src = layout_src[layout];
    for (int64_t b = c0 / 256; b < c1 / 256; b++) {
        const float *xb = x + 256 * b;
        const float amax = absmax_avx2(xb, 256);
        const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        int8_t tmp[256] __attribute__((aligned(32)));
        for (int j = 0; j < 8; j++) {
            const __m256i v = q8_round32(xb + 32 * j, id);
            _mm256_store_si256((__m256i *)(tmp + 32 * j), v);
            sums16(v, bs16 + 16 * b + 2 * j);
            bs32[8 * b + j] = (int16_t)(bs16[16 * b + 2 * j] + bs16[16 * b + 2 * j + 1]);
        }
        for (int p = 0; p < 16; p++) memcpy(q + 256 * b + 16 * p, tmp + 16 * src[p], 16);
        d[b] = amax / 127.f;
    }
}

#endif /* K2K_X86 */

/* ------------------------------------------------------------------ dispatch */

void quantize_act_range(const float *x, int64_t cols, int layout, uint8_t *buf, int64_t c0, int64_t c1) {
#if K2K_X86
    if (g_isa >= ISA_AVX2) {
        quantize_act_range_avx2(x, cols, layout, buf, c0, c1);
        return;
    }
#endif
    quantize_act_range_gen(x, cols, layout, buf, c0, c1);
}

void quantize_act(const float *x, int64_t cols, int layout, uint8_t *buf) {
    quantize_act_range(x, cols, layout, buf, 0, cols);
}

