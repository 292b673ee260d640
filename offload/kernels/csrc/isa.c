/* What runs: CPU detection and the ISA level (K2LOCAL_ISA, K2LOCAL_AVXVNNI), the type table, the kernel table
 * entry of each type at that level (get_kernel), and the knobs the kernels and drivers read. */
#include "common.h"
#include "kernels.h"

/* prefetch distance in bytes ahead of the weight stream (0: off) and target level (0: L1, 1: L2) */
/* 8 KiB ahead into L1 was best on a 16-core Xeon (Q4_K 71 -> 100 GB/s at 16 threads, see bench/kernels.py
 * --prefetch); without it the core stalls on each miss instead of overlapping loads with the integer math. */
int g_pfd = 8192, g_pf_l2 = 0;
/* the *_R16 kernels' own distance (their one sequential stream per thread): 8 KiB on Intel (the Xeon of RESULTS.md
 * 2026-12-07, Q8_0 26.6 GB/s = its read loop), off on AMD, whose hardware prefetcher does better alone (Zen 4,
 * 2 threads: Q8_0_R16 [7168 x 8192] 25.2 GB/s at 8 KiB vs 32.8 off; Q4_K_R16 [7168 x 2048] 27.8 vs 30.6); set in
 * isa_init, K2LOCAL_PREFETCH_R16 overrides */
int g_pfd_r16 = 8192;
/* Row-pair kernels (two rows per call for one token) are off by default: they are 3-10% faster with the
 * weights in L3, but from DRAM two interleaved row streams defeated the hardware prefetcher on Zen 4
 * (Q4_K one thread 20 -> 12 GB/s).  K2LOCAL_PAIRS=1 / set_row_pairs(True) turns them on; tests check that
 * they are bit-identical to the one-row kernels. */
int g_no_pairs = 1;
/* decode-once paths for many tokens (pnl_gemm, run_rows' codebook rows): on unless K2LOCAL_PANEL=0 or k2k_set_panel(0) */
int g_panel = 1;

#define TY(t, blk, bytes) {GT_##t, blk, bytes, #t}
static const tinfo_t TYPES[] = {
    TY(Q4_0, 32, 18), TY(Q5_0, 32, 22), TY(Q5_1, 32, 24), TY(Q8_0, 32, 34), TY(Q2_K, 256, 84), TY(Q3_K, 256, 110),
    TY(Q4_K, 256, 144), TY(Q5_K, 256, 176), TY(Q6_K, 256, 210), TY(IQ2_XXS, 256, 66), TY(IQ2_XS, 256, 74),
    TY(IQ3_XXS, 256, 98), TY(IQ1_S, 256, 50), TY(IQ4_NL, 32, 18), TY(IQ3_S, 256, 110), TY(IQ2_S, 256, 82),
    TY(IQ4_XS, 256, 136), TY(IQ1_M, 256, 56), TY(Q8_0_R16, 32, 34), TY(Q4_K_R16, 256, 144),
};
const tinfo_t *tinfo(int type) {
    for (size_t i = 0; i < sizeof(TYPES) / sizeof(TYPES[0]); i++)
        if (TYPES[i].type == type) return &TYPES[i];
    return NULL;
}
#undef TY

#if K2K_X86
int g_avxvnni_hw = 0; /* the CPU has AVX-VNNI (isa_init) */
int g_avxvnni = 0;    /* and it is used: isa_init (off with K2LOCAL_AVXVNNI=0), k2k_set_avxvnni */
#endif

int g_isa_hw = -1, g_isa = -1;
int g_vbmi = 0; /* AVX512_VBMI (IQ3 kernels at ISA level avx512-vnni-gfni) */

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

void isa_init(void) {
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
#if K2K_X86 && !defined(K2K_EMULATE_AVX512)
    if (__builtin_cpu_is("amd")) g_pfd_r16 = 0;
#endif
    const char *pr = getenv("K2LOCAL_PREFETCH_R16");
    if (pr) g_pfd_r16 = atoi(pr) > 0 ? atoi(pr) : 0;
    const char *e = getenv("K2LOCAL_ISA");
    if (e) {
        int want = !strcmp(e, "generic") ? ISA_GENERIC : !strcmp(e, "avx2") ? ISA_AVX2 : !strcmp(e, "avx512") ? ISA_AVX512 : ISA_AVX512G;
        if (want < g_isa) g_isa = want;
    }
}

static kern_t get_kernel_base(int type) {
    kern_t k;
    memset(&k, 0, sizeof k);
    int k_layout = (type == GT_Q8_0 || type == GT_Q8_0_R16 || type == GT_Q4_0 || type == GT_Q5_0 || type == GT_Q5_1 || type == GT_IQ4_NL)
                       ? LAYOUT_Q8_0 : LAYOUT_NAT;
    k.layout = k_layout;
#if K2K_X86
    if (g_isa == ISA_AVX512G) {
        switch (type) {
        case GT_Q2_K: k.fn = q2k_512g; k.fn2 = q2k_512g_r2; k.layout = LAYOUT_P2; return k;
        case GT_Q3_K: k.fn = q3k_512g; k.fn2 = q3k_512g_r2; k.layout = LAYOUT_P2; return k;
        case GT_Q4_K: k.fn = q4k_512g; k.fn2 = q4k_512g_r2; k.layout = LAYOUT_P64; return k;
        case GT_Q4_K_R16: k.fnb = q4kr16_512g; return k;
        case GT_Q5_K: k.fn = q5k_512g; k.fn2 = q5k_512g_r2; k.layout = LAYOUT_P64; return k;
        case GT_Q6_K: k.fn = q6k_512g; k.fn2 = q6k_512g_r2; return k;
        case GT_IQ3_XXS: if (g_vbmi) { k.fn = iq3xxs_vbmi; return k; } break;
        case GT_IQ3_S: if (g_vbmi) { k.fn = iq3s_vbmi; return k; } break;
        }
    }
    if (g_isa >= ISA_AVX512) {
        switch (type) {
        case GT_Q8_0_R16: k.fnb = q8r16_512; return k;
        case GT_Q4_K_R16: k.fnb = q4kr16_512; return k;
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
        case GT_Q8_0_R16: k.fnb = q8r16_vnni; return k;
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
        case GT_Q8_0_R16: k.fnb = q8r16_avx2; return k;
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
    case GT_Q8_0_R16: k.fnb = q8r16_gen; break;
    case GT_Q4_K_R16: k.fnb = q4kr16_gen; break;
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

kern_t get_kernel(int type) {
    kern_t k = get_kernel_base(type);
    const tinfo_t *ti = tinfo(type);
    k.blk = ti ? ti->blk : 0;
#if K2K_X86
    if (g_panel) pnl_attach(&k, type, g_isa);
    if (g_panel && g_isa == ISA_AVX2) upan_attach(&k, type);
#endif
    return k;
}

