/* The C API of the k2kern library: everything it exports (offload/kernels/_abi.py declares the same signatures for
 * ctypes).  Calls are serialized by one lock; the matmul / MoE calls run on the library's own thread pool. */
#ifndef K2K_K2KERN_H
#define K2K_K2KERN_H
#include <stdint.h>

#define K2K_API __attribute__((visibility("default")))

/* api.c */
K2K_API int k2k_abi_version(void);
K2K_API const char *k2k_src_tag(void);
K2K_API int k2k_isa(void);
K2K_API int k2k_isa_hw(void);
K2K_API int k2k_set_isa(int isa);
K2K_API int k2k_set_threads(int n, int pin);
K2K_API int k2k_get_threads(void);
K2K_API int k2k_default_threads(void);
K2K_API int k2k_numa_nodes(void);
K2K_API int k2k_interleave(void *addr, int64_t len);
K2K_API int k2k_set_prefetch(int bytes, int l2);
K2K_API int k2k_set_panel(int on);
K2K_API int k2k_set_pairs(int on);
K2K_API int k2k_set_avxvnni(int on);
K2K_API int k2k_supported(int type);
K2K_API int64_t k2k_act_bytes(int64_t cols);
K2K_API int k2k_quantize_act(const float *x, int64_t cols, int layout, void *buf);
K2K_API int64_t k2k_row_bytes(int type, int64_t cols);
K2K_API const char *k2k_type_name(int type);
K2K_API double k2k_read_bw(const void *buf, int64_t n, int reps);
K2K_API double k2k_pool_seconds(int64_t *calls);
/* grids.c */
K2K_API int k2k_set_grid(int id, const void *data, int64_t n);
/* matmul.c */
K2K_API int k2k_matmul(int type, const void *w, int64_t rows, int64_t cols, int64_t row_stride, const float *x,
                       int64_t T, int64_t ldx, float *y, int64_t ldy);
K2K_API int k2k_matmul_heads(int type, const void *w, int64_t heads, int64_t w_hs, int64_t rows, int64_t cols,
                             int64_t row_stride, const float *x, int64_t T, float *y);
/* attn.c */
K2K_API int k2k_mla_decode(int tk, const void *kb, int64_t kh, int tv, const void *vb, int64_t vh, int64_t heads,
                           int64_t nope, int64_t rope, int64_t c, int64_t vd, const float *q_nope, int64_t q_hs,
                           const float *q_pe, int64_t qp_hs, const float *lat, const float *kpe, int64_t s, float scale,
                           float *out);
/* moe.c */
K2K_API int k2k_moe(int64_t T, int64_t hidden, int64_t inter, const float *x, int64_t ldx, int nexp,
                    const void *const *gate, const void *const *up, const void *const *down, int tg, int tu, int td,
                    int K, const int32_t *idx, const float *wts, float *y, int64_t ldy, int accumulate);
/* repack.c (no lock: callable from reader threads) */
K2K_API int64_t k2k_repack_int4_q4_0(const void *packed, const void *scale, int scale_kind, int64_t rows,
                                     int64_t groups, void *out);
K2K_API int64_t k2k_repack_q8_0_r16(const void *src, int64_t rows, int64_t nb, void *out);
K2K_API int64_t k2k_repack_q4_k_r16(const void *src, int64_t rows, int64_t nb, void *out);

#endif /* K2K_K2KERN_H */
