/* Codec repacks done as experts are read (no lock, no thread pool: safe to call from the disk tier's reader
 * threads while a matmul runs).
 *
 * compressed-tensors INT4 (pack-quantized, symmetric, group 32) -> ggml Q4_0. The 4-bit codes are the same
 * (w = (u - 8) * d); only the nibble order changes and the scale goes bf16/f16/f32 -> f16:
 *   INT4 group: 16 bytes, byte k = elements 2k (low nibble), 2k + 1 (high)
 *   Q4_0 block: f16 d, then 16 bytes, byte m = elements m (low), m + 16 (high)
 * so Q4_0 bytes 2k, 2k + 1 are the low / high nibbles of INT4 bytes k and k + 8. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "k2kern.h"

#define LO 0x0F0F0F0F0F0F0F0FULL

/* Spreads the 4 bytes of x into the low byte of each 16-bit lane. */
static inline uint64_t spread4(uint64_t x) {
    x &= 0xFFFFFFFFULL;
    x = (x | (x << 16)) & 0x0000FFFF0000FFFFULL;
    x = (x | (x << 8)) & 0x00FF00FF00FF00FFULL;
    return x;
}

static inline float scale_f32(const void *scale, int kind, int64_t i) {
    uint32_t bits;
    float f;
    switch (kind) {
    case 0: /* bf16 */
        bits = (uint32_t)((const uint16_t *)scale)[i] << 16;
        memcpy(&f, &bits, 4);
        return f;
    case 1: /* f16 */
        return (float)((const _Float16 *)scale)[i];
    default: /* f32 */
        return ((const float *)scale)[i];
    }
}

/* The common case without a float conversion call: a bf16 scale in f16's normal range (or zero) is an f16 value
 * (bf16's 7 mantissa bits fit f16's 10): rebias the exponent. False for anything else (the caller converts). */
static inline int bf16_to_f16_exact(const void *scale, int kind, int64_t i, uint16_t *out) {
    if (kind != 0) return 0;
    uint16_t b = ((const uint16_t *)scale)[i];
    uint32_t e = (b >> 7) & 0xFF;
    if ((b & 0x7FFF) == 0) {
        *out = b & 0x8000;
        return 1;
    }
    if (e < 127 - 14 || e > 127 + 15) return 0;
    *out = (uint16_t)((b & 0x8000) | ((e - 112) << 10) | ((b & 0x7F) << 3));
    return 1;
}

int64_t k2k_repack_int4_q4_0(const void *packed, const void *scale, int scale_kind, int64_t rows, int64_t groups,
                             void *out) {
    const uint8_t *src = (const uint8_t *)packed;
    uint8_t *dst = (uint8_t *)out;
    int64_t inexact = 0;
    for (int64_t g = 0; g < rows * groups; g++) {
        uint16_t d;
        if (!bf16_to_f16_exact(scale, scale_kind, g, &d)) {
            float s = scale_f32(scale, scale_kind, g);
            _Float16 h = (_Float16)s; /* round to nearest even, as torch's .to(float16) */
            float back = (float)h;
            if (back - back != 0.0f && s - s == 0.0f) return -1 - g; /* finite scale past f16's range */
            inexact += back != s;
            memcpy(&d, &h, 2);
        }
        uint64_t a, c;
        memcpy(&a, src + 16 * g, 8);
        memcpy(&c, src + 16 * g + 8, 8);
        uint64_t ev = (a & LO) | ((c & LO) << 4);          /* byte k = Q4_0 byte 2k */
        uint64_t od = ((a >> 4) & LO) | (c & ~LO);         /* byte k = Q4_0 byte 2k + 1 */
        uint64_t q0 = spread4(ev) | (spread4(od) << 8);
        uint64_t q1 = spread4(ev >> 32) | (spread4(od >> 32) << 8);
        uint8_t *b = dst + 18 * g;
        memcpy(b, &d, 2);
        memcpy(b + 2, &q0, 8);
        memcpy(b + 10, &q1, 8);
    }
    return inexact;
}

/* Repacks rows / 16 groups of 16 rows (gbytes each, the same in both layouts) with group(source, output, nb).  When
 * out overlaps src (in place: a group's bytes stay where they were) each group is copied aside first.  0; -1 bad
 * sizes; -3 out of memory. */
static int64_t r16_groups(const void *src, int64_t rows, int64_t nb, int64_t gbytes, void *out,
                          void (*group)(const uint8_t *gs, uint8_t *go, int64_t nb)) {
    if (rows <= 0 || rows % 16 || nb <= 0) return -1;
    const uint8_t *s = (const uint8_t *)src;
    uint8_t *d = (uint8_t *)out;
    const int64_t n = rows / 16 * gbytes;
    const int overlap = s < d + n && d < s + n;
    uint8_t *scratch = overlap ? (uint8_t *)malloc((size_t)gbytes) : NULL;
    if (overlap && !scratch) return -3;
    for (int64_t g = 0; g < rows / 16; g++) {
        const uint8_t *gs = s + g * gbytes;
        if (scratch) gs = (const uint8_t *)memcpy(scratch, gs, (size_t)gbytes);
        group(gs, d + g * gbytes, nb);
    }
    free(scratch);
    return 0;
}

/* ggml Q8_0 [rows, nb blocks] -> GT_Q8_0_R16, the same bytes per row: for each group of 16 rows and block i,
 * 544 bytes: the 16 rows' f16 scales, then for each 4-value quad q < 8 the 16 rows' quants 4q..4q+3, each + 128
 * (unsigned for dpbusd).  One 64-byte load then holds 4 values of 16 rows, so a dot product needs no horizontal
 * sums.  rows must be a multiple of 16 (-1 otherwise); out may be src (repacked in place). */
static void q8_0_r16_group(const uint8_t *gs, uint8_t *go, int64_t nb) {
    const int64_t rb = 34 * nb;
    for (int64_t i = 0; i < nb; i++) {
        uint8_t *o = go + i * 544;
        for (int r = 0; r < 16; r++) {
            const uint8_t *b = gs + r * rb + 34 * i;
            memcpy(o + 2 * r, b, 2);
            for (int q = 0; q < 8; q++)
                for (int k = 0; k < 4; k++) o[32 + 64 * q + 4 * r + k] = (uint8_t)(b[2 + 4 * q + k] ^ 0x80);
        }
    }
}
int64_t k2k_repack_q8_0_r16(const void *src, int64_t rows, int64_t nb, void *out) {
    return r16_groups(src, rows, nb, 16 * 34 * nb, out, q8_0_r16_group);
}

/* ggml Q4_K [rows, nb super-blocks] -> GT_Q4_K_R16, the same bytes per row (layout: avx512.c, q4kr16_512_body);
 * rows a multiple of 16 (-1 otherwise); out may be src */
static void q4_k_r16_group(const uint8_t *gs, uint8_t *go, int64_t nb) {
    const int64_t rb = 144 * nb;
    for (int64_t i = 0; i < nb; i++) {
        uint8_t *o = go + i * 2304;
        memset(o + 192, 0, 64);
        for (int r = 0; r < 16; r++) {
            const uint8_t *b = gs + r * rb + 144 * i, *q = b + 4, *qs = b + 16;
            memcpy(o + 2 * r, b, 2);
            memcpy(o + 32 + 2 * r, b + 2, 2);
            uint8_t u[256]; /* the row's quants in natural order: sub-block 2p low nibbles of qs[32p..], 2p + 1 high */
            for (int p = 0; p < 4; p++)
                for (int l = 0; l < 32; l++) u[64 * p + l] = qs[32 * p + l] & 15, u[64 * p + 32 + l] = qs[32 * p + l] >> 4;
            for (int jk = 0; jk < 32; jk++) /* sub-block j = jk / 4, vector k = jk % 4: quants 8jk .. 8jk + 7 */
                for (int v = 0; v < 4; v++) o[256 + 64 * jk + 4 * r + v] = (uint8_t)(u[8 * jk + v] | u[8 * jk + 4 + v] << 4);
            for (int j = 0; j < 8; j++) {
                const int sc = j < 4 ? q[j] & 63 : (q[j + 4] & 15) | (q[j - 4] >> 6) << 4;
                const int mn = j < 4 ? q[j + 4] & 63 : (q[j + 4] >> 4) | (q[j] >> 6) << 4;
                o[64 + 16 * j + r] = (uint8_t)((sc & 15) | (mn & 15) << 4);
                o[192 + 16 * (j & 3) + r] |= (uint8_t)(((sc >> 4) | (mn >> 4) << 2) << (j < 4 ? 0 : 4));
            }
        }
    }
}
int64_t k2k_repack_q4_k_r16(const void *src, int64_t rows, int64_t nb, void *out) {
    return r16_groups(src, rows, nb, 16 * 144 * nb, out, q4_k_r16_group);
}
