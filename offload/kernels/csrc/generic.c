/* Portable scalar kernels (NAT layout) of every type: any CPU, and the reference the SIMD kernels are checked
 * against (tests/test_kernels.py runs every ISA level on the same bytes). */
#include "common.h"
#include "kernels.h"

/* ------------------------------------------------------------------ generic kernels (NAT layout) */

void dot_q4_0_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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
void dot_q5_0_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    dot_q5_gen(w, nb, a, nt, out, os, 0);
}
void dot_q5_1_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    dot_q5_gen(w, nb, a, nt, out, os, 1);
}

void dot_q8_0_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

void dot_q2_k_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

void dot_q3_k_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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
void dot_q4_k_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    dot_q45_k_gen(w, nb, a, nt, out, os, pf, 0);
}
void dot_q5_k_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
    (void)pf;
    dot_q45_k_gen(w, nb, a, nt, out, os, pf, 1);
}

void dot_q6_k_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

/* ------------------------------------------------------------------ generic IQ kernels (NAT layout) */

/* one 8-weight group: sum_j sign_j * grid_j * q_j (sign bit j set: negative) */
static inline int grid8_dot(const uint8_t *g, uint32_t signs, const int8_t *q) {
    int s = 0;
    for (int j = 0; j < 8; j++) s += ((signs >> j) & 1 ? -(int)g[j] : (int)g[j]) * q[j];
    return s;
}

void dot_iq4_nl_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

void dot_iq4_xs_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

void dot_iq2_xxs_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

void dot_iq2_xs_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

void dot_iq2_s_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

void dot_iq3_xxs_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

void dot_iq3_s_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

void dot_iq1_s_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

void dot_iq1_m_gen(const uint8_t *w, int nb, const act_t *a, int nt, float *out, ptrdiff_t os, const uint8_t *pf) {
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

uint64_t read_sum_gen(const uint8_t *p, size_t n) {
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


/* GT_Q8_0_R16 (k2k_repack_q8_0_r16): 16 interleaved rows per group; the same sums as dot_q8_0_gen per row */
void q8r16_gen(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
               const uint8_t *pf) {
    (void)pf;
    for (int64_t g = 0; g < nrows / 16; g++)
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < 16; r++) {
                float acc = 0.f;
                for (int i = 0; i < nb; i++) {
                    const uint8_t *b = w + (g * nb + i) * 544;
                    const int8_t *q = a[t].q + 32 * i;
                    int s = 0;
                    for (int v = 0; v < 32; v++) s += ((int)b[32 + 64 * (v / 4) + 4 * r + v % 4] - 128) * q[v];
                    acc += fp16_to_f32(rd16(b + 2 * r)) * a[t].d[i] * (float)s;
                }
                out[t * os + 16 * g + r] = acc;
            }
}

/* GT_Q4_K_R16 (k2k_repack_q4_k_r16, layout in avx512.c): the same integer sums per row as dot_q4_k_gen */
void q4kr16_gen(const uint8_t *w, int64_t nrows, int nb, const act_t *a, int nt, float *out, ptrdiff_t os,
                const uint8_t *pf) {
    (void)pf;
    for (int64_t g = 0; g < nrows / 16; g++)
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < 16; r++) {
                float acc = 0.f;
                for (int i = 0; i < nb; i++) {
                    const uint8_t *b = w + (g * nb + i) * 2304;
                    int32_t isum = 0, imin = 0;
                    for (int j = 0; j < 8; j++) {
                        const int lo = b[64 + 16 * j + r], hi = b[192 + 16 * (j & 3) + r] >> (j < 4 ? 0 : 4);
                        const int sc = (lo & 15) | (hi & 3) << 4, mn = (lo >> 4) | (hi & 12) << 2;
                        const uint8_t *qj = b + 256 + 256 * j;
                        const int8_t *x = a[t].q + 256 * i + 32 * j;
                        int32_t s = 0;
                        for (int k = 0; k < 4; k++)
                            for (int v = 0; v < 4; v++) {
                                const int byte = qj[64 * k + 4 * r + v];
                                s += (byte & 15) * x[8 * k + v] + (byte >> 4) * x[8 * k + 4 + v];
                            }
                        isum += sc * s;
                        imin += mn * a[t].bs32[8 * i + j];
                    }
                    const float da = a[t].d[i];
                    acc = fmaf((float)isum, fp16_to_f32(rd16(b + 2 * r)) * da, acc);
                    acc = fmaf(-(float)imin, fp16_to_f32(rd16(b + 32 + 2 * r)) * da, acc);
                }
                out[t * os + 16 * g + r] = acc;
            }
}
