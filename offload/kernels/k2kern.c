/*
 * k2kern: CPU kernels for MoE expert matmuls directly on ggml-quantized weight bytes.
 *
 * Plain C shared library (no Python C-API), loaded with ctypes.  One binary carries a
 * generic scalar path plus AVX2 and AVX-512(VNNI) paths selected at run time with
 * __builtin_cpu_supports; it is never built with -march=native.  Where the CPU also has GFNI
 * (Ice Lake / Sapphire Rapids / Zen 4 and later) the K-quant AVX-512 kernels unpack bit fields with
 * vgf2p8affineqb (ISA level avx512-vnni-gfni; K2LOCAL_ISA=avx512 forces the plain AVX-512 kernels).
 *
 * Math: like ggml, the activation row is quantized once per call to int8 blocks
 * ("Q8_K": 256 values, one float scale, int16 sums per 16 and per 32; "Q8_0": 32 values),
 * and each weight block is dotted with integer instructions (maddubs + madd/dpwssd, or
 * dpbusd), accumulating in float per block.  The int8 order inside a 256-block is
 * permuted per kernel so that one 512-bit load of packed quants lines up with one
 * 512-bit load of activations (see LAYOUT_*).
 *
 * Memory: each kernel software-prefetches g_pfd bytes (default 8 KiB) ahead of the weight stream, and
 * the stream continues across segment ends into what the thread reads next (gate rows -> up rows,
 * down rows of expert e -> expert e+1), so loads overlap the integer math instead of stalling on it.
 *
 * Threads: a persistent pthread pool; the caller's thread is worker 0.  Public calls are serialized
 * by a mutex (one computation at a time uses all workers).  Work is cut in
 * row chunks handed out by an atomic counter (dynamic balance, robust to hybrid cores
 * and noisy neighbours).  Optional pinning walks the allowed CPUs interleaving NUMA
 * nodes (read from /sys/devices/system/node), so thread i and i+1 sit on different
 * nodes; data placement (interleaved pages) is left to the expert store.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <errno.h>
#include <sys/syscall.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define K2K_X86 1
#else
#define K2K_X86 0
#endif

#define K2K_ABI_VERSION 9

/* ggml type ids (gguf.GGMLQuantizationType) */
enum { GT_Q4_0 = 2, GT_Q5_0 = 6, GT_Q5_1 = 7, GT_Q8_0 = 8, GT_Q2_K = 10, GT_Q3_K = 11, GT_Q4_K = 12, GT_Q5_K = 13, GT_Q6_K = 14,
       GT_IQ2_XXS = 16, GT_IQ2_XS = 17, GT_IQ3_XXS = 18, GT_IQ1_S = 19, GT_IQ4_NL = 20, GT_IQ3_S = 21, GT_IQ2_S = 22,
       GT_IQ4_XS = 23, GT_IQ1_M = 29 };
/* k2k_set_grid id of the 128-entry sign table shared by IQ2_XXS / IQ2_XS / IQ3_XXS */
#define GRID_KSIGNS 256
enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512G = 3 /* AVX-512 VNNI + GFNI */ };
/* int8 activation order inside a 256 block: source 32-chunk index for each position */
/* int8 activation order inside a 256 block: source 16-chunk index for each 16-wide position */
enum { LAYOUT_NAT = 0, LAYOUT_P64 = 1, LAYOUT_P2 = 2, LAYOUT_Q8_0 = 3, LAYOUT_IQ4X = 4 };
static const int layout_src[5][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15},  /* Q4_K/Q5_K 512-bit: lo/hi nibbles of 64 packed bytes */
    {0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15},  /* Q2_K/Q3_K 512-bit: both 128-halves per 2-bit plane */
    {0},                                                      /* (Q8_0: 32-blocks, natural) */
    {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15},  /* IQ4_XS: lo nibbles of 4 sub-blocks, then hi */
};

#define AI static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ activations */

/* Per token: q int8 (block-ordered per layout), d float per block, bs16 int16 per 16 values
 * (natural order), bs32 int16 per 32 values.  For LAYOUT_Q8_0 blocks are 32 wide and bs16
 * holds one sum per block. */
typedef struct {
    const int8_t *q;
    const float *d;
    const int16_t *bs16;
    const int16_t *bs32;
} act_t;

static size_t act_bytes(int64_t cols) {
    /* generous: q + d + bs16 + bs32, each 64-aligned */
    size_t n = (size_t)cols;
    return ((n + 63) & ~(size_t)63) + (((n / 32 + 1) * 4 + 63) & ~(size_t)63) + (((n / 16 + 1) * 2 + 63) & ~(size_t)63) +
           (((n / 32 + 1) * 2 + 63) & ~(size_t)63) + 64;
}

static act_t act_view(uint8_t *buf, int64_t cols) {
    size_t n = (size_t)cols;
    act_t a;
    uint8_t *p = buf;
    a.q = (const int8_t *)p;
    p += (n + 63) & ~(size_t)63;
    a.d = (const float *)p;
    p += ((n / 32 + 1) * 4 + 63) & ~(size_t)63;
    a.bs16 = (const int16_t *)p;
    p += ((n / 16 + 1) * 2 + 63) & ~(size_t)63;
    a.bs32 = (const int16_t *)p;
    return a;
}

static inline int8_t q8round(float v) {
    int i = (int)lrintf(v);
    return (int8_t)(i > 127 ? 127 : (i < -127 ? -127 : i));
}

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

/* Per-thread scratch for decoded weight rows (pnl_gemm's panel, run_rows' decoded codebook row): 64-byte aligned, at
 * least n bytes, kept and grown (pool workers live as long as the process; the two users never nest) */
static __thread uint8_t *t_rows = NULL;
static __thread size_t t_rows_cap = 0;
static uint8_t *thread_rows_buf(size_t n) {
    if (t_rows_cap < n) {
        free(t_rows);
        t_rows = NULL, t_rows_cap = 0;
        if (posix_memalign((void **)&t_rows, 64, n) != 0) abort(); /* a few hundred KiB */
        t_rows_cap = n;
    }
    return t_rows;
}

/* ------------------------------------------------------------------ type table */

/* One weight row (nb blocks) against nt activation rows: out[t * os] = dot(row, a[t]).
 * pf: where to software-prefetch while walking the row (pf + i * block_bytes for block i), or NULL. */
typedef void (*dot_fn)(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf);

/* prefetch distance in bytes ahead of the weight stream (0: off) and target level (0: L1, 1: L2) */
/* 8 KiB ahead into L1 was best on a 16-core Xeon (Q4_K 71 -> 100 GB/s at 16 threads, see bench/kernels.py
 * --prefetch); without it the core stalls on each miss instead of overlapping loads with the integer math. */
static int g_pfd = 8192, g_pf_l2 = 0;
/* Row-pair kernels (two rows per call for one token) are off by default: they are 3-10% faster with the
 * weights in L3, but from DRAM two interleaved row streams defeated the hardware prefetcher on Zen 4
 * (Q4_K one thread 20 -> 12 GB/s).  K2LOCAL_PAIRS=1 / set_row_pairs(True) turns them on; tests check that
 * they are bit-identical to the one-row kernels. */
static int g_no_pairs = 1;
/* decode-once paths for many tokens (pnl_gemm, run_rows' codebook rows): on unless K2LOCAL_PANEL=0 or k2k_set_panel(0) */
static int g_panel = 1;

static inline __attribute__((always_inline)) void pf_block(const uint8_t *pf, int i, int bpb) {
    if (!pf) return;
    const uint8_t *p = pf + (size_t)bpb * i;
    /* one prefetch per 64 bytes of the block (Q6_K's 210-byte blocks need four: three left every block's
     * last line to a demand miss) */
    if (g_pf_l2) {
        __builtin_prefetch(p, 0, 2);
        if (bpb > 64) __builtin_prefetch(p + 64, 0, 2);
        if (bpb > 128) __builtin_prefetch(p + 128, 0, 2);
        if (bpb > 192) __builtin_prefetch(p + 192, 0, 2);
    } else {
        __builtin_prefetch(p, 0, 3);
        if (bpb > 64) __builtin_prefetch(p + 64, 0, 3);
        if (bpb > 128) __builtin_prefetch(p + 128, 0, 3);
        if (bpb > 192) __builtin_prefetch(p + 192, 0, 3);
    }
}

typedef struct {
    int type, blk, bytes;
} tinfo_t;
static const tinfo_t TYPES[] = {
    {GT_Q4_0, 32, 18}, {GT_Q5_0, 32, 22}, {GT_Q5_1, 32, 24}, {GT_Q8_0, 32, 34}, {GT_Q2_K, 256, 84}, {GT_Q3_K, 256, 110},
    {GT_Q4_K, 256, 144}, {GT_Q5_K, 256, 176}, {GT_Q6_K, 256, 210},
    {GT_IQ2_XXS, 256, 66}, {GT_IQ2_XS, 256, 74}, {GT_IQ3_XXS, 256, 98}, {GT_IQ1_S, 256, 50}, {GT_IQ4_NL, 32, 18},
    {GT_IQ3_S, 256, 110}, {GT_IQ2_S, 256, 82}, {GT_IQ4_XS, 256, 136}, {GT_IQ1_M, 256, 56},
};
static const tinfo_t *tinfo(int type) {
    for (size_t i = 0; i < sizeof(TYPES) / sizeof(TYPES[0]); i++)
        if (TYPES[i].type == type) return &TYPES[i];
    return NULL;
}

static inline float fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (m << 13);
    } else {
        bits = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}
static inline uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static inline uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Q4_K/Q5_K packed 6-bit scales: bytes 0..7 -> scales, 8..15 -> mins */
static inline void unpack_k4(const uint8_t *s, uint32_t out[4]) {
    uint32_t u0 = rd32(s), u1 = rd32(s + 4), u2 = rd32(s + 8);
    out[0] = u0 & 0x3f3f3f3fu;
    out[1] = (u2 & 0x0f0f0f0fu) | ((u0 >> 2) & 0x30303030u);
    out[2] = u1 & 0x3f3f3f3fu;
    out[3] = ((u2 >> 4) & 0x0f0f0f0fu) | ((u1 >> 2) & 0x30303030u);
}
/* Q3_K packed 6-bit signed scales -> 16 bytes, each (scale + 32) */
static inline void unpack_q3(const uint8_t *s, uint32_t out[4]) {
    uint32_t a0 = rd32(s), a1 = rd32(s + 4), a2 = rd32(s + 8);
    out[0] = (a0 & 0x0f0f0f0fu) | ((a2 & 0x03030303u) << 4);
    out[1] = (a1 & 0x0f0f0f0fu) | (((a2 >> 2) & 0x03030303u) << 4);
    out[2] = ((a0 >> 4) & 0x0f0f0f0fu) | (((a2 >> 4) & 0x03030303u) << 4);
    out[3] = ((a1 >> 4) & 0x0f0f0f0fu) | (((a2 >> 6) & 0x03030303u) << 4);
}

/* ------------------------------------------------------------------ generic kernels (NAT layout) */

static void dot_q4_0_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 18 * i;
            const int8_t *q = a[t].q + 32 * i;
            int s = 0;
            for (int l = 0; l < 16; l++) s += (b[2 + l] & 0xF) * q[l] + (b[2 + l] >> 4) * q[l + 16];
            s -= 8 * a[t].bs16[i];
            acc += fp16_to_f32(rd16(b)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

/* Q5_0 (22-byte blocks: d, 32 high bits, 16 bytes of nibbles; value d * (q - 16)) and Q5_1 (24 bytes: d, m, the
 * same; value d * q + m): the 32-value fallbacks of Q4_K / Q5_K for rows not a multiple of 256 (Moonlight's 1408) */
static void dot_q5_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const int one) {
    const int bpb = one ? 24 : 22, hq = one ? 4 : 2;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + bpb * i;
            const uint32_t qh = rd32(b + hq);
            const int8_t *q = a[t].q + 32 * i;
            int s = 0;
            for (int l = 0; l < 16; l++)
                s += ((b[hq + 4 + l] & 0xF) | (((qh >> l) & 1) << 4)) * q[l] +
                     ((b[hq + 4 + l] >> 4) | (((qh >> (l + 16)) & 1) << 4)) * q[l + 16];
            const float dd = fp16_to_f32(rd16(b)) * a[t].d[i];
            acc += one ? dd * (float)s + fp16_to_f32(rd16(b + 2)) * a[t].d[i] * (float)a[t].bs16[i]
                       : dd * (float)(s - 16 * a[t].bs16[i]);
        }
        out[t * os] = acc;
    }
}
static void dot_q5_0_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    dot_q5_gen(w, nb, a, nt, out, os, 0);
}
static void dot_q5_1_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    dot_q5_gen(w, nb, a, nt, out, os, 1);
}

static void dot_q8_0_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 34 * i;
            const int8_t *wq = (const int8_t *)(b + 2), *q = a[t].q + 32 * i;
            int s = 0;
            for (int l = 0; l < 32; l++) s += wq[l] * q[l];
            acc += fp16_to_f32(rd16(b)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

static void dot_q2_k_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 84 * i, *sc = b, *qs = b + 16;
            const int8_t *q = a[t].q + 256 * i;
            int s = 0, m = 0;
            for (int n = 0; n < 2; n++)
                for (int j = 0; j < 4; j++)
                    for (int h = 0; h < 2; h++) {
                        int sub = 8 * n + 2 * j + h, si = 0;
                        for (int l = 0; l < 16; l++) si += ((qs[32 * n + 16 * h + l] >> (2 * j)) & 3) * q[16 * sub + l];
                        s += (sc[sub] & 0xF) * si;
                    }
            for (int k = 0; k < 16; k++) m += (sc[k] >> 4) * a[t].bs16[16 * i + k];
            float da = a[t].d[i];
            acc += fp16_to_f32(rd16(b + 80)) * da * (float)s - fp16_to_f32(rd16(b + 82)) * da * (float)m;
        }
        out[t * os] = acc;
    }
}

static void dot_q3_k_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 110 * i, *hm = b, *qs = b + 32;
            uint32_t u[4];
            unpack_q3(b + 96, u);
            const uint8_t *sc = (const uint8_t *)u;
            const int8_t *q = a[t].q + 256 * i;
            int s = 0;
            for (int n = 0; n < 2; n++)
                for (int j = 0; j < 4; j++)
                    for (int h = 0; h < 2; h++) {
                        int sub = 8 * n + 2 * j + h, si = 0;
                        for (int l = 0; l < 16; l++) {
                            int li = 16 * h + l;
                            int v = ((qs[32 * n + li] >> (2 * j)) & 3) - (((hm[li] >> (4 * n + j)) & 1) ? 0 : 4);
                            si += v * q[16 * sub + l];
                        }
                        s += ((int)sc[sub] - 32) * si;
                    }
            acc += fp16_to_f32(rd16(b + 108)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

static void dot_q45_k_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf, int five) {
    (void)pf;
    const int bpb = five ? 176 : 144;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + bpb * i, *qh = b + 16, *qs = b + (five ? 48 : 16);
            uint32_t u[4];
            unpack_k4(b + 4, u);
            const uint8_t *sc = (const uint8_t *)u, *mn = sc + 8;
            const int8_t *q = a[t].q + 256 * i;
            int s = 0, m = 0;
            for (int j = 0; j < 4; j++) {
                int slo = 0, shi = 0;
                for (int l = 0; l < 32; l++) {
                    int lo = qs[32 * j + l] & 0xF, hi = qs[32 * j + l] >> 4;
                    if (five) {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    slo += lo * q[64 * j + l];
                    shi += hi * q[64 * j + 32 + l];
                }
                s += sc[2 * j] * slo + sc[2 * j + 1] * shi;
            }
            for (int k = 0; k < 8; k++) m += mn[k] * a[t].bs32[8 * i + k];
            float da = a[t].d[i];
            acc += fp16_to_f32(rd16(b)) * da * (float)s - fp16_to_f32(rd16(b + 2)) * da * (float)m;
        }
        out[t * os] = acc;
    }
}
static void dot_q4_k_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    dot_q45_k_gen(w, nb, a, nt, out, os, pf, 0);
}
static void dot_q5_k_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    dot_q45_k_gen(w, nb, a, nt, out, os, pf, 1);
}

static void dot_q6_k_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 210 * i;
            const int8_t *sc = (const int8_t *)(b + 192), *q = a[t].q + 256 * i;
            int s = 0;
            for (int n = 0; n < 2; n++) {
                const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
                for (int k = 0; k < 4; k++) {  /* quarter: 32 weights at 128n + 32k */
                    for (int h = 0; h < 2; h++) {
                        int si = 0;
                        for (int l = 16 * h; l < 16 * h + 16; l++) {
                            int lo = (k & 1) ? ql[32 + l] : ql[l];
                            lo = (k & 2) ? (lo >> 4) : (lo & 0xF);
                            int v = (lo | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
                            si += v * q[128 * n + 32 * k + l];
                        }
                        s += sc[8 * n + 2 * k + h] * si;
                    }
                }
            }
            acc += fp16_to_f32(rd16(b + 208)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

/* ------------------------------------------------------------------ IQ codebooks (set at run time) */

/* The IQ types' codebooks are not part of this source: the Python loader takes them from the installed gguf
 * package and hands them over once with k2k_set_grid (a type without its tables is not supported).
 * Stored as rows: 8 bytes (IQ2_*, IQ1_*) or 4 bytes (IQ3_*) per grid index.  IQ2/IQ3 rows hold the grid
 * magnitudes (0..63, checked: 64 +/- g must stay a valid unsigned byte below 128); IQ1 rows hold 8 * g + 8 for
 * g in {-1, 0, 1}, so that 8 * (g +/- 1/8) + 9 = row + 1 +/- 1 is a small unsigned integer.  The IQ2 / IQ3
 * tables are followed by a second copy of their rows with 64 added to every byte (AVX-512 kernels: 64 + |g|, and
 * 128 - that is 64 - |g|); the IQ3 ones then by the same + 64 bytes as four planes (byte p of row r at
 * rows * p + r) for in-register lookups. */
static uint64_t *g_iq2xxs, *g_iq2xs, *g_iq2s, *g_iq1s;
static uint32_t *g_iq3xxs, *g_iq3s;
static int8_t g_kv[16];       /* IQ4_NL / IQ4_XS non-linear 4-bit values */
static uint8_t g_kvu[16];     /* the same + 128 (unsigned, for dpbusd) */
static uint8_t g_ksigns[128]; /* 7 sign bits + parity as bit 7 */
static int g_kv_set = 0, g_ksigns_set = 0;

static int grids_ready(int type) {
    switch (type) {
    case GT_IQ2_XXS: return g_iq2xxs && g_ksigns_set;
    case GT_IQ2_XS: return g_iq2xs && g_ksigns_set;
    case GT_IQ3_XXS: return g_iq3xxs && g_ksigns_set;
    case GT_IQ2_S: return g_iq2s != NULL;
    case GT_IQ3_S: return g_iq3s != NULL;
    case GT_IQ1_S: case GT_IQ1_M: return g_iq1s != NULL;
    case GT_IQ4_NL: case GT_IQ4_XS: return g_kv_set;
    default: return 1;
    }
}

/* IQ2_XXS / IQ2_XS / IQ3_XXS sign index (7 bits) -> 8 sign bits: the 8th makes the parity even */
static inline uint32_t ksign8(uint32_t i) { return g_ksigns[i & 127]; }

/* ------------------------------------------------------------------ generic IQ kernels (NAT layout) */

/* one 8-weight group: sum_j sign_j * grid_j * q_j (sign bit j set: negative) */
static inline int grid8_dot(const uint8_t *g, uint32_t signs, const int8_t *q) {
    int s = 0;
    for (int j = 0; j < 8; j++) s += ((signs >> j) & 1 ? -(int)g[j] : (int)g[j]) * q[j];
    return s;
}

static void dot_iq4_nl_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 18 * i;
            const int8_t *q = a[t].q + 32 * i;
            int s = 0;
            for (int l = 0; l < 16; l++) s += g_kv[b[2 + l] & 0xF] * q[l] + g_kv[b[2 + l] >> 4] * q[l + 16];
            acc += fp16_to_f32(rd16(b)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

static void dot_iq4_xs_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 136 * i, *qs = b + 8;
            const uint32_t sh = rd16(b + 2);
            const int8_t *q = a[t].q + 256 * i;
            int s = 0;
            for (int j = 0; j < 8; j++) {
                const int ls = (int)(((b[4 + j / 2] >> (4 * (j % 2))) & 0xF) | (((sh >> (2 * j)) & 3) << 4)) - 32;
                int sj = 0;
                for (int l = 0; l < 16; l++) sj += g_kv[qs[16 * j + l] & 0xF] * q[32 * j + l] + g_kv[qs[16 * j + l] >> 4] * q[32 * j + 16 + l];
                s += ls * sj;
            }
            acc += fp16_to_f32(rd16(b)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

static void dot_iq2_xxs_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 66 * i;
            const int8_t *q = a[t].q + 256 * i;
            int s = 0;
            for (int ib = 0; ib < 8; ib++) {
                const uint32_t a0 = rd32(b + 2 + 8 * ib), a1 = rd32(b + 6 + 8 * ib);
                int si = 0;
                for (int l = 0; l < 4; l++)
                    si += grid8_dot((const uint8_t *)&g_iq2xxs[(a0 >> (8 * l)) & 0xFF], ksign8(a1 >> (7 * l)), q + 32 * ib + 8 * l);
                s += (int)(2 * (a1 >> 28) + 1) * si;
            }
            acc += 0.125f * fp16_to_f32(rd16(b)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

static void dot_iq2_xs_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 74 * i, *sc = b + 66;
            const int8_t *q = a[t].q + 256 * i;
            int s = 0;
            for (int k = 0; k < 16; k++) { /* 16 weights: two groups, one 4-bit scale */
                int si = 0;
                for (int l = 0; l < 2; l++) {
                    const uint32_t v = rd16(b + 2 + 2 * (2 * k + l));
                    si += grid8_dot((const uint8_t *)&g_iq2xs[v & 511], ksign8(v >> 9), q + 16 * k + 8 * l);
                }
                s += (int)(2 * ((sc[k / 2] >> (4 * (k % 2))) & 0xF) + 1) * si;
            }
            acc += 0.125f * fp16_to_f32(rd16(b)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

static void dot_iq2_s_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 82 * i, *qs = b + 2, *sg = b + 34, *qh = b + 66, *sc = b + 74;
            const int8_t *q = a[t].q + 256 * i;
            int s = 0;
            for (int k = 0; k < 16; k++) {
                int si = 0;
                for (int l = 0; l < 2; l++) {
                    const int g = 2 * k + l, idx = qs[g] | (((qh[g / 4] >> (2 * (g % 4))) & 3) << 8);
                    si += grid8_dot((const uint8_t *)&g_iq2s[idx], sg[g], q + 8 * g);
                }
                s += (int)(2 * ((sc[k / 2] >> (4 * (k % 2))) & 0xF) + 1) * si;
            }
            acc += 0.125f * fp16_to_f32(rd16(b)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

static void dot_iq3_xxs_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 98 * i, *qs = b + 2;
            const int8_t *q = a[t].q + 256 * i;
            int s = 0;
            for (int ib = 0; ib < 8; ib++) {
                const uint32_t aux = rd32(b + 66 + 4 * ib);
                int si = 0;
                for (int l = 0; l < 4; l++) {
                    uint8_t g[8];
                    memcpy(g, &g_iq3xxs[qs[8 * ib + 2 * l]], 4);
                    memcpy(g + 4, &g_iq3xxs[qs[8 * ib + 2 * l + 1]], 4);
                    si += grid8_dot(g, ksign8(aux >> (7 * l)), q + 32 * ib + 8 * l);
                }
                s += (int)(2 * (aux >> 28) + 1) * si;
            }
            acc += 0.25f * fp16_to_f32(rd16(b)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

static void dot_iq3_s_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 110 * i, *qs = b + 2, *qh = b + 66, *sg = b + 74, *sc = b + 106;
            const int8_t *q = a[t].q + 256 * i;
            int s = 0;
            for (int ib = 0; ib < 8; ib++) {
                int si = 0;
                for (int l = 0; l < 4; l++) {
                    const int g = 4 * ib + l;
                    uint8_t v[8];
                    for (int h = 0; h < 2; h++) {
                        const int k = 2 * g + h, idx = qs[k] | (((qh[k / 8] >> (k % 8)) & 1) << 8);
                        memcpy(v + 4 * h, &g_iq3s[idx], 4);
                    }
                    si += grid8_dot(v, sg[g], q + 8 * g);
                }
                s += (int)(2 * ((sc[ib / 2] >> (4 * (ib % 2))) & 0xF) + 1) * si;
            }
            acc += fp16_to_f32(rd16(b)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

/* IQ1: w = d * ls * (g + delta), delta = +-1/8; summed as d / 8 * ls * (8 g +- 1) */
static inline int iq1_group(int idx, int minus, const int8_t *q) {
    const uint8_t *r = (const uint8_t *)&g_iq1s[idx];
    int s = 0;
    for (int j = 0; j < 8; j++) s += ((int)r[j] - 8 + (minus ? -1 : 1)) * q[j];
    return s;
}

static void dot_iq1_s_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 50 * i, *qs = b + 2;
            const int8_t *q = a[t].q + 256 * i;
            int s = 0;
            for (int ib = 0; ib < 8; ib++) {
                const uint32_t h = rd16(b + 34 + 2 * ib);
                int si = 0;
                for (int l = 0; l < 4; l++) si += iq1_group(qs[4 * ib + l] | (((h >> (3 * l)) & 7) << 8), h >> 15, q + 32 * ib + 8 * l);
                s += (int)(2 * ((h >> 12) & 7) + 1) * si;
            }
            acc += 0.125f * fp16_to_f32(rd16(b)) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

static inline float iq1m_scale(const uint8_t *sc) {
    const uint32_t s0 = rd16(sc), s1 = rd16(sc + 2), s2 = rd16(sc + 4), s3 = rd16(sc + 6);
    return fp16_to_f32((uint16_t)((s0 >> 12) | ((s1 >> 8) & 0xF0) | ((s2 >> 4) & 0xF00) | (s3 & 0xF000)));
}

static void dot_iq1_m_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    for (int t = 0; t < nt; t++) {
        float acc = 0.f;
        for (int i = 0; i < nb; i++) {
            const uint8_t *b = w + 56 * i, *qs = b, *qh = b + 32, *sc = b + 48;
            const int8_t *q = a[t].q + 256 * i;
            int s = 0;
            for (int k = 0; k < 16; k++) { /* 16 weights, one 3-bit scale */
                int si = 0;
                for (int l = 0; l < 2; l++) {
                    const int g = 2 * k + l, nib = (qh[g / 2] >> (4 * (g % 2))) & 0xF;
                    si += iq1_group(qs[g] | ((nib & 7) << 8), nib & 8, q + 8 * g);
                }
                s += (int)(2 * ((rd16(sc + 2 * (k / 4)) >> (3 * (k % 4))) & 7) + 1) * si;
            }
            acc += 0.125f * iq1m_scale(sc) * a[t].d[i] * (float)s;
        }
        out[t * os] = acc;
    }
}

#if K2K_X86
/* ------------------------------------------------------------------ AVX2 kernels (NAT layout) */
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

/* Q4_K/Q5_K scales (bytes 0..7) and mins (8..15), in a register (no store-forwarding stall) */
AI T256 __m128i k4_scales(const uint8_t *s) {
    uint32_t u[4];
    unpack_k4(s, u);
    return _mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]);
}
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

/* The bodies below take VN (0: AVX2, 1: AVX-VNNI, same integer sums) and get a T256 and (in the AVX-VNNI section)
 * a TVNNI instantiation through this wrapper. */
#define NT_BODY(name, body, ATTR, VN)                                                                             \
    AI ATTR void name##_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os,      \
                           const uint8_t *pf) {                                                                   \
        body(w, nb, a, NT, out, os, pf, VN);                                                                      \
    }

/* Kernels are written for a compile-time token count NT (always_inline + constant folding keeps
 * the per-token accumulators in registers); this wrapper walks the tokens in tiles of TILE. */
#define NT_DISPATCH(name, ATTR, TILE)                                                                  \
    ATTR static void name(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,      \
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
    ATTR static void name(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,             \
                          const uint8_t *pf) {                                                                    \
        for (int t0 = 0; t0 < nt; t0 += 4, pf = NULL) {                                                           \
            const int n = nt - t0 < 4 ? nt - t0 : 4;                                                              \
            if (n == 4) name##_4(w, nb, a + t0, out + t0 * os, os, pf);                                           \
            else if (n == 1) name##_1(w, nb, a + t0, out + t0 * os, os, pf);                                      \
            else if (n == 2) name##_2(w, nb, a + t0, out + t0 * os, os, pf);                                      \
            else name##_3(w, nb, a + t0, out + t0 * os, os, pf);                                                  \
        }                                                                                                         \
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

/* Grid types (IQ2_*, IQ3_*, IQ1_*): each 32 weights become unsigned bytes u = OFF + (signed integer weight):
 * OFF = 64 for the sign + magnitude grids (|w| <= 63), 9 for IQ1 (8 g +- 1, g in {-1, 0, 1}).  Then the K-quant
 * path: maddubs(u, x) (u <= 127: no saturation), madd with one int16 scale per 16 weights, and the OFF term taken
 * back with the activation sums per 16.  All integer inside a block; a float factor folds 1/8, 1/4. */
/* IQD_PAN: not a GGUF type but a row of any of them decoded once (iq_udec_body, for many tokens): per block its 256 u
 * bytes with OFF = 64, the 16 int16 scales, the float block scale (times the type's factor) */
enum { IQD_2XXS, IQD_2XS, IQD_2S, IQD_3XXS, IQD_3S, IQD_1S, IQD_1M, IQD_PAN };
#define UPAN_BPB 320

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
/* block b's 256 weights as u bytes with OFF 64 for every type (the decoded rows of both decode-once paths) */
AI T256 void iq_u64_block(const uint8_t *b, const int TY, uint8_t *u) {
    const __m256i to64 = _mm256_set1_epi8((char)(64 - iq_off(TY)));
    uint16_t ix[64] __attribute__((aligned(32)));
    if (iq_has_ix(TY)) iq_index_vec(b, TY, ix);
    const __m256i sv = iq_signs_vec(b, TY);
    for (int c = 0; c < 8; c++) _mm256_storeu_si256((__m256i *)(u + 32 * c), _mm256_add_epi8(iq_chunk_256(b, c, TY, sv, ix), to64));
}
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

/* ------------------------------------------------------------------ AVX-VNNI (AVX2 CPUs with vpdpbusd: Alder Lake and
 * later Intel desktops, Zen 4 / 5): the many-token Q8_0 kernel of the AVX-512 section (q8_0_512_gemm, which
 * explains it) on 8 lanes, 7 tokens a tile.  One core (Zen 5 VM, AVX2 level), 64 tokens: ~105 GMAC/s against ~50
 * for the AVX2 per-row kernel; 1.2x at 10 tokens. */
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
#define Q8V_XBYTES (8 * 32 + 32)
static int g_avxvnni_hw = 0; /* the CPU has AVX-VNNI (isa_init) */
static int g_avxvnni = 0;    /* and it is used: isa_init (off with K2LOCAL_AVXVNNI=0), k2k_set_avxvnni */

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
NT_BODY(iq4nl_vnni, iq4nl_body, TVNNI, 1)
NT_BODY(iq4xs_vnni, iq4xs_body, TVNNI, 1)
NT_DISPATCH4_SPLIT(q4k_vnni, TVNNI)
NT_DISPATCH4_SPLIT(q5k_vnni, TVNNI)
NT_DISPATCH4_SPLIT(q2k_vnni, TVNNI)
NT_DISPATCH4_SPLIT(q3k_vnni, TVNNI)
NT_DISPATCH4_SPLIT(q6k_vnni, TVNNI)
NT_DISPATCH4_SPLIT(q8_0_vnni, TVNNI)
NT_DISPATCH(q4_0_vnni, TVNNI, 2)
NT_DISPATCH(q5_0_vnni, TVNNI, 4)
NT_DISPATCH(q5_1_vnni, TVNNI, 4)
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

static void q8_0_vnni_pack(const act_t *a, int nt, int nb, uint8_t *X);
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

/* ------------------------------------------------------------------ AVX-512 VNNI kernels */
#ifndef K2K_EMULATE_AVX512
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")))
/* + AVX512_VBMI (vpermb / vpermi2b), for the kernels picked only where the CPU reports it */
#define T512V __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c,bmi2")))
#else
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
#endif

/* permutexvar_epi16 index vectors, loaded from memory (building them with broadcasts/inserts cost
 * ~60 instructions per kernel call, i.e. per weight row: a lot next to 8 blocks of a down row) */
#define K2K_I8(x) x, x, x, x, x, x, x, x
static const int16_t ix_q23[4][32] __attribute__((aligned(64))) = {
    {K2K_I8(0), K2K_I8(1), K2K_I8(8), K2K_I8(9)},
    {K2K_I8(2), K2K_I8(3), K2K_I8(10), K2K_I8(11)},
    {K2K_I8(4), K2K_I8(5), K2K_I8(12), K2K_I8(13)},
    {K2K_I8(6), K2K_I8(7), K2K_I8(14), K2K_I8(15)}};
static const int16_t ix_q6[4][32] __attribute__((aligned(64))) = {
    {K2K_I8(0), K2K_I8(1), K2K_I8(2), K2K_I8(3)},
    {K2K_I8(4), K2K_I8(5), K2K_I8(6), K2K_I8(7)},
    {K2K_I8(8), K2K_I8(9), K2K_I8(10), K2K_I8(11)},
    {K2K_I8(12), K2K_I8(13), K2K_I8(14), K2K_I8(15)}};
#define IXLOAD(tab, k) _mm512_load_si512((const void *)(tab)[k])

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
    T512 static void name##_r2(const uint8_t *w, ptrdiff_t rs, int nb, const act_t *a, float *out, const uint8_t *pf0, \
                               const uint8_t *pf1) {                                                                \
        body(w, rs, 2, nb, a, 1, out, 0, pf0, pf1, variant, 0);                                                     \
    }                                                                                                               \
    T512 static void name##g_r2(const uint8_t *w, ptrdiff_t rs, int nb, const act_t *a, float *out, const uint8_t *pf0, \
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
T512 static int q8_0_512_short(const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const act_t *a, float *out) {
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

/* Q8_0 against many tokens (prefill): an int8 GEMM with VNNI.  The vector lanes are tokens: each dpbusd takes four
 * weight bytes broadcast from the row and four activation bytes of 16 lanes, so a 32-value block is 8 dpbusd per row
 * with no horizontal sums.  One core, 64 tokens: 160-194 GMAC/s against 80-86 for the per-row kernel, close to one
 * dpbusd per cycle at 60 useful multiply-adds each (a 15-token tile wastes lanes at 16-30 tokens).  Activations are
 * packed once per call (q8_0_512_pack): per block, 8 vectors whose lane t holds bytes 4k .. 4k+3 of token t + 128
 * (dpbusd wants them unsigned), lane 15 holding 1s so that it sums the weight block itself (the +128's correction),
 * then the 16 tokens' block scales (0 in lanes without a token). */
#define Q8G_XBYTES (8 * 64 + 64)
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

/* ------------------------------------------------------------------ AVX-512 IQ kernels */

AI T512 void iq4nl_512_nt(const uint8_t *w, int nb, const act_t *a, const int NT, float *out, ptrdiff_t os, const uint8_t *pf) {
    q4_32_512_body(w, nb, a, NT, out, os, pf, 1);
}
NT_DISPATCH(iq4nl_512, T512, 4)

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

/* streaming read used by the bandwidth probe */
T512 static uint64_t read_sum_512(const uint8_t *p, size_t n) {
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
T256 static uint64_t read_sum_256(const uint8_t *p, size_t n) {
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

static uint64_t read_sum_gen(const uint8_t *p, size_t n) {
    uint64_t a = 0, b = 0;
    for (size_t i = 0; i + 16 <= n; i += 16) {
        uint64_t x, y;
        memcpy(&x, p + i, 8);
        memcpy(&y, p + i + 8, 8);
        a ^= x;
        b ^= y;
    }
    return a ^ b;
}

/* ------------------------------------------------------------------ dispatch */

/* Two weight rows (w and w + rs) against one token: out[0], out[1]; bit-identical to two dot_fn calls. */
typedef void (*dot2_fn)(const uint8_t *w, ptrdiff_t rs, int nb, const act_t *a, float *out, const uint8_t *pf0,
                        const uint8_t *pf1);

/* Many short contiguous rows (nb blocks each, row i at w + i * rs) against one token: out[i]; returns 0 (nothing
 * done) when it does not handle this row shape. */
typedef int (*rows_fn)(const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const act_t *a, float *out);

/* Many tokens (prefill): X holds up to kern_t.gtok tokens' activations packed by the kernel's pack_fn;
 * out[t * os + r] for rows r < nrows (row r at w + r * rs), tokens t < nt. */
typedef struct kern_s kern_t;
/* Many tokens (prefill): T tokens' activations packed by the kernel's pack_fn in tiles of kern_t.gtok tokens, xgb
 * bytes apart; out[t * os + r] for rows r < nrows (row r at w + r * rs), tokens t < T. */
typedef void (*gemm_fn)(const kern_t *k, const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const uint8_t *X,
                        size_t xgb, int T, float *out, ptrdiff_t os);
/* packs up to gtok tokens' activations (quantized in the kernel's layout) for gemm_fn */
typedef void (*pack_fn)(const act_t *a, int nt, int nb, uint8_t *X, int layout, int blk);
/* decode-once GEMM: one weight row -> panel (see pnl_gemm), and one token tile over PNL_ROWS decoded rows */
typedef void (*pdec_fn)(const uint8_t *w, int nb, uint8_t *q, float *dw, float *mw);
typedef void (*ptile_fn)(const uint8_t *pnl, size_t pstride, int nr, int n32, const uint8_t *X, int nt, float *out,
                         ptrdiff_t os);
#define GEMM_MIN_T 10 /* the per-row kernels are used below this many tokens (about as fast at 8-10) */

struct kern_s {
    dot_fn fn;
    int layout;
    dot2_fn fn2; /* optional row-pair kernel for one token (decode), NULL if none */
    rows_fn fnr; /* optional short-row kernel for one token (decode), NULL if none */
    gemm_fn fng; /* optional many-token kernel (prefill) on activations packed by fnp (nb * xbytes bytes), or NULL */
    pack_fn fnp;
    int xbytes, gtok; /* packed bytes per block, tokens per packed tile */
    int gmin;         /* fng from this many tokens up */
    int blk;          /* values per block */
    pdec_fn pdec;     /* decode-once GEMM (fng = pnl_gemm): row decoder and tile kernel */
    ptile_fn ptile;
    int pg;           /* values per panel scale (16 or 32) */
    /* codebook types at the AVX2 level, more than RUN_TILE tokens: a row decoded once (udec) into UPAN_BPB bytes a
     * block, then upan over it for all tokens */
    void (*udec)(const uint8_t *w, int nb, uint8_t *pan);
    dot_fn upan;
};

#if K2K_X86
/* The Q8_0 GEMMs over all tiles */
static void q8_0_512_gemm_all(const kern_t *k, const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const uint8_t *X,
                              size_t xgb, int T, float *out, ptrdiff_t os) {
    for (int t0 = 0, i = 0; t0 < T; t0 += k->gtok, i++)
        q8_0_512_gemm(w, rs, nrows, nb, X + xgb * i, T - t0 < k->gtok ? T - t0 : k->gtok, out + t0 * os, os);
}
static void q8_0_vnni_gemm_all(const kern_t *k, const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const uint8_t *X,
                               size_t xgb, int T, float *out, ptrdiff_t os) {
    for (int t0 = 0, i = 0; t0 < T; t0 += k->gtok, i++)
        q8_0_vnni_gemm(w, rs, nrows, nb, X + xgb * i, T - t0 < k->gtok ? T - t0 : k->gtok, out + t0 * os, os);
}
static void q8_0_512_pack_l(const act_t *a, int nt, int nb, uint8_t *X, int layout, int blk) {
    (void)layout, (void)blk;
    q8_0_512_pack(a, nt, nb, X);
}
static void q8_0_vnni_pack_l(const act_t *a, int nt, int nb, uint8_t *X, int layout, int blk) {
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

/* the AVX2-level decode-once path of the codebook types */
static void upan_attach(kern_t *k, int type) {
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

/* the decode-once GEMM for this type at this ISA level, if it has one */
static void pnl_attach(kern_t *k, int type, int isa) {
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

static int g_isa_hw = -1, g_isa = -1;
static int g_vbmi = 0; /* AVX512_VBMI (IQ3 kernels at ISA level avx512-vnni-gfni) */

static int detect_isa(void) {
#ifdef K2K_EMULATE_AVX512
    return ISA_AVX512G;
#endif
#if K2K_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return __builtin_cpu_supports("gfni") ? ISA_AVX512G : ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("bmi2"))
        return ISA_AVX2;
#endif
    return ISA_GENERIC;
}

static void isa_init(void) {
    if (g_isa_hw >= 0) return;
    g_isa_hw = detect_isa();
#ifdef K2K_EMULATE_AVX512
    g_vbmi = 1;
#elif K2K_X86
    g_vbmi = g_isa_hw >= ISA_AVX512 && __builtin_cpu_supports("avx512vbmi");
#ifdef K2K_FAKE_AVXVNNI
    g_avxvnni_hw = g_isa_hw >= ISA_AVX2;
#else
    g_avxvnni_hw = g_isa_hw >= ISA_AVX2 && __builtin_cpu_supports("avxvnni");
#endif
    const char *ev = getenv("K2LOCAL_AVXVNNI");
    g_avxvnni = g_avxvnni_hw && !(ev && !strcmp(ev, "0"));
#endif
    g_isa = g_isa_hw;
    const char *e = getenv("K2LOCAL_ISA");
    if (e) {
        int want = !strcmp(e, "generic") ? ISA_GENERIC : !strcmp(e, "avx2") ? ISA_AVX2 : !strcmp(e, "avx512") ? ISA_AVX512 : ISA_AVX512G;
        if (want < g_isa) g_isa = want;
    }
}

static kern_t get_kernel_base(int type) {
    kern_t k;
    memset(&k, 0, sizeof k);
    int k_layout = (type == GT_Q8_0 || type == GT_Q4_0 || type == GT_Q5_0 || type == GT_Q5_1 || type == GT_IQ4_NL)
                       ? LAYOUT_Q8_0 : LAYOUT_NAT;
    k.layout = k_layout;
#if K2K_X86
    if (g_isa == ISA_AVX512G) {
        switch (type) {
        case GT_Q2_K: k.fn = q2k_512g; k.fn2 = q2k_512g_r2; k.layout = LAYOUT_P2; return k;
        case GT_Q3_K: k.fn = q3k_512g; k.fn2 = q3k_512g_r2; k.layout = LAYOUT_P2; return k;
        case GT_Q4_K: k.fn = q4k_512g; k.fn2 = q4k_512g_r2; k.layout = LAYOUT_P64; return k;
        case GT_Q5_K: k.fn = q5k_512g; k.fn2 = q5k_512g_r2; k.layout = LAYOUT_P64; return k;
        case GT_Q6_K: k.fn = q6k_512g; k.fn2 = q6k_512g_r2; return k;
        case GT_IQ3_XXS: if (g_vbmi) { k.fn = iq3xxs_vbmi; return k; } break;
        case GT_IQ3_S: if (g_vbmi) { k.fn = iq3s_vbmi; return k; } break;
        }
    }
    if (g_isa >= ISA_AVX512) {
        switch (type) {
        case GT_Q4_0: k.fn = q4_0_512; return k;
        case GT_Q5_0: k.fn = q5_0_512; return k;
        case GT_Q5_1: k.fn = q5_1_512; return k;
        case GT_Q8_0:
            k.fn = q8_0_512, k.fnr = q8_0_512_short, k.fng = q8_0_512_gemm_all, k.fnp = q8_0_512_pack_l, k.gmin = GEMM_MIN_T, k.xbytes = Q8G_XBYTES;
            k.gtok = 15; /* the vector's 16th lane is used by the kernel itself */
            return k;
        case GT_Q2_K: k.fn = q2k_512; k.fn2 = q2k_512_r2; k.layout = LAYOUT_P2; return k;
        case GT_Q3_K: k.fn = q3k_512; k.fn2 = q3k_512_r2; k.layout = LAYOUT_P2; return k;
        case GT_Q4_K: k.fn = q4k_512; k.fn2 = q4k_512_r2; k.layout = LAYOUT_P64; return k;
        case GT_Q5_K: k.fn = q5k_512; k.fn2 = q5k_512_r2; k.layout = LAYOUT_P64; return k;
        case GT_Q6_K: k.fn = q6k_512; k.fn2 = q6k_512_r2; return k;
        case GT_IQ4_NL: k.fn = iq4nl_512; return k;
        case GT_IQ4_XS: k.fn = iq4xs_512; k.layout = LAYOUT_IQ4X; return k;
        case GT_IQ2_XXS: k.fn = iq2xxs_512; return k;
        case GT_IQ2_XS: k.fn = iq2xs_512; return k;
        case GT_IQ2_S: k.fn = iq2s_512; return k;
        case GT_IQ3_XXS: k.fn = iq3xxs_512; return k;
        case GT_IQ3_S: k.fn = iq3s_512; return k;
        case GT_IQ1_S: k.fn = iq1s_512; return k;
        case GT_IQ1_M: k.fn = iq1m_512; return k;
        }
    } else if (g_isa == ISA_AVX2 && g_avxvnni) {
        switch (type) {
        case GT_IQ2_XXS: k.fn = iq2xxs_vnni; return k;
        case GT_IQ2_XS: k.fn = iq2xs_vnni; return k;
        case GT_IQ2_S: k.fn = iq2s_vnni; return k;
        case GT_IQ3_XXS: k.fn = iq3xxs_vnni; return k;
        case GT_IQ3_S: k.fn = iq3s_vnni; return k;
        case GT_IQ1_S: k.fn = iq1s_vnni; return k;
        case GT_IQ1_M: k.fn = iq1m_vnni; return k;
        case GT_IQ4_NL: k.fn = iq4nl_vnni; return k;
        case GT_IQ4_XS: k.fn = iq4xs_vnni; k.layout = LAYOUT_IQ4X; return k;
        case GT_Q4_0: k.fn = q4_0_vnni; return k;
        case GT_Q5_0: k.fn = q5_0_vnni; return k;
        case GT_Q5_1: k.fn = q5_1_vnni; return k;
        case GT_Q8_0:
            k.fn = q8_0_vnni, k.fng = q8_0_vnni_gemm_all, k.fnp = q8_0_vnni_pack_l, k.gmin = GEMM_MIN_T, k.xbytes = Q8V_XBYTES, k.gtok = 7;
            return k;
        case GT_Q2_K: k.fn = q2k_vnni; return k;
        case GT_Q3_K: k.fn = q3k_vnni; return k;
        case GT_Q4_K: k.fn = q4k_vnni; return k;
        case GT_Q5_K: k.fn = q5k_vnni; return k;
        case GT_Q6_K: k.fn = q6k_vnni; return k;
        }
    }
    if (g_isa == ISA_AVX2) {
        switch (type) {
        case GT_IQ4_NL: k.fn = iq4nl_avx2; return k;
        case GT_IQ4_XS: k.fn = iq4xs_avx2; k.layout = LAYOUT_IQ4X; return k;
        case GT_IQ2_XXS: k.fn = iq2xxs_avx2; return k;
        case GT_IQ2_XS: k.fn = iq2xs_avx2; return k;
        case GT_IQ2_S: k.fn = iq2s_avx2; return k;
        case GT_IQ3_XXS: k.fn = iq3xxs_avx2; return k;
        case GT_IQ3_S: k.fn = iq3s_avx2; return k;
        case GT_IQ1_S: k.fn = iq1s_avx2; return k;
        case GT_IQ1_M: k.fn = iq1m_avx2; return k;
        case GT_Q4_0: k.fn = q4_0_avx2; return k;
        case GT_Q5_0: k.fn = q5_0_avx2; return k;
        case GT_Q5_1: k.fn = q5_1_avx2; return k;
        case GT_Q8_0: k.fn = q8_0_avx2; return k;
        case GT_Q2_K: k.fn = q2k_avx2; return k;
        case GT_Q3_K: k.fn = q3k_avx2; return k;
        case GT_Q4_K: k.fn = q4k_avx2; return k;
        case GT_Q5_K: k.fn = q5k_avx2; return k;
        case GT_Q6_K: k.fn = q6k_avx2; return k;
        }
    }
#endif
    switch (type) {
    case GT_Q4_0: k.fn = dot_q4_0_gen; break;
    case GT_Q5_0: k.fn = dot_q5_0_gen; break;
    case GT_Q5_1: k.fn = dot_q5_1_gen; break;
    case GT_Q8_0: k.fn = dot_q8_0_gen; break;
    case GT_Q2_K: k.fn = dot_q2_k_gen; break;
    case GT_Q3_K: k.fn = dot_q3_k_gen; break;
    case GT_Q4_K: k.fn = dot_q4_k_gen; break;
    case GT_Q5_K: k.fn = dot_q5_k_gen; break;
    case GT_Q6_K: k.fn = dot_q6_k_gen; break;
    case GT_IQ4_NL: k.fn = dot_iq4_nl_gen; break;
    case GT_IQ4_XS: k.fn = dot_iq4_xs_gen; break;
    case GT_IQ2_XXS: k.fn = dot_iq2_xxs_gen; break;
    case GT_IQ2_XS: k.fn = dot_iq2_xs_gen; break;
    case GT_IQ2_S: k.fn = dot_iq2_s_gen; break;
    case GT_IQ3_XXS: k.fn = dot_iq3_xxs_gen; break;
    case GT_IQ3_S: k.fn = dot_iq3_s_gen; break;
    case GT_IQ1_S: k.fn = dot_iq1_s_gen; break;
    case GT_IQ1_M: k.fn = dot_iq1_m_gen; break;
    }
    return k;
}

static kern_t get_kernel(int type) {
    kern_t k = get_kernel_base(type);
    const tinfo_t *ti = tinfo(type);
    k.blk = ti ? ti->blk : 0;
#if K2K_X86
    if (g_panel) pnl_attach(&k, type, g_isa);
    if (g_panel && g_isa == ISA_AVX2) upan_attach(&k, type);
#endif
    return k;
}

/* ------------------------------------------------------------------ activation quantization dispatch */

static void quantize_act_range(const float *x, int64_t cols, int layout, uint8_t *buf, int64_t c0, int64_t c1) {
#if K2K_X86
    if (g_isa >= ISA_AVX2) {
        quantize_act_range_avx2(x, cols, layout, buf, c0, c1);
        return;
    }
#endif
    quantize_act_range_gen(x, cols, layout, buf, c0, c1);
}

static void quantize_act(const float *x, int64_t cols, int layout, uint8_t *buf) {
    quantize_act_range(x, cols, layout, buf, 0, cols);
}

/* ------------------------------------------------------------------ thread pool */

typedef void (*task_fn)(void *ctx, int tid, int nth);

typedef struct {
    pthread_t th;
    int tid;
    uint64_t gen0; /* pool generation at creation: only later tasks are ours */
} worker_t;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_t call_mu; /* serializes public calls */
    int nth;                 /* participants including caller */
    worker_t *w;
    _Atomic uint64_t gen;
    _Atomic int done;
    _Atomic int quit;
    task_fn fn;
    void *ctx;
    int pin;
    int cpus[1024];
    int ncpus;
    int spin_us;
    int physical;
    /* barrier */
    _Atomic int bar_count;
    _Atomic int bar_sense;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, 1};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline void cpu_relax(void) {
#if K2K_X86
    __builtin_ia32_pause();
#endif
}

static void pin_self(int tid) {
    if (!P.pin || P.ncpus <= 0) return;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(P.cpus[tid % P.ncpus], &s);
    pthread_setaffinity_np(pthread_self(), sizeof(s), &s);
}

static void *worker_main(void *arg) {
    worker_t *me = (worker_t *)arg;
    pin_self(me->tid);
    uint64_t seen = me->gen0;
    for (;;) {
        uint64_t g;
        double t0 = 0;
        int it = 0;
        for (;;) {
            g = atomic_load_explicit(&P.gen, memory_order_acquire);
            if (g != seen || atomic_load(&P.quit)) break;
            cpu_relax();
            if ((++it & 255) == 0) {
                double t = now_s();
                if (t0 == 0) t0 = t;
                else if ((t - t0) * 1e6 > P.spin_us) {
                    pthread_mutex_lock(&P.mu);
                    while (atomic_load(&P.gen) == seen && !atomic_load(&P.quit)) pthread_cond_wait(&P.cv, &P.mu);
                    pthread_mutex_unlock(&P.mu);
                    t0 = 0;
                }
            }
        }
        if (atomic_load(&P.quit)) return NULL;
        seen = g;
        P.fn(P.ctx, me->tid, P.nth);
        atomic_fetch_add_explicit(&P.done, 1, memory_order_acq_rel);
    }
}

/* physical-core aware CPU order, NUMA-interleaved */
static int read_cpulist(const char *path, int *out, int cap) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char buf[4096];
    int n = 0;
    if (!fgets(buf, sizeof buf, f)) {
        fclose(f);
        return -1;
    }
    fclose(f);
    char *p = buf;
    while (*p && *p != '\n') {
        int a = (int)strtol(p, &p, 10), b = a;
        if (*p == '-') b = (int)strtol(p + 1, &p, 10);
        for (int c = a; c <= b && n < cap; c++) out[n++] = c;
        if (*p == ',') p++;
        else break;
    }
    return n;
}

static int g_numa_nodes = 1;

static void build_cpu_order(void) {
    cpu_set_t s;
    int allowed[1024], na = 0;
    if (sched_getaffinity(0, sizeof(s), &s) == 0) {
        for (int c = 0; c < 1024 && na < 1024; c++)
            if (CPU_ISSET(c, &s)) allowed[na++] = c;
    }
    if (na == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        for (int c = 0; c < n && c < 1024; c++) allowed[na++] = c;
    }
    /* one CPU per physical core first (SMT siblings go last) */
    int first[1024], nf = 0, rest[1024], nr = 0;
    for (int i = 0; i < na; i++) {
        char path[256];
        int sib[256];
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/thread_siblings_list", allowed[i]);
        int ns = read_cpulist(path, sib, 256);
        int primary = 1;
        for (int k = 0; k < ns; k++)
            if (sib[k] < allowed[i]) {
                for (int j = 0; j < na; j++)
                    if (allowed[j] == sib[k]) primary = 0;
            }
        if (primary) first[nf++] = allowed[i];
        else rest[nr++] = allowed[i];
    }
    /* NUMA nodes */
    int node_of[1024];
    for (int i = 0; i < 1024; i++) node_of[i] = 0;
    int nn = 0;
    for (int nd = 0; nd < 64; nd++) {
        char path[128];
        int cl[1024];
        snprintf(path, sizeof path, "/sys/devices/system/node/node%d/cpulist", nd);
        int n = read_cpulist(path, cl, 1024);
        if (n < 0) continue;
        nn = nd + 1;
        for (int k = 0; k < n; k++)
            if (cl[k] < 1024) node_of[cl[k]] = nd;
    }
    g_numa_nodes = nn > 0 ? nn : 1;
    /* interleave nodes: round-robin over nodes within each class */
    int ncp = 0;
    for (int cls = 0; cls < 2; cls++) {
        int *src = cls ? rest : first, ns = cls ? nr : nf;
        int used[1024] = {0}, left = ns;
        while (left > 0) {
            for (int nd = 0; nd < g_numa_nodes && left > 0; nd++) {
                for (int k = 0; k < ns; k++)
                    if (!used[k] && node_of[src[k]] == nd) {
                        used[k] = 1;
                        P.cpus[ncp++] = src[k];
                        left--;
                        break;
                    }
            }
        }
    }
    P.ncpus = ncp;
    P.physical = nf;
}

static void pool_stop(void) {
    if (!P.w) return;
    atomic_store(&P.quit, 1);
    pthread_mutex_lock(&P.mu);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    for (int i = 1; i < P.nth; i++) pthread_join(P.w[i].th, NULL);
    free(P.w);
    P.w = NULL;
    atomic_store(&P.quit, 0);
    P.nth = 1;
}

static int pool_start(int n, int pin) {
    pool_stop();
    if (n < 1) n = 1;
    if (n > 1024) n = 1024;
    P.pin = pin;
    P.nth = n;
    P.w = (worker_t *)calloc((size_t)n, sizeof(worker_t));
    if (!P.w) {
        P.nth = 1;
        return 1;
    }
    pin_self(0);
    for (int i = 1; i < n; i++) {
        P.w[i].tid = i;
        P.w[i].gen0 = atomic_load(&P.gen);
        if (pthread_create(&P.w[i].th, NULL, worker_main, &P.w[i]) != 0) {
            P.nth = i;
            break;
        }
    }
    return P.nth;
}

static void pool_run(task_fn fn, void *ctx) {
    if (P.nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    P.fn = fn;
    P.ctx = ctx;
    atomic_store(&P.done, 0);
    atomic_store(&P.bar_count, 0);
    atomic_store(&P.bar_sense, 0);
    pthread_mutex_lock(&P.mu);
    atomic_fetch_add_explicit(&P.gen, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    fn(ctx, 0, P.nth);
    int it = 0;
    while (atomic_load_explicit(&P.done, memory_order_acquire) < P.nth - 1) {
        cpu_relax();
        if ((++it & 1023) == 0) sched_yield();
    }
}

/* sense-reversing barrier across all participants of the current task */
static void pool_barrier(int nth, int *local_sense) {
    if (nth <= 1) return;
    *local_sense = !*local_sense;
    if (atomic_fetch_add_explicit(&P.bar_count, 1, memory_order_acq_rel) == nth - 1) {
        atomic_store(&P.bar_count, 0);
        atomic_store_explicit(&P.bar_sense, *local_sense, memory_order_release);
    } else {
        int it = 0;
        while (atomic_load_explicit(&P.bar_sense, memory_order_acquire) != *local_sense) {
            cpu_relax();
            if ((++it & 1023) == 0) sched_yield();
        }
    }
}

static int g_pool_init = 0;

/* a forked child has none of the parent's workers: start over lazily */
static void atfork_child(void) {
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    pthread_mutex_init(&P.call_mu, NULL);
    P.w = NULL;
    P.nth = 1;
    atomic_store(&P.quit, 0);
    g_pool_init = 0;
}

static void ensure_init(void) {
    if (g_pool_init) return;
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, atfork_child);
        atfork_done = 1;
    }
    g_pool_init = 1;
    isa_init();
    build_cpu_order();
    const char *e = getenv("K2LOCAL_SPIN_US");
    P.spin_us = e ? atoi(e) : 300;
    int n = P.physical > 0 ? P.physical : 1;
    e = getenv("K2LOCAL_THREADS");
    if (e && atoi(e) > 0) n = atoi(e);
    e = getenv("K2LOCAL_PREFETCH");
    if (e) g_pfd = atoi(e) > 0 ? atoi(e) : 0;
    e = getenv("K2LOCAL_PAIRS");
    if (e) g_no_pairs = atoi(e) <= 0;
    e = getenv("K2LOCAL_PANEL");
    if (e) g_panel = atoi(e) > 0;
    e = getenv("K2LOCAL_PREFETCH_L2");
    if (e) g_pf_l2 = atoi(e) > 0;
    const char *pe = getenv("K2LOCAL_PIN");
    pool_start(n, pe && atoi(pe) > 0);
}

/* ------------------------------------------------------------------ scratch */

static uint8_t *g_scratch = NULL;
static size_t g_scratch_cap = 0;
static void *scratch(size_t n) {
    if (n > g_scratch_cap) {
        free(g_scratch);
        size_t cap = n + n / 4 + 4096;
        if (posix_memalign((void **)&g_scratch, 64, cap) != 0) {
            g_scratch = NULL;
            g_scratch_cap = 0;
            return NULL;
        }
        g_scratch_cap = cap;
    }
    return g_scratch;
}
static inline size_t al64(size_t n) { return (n + 63) & ~(size_t)63; }

/* ------------------------------------------------------------------ matmul */

#define MAXNT 64 /* tokens per kernel call; larger batches loop */
#ifndef RUN_ROWS
#define RUN_ROWS 16 /* rows per block when tokens come in several tiles (run_rows); 8-32 about the same */
#endif
#define RUN_TILE 4 /* tokens per kernel call there: the kernels' own tile */
#define PREQUANT_MAX 65536 /* quantize activations in the calling thread up to this many values */

/* Rows [r0, r1) of w.  The prefetch stream runs g_pfd bytes ahead and, past r1, continues into
 * `next` (the segment this thread reads next, or NULL when unknown). */
static inline void run_rows(const kern_t *k, const uint8_t *w, int64_t row_stride, int nb, int64_t r0, int64_t r1,
                            const act_t *acts, int nt, float *out, ptrdiff_t os, const uint8_t *next) {
    const uint8_t *end = w + r1 * row_stride;
    const int64_t pfd = g_pfd;
    const int pairs = nt == 1 && k->fn2 && !g_no_pairs;
    if (nt == 1 && k->fnr && k->fnr(w + r0 * row_stride, (ptrdiff_t)row_stride, r1 - r0, nb, acts, out)) return;
    if (nt > RUN_TILE && k->udec) { /* decode each row once, then every 4-token tile over the decoded bytes */
        uint8_t *pan = thread_rows_buf((size_t)UPAN_BPB * nb);
        for (int64_t r = r0; r < r1; r++) {
            k->udec(w + r * row_stride, nb, pan);
            k->upan(pan, nb, acts, nt, out + (r - r0), os, NULL);
        }
        return;
    }
    if (nt > RUN_TILE) {
        /* More tokens than a kernel call takes: a few rows at a time, each tile of tokens over those rows, so the
         * tile's activations stay in L1 while the rows are read again from it (row by row with all tiles read
         * every token's activations per row, from L2 once they outgrow L1).  One core, Q4_K / Q2_K [2048 x 7168] at
         * 8-64 tokens: 1.3-1.5x (Q4_K at 21 tokens 89 -> 135 GMAC/s), [7168 x 2048] 1.0-1.3x; same bits. */
        for (int64_t rb = r0; rb < r1; rb += RUN_ROWS) {
            const int64_t re = rb + RUN_ROWS < r1 ? rb + RUN_ROWS : r1;
            for (int t0 = 0; t0 < nt; t0 += RUN_TILE)
                for (int64_t r = rb; r < re; r++) {
                    const uint8_t *row = w + r * row_stride, *pf = NULL;
                    if (t0 == 0 && pfd > 0) {
                        pf = row + pfd;
                        if (pf >= end) pf = next ? next + (pf - end) : NULL;
                    }
                    k->fn(row, nb, acts + t0, nt - t0 < RUN_TILE ? nt - t0 : RUN_TILE, out + t0 * os + (r - r0), os, pf);
                }
        }
        return;
    }
    for (int64_t r = r0; r < r1;) {
        const uint8_t *row = w + r * row_stride, *pf = NULL, *pf1 = NULL;
        if (pfd > 0) {
            pf = row + pfd;
            if (pf >= end) pf = next ? next + (pf - end) : NULL;
        }
        if (pairs && r + 1 < r1) {
            if (pfd > 0) {
                pf1 = row + row_stride + pfd;
                if (pf1 >= end) pf1 = next ? next + (pf1 - end) : NULL;
            }
            k->fn2(row, (ptrdiff_t)row_stride, nb, acts, out + (r - r0), pf, pf1);
            r += 2;
        } else {
            k->fn(row, nb, acts, nt, out + (r - r0), os, pf);
            r++;
        }
    }
}

static int64_t pick_chunk(int64_t items_rows, int nth, int64_t lo, int64_t hi) {
    /* aim for >= 8 chunks per thread, within [lo, hi], power of two */
    int64_t c = hi;
    while (c > lo && items_rows / c < 8 * (int64_t)nth) c /= 2;
    return c;
}

typedef struct {
    kern_t k;
    const uint8_t *w;
    int64_t rows, cols, row_stride, T, ldx, ldy, chunk;
    int64_t heads, w_hs, x_hs, y_hs; /* independent matrices (attention heads): bytes / floats between heads */
    int nb;
    const float *x;
    float *y;
    uint8_t *abuf;   /* heads x T activation buffers */
    size_t abytes;
    int prequant; /* activations already quantized by the caller: no barrier needed */
    uint8_t *xg;  /* many-token kernel (k.fng): heads x ntiles packed activation tiles of xgb bytes, else NULL */
    size_t xgb;
    int64_t ntiles;
    _Atomic int64_t next;
} mm_ctx;

static void mm_quantize(mm_ctx *c, int64_t i) { /* activation row i = head * T + token */
    quantize_act(c->x + (i / c->T) * c->x_hs + (i % c->T) * c->ldx, c->cols, c->k.layout, c->abuf + i * c->abytes);
}

static void mm_task(void *vctx, int tid, int nth) {
    mm_ctx *c = (mm_ctx *)vctx;
    int sense = 0;
    if (!c->prequant) {
        for (int64_t i = tid; i < c->heads * c->T; i += nth) mm_quantize(c, i);
        pool_barrier(nth, &sense);
    }
    act_t acts[MAXNT];
    if (c->xg) { /* pack each (head, tile of gtok tokens) for the many-token kernel */
        for (int64_t u = tid; u < c->heads * c->ntiles; u += nth) {
            const int64_t h = u / c->ntiles, t0 = (u % c->ntiles) * c->k.gtok, n = c->T - t0 < c->k.gtok ? c->T - t0 : c->k.gtok;
            for (int64_t t = 0; t < n; t++) acts[t] = act_view(c->abuf + (h * c->T + t0 + t) * c->abytes, c->cols);
            c->k.fnp(acts, (int)n, c->nb, c->xg + u * c->xgb, c->k.layout, c->k.blk);
        }
        pool_barrier(nth, &sense);
    }
    int64_t hcur = -1;
    const int64_t nch = (c->rows + c->chunk - 1) / c->chunk, nchunks = nch * c->heads;
    for (;;) {
        int64_t ci = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (ci >= nchunks) break;
        const int64_t h = ci / nch, r0 = (ci % nch) * c->chunk, r1 = r0 + c->chunk < c->rows ? r0 + c->chunk : c->rows;
        if (c->xg) {
            c->k.fng(&c->k, c->w + h * c->w_hs + r0 * c->row_stride, (ptrdiff_t)c->row_stride, r1 - r0, c->nb,
                     c->xg + h * c->ntiles * c->xgb, c->xgb, (int)c->T, c->y + h * c->y_hs + r0, (ptrdiff_t)c->ldy);
            continue;
        }
        if (h != hcur) {
            for (int64_t t = 0; t < c->T; t++) acts[t] = act_view(c->abuf + (h * c->T + t) * c->abytes, c->cols);
            hcur = h;
        }
        const uint8_t *w = c->w + h * c->w_hs;
        /* keep prefetching into the following rows (read by this or a neighbouring thread), not past the matrix */
        const uint8_t *nx = r1 < c->rows ? w + r1 * c->row_stride : (h + 1 < c->heads ? w + c->w_hs : NULL);
        run_rows(&c->k, w, c->row_stride, c->nb, r0, r1, acts, (int)c->T, c->y + h * c->y_hs + r0, (ptrdiff_t)c->ldy, nx);
    }
}

/* ------------------------------------------------------------------ fused MoE experts */

typedef struct {
    int64_t T, hidden, inter, ldx, ldy;
    const float *x;
    float *y;
    int accumulate, prequant;
    kern_t kg, ku, kd;
    int nb_h, nb_u, nb_i; /* blocks per row: gate, up rows (hidden cols; the types may differ), down rows (inter) */
    int64_t rs_g, rs_u, rs_d;
    const uint8_t *const *gate, *const *up, *const *down;
    int nslots;
    const int *slot_exp;  /* slot -> expert index */
    const int *slot_off;  /* slot -> first pair (pairs grouped by slot), size nslots+1 */
    const int *pair_tok;  /* pair -> token */
    const float *pair_w;  /* pair -> routing weight */
    uint8_t *xa_g, *xa_u; /* per token activation buffers (hidden) */
    size_t xab, xas;      /* bytes of one buffer; bytes between tokens' buffers (0: every token is the same row) */
    int64_t Tq;           /* distinct rows to quantize: T, or 1 when x's row stride is 0 */
    float *h;             /* [npairs, inter] */
    uint8_t *ha;          /* per pair activation buffers (inter) */
    size_t hab;
    _Atomic int *span_done;
    int nspans;
    int64_t chunk1, nch1, chunk2;
    /* decode-once / many-token GEMM (kernel fng) for a slot's group of up to MAXNT pairs with >= gmin of them:
     * grp0[s] = the slot's first group; tiles of group g at xg_* + tb_*[g] * xgb_* (tb_*[g + 1] == tb_*[g]: none) */
    int *grp0;
    int64_t *tb_g, *tb_u, *tb_d;
    uint8_t *xg_g, *xg_u, *xg_d;
    size_t xgb_g, xgb_u, xgb_d;
    int ngroups, any_gemm1, any_gemm2, share_u; /* share_u: up uses gate's packed tiles */
    float *tmp;           /* per thread scratch */
    size_t tmp_per_thread;
    _Atomic int64_t next1, next2;
} moe_ctx;

#define SPAN 256

static inline float silu(float v) { return v / (1.f + expf(-v)); }

/* pack group g's activations (pair p's buffer at buf + (pair_tok[p] or p) * stride) in tiles for kernel k */
static void moe_pack(const moe_ctx *c, const kern_t *k, int g, int s, const uint8_t *buf, size_t stride, int by_tok,
                     int64_t cols, const int64_t *tb, uint8_t *xg, size_t xgb, int nb) {
    if (tb[g + 1] == tb[g]) return;
    act_t acts[MAXNT];
    const int p0 = c->slot_off[s] + (g - c->grp0[s]) * MAXNT;
    const int nt = c->slot_off[s + 1] - p0 < MAXNT ? c->slot_off[s + 1] - p0 : MAXNT;
    for (int i = 0; i < nt; i++)
        acts[i] = act_view((uint8_t *)buf + (size_t)(by_tok ? c->pair_tok[p0 + i] : p0 + i) * stride, cols);
    for (int t0 = 0, i = 0; t0 < nt; t0 += k->gtok, i++)
        k->fnp(acts + t0, nt - t0 < k->gtok ? nt - t0 : k->gtok, nb, xg + (tb[g] + i) * xgb, k->layout, k->blk);
}

static inline int group_slot(const moe_ctx *c, int g) { /* the slot a group belongs to */
    int lo = 0, hi = c->nslots - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (c->grp0[mid] <= g) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

static void moe_task(void *vctx, int tid, int nth) {
    moe_ctx *c = (moe_ctx *)vctx;
    int sense = 0;
    /* phase 0: quantize x per token for gate (and up if its layout differs) */
    if (!c->prequant) {
        for (int64_t t = tid; t < c->Tq; t += nth) {
            quantize_act(c->x + t * c->ldx, c->hidden, c->kg.layout, c->xa_g + t * c->xas);
            if (c->xa_u != c->xa_g) quantize_act(c->x + t * c->ldx, c->hidden, c->ku.layout, c->xa_u + t * c->xas);
        }
        pool_barrier(nth, &sense);
    }
    if (c->any_gemm1) { /* pack gate/up activations of the groups that go through the GEMM */
        for (int g = tid; g < c->ngroups; g += nth) {
            const int s = group_slot(c, g);
            moe_pack(c, &c->kg, g, s, c->xa_g, c->xas, 1, c->hidden, c->tb_g, c->xg_g, c->xgb_g, c->nb_h);
            if (!c->share_u)
                moe_pack(c, &c->ku, g, s, c->xa_u, c->xas, 1, c->hidden, c->tb_u, c->xg_u, c->xgb_u, c->nb_u);
        }
        pool_barrier(nth, &sense);
    }
    float *tmp = c->tmp + (size_t)tid * c->tmp_per_thread;
    act_t ag[MAXNT], au[MAXNT];
    /* phase 1: gate/up rows -> h = silu(g) * u; the thread finishing a 256-row span quantizes it */
    const int64_t n1 = (int64_t)c->nslots * c->nch1;
    for (;;) {
        int64_t it = atomic_fetch_add_explicit(&c->next1, 1, memory_order_relaxed);
        if (it >= n1) break;
        const int s = (int)(it / c->nch1), e = c->slot_exp[s];
        const int64_t r0 = (it % c->nch1) * c->chunk1, r1 = r0 + c->chunk1 < c->inter ? r0 + c->chunk1 : c->inter;
        const int64_t nr = r1 - r0;
        for (int p0 = c->slot_off[s]; p0 < c->slot_off[s + 1]; p0 += MAXNT) {
            int nt = c->slot_off[s + 1] - p0 < MAXNT ? c->slot_off[s + 1] - p0 : MAXNT;
            const int grp = c->grp0[s] + (p0 - c->slot_off[s]) / MAXNT;
            const int gg = c->tb_g[grp + 1] > c->tb_g[grp], gu = c->tb_u[grp + 1] > c->tb_u[grp];
            for (int k = 0; k < nt && !(gg && gu); k++) {
                int t = c->pair_tok[p0 + k];
                ag[k] = act_view(c->xa_g + (size_t)t * c->xas, c->hidden);
                au[k] = act_view(c->xa_u + (size_t)t * c->xas, c->hidden);
            }
            float *g = tmp, *u = tmp + (size_t)MAXNT * c->chunk1;
            if (gg)
                c->kg.fng(&c->kg, c->gate[e] + r0 * c->rs_g, c->rs_g, nr, c->nb_h, c->xg_g + c->tb_g[grp] * c->xgb_g,
                          c->xgb_g, nt, g, (ptrdiff_t)c->chunk1);
            else
                run_rows(&c->kg, c->gate[e], c->rs_g, c->nb_h, r0, r1, ag, nt, g, (ptrdiff_t)c->chunk1, c->up[e] + r0 * c->rs_u);
            if (gu)
                c->ku.fng(&c->ku, c->up[e] + r0 * c->rs_u, c->rs_u, nr, c->nb_u, c->xg_u + c->tb_u[grp] * c->xgb_u,
                          c->xgb_u, nt, u, (ptrdiff_t)c->chunk1);
            else
                run_rows(&c->ku, c->up[e], c->rs_u, c->nb_u, r0, r1, au, nt, u, (ptrdiff_t)c->chunk1,
                         r1 < c->inter ? c->up[e] + r1 * c->rs_u : NULL);
            for (int k = 0; k < nt; k++) {
                float *hr = c->h + (size_t)(p0 + k) * c->inter;
                for (int64_t r = 0; r < nr; r++) hr[r0 + r] = silu(g[k * c->chunk1 + r]) * u[k * c->chunk1 + r];
            }
        }
        const int span = (int)(r0 / SPAN);
        const int64_t s0 = (int64_t)span * SPAN, s1 = s0 + SPAN < c->inter ? s0 + SPAN : c->inter;
        int prev = atomic_fetch_add_explicit(&c->span_done[s * c->nspans + span], (int)nr, memory_order_acq_rel);
        if (prev + nr == s1 - s0) {
            for (int p = c->slot_off[s]; p < c->slot_off[s + 1]; p++)
                quantize_act_range(c->h + (size_t)p * c->inter, c->inter, c->kd.layout, c->ha + (size_t)p * c->hab, s0, s1);
        }
    }
    pool_barrier(nth, &sense);
    if (c->any_gemm2) {
        for (int g = tid; g < c->ngroups; g += nth)
            moe_pack(c, &c->kd, g, group_slot(c, g), c->ha, c->hab, 0, c->inter, c->tb_d, c->xg_d, c->xgb_d, c->nb_i);
        pool_barrier(nth, &sense);
    }
    /* phase 2: down rows; each chunk of output rows loops over all slots and accumulates */
    const int64_t n2 = (c->hidden + c->chunk2 - 1) / c->chunk2;
    for (;;) {
        int64_t it = atomic_fetch_add_explicit(&c->next2, 1, memory_order_relaxed);
        if (it >= n2) break;
        const int64_t r0 = it * c->chunk2, r1 = r0 + c->chunk2 < c->hidden ? r0 + c->chunk2 : c->hidden;
        const int64_t nr = r1 - r0;
        if (!c->accumulate)
            for (int64_t t = 0; t < c->T; t++) memset(c->y + t * c->ldy + r0, 0, (size_t)nr * sizeof(float));
        for (int s = 0; s < c->nslots; s++) {
            const int e = c->slot_exp[s];
            for (int p0 = c->slot_off[s]; p0 < c->slot_off[s + 1]; p0 += MAXNT) {
                int nt = c->slot_off[s + 1] - p0 < MAXNT ? c->slot_off[s + 1] - p0 : MAXNT;
                const int grp = c->grp0[s] + (p0 - c->slot_off[s]) / MAXNT;
                if (c->tb_d[grp + 1] > c->tb_d[grp]) {
                    c->kd.fng(&c->kd, c->down[e] + r0 * c->rs_d, c->rs_d, nr, c->nb_i, c->xg_d + c->tb_d[grp] * c->xgb_d,
                              c->xgb_d, nt, tmp, (ptrdiff_t)c->chunk2);
                } else {
                    for (int k = 0; k < nt; k++) ag[k] = act_view(c->ha + (size_t)(p0 + k) * c->hab, c->inter);
                    const uint8_t *nx = s + 1 < c->nslots ? c->down[c->slot_exp[s + 1]] + r0 * c->rs_d : NULL;
                    run_rows(&c->kd, c->down[e], c->rs_d, c->nb_i, r0, r1, ag, nt, tmp, (ptrdiff_t)c->chunk2, nx);
                }
                for (int k = 0; k < nt; k++) {
                    float *yr = c->y + c->pair_tok[p0 + k] * c->ldy + r0;
                    const float wgt = c->pair_w[p0 + k];
                    const float *src = tmp + (size_t)k * c->chunk2;
                    for (int64_t r = 0; r < nr; r++) yr[r] += wgt * src[r];
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ read bandwidth probe */

typedef struct {
    const uint8_t *p;
    size_t n;
    _Atomic uint64_t sink;
} bw_ctx;

static void bw_task(void *vctx, int tid, int nth) {
    bw_ctx *c = (bw_ctx *)vctx;
    size_t per = (c->n / (size_t)nth) & ~(size_t)255;
    const uint8_t *p = c->p + per * (size_t)tid;
    size_t n = tid == nth - 1 ? c->n - per * (size_t)tid : per;
    n &= ~(size_t)255;
    uint64_t s;
#if K2K_X86
    if (g_isa >= ISA_AVX512) s = read_sum_512(p, n);
    else if (g_isa == ISA_AVX2) s = read_sum_256(p, n);
    else
#endif
        s = read_sum_gen(p, n);
    atomic_fetch_xor(&c->sink, s);
}

/* ------------------------------------------------------------------ public API */

#ifndef K2K_SRC_TAG
#define K2K_SRC_TAG "unknown"
#endif
int k2k_abi_version(void) { return K2K_ABI_VERSION; }
/* hash of the source this binary was built from (set by setup.py / the on-demand build) */
const char *k2k_src_tag(void) { return K2K_SRC_TAG; }

int k2k_isa(void) {
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    int r = g_isa;
    pthread_mutex_unlock(&P.call_mu);
    return r;
}

int k2k_isa_hw(void) {
    isa_init();
    return g_isa_hw;
}

/* cap the ISA (tests / debugging); returns the effective ISA */
int k2k_set_isa(int isa) {
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    g_isa = isa < g_isa_hw ? (isa < 0 ? 0 : isa) : g_isa_hw;
    int r = g_isa;
    pthread_mutex_unlock(&P.call_mu);
    return r;
}

int k2k_set_threads(int n, int pin) {
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    if (n <= 0) n = P.physical > 0 ? P.physical : 1;
    int r = pool_start(n, pin);
    pthread_mutex_unlock(&P.call_mu);
    return r;
}

int k2k_get_threads(void) {
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    int r = P.nth;
    pthread_mutex_unlock(&P.call_mu);
    return r;
}

/* physical cores among the CPUs this process may run on */
int k2k_default_threads(void) {
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    int r = P.physical > 0 ? P.physical : 1;
    pthread_mutex_unlock(&P.call_mu);
    return r;
}

int k2k_numa_nodes(void) {
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    int r = g_numa_nodes;
    pthread_mutex_unlock(&P.call_mu);
    return r;
}

/* Page-interleave [addr, addr + len) across the online NUMA nodes (mbind, MPOL_INTERLEAVE) before its pages are
 * first touched, so expert weights read by threads on every node draw on every node's memory channels.
 * Returns the number of nodes in the policy, or -errno (-ENOSYS: no NUMA support in this kernel). */
int k2k_interleave(void *addr, int64_t len) {
#ifdef SYS_mbind
    enum { MAXN = 1024, BITS = 8 * sizeof(unsigned long) };
    int nodes[MAXN];
    int n = read_cpulist("/sys/devices/system/node/online", nodes, MAXN);
    if (n <= 0) return -ENOENT;
    unsigned long mask[MAXN / BITS];
    memset(mask, 0, sizeof mask);
    for (int k = 0; k < n; k++)
        if (nodes[k] >= 0 && nodes[k] < MAXN) mask[nodes[k] / BITS] |= 1UL << (nodes[k] % BITS);
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t a = (uintptr_t)addr & ~(page - 1), end = ((uintptr_t)addr + (uintptr_t)len + page - 1) & ~(page - 1);
    /* maxnode counts one more than the mask's bits (the kernel drops the last one) */
    if (syscall(SYS_mbind, a, end - a, 3 /* MPOL_INTERLEAVE */, mask, (unsigned long)MAXN + 1, 0) != 0) return -errno;
    return n;
#else
    (void)addr;
    (void)len;
    return -ENOSYS;
#endif
}

/* software prefetch distance in bytes (0 disables; < 0 leaves it) and level (0: L1, 1: L2; < 0 leaves it) */
int k2k_set_prefetch(int bytes, int l2) {
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    if (bytes >= 0) g_pfd = bytes;
    if (l2 >= 0) g_pf_l2 = l2 ? 1 : 0;
    int r = g_pfd;
    pthread_mutex_unlock(&P.call_mu);
    return r;
}

/* decode-once paths for many tokens on (1) / off (0); < 0 only queries */
int k2k_set_panel(int on) {
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    if (on >= 0) g_panel = on != 0;
    int r = g_panel;
    pthread_mutex_unlock(&P.call_mu);
    return r;
}

/* row-pair kernels for single-token calls: 1 on, 0 off, < 0 leaves it; returns the setting in effect */
int k2k_set_pairs(int on) {
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    if (on >= 0) g_no_pairs = !on;
    int r = !g_no_pairs;
    pthread_mutex_unlock(&P.call_mu);
    return r;
}

/* AVX-VNNI kernels at the AVX2 level: 1 on (where the CPU has it), 0 off, < 0 leaves it; returns the setting in effect */
int k2k_set_avxvnni(int on) {
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
#if K2K_X86
    if (on >= 0) g_avxvnni = on && g_avxvnni_hw;
    int r = g_avxvnni;
#else
    int r = 0 * on;
#endif
    pthread_mutex_unlock(&P.call_mu);
    return r;
}

/* a type has a kernel here once its codebooks (if any) were handed over */
int k2k_supported(int type) { return tinfo(type) != NULL && grids_ready(type); }

/* Hand over one IQ codebook (see "IQ codebooks"): id = the ggml type whose grid it is (IQ2_XXS 256 x 8,
 * IQ2_XS 512 x 8, IQ2_S 1024 x 8, IQ3_XXS 256 x 4, IQ3_S 512 x 4 bytes of grid magnitudes; IQ1_S 2048 x 8 int8
 * values in {-1, 0, 1}, also used by IQ1_M; IQ4_NL 16 int8 values, also used by IQ4_XS) or GRID_KSIGNS (128
 * bytes).  Returns 0, -1 unknown id, -2 wrong size, -3 values out of the range the kernels rely on, -4 no memory. */
int k2k_set_grid(int id, const void *data, int64_t n) {
    const uint8_t *p = (const uint8_t *)data;
    int64_t want;
    switch (id) {
    case GT_IQ2_XXS: want = 256 * 8; break;
    case GT_IQ2_XS: want = 512 * 8; break;
    case GT_IQ2_S: want = 1024 * 8; break;
    case GT_IQ3_XXS: want = 256 * 4; break;
    case GT_IQ3_S: want = 512 * 4; break;
    case GT_IQ1_S: want = 2048 * 8; break;
    case GT_IQ4_NL: want = 16; break;
    case GRID_KSIGNS: want = 128; break;
    default: return -1;
    }
    if (n != want || !p) return -2;
    for (int64_t i = 0; i < n; i++) {
        const int v = id == GT_IQ1_S || id == GT_IQ4_NL ? (int)(int8_t)p[i] : (int)p[i];
        if (id == GT_IQ1_S ? (v < -1 || v > 1) : id == GT_IQ4_NL ? v < -127 : id == GRID_KSIGNS ? 0 : v > 63) return -3;
    }
    if (id == GRID_KSIGNS) /* the SIMD kernels compute the parity bit instead of looking it up */
        for (int i = 0; i < 128; i++)
            if (p[i] != (uint8_t)(i | ((__builtin_popcount((unsigned)i) & 1) << 7))) return -3;
    pthread_mutex_lock(&P.call_mu);
    int rc = 0;
    if (id == GT_IQ4_NL) {
        for (int i = 0; i < 16; i++) g_kv[i] = (int8_t)p[i], g_kvu[i] = (uint8_t)((int)(int8_t)p[i] + 128);
        g_kv_set = 1;
    } else if (id == GRID_KSIGNS) {
        memcpy(g_ksigns, p, 128);
        g_ksigns_set = 1;
    } else {
        void *buf = NULL;
        const int plus64 = id != GT_IQ1_S; /* IQ2 / IQ3 grids: the rows, then the rows + 64 */
        const int planes = id == GT_IQ3_XXS || id == GT_IQ3_S; /* then (IQ3) byte p of each row + 64, p = 0..3 */
        if (posix_memalign(&buf, 64, (size_t)n * (planes ? 3 : plus64 ? 2 : 1)) != 0) {
            rc = -4;
        } else {
            uint8_t *d = (uint8_t *)buf;
            for (int64_t i = 0; i < n; i++) d[i] = id == GT_IQ1_S ? (uint8_t)(8 * (int)(int8_t)p[i] + 8) : p[i];
            if (plus64)
                for (int64_t i = 0; i < n; i++) d[n + i] = (uint8_t)(p[i] + 64);
            if (planes)
                for (int64_t i = 0; i < n; i++) d[2 * n + n / 4 * (i % 4) + i / 4] = (uint8_t)(p[i] + 64);
            void **slot = id == GT_IQ2_XXS ? (void **)&g_iq2xxs : id == GT_IQ2_XS ? (void **)&g_iq2xs
                        : id == GT_IQ2_S ? (void **)&g_iq2s : id == GT_IQ3_XXS ? (void **)&g_iq3xxs
                        : id == GT_IQ3_S ? (void **)&g_iq3s : (void **)&g_iq1s;
            free(*slot); /* no computation runs: public calls hold call_mu */
            *slot = buf;
        }
    }
    pthread_mutex_unlock(&P.call_mu);
    return rc;
}

/* Bytes of one token's activation buffer for cols values, and the buffer itself (tests: every ISA must write
 * the same bytes).  layout: 0 natural, 1 Q4_K/Q5_K 512-bit, 2 Q2_K/Q3_K 512-bit, 3 Q8_0 blocks, 4 IQ4_XS. */
int64_t k2k_act_bytes(int64_t cols) { return (int64_t)al64(act_bytes(cols)); }

int k2k_quantize_act(const float *x, int64_t cols, int layout, void *buf) {
    if (layout < 0 || layout > LAYOUT_IQ4X || cols <= 0 || cols % (layout == LAYOUT_Q8_0 ? 32 : 256)) return -2;
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    quantize_act(x, cols, layout, (uint8_t *)buf);
    pthread_mutex_unlock(&P.call_mu);
    return 0;
}

int64_t k2k_row_bytes(int type, int64_t cols) {
    const tinfo_t *ti = tinfo(type);
    if (!ti || cols <= 0 || cols % ti->blk) return -1;
    return cols / ti->blk * ti->bytes;
}

/* y[t, r] = sum_c x[t, c] * W[r, c] for t < T; W rows are ggml blocks, row_stride bytes apart. */
/* heads independent products y[h, t, r] = sum_c x[h, t, c] * W_h[r, c]; W_h = w + h * w_hs bytes, x/y heads
 * x_hs / y_hs floats apart, tokens ldx / ldy apart */
static int matmul_heads(int type, const uint8_t *w, int64_t heads, int64_t w_hs, int64_t rows, int64_t cols,
                        int64_t row_stride, const float *x, int64_t x_hs, int64_t T, int64_t ldx, float *y, int64_t y_hs,
                        int64_t ldy) {
    const tinfo_t *ti = tinfo(type);
    if (!ti || !grids_ready(type)) return -1;
    if (cols <= 0 || cols % ti->blk || rows < 0 || T < 0 || heads < 0 || row_stride < k2k_row_bytes(type, cols)) return -2;
    if (rows == 0 || T == 0 || heads == 0) return 0;
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    int rc = 0;
    for (int64_t t0 = 0; t0 < T; t0 += MAXNT) {
        mm_ctx c;
        memset(&c, 0, sizeof c);
        c.k = get_kernel(type);
        c.w = w;
        c.rows = rows;
        c.cols = cols;
        c.row_stride = row_stride;
        c.heads = heads;
        c.w_hs = w_hs;
        c.x_hs = x_hs;
        c.y_hs = y_hs;
        c.T = T - t0 < MAXNT ? T - t0 : MAXNT;
        c.ldx = ldx;
        c.ldy = ldy;
        c.nb = (int)(cols / ti->blk);
        c.x = x + t0 * ldx;
        c.y = y + t0 * ldy;
        c.abytes = al64(act_bytes(cols));
        const int gemm = c.k.fng && c.T >= c.k.gmin;
        c.ntiles = gemm ? (c.T + c.k.gtok - 1) / c.k.gtok : 0;
        c.xgb = gemm ? al64((size_t)c.k.xbytes * (size_t)c.nb) : 0;
        const size_t abytes_all = al64(c.abytes * (size_t)(c.T * heads));
        c.abuf = (uint8_t *)scratch(abytes_all + c.xgb * (size_t)(c.ntiles * heads));
        if (!c.abuf) {
            rc = -3;
            break;
        }
        c.xg = gemm ? c.abuf + abytes_all : NULL;
        c.chunk = pick_chunk(rows * heads, P.nth, 16, 128);
        c.prequant = P.nth <= 1 || heads * c.T * cols <= PREQUANT_MAX;
        if (c.prequant)
            for (int64_t i = 0; i < heads * c.T; i++) mm_quantize(&c, i);
        atomic_store(&c.next, 0);
        pool_run(mm_task, &c);
    }
    pthread_mutex_unlock(&P.call_mu);
    return rc;
}

/* y[t, r] = sum_c x[t, c] * W[r, c] for t < T; W rows are ggml blocks, row_stride bytes apart. */
int k2k_matmul(int type, const void *w, int64_t rows, int64_t cols, int64_t row_stride, const float *x, int64_t T,
               int64_t ldx, float *y, int64_t ldy) {
    return matmul_heads(type, (const uint8_t *)w, 1, 0, rows, cols, row_stride, x, 0, T, ldx, y, 0, ldy);
}

/* Per-head products (MLA's absorbed k_b / v_b): y[h, t, :] = x[h, t, :] @ W_h.T for heads stacked matrices
 * W_h [rows, cols] (w_hs bytes apart); x [heads, T, cols] and y [heads, T, rows] contiguous. */
int k2k_matmul_heads(int type, const void *w, int64_t heads, int64_t w_hs, int64_t rows, int64_t cols,
                     int64_t row_stride, const float *x, int64_t T, float *y) {
    return matmul_heads(type, (const uint8_t *)w, heads, w_hs, rows, cols, row_stride, x, T * cols, T, cols, y,
                        T * rows, rows);
}

/*
 * Routed experts of a MoE layer for T tokens:
 *   y[t] (+)= sum_k wts[t, k] * down_e( silu(gate_e x[t]) * up_e x[t] ),  e = idx[t, k]  (idx < 0: skipped)
 * gate/up/down are per-expert pointers to [inter, hidden] / [inter, hidden] / [hidden, inter] quantized rows.
 */
int k2k_moe(int64_t T, int64_t hidden, int64_t inter, const float *x, int64_t ldx, int nexp, const void *const *gate,
            const void *const *up, const void *const *down, int tg, int tu, int td, int K, const int32_t *idx,
            const float *wts, float *y, int64_t ldy, int accumulate) {
    const tinfo_t *ig = tinfo(tg), *iu = tinfo(tu), *id = tinfo(td);
    if (!ig || !iu || !id || !grids_ready(tg) || !grids_ready(tu) || !grids_ready(td)) return -1;
    if (hidden <= 0 || inter <= 0 || hidden % ig->blk || hidden % iu->blk || inter % id->blk || T < 0 || K < 0) return -2;
    if (T == 0) return 0;
    for (int64_t i = 0; i < T * K; i++)
        if (idx[i] >= nexp) return -2;
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    int rc = 0;
    moe_ctx c;
    memset(&c, 0, sizeof c);
    c.T = T;
    c.hidden = hidden;
    c.inter = inter;
    c.ldx = ldx;
    c.ldy = ldy;
    c.x = x;
    c.y = y;
    c.accumulate = accumulate;
    c.kg = get_kernel(tg);
    c.ku = get_kernel(tu);
    c.kd = get_kernel(td);
    c.nb_h = (int)(hidden / ig->blk);
    c.nb_u = (int)(hidden / iu->blk);
    c.nb_i = (int)(inter / id->blk);
    c.rs_g = k2k_row_bytes(tg, hidden);
    c.rs_u = k2k_row_bytes(tu, hidden);
    c.rs_d = k2k_row_bytes(td, inter);
    c.gate = (const uint8_t *const *)gate;
    c.up = (const uint8_t *const *)up;
    c.down = (const uint8_t *const *)down;
    /* group (token, expert) pairs by expert, in order of first use */
    int64_t np = 0;
    for (int64_t i = 0; i < T * K; i++) np += idx[i] >= 0;
    const int nth = P.nth;
    c.xab = al64(act_bytes(hidden));
    /* one token's row given K times as a stride-0 view (a decode step: one output row per routed expert) is
     * quantized once */
    c.Tq = ldx == 0 ? 1 : T;
    c.xas = ldx == 0 ? 0 : c.xab;
    c.hab = al64(act_bytes(inter));
    c.nspans = (int)((inter + SPAN - 1) / SPAN);
    c.chunk1 = pick_chunk((np ? np : 1) * inter, nth, 8, 128);
    if (c.chunk1 > inter) c.chunk1 = inter;
    c.nch1 = (inter + c.chunk1 - 1) / c.chunk1;
    c.chunk2 = pick_chunk(hidden, nth, 8, 64);
    c.tmp_per_thread = al64((size_t)2 * MAXNT * (size_t)(c.chunk1 > c.chunk2 ? c.chunk1 : c.chunk2) * sizeof(float)) / sizeof(float);
    const int diff_layout = c.ku.layout != c.kg.layout;
    size_t off = 0;
    const size_t o_slot_exp = off; off += al64(sizeof(int) * (size_t)(np + 1));
    const size_t o_slot_off = off; off += al64(sizeof(int) * (size_t)(np + 2));
    const size_t o_pair_tok = off; off += al64(sizeof(int) * (size_t)(np + 1));
    const size_t o_pair_w = off; off += al64(sizeof(float) * (size_t)(np + 1));
    const size_t o_first = off; off += al64(sizeof(int) * (size_t)nexp);
    const size_t o_xa = off; off += c.xab * (size_t)c.Tq * (diff_layout ? 2 : 1);
    const size_t o_h = off; off += al64(sizeof(float) * (size_t)(np * inter));
    const size_t o_ha = off; off += c.hab * (size_t)np;
    const size_t o_span = off; off += al64(sizeof(int) * (size_t)(np * c.nspans + 1));
    const size_t o_tmp = off; off += sizeof(float) * c.tmp_per_thread * (size_t)nth;
    /* many-token GEMM: group and tile tables, packed tiles (bounded by the pairs: a group has >= gmin of them) */
    const int64_t ngmax = np + np / MAXNT + 2;
    const size_t o_grp0 = off; off += al64(sizeof(int) * (size_t)(np + 2));
    const size_t o_tb = off; off += al64(3 * sizeof(int64_t) * (size_t)ngmax);
    const int share_u = c.ku.fng == c.kg.fng && c.ku.fnp == c.kg.fnp && !diff_layout && c.ku.xbytes == c.kg.xbytes &&
                        c.nb_u == c.nb_h;
    c.share_u = share_u;
    const kern_t *kk[3] = {&c.kg, &c.ku, &c.kd};
    size_t xgb[3], o_xg[3];
    for (int i = 0; i < 3; i++) {
        const kern_t *k = kk[i];
        xgb[i] = k->fng ? al64((size_t)k->xbytes * (size_t)(i == 2 ? c.nb_i : i ? c.nb_u : c.nb_h)) : 0;
        const int64_t tiles = k->fng ? np / k->gtok + np / k->gmin + 1 : 0;
        o_xg[i] = off;
        if (!(i == 1 && share_u)) off += xgb[i] * (size_t)tiles;
    }
    if (share_u) o_xg[1] = o_xg[0];
    uint8_t *base = (uint8_t *)scratch(off);
    if (!base) {
        pthread_mutex_unlock(&P.call_mu);
        return -3;
    }
    int *slot_exp = (int *)(base + o_slot_exp), *slot_off = (int *)(base + o_slot_off);
    int *pair_tok = (int *)(base + o_pair_tok), *first = (int *)(base + o_first);
    float *pair_w = (float *)(base + o_pair_w);
    /* counting sort of pairs by slot (slot order = first appearance) */
    for (int e = 0; e < nexp; e++) first[e] = -1;
    int ns = 0;
    for (int64_t i = 0; i < T * K; i++) {
        int e = idx[i];
        if (e < 0) continue;
        if (first[e] < 0) {
            first[e] = ns;
            slot_exp[ns] = e;
            slot_off[ns] = 0;
            ns++;
        }
        slot_off[first[e]]++;
    }
    int acc = 0;
    for (int s = 0; s < ns; s++) {
        int cnt = slot_off[s];
        slot_off[s] = acc;
        acc += cnt;
    }
    slot_off[ns] = acc;
    {
        int *fill = (int *)(base + o_span); /* temporary cursor, reset below */
        for (int s = 0; s < ns; s++) fill[s] = slot_off[s];
        for (int64_t i = 0; i < T * K; i++) {
            int e = idx[i];
            if (e < 0) continue;
            int p = fill[first[e]]++;
            pair_tok[p] = (int)(i / K);
            pair_w[p] = wts[i];
        }
    }
    c.nslots = ns;
    {
        c.grp0 = (int *)(base + o_grp0);
        int ng = 0;
        for (int si = 0; si < ns; si++) {
            c.grp0[si] = ng;
            ng += (slot_off[si + 1] - slot_off[si] + MAXNT - 1) / MAXNT;
        }
        c.grp0[ns] = ng;
        c.ngroups = ng;
        int64_t *tb[3];
        for (int i = 0; i < 3; i++) {
            tb[i] = (int64_t *)(base + o_tb) + (size_t)i * ngmax;
            const kern_t *k = kk[i];
            int64_t n = 0;
            for (int si = 0; si < ns; si++)
                for (int p0 = slot_off[si]; p0 < slot_off[si + 1]; p0 += MAXNT) {
                    const int nt = slot_off[si + 1] - p0 < MAXNT ? slot_off[si + 1] - p0 : MAXNT;
                    tb[i][c.grp0[si] + (p0 - slot_off[si]) / MAXNT] = n;
                    if (k->fng && nt >= k->gmin) n += (nt + k->gtok - 1) / k->gtok;
                }
            tb[i][ng] = n;
            if (i < 2) c.any_gemm1 |= n > 0;
            else c.any_gemm2 = n > 0;
        }
        c.tb_g = tb[0], c.tb_u = tb[1], c.tb_d = tb[2];
        c.xg_g = base + o_xg[0], c.xg_u = base + o_xg[1], c.xg_d = base + o_xg[2];
        c.xgb_g = xgb[0], c.xgb_u = xgb[1], c.xgb_d = xgb[2];
    }
    c.slot_exp = slot_exp;
    c.slot_off = slot_off;
    c.pair_tok = pair_tok;
    c.pair_w = pair_w;
    c.xa_g = base + o_xa;
    c.xa_u = diff_layout ? base + o_xa + c.xab * (size_t)c.Tq : c.xa_g;
    c.h = (float *)(base + o_h);
    c.ha = base + o_ha;
    c.span_done = (_Atomic int *)(base + o_span);
    for (int64_t i = 0; i < np * c.nspans; i++) atomic_store(&c.span_done[i], 0);
    c.tmp = (float *)(base + o_tmp);
    c.prequant = nth <= 1 || c.Tq * hidden <= PREQUANT_MAX;
    if (c.prequant)
        for (int64_t t = 0; t < c.Tq; t++) {
            quantize_act(x + t * ldx, hidden, c.kg.layout, c.xa_g + t * c.xas);
            if (diff_layout) quantize_act(x + t * ldx, hidden, c.ku.layout, c.xa_u + t * c.xas);
        }
    atomic_store(&c.next1, 0);
    atomic_store(&c.next2, 0);
    if (ns == 0) {
        if (!accumulate)
            for (int64_t t = 0; t < T; t++) memset(y + t * ldy, 0, (size_t)hidden * sizeof(float));
    } else {
        pool_run(moe_task, &c);
    }
    pthread_mutex_unlock(&P.call_mu);
    return rc;
}

/* Read bandwidth of buf (64-byte aligned) with the pool: best of reps passes, GB/s. */
double k2k_read_bw(const void *buf, int64_t n, int reps) {
    pthread_mutex_lock(&P.call_mu);
    ensure_init();
    double best = 0;
    for (int r = 0; r < (reps > 0 ? reps : 1); r++) {
        bw_ctx c;
        c.p = (const uint8_t *)buf;
        c.n = (size_t)n;
        atomic_store(&c.sink, 0);
        double t0 = now_s();
        pool_run(bw_task, &c);
        double dt = now_s() - t0;
        if (dt > 0 && n / dt / 1e9 > best) best = n / dt / 1e9;
    }
    pthread_mutex_unlock(&P.call_mu);
    return best;
}
