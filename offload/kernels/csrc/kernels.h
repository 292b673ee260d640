/* The kernels a type's kernel table entry (kern_t, isa.c: get_kernel) points at, by the file that defines them.
 * Hidden symbols: they are reached through the dispatch, never called from outside the library. */
#ifndef K2K_KERNELS_H
#define K2K_KERNELS_H
#include "common.h"

/* dot_fn: one weight row against nt tokens; dot2_fn: two rows against one token (bit-identical to two dot_fn calls) */
#define K2K_DOT(name) void name(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf)
#define K2K_DOT2(name) \
    void name(const uint8_t *w, ptrdiff_t rs, int nb, const act_t *a, float *out, const uint8_t *pf0, const uint8_t *pf1)

/* generic.c: every type, any CPU */
K2K_DOT(dot_q4_0_gen);
K2K_DOT(dot_q5_0_gen);
K2K_DOT(dot_q5_1_gen);
K2K_DOT(dot_q8_0_gen);
K2K_DOT(dot_q2_k_gen);
K2K_DOT(dot_q3_k_gen);
K2K_DOT(dot_q4_k_gen);
K2K_DOT(dot_q5_k_gen);
K2K_DOT(dot_q6_k_gen);
K2K_DOT(dot_iq4_nl_gen);
K2K_DOT(dot_iq4_xs_gen);
K2K_DOT(dot_iq2_xxs_gen);
K2K_DOT(dot_iq2_xs_gen);
K2K_DOT(dot_iq2_s_gen);
K2K_DOT(dot_iq3_xxs_gen);
K2K_DOT(dot_iq3_s_gen);
K2K_DOT(dot_iq1_s_gen);
K2K_DOT(dot_iq1_m_gen);
uint64_t read_sum_gen(const uint8_t *p, size_t n); /* the bandwidth probe's streaming read */
void q8r16_gen(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
               const uint8_t *pf); /* group_fn of GT_Q8_0_R16 */
void q4kr16_gen(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
               const uint8_t *pf); /* group_fn of GT_Q4_K_R16 */

#if K2K_X86
/* avx2.c: AVX2 (ISA level avx2) and the same bodies with AVX-VNNI */
K2K_DOT(q4_0_avx2);
K2K_DOT(q5_0_avx2);
K2K_DOT(q5_1_avx2);
K2K_DOT(q8_0_avx2);
K2K_DOT(q2k_avx2);
K2K_DOT(q3k_avx2);
K2K_DOT(q4k_avx2);
K2K_DOT(q5k_avx2);
K2K_DOT(q6k_avx2);
K2K_DOT(q4_0_vnni);
K2K_DOT(q5_0_vnni);
K2K_DOT(q5_1_vnni);
K2K_DOT(q8_0_vnni);
K2K_DOT(q2k_vnni);
K2K_DOT(q3k_vnni);
K2K_DOT(q4k_vnni);
K2K_DOT(q5k_vnni);
K2K_DOT(q6k_vnni);
uint64_t read_sum_256(const uint8_t *p, size_t n);
void q8r16_avx2(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                const uint8_t *pf); /* group_fn of GT_Q8_0_R16 */
void q8r16_vnni(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                const uint8_t *pf);

/* avx2_iq.c */
K2K_DOT(iq4nl_avx2);
K2K_DOT(iq4xs_avx2);
K2K_DOT(iq2xxs_avx2);
K2K_DOT(iq2xs_avx2);
K2K_DOT(iq2s_avx2);
K2K_DOT(iq3xxs_avx2);
K2K_DOT(iq3s_avx2);
K2K_DOT(iq1s_avx2);
K2K_DOT(iq1m_avx2);
K2K_DOT(iq4nl_vnni);
K2K_DOT(iq4xs_vnni);
K2K_DOT(iq2xxs_vnni);
K2K_DOT(iq2xs_vnni);
K2K_DOT(iq2s_vnni);
K2K_DOT(iq3xxs_vnni);
K2K_DOT(iq3s_vnni);
K2K_DOT(iq1s_vnni);
K2K_DOT(iq1m_vnni);
void upan_attach(kern_t *k, int type); /* the AVX2-level decode-once path of the codebook types (kern_t.udec / upan) */

/* avx512.c: the K-quants without (name) and with GFNI (name##g), one row and row pairs (_r2) */
K2K_DOT(q2k_512);
K2K_DOT(q3k_512);
K2K_DOT(q4k_512);
K2K_DOT(q5k_512);
K2K_DOT(q6k_512);
K2K_DOT(q2k_512g);
K2K_DOT(q3k_512g);
K2K_DOT(q4k_512g);
K2K_DOT(q5k_512g);
K2K_DOT(q6k_512g);
K2K_DOT2(q2k_512_r2);
K2K_DOT2(q3k_512_r2);
K2K_DOT2(q4k_512_r2);
K2K_DOT2(q5k_512_r2);
K2K_DOT2(q6k_512_r2);
K2K_DOT2(q2k_512g_r2);
K2K_DOT2(q3k_512g_r2);
K2K_DOT2(q4k_512g_r2);
K2K_DOT2(q5k_512g_r2);
K2K_DOT2(q6k_512g_r2);
K2K_DOT(q8_0_512);
int q8_0_512_short(const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const act_t *a, float *out); /* rows_fn */
K2K_DOT(q4_0_512);
K2K_DOT(q5_0_512);
K2K_DOT(q5_1_512);
K2K_DOT(iq4nl_512);
uint64_t read_sum_512(const uint8_t *p, size_t n);
void q8r16_512(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
               const uint8_t *pf); /* group_fn of GT_Q8_0_R16 */
void q4kr16_512(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                const uint8_t *pf); /* group_fn of GT_Q4_K_R16 */
void q4kr16_512g(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                 const uint8_t *pf);

/* avx512_iq.c */
K2K_DOT(iq4xs_512);
K2K_DOT(iq2xxs_512);
K2K_DOT(iq2xs_512);
K2K_DOT(iq2s_512);
K2K_DOT(iq3xxs_512);
K2K_DOT(iq3s_512);
K2K_DOT(iq1s_512);
K2K_DOT(iq1m_512);
K2K_DOT(iq3xxs_vbmi);
K2K_DOT(iq3s_vbmi);

/* gemm.c: the Q8_0 GEMMs (gemm_fn over all token tiles, and their pack_fn) and the decode-once panel GEMM */
void q8_0_512_gemm_all(const kern_t *k, const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const uint8_t *X,
                       size_t xgb, int T, float *out, ptrdiff_t os);
void q8_0_vnni_gemm_all(const kern_t *k, const uint8_t *w, ptrdiff_t rs, int64_t nrows, int nb, const uint8_t *X,
                        size_t xgb, int T, float *out, ptrdiff_t os);
void q8_0_512_pack_l(const act_t *a, int nt, int nb, uint8_t *X, int layout, int blk);
void q8_0_vnni_pack_l(const act_t *a, int nt, int nb, uint8_t *X, int layout, int blk);
void pnl_attach(kern_t *k, int type, int isa); /* the decode-once GEMM for this type at this ISA level, if any */
#endif /* K2K_X86 */

#endif /* K2K_KERNELS_H */
