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
 *
 * Files (all built into one shared library; every .c includes this header first, and only the functions declared
 * in k2kern.h are exported):
 *   common.h       activations, block readers, the type/kernel table entry, the state all files share (this file)
 *   k2kern.h       the exported C API (called through ctypes: offload/kernels/_abi.py)
 *   kernels.h      the per-row / many-token kernels the dispatch points at, by file
 *   avx2.h         AVX2 target attributes, helpers and the token-count wrappers; AVX-VNNI attribute (+ stand-in)
 *   avx2_iq.h      IQ block decoding (AVX2), shared by avx2_iq.c, avx512_iq.c and gemm.c
 *   avx512.h       AVX-512 target attributes (emu512.h: the SIMDe-emulated test build)
 *   api.c          exported entry points other than the matmul / MoE / codebook ones
 *   pool.c         thread pool, public-call lock, scratch buffers
 *   isa.c          CPU detection, the type table, kernel dispatch and its knobs
 *   grids.c        the IQ codebooks, handed over at run time
 *   act.c          activation quantization (portable and AVX2)
 *   generic.c      portable scalar kernels (also the reference the SIMD ones are checked against)
 *   avx2.c         AVX2 / AVX-VNNI kernels: K-quants, Q8_0, Q4_0 / Q5_0 / Q5_1
 *   avx2_iq.c      AVX2 / AVX-VNNI kernels: IQ types, and their decode-once rows for many tokens
 *   avx512.c       AVX-512 VNNI kernels: K-quants (with and without GFNI), Q8_0, the 32-value types, IQ4_NL
 *   avx512_iq.c    AVX-512 VNNI kernels: IQ4_XS and the codebook types (IQ3 also with VBMI)
 *   gemm.c         many-token kernels: Q8_0 GEMMs (AVX-512, AVX-VNNI), the decode-once panel GEMM (AVX-512)
 *   run.h          the row runner shared by the matmul and MoE drivers
 *   matmul.c       y = x W^T (and per-head products)
 *   attn.c         MLA's absorbed attention for one decoded token (k_b, scores over the latent cache, v_b)
 *   moe.c          the fused routed-experts FFN
 */
#ifndef K2K_COMMON_H
#define K2K_COMMON_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
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

#define K2K_ABI_VERSION 14

/* ggml type ids (gguf.GGMLQuantizationType) */
enum { GT_Q4_0 = 2, GT_Q5_0 = 6, GT_Q5_1 = 7, GT_Q8_0 = 8, GT_Q2_K = 10, GT_Q3_K = 11, GT_Q4_K = 12, GT_Q5_K = 13, GT_Q6_K = 14,
       GT_IQ2_XXS = 16, GT_IQ2_XS = 17, GT_IQ3_XXS = 18, GT_IQ1_S = 19, GT_IQ4_NL = 20, GT_IQ3_S = 21, GT_IQ2_S = 22,
       GT_IQ4_XS = 23, GT_IQ1_M = 29,
       /* not gguf types: rows repacked 16 at a time (the same bytes per row): Q8_0 (k2k_repack_q8_0_r16), the model's
        * own matrices; Q4_K (k2k_repack_q4_k_r16), routed experts held in RAM */
       GT_Q8_0_R16 = 1008, GT_Q4_K_R16 = 1012 };
#define R16_ROWS 16 /* rows per interleaved group of the *_R16 types */
#define IS_R16(t) ((t) == GT_Q8_0_R16 || (t) == GT_Q4_K_R16)
/* k2k_set_grid id of the 128-entry sign table shared by IQ2_XXS / IQ2_XS / IQ3_XXS */
#define GRID_KSIGNS 256
enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512G = 3 /* AVX-512 VNNI + GFNI */ };
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

/* Everything declared from here on is internal to the library (hidden): only k2kern.h's functions are exported. */
#pragma GCC visibility push(hidden)

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

static inline size_t act_bytes(int64_t cols) {
    /* generous: q + d + bs16 + bs32, each 64-aligned */
    size_t n = (size_t)cols;
    return ((n + 63) & ~(size_t)63) + (((n / 32 + 1) * 4 + 63) & ~(size_t)63) + (((n / 16 + 1) * 2 + 63) & ~(size_t)63) +
           (((n / 32 + 1) * 2 + 63) & ~(size_t)63) + 64;
}

static inline act_t act_view(uint8_t *buf, int64_t cols) {
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

/* ------------------------------------------------------------------ per-row kernels, prefetch, the type table */

/* One weight row (nb blocks) against nt activation rows: out[t * os] = dot(row, a[t]).
 * pf: where to software-prefetch while walking the row (pf + i * block_bytes for block i), or NULL. */
typedef void (*dot_fn)(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf);

extern int g_pfd, g_pf_l2; /* prefetch distance in bytes ahead of the weight stream (0: off), into L2 (1) or L1 (0) */
extern int g_pfd_r16;      /* the same for the *_R16 kernels (isa.c: by CPU vendor) */
extern int g_no_pairs;     /* row-pair kernels off (isa.c says why) */
extern int g_panel;        /* decode-once paths for many tokens on */

/* *_R16 kernels: prefetch the `lines` cache lines pfd bytes past b, continuing at pf (this thread's next segment,
 * or nothing when NULL) once that runs past end */
static inline __attribute__((always_inline)) void r16_prefetch(const uint8_t *b, int64_t pfd, const uint8_t *end,
                                                               const uint8_t *pf, int lines) {
    const uint8_t *p = b + pfd;
    if (p >= end) p = pf ? pf + (p - end) : NULL;
    if (p)
        for (int k = 0; k < lines; k++) __builtin_prefetch(p + 64 * k, 0, 3);
}

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
    const char *name; /* gguf's GGMLQuantizationType name */
} tinfo_t;
const tinfo_t *tinfo(int type); /* the type's geometry, NULL for types without kernels (isa.c) */

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

/* ------------------------------------------------------------------ IQ codebooks (set at run time) */

/* The IQ types' codebooks are not part of this source: the Python loader takes them from the installed gguf
 * package and hands them over once with k2k_set_grid (a type without its tables is not supported).
 * Stored as rows: 8 bytes (IQ2_*, IQ1_*) or 4 bytes (IQ3_*) per grid index.  IQ2/IQ3 rows hold the grid
 * magnitudes (0..63, checked: 64 +/- g must stay a valid unsigned byte below 128); IQ1 rows hold 8 * g + 8 for
 * g in {-1, 0, 1}, so that 8 * (g +/- 1/8) + 9 = row + 1 +/- 1 is a small unsigned integer.  The IQ2 / IQ3
 * tables are followed by a second copy of their rows with 64 added to every byte (AVX-512 kernels: 64 + |g|, and
 * 128 - that is 64 - |g|); the IQ3 ones then by the same + 64 bytes as four planes (byte p of row r at
 * rows * p + r) for in-register lookups. */
extern uint64_t *g_iq2xxs, *g_iq2xs, *g_iq2s, *g_iq1s;
extern uint32_t *g_iq3xxs, *g_iq3s;
extern int8_t g_kv[16];       /* IQ4_NL / IQ4_XS non-linear 4-bit values */
extern uint8_t g_kvu[16];     /* the same + 128 (unsigned, for dpbusd) */
extern uint8_t g_ksigns[128]; /* 7 sign bits + parity as bit 7 */
int grids_ready(int type);    /* the type's tables (if it needs any) were handed over */

/* IQ2_XXS / IQ2_XS / IQ3_XXS sign index (7 bits) -> 8 sign bits: the 8th makes the parity even */
static inline uint32_t ksign8(uint32_t i) { return g_ksigns[i & 127]; }

/* ------------------------------------------------------------------ kernel table entries (isa.c: get_kernel) */

/* Two weight rows (w and w + rs) against one token: out[0], out[1]; bit-identical to two dot_fn calls. */
typedef void (*dot2_fn)(const uint8_t *w, ptrdiff_t rs, int nb, const act_t *a, float *out, const uint8_t *pf0,
                        const uint8_t *pf1);

/* Many short contiguous rows (nb blocks each, row i at w + i * rs) against one token: out[i]; returns 0 (nothing
 * done) when it does not handle this row shape. */
typedef int (*rows_fn)(const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const act_t *a, float *out);
/* Row-interleaved layouts (GT_Q8_0_R16): nrows (a multiple of the group) rows at w against nt tokens, out[t * os + r];
 * pf: where this thread reads next (prefetched past the end), or NULL */
typedef void (*group_fn)(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                         const uint8_t *pf);

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
#define UPAN_BPB 320 /* bytes per block of a codebook row decoded once (kern_t.udec; avx2_iq.h: IQD_PAN) */
#define Q8G_XBYTES (8 * 64 + 64) /* packed activation bytes per block: AVX-512 Q8_0 GEMM (gemm.c) */
#define Q8V_XBYTES (8 * 32 + 32) /* the same, AVX-VNNI Q8_0 GEMM */

struct kern_s {
    dot_fn fn;
    int layout;
    dot2_fn fn2; /* optional row-pair kernel for one token (decode), NULL if none */
    rows_fn fnr; /* optional short-row kernel for one token (decode), NULL if none */
    group_fn fnb; /* row-interleaved types: the only kernel, every token count (fn is NULL) */
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

/* ------------------------------------------------------------------ isa.c: what runs */
extern int g_isa_hw, g_isa; /* ISA_* the CPU has / the one in use (-1 before isa_init) */
extern int g_vbmi;          /* AVX512_VBMI (IQ3 kernels at ISA level avx512-vnni-gfni) */
#if K2K_X86
extern int g_avxvnni_hw;    /* the CPU has AVX-VNNI */
extern int g_avxvnni;       /* and the AVX2-level kernels use it */
#endif
void isa_init(void);
kern_t get_kernel(int type); /* the kernels for this type at the ISA level and knobs in effect */

/* ------------------------------------------------------------------ act.c: activation quantization */
void quantize_act_range(const float *x, int64_t cols, int layout, uint8_t *buf, int64_t c0, int64_t c1);
void quantize_act(const float *x, int64_t cols, int layout, uint8_t *buf);

/* ------------------------------------------------------------------ pool.c: threads, the public-call lock, scratch */
typedef void (*task_fn)(void *ctx, int tid, int nth);
void call_lock(void);   /* serializes public calls: one computation at a time uses all workers */
void call_unlock(void);
void ensure_init(void); /* first call: ISA, CPU order, environment knobs, the pool (under the call lock) */
int pool_start(int n, int pin);
int pool_threads(void);  /* participants including the caller */
int pool_physical(void); /* physical cores among the CPUs this process may run on (0 when unknown) */
extern int g_numa_nodes;
void pool_run(task_fn fn, void *ctx);          /* fn(ctx, tid, nth) on every participant; the caller is tid 0 */
double pool_seconds(int64_t *calls);           /* wall seconds inside pool_run since the start, and its calls */
void pool_barrier(int nth, int *local_sense); /* inside a task: wait for all participants */
double now_s(void);
int read_cpulist(const char *path, int *out, int cap);
void *scratch(size_t n); /* the public calls' work buffer (64-byte aligned, kept and grown; under the call lock) */
/* Per-thread scratch for decoded weight rows (pnl_gemm's panel, run_rows' decoded codebook row): 64-byte aligned, at
 * least n bytes, kept and grown (pool workers live as long as the process; the two users never nest) */
uint8_t *thread_rows_buf(size_t n);
static inline size_t al64(size_t n) { return (n + 63) & ~(size_t)63; }

#endif /* K2K_COMMON_H */
