/* MLA's absorbed attention for one decoded token in one pool call (k2k_mla_decode): every head's query moved into
 * the latent space by its quantized k_b, scored against the whole latent cache with an online softmax, and the
 * weighted latent sum moved out by its quantized v_b.  Before this, the same step was ~20 torch / ctypes calls a
 * layer on one thread (bench/decode.py --shape k2deep: 51 ms of a 500 ms token on a 2-core Zen 4).
 *
 * Work split: the per-head products (k_b, v_b) by head; the scores by key range (each thread all heads against its
 * own keys, flash-decoding's split-K, so a long cache is read once per layer, not once per thread), the partial
 * softmaxes merged per head before v_b. */
#include "common.h"
#include "k2kern.h"
#include "run.h"
#if K2K_X86
#include "avx2.h"
#endif

#define MLA_KB 32 /* keys per block of the online softmax: 16 latent rows (32 KiB at 512) stay in L1/L2 over all heads */

typedef struct {
    kern_t kk, kv; /* k_b's and v_b's kernels */
    const uint8_t *kb, *vb;
    int64_t kh, vh, krs, vrs; /* bytes between heads, between rows */
    int nbk, nbv;
    int64_t heads, nope, rope, c, vd, s;
    const float *qn, *qp, *lat, *kpe;
    int64_t q_hs, qp_hs;
    float scale;
    float *out;
    float *qlat; /* heads x c: the latent queries, then (phase 3) the merged latent outputs */
    float *m, *den, *acc, *sc; /* per thread: heads, heads, heads x c, heads x MLA_KB */
    uint8_t *act;         /* heads x abytes activation buffers */
    size_t abytes;
} mla_ctx;

/* ------------------------------------------------------------------ fp32 helpers: 4 keys at a time */

static void dot4_gen(const float *q, const float *k, int64_t ld, int64_t n, float *o) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t i = 0; i < n; i++) {
        s0 += q[i] * k[i];
        s1 += q[i] * k[ld + i];
        s2 += q[i] * k[2 * ld + i];
        s3 += q[i] * k[3 * ld + i];
    }
    o[0] = s0, o[1] = s1, o[2] = s2, o[3] = s3;
}

static void axpy4_gen(float *acc, const float *p, const float *v, int64_t ld, int64_t n) {
    for (int64_t i = 0; i < n; i++) acc[i] += p[0] * v[i] + p[1] * v[ld + i] + p[2] * v[2 * ld + i] + p[3] * v[3 * ld + i];
}

#if K2K_X86
/* n a multiple of 8 (the latent and rope widths are) */
T256 static void dot4_avx2(const float *q, const float *k, int64_t ld, int64_t n, float *o) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 x = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + ld + i), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 2 * ld + i), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 3 * ld + i), a3);
    }
    o[0] = hsum256(a0), o[1] = hsum256(a1), o[2] = hsum256(a2), o[3] = hsum256(a3);
}

T256 static void axpy4_avx2(float *acc, const float *p, const float *v, int64_t ld, int64_t n) {
    const __m256 p0 = _mm256_set1_ps(p[0]), p1 = _mm256_set1_ps(p[1]), p2 = _mm256_set1_ps(p[2]), p3 = _mm256_set1_ps(p[3]);
    for (int64_t i = 0; i < n; i += 8) {
        __m256 a = _mm256_loadu_ps(acc + i);
        a = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v + i), a);
        a = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v + ld + i), a);
        a = _mm256_fmadd_ps(p2, _mm256_loadu_ps(v + 2 * ld + i), a);
        a = _mm256_fmadd_ps(p3, _mm256_loadu_ps(v + 3 * ld + i), a);
        _mm256_storeu_ps(acc + i, a);
    }
}
/* a[u][v] = q_u . k_v for 3 query rows (qs floats apart) and 4 key rows (ks apart) of n floats (a multiple of 8) */
T256 static void tile34_avx2(const float *q, int64_t qs, const float *k, int64_t ks, int64_t n, float a[3][4]) {
    __m256 s[3][4];
    for (int u = 0; u < 3; u++)
        for (int v = 0; v < 4; v++) s[u][v] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 q0 = _mm256_loadu_ps(q + i), q1 = _mm256_loadu_ps(q + qs + i), q2 = _mm256_loadu_ps(q + 2 * qs + i);
        for (int v = 0; v < 4; v++) {
            const __m256 l = _mm256_loadu_ps(k + v * ks + i);
            s[0][v] = _mm256_fmadd_ps(q0, l, s[0][v]);
            s[1][v] = _mm256_fmadd_ps(q1, l, s[1][v]);
            s[2][v] = _mm256_fmadd_ps(q2, l, s[2][v]);
        }
    }
    for (int u = 0; u < 3; u++)
        for (int v = 0; v < 4; v++) a[u][v] = hsum256(s[u][v]);
}

/* acc[u] += sum_j p[u][j] lat[j] for 4 heads (acc rows C apart, p rows MLA_KB apart), j < nk; C a multiple of 16 */
T256 static void out416_avx2(float *acc, int64_t C, const float *p, const float *lat, int64_t nk) {
    for (int64_t i = 0; i < C; i += 16) {
        __m256 a[4][2];
        for (int u = 0; u < 4; u++) a[u][0] = _mm256_loadu_ps(acc + u * C + i), a[u][1] = _mm256_loadu_ps(acc + u * C + i + 8);
        for (int64_t j = 0; j < nk; j++) {
            const __m256 l0 = _mm256_loadu_ps(lat + j * C + i), l1 = _mm256_loadu_ps(lat + j * C + i + 8);
            for (int u = 0; u < 4; u++) {
                const __m256 b = _mm256_broadcast_ss(p + u * MLA_KB + j);
                a[u][0] = _mm256_fmadd_ps(b, l0, a[u][0]);
                a[u][1] = _mm256_fmadd_ps(b, l1, a[u][1]);
            }
        }
        for (int u = 0; u < 4; u++) _mm256_storeu_ps(acc + u * C + i, a[u][0]), _mm256_storeu_ps(acc + u * C + i + 8, a[u][1]);
    }
}
#endif

typedef void (*dot4_fn)(const float *q, const float *k, int64_t ld, int64_t n, float *o);
typedef void (*axpy4_fn)(float *acc, const float *p, const float *v, int64_t ld, int64_t n);

/* ------------------------------------------------------------------ the three phases */

/* the thread's keys [k0, k1) against every head: running max m, denominator den and weighted latent sum acc */
/* Scores of key block [b0, b0 + nk) for every head into sc [heads][MLA_KB] (scaled) */
static void block_scores(const mla_ctx *c, const float *lat, const float *kpe, int64_t nk, float *sc) {
    const int64_t C = c->c, R = c->rope, H = c->heads;
    int64_t h0 = 0;
#if K2K_X86
    if (g_isa >= ISA_AVX2 && nk == MLA_KB) /* 3 heads x 4 keys a step */
        for (; h0 + 3 <= H; h0 += 3)
            for (int64_t j = 0; j < nk; j += 4) {
                float a[3][4], b[3][4];
                tile34_avx2(c->qlat + h0 * C, C, lat + j * C, C, C, a);
                tile34_avx2(c->qp + h0 * c->qp_hs, c->qp_hs, kpe + j * R, R, R, b);
                for (int u = 0; u < 3; u++)
                    for (int v = 0; v < 4; v++) sc[(h0 + u) * MLA_KB + j + v] = (a[u][v] + b[u][v]) * c->scale;
            }
#endif
    dot4_fn dot4 = dot4_gen;
#if K2K_X86
    if (g_isa >= ISA_AVX2) dot4 = dot4_avx2;
#endif
    const int64_t n4 = nk & ~(int64_t)3;
    for (int64_t h = h0; h < H; h++) {
        const float *ql = c->qlat + h * C, *qp = c->qp + h * c->qp_hs;
        float *sh = sc + h * MLA_KB, pe[4];
        for (int64_t j = 0; j < n4; j += 4) {
            dot4(ql, lat + j * C, C, C, sh + j);
            dot4(qp, kpe + j * R, R, R, pe);
            for (int u = 0; u < 4; u++) sh[j + u] = (sh[j + u] + pe[u]) * c->scale;
        }
        for (int64_t j = n4; j < nk; j++) {
            float a = 0.f, b = 0.f;
            for (int64_t i = 0; i < C; i++) a += ql[i] * lat[j * C + i];
            for (int64_t i = 0; i < R; i++) b += qp[i] * kpe[j * R + i];
            sh[j] = (a + b) * c->scale;
        }
    }
}

/* acc[h] += sum_j p[h][j] lat[j] for every head, keys j < nk */
static void block_values(const mla_ctx *c, const float *lat, int64_t nk, const float *p, float *acc) {
    const int64_t C = c->c, H = c->heads;
    int64_t h0 = 0;
#if K2K_X86
    if (g_isa >= ISA_AVX2 && C % 16 == 0) /* 4 heads x 16 latent columns a step */
        for (; h0 + 4 <= H; h0 += 4) out416_avx2(acc + h0 * C, C, p + h0 * MLA_KB, lat, nk);
#endif
    axpy4_fn axpy4 = axpy4_gen;
#if K2K_X86
    if (g_isa >= ISA_AVX2) axpy4 = axpy4_avx2;
#endif
    const int64_t n4 = nk & ~(int64_t)3;
    for (int64_t h = h0; h < H; h++) {
        float *ah = acc + h * C;
        const float *ph = p + h * MLA_KB;
        for (int64_t j = 0; j < n4; j += 4) axpy4(ah, ph + j, lat + j * C, C, C);
        for (int64_t j = n4; j < nk; j++)
            for (int64_t i = 0; i < C; i++) ah[i] += ph[j] * lat[j * C + i];
    }
}

/* the thread's keys [k0, k1) against every head: running max m, denominator den and weighted latent sum acc;
 * sc: heads x MLA_KB floats of scratch */
static void mla_scores(const mla_ctx *c, int64_t k0, int64_t k1, float *m, float *den, float *acc, float *sc) {
    const int64_t C = c->c, R = c->rope;
    for (int64_t h = 0; h < c->heads; h++) m[h] = -INFINITY, den[h] = 0.f;
    memset(acc, 0, sizeof(float) * (size_t)(c->heads * C));
    for (int64_t b0 = k0; b0 < k1; b0 += MLA_KB) {
        const int64_t nk = k1 - b0 < MLA_KB ? k1 - b0 : MLA_KB;
        const float *lat = c->lat + b0 * C, *kpe = c->kpe + b0 * R;
        block_scores(c, lat, kpe, nk, sc);
        for (int64_t h = 0; h < c->heads; h++) { /* scores -> weights in place, rescaling the running sums */
            float *sh = sc + h * MLA_KB, mx = m[h];
            for (int64_t j = 0; j < nk; j++) mx = sh[j] > mx ? sh[j] : mx;
            if (mx > m[h]) {
                const float corr = expf(m[h] - mx);
                den[h] *= corr;
                if (m[h] != -INFINITY)
                    for (float *ah = acc + h * C, *e = ah + C; ah < e; ah++) *ah *= corr;
                m[h] = mx;
            }
            for (int64_t j = 0; j < nk; j++) {
                sh[j] = expf(sh[j] - mx);
                den[h] += sh[j];
            }
        }
        block_values(c, lat, nk, sc, acc);
    }
}

static void mla_task(void *vctx, int tid, int nth) {
    mla_ctx *c = (mla_ctx *)vctx;
    int sense = 0;
    act_t a;
    /* 1: latent queries q_lat[h] = k_b[h] q_nope[h] */
    for (int64_t h = tid; h < c->heads; h += nth) {
        uint8_t *buf = c->act + h * c->abytes;
        quantize_act(c->qn + h * c->q_hs, c->nope, c->kk.layout, buf);
        a = act_view(buf, c->nope);
        run_rows(&c->kk, c->kb + h * c->kh, c->krs, c->nbk, 0, c->c, &a, 1, c->qlat + h * c->c, 1, NULL);
    }
    pool_barrier(nth, &sense);
    /* 2: this thread's keys */
    const int64_t k0 = c->s * tid / nth, k1 = c->s * (tid + 1) / nth;
    float *m = c->m + (int64_t)tid * c->heads, *den = c->den + (int64_t)tid * c->heads;
    float *acc = c->acc + (int64_t)tid * c->heads * c->c;
    mla_scores(c, k0, k1, m, den, acc, c->sc + (int64_t)tid * c->heads * MLA_KB);
    pool_barrier(nth, &sense);
    /* 3: merge the threads' partial softmaxes per head, then out[h] = v_b[h] o_lat[h] */
    for (int64_t h = tid; h < c->heads; h += nth) {
        float mx = -INFINITY, d = 0.f, wt[1024];
        for (int t = 0; t < nth; t++) mx = c->m[t * c->heads + h] > mx ? c->m[t * c->heads + h] : mx;
        for (int t = 0; t < nth; t++) {
            const float mt = c->m[t * c->heads + h];
            wt[t] = mt == -INFINITY ? 0.f : expf(mt - mx);
            d += wt[t] * c->den[t * c->heads + h];
        }
        float *o = c->qlat + h * c->c;
        for (int64_t i = 0; i < c->c; i++) o[i] = 0.f;
        for (int t = 0; t < nth; t++) {
            if (wt[t] == 0.f) continue;
            const float *at = c->acc + ((int64_t)t * c->heads + h) * c->c, w = wt[t] / d;
            for (int64_t i = 0; i < c->c; i++) o[i] += w * at[i];
        }
        uint8_t *buf = c->act + h * c->abytes;
        quantize_act(o, c->c, c->kv.layout, buf);
        a = act_view(buf, c->c);
        run_rows(&c->kv, c->vb + h * c->vh, c->vrs, c->nbv, 0, c->vd, &a, 1, c->out + h * c->vd, 1, NULL);
    }
}

/* A decode step of MLA in the latent space, for `heads` heads of one token:
 *   q_lat_h = K_h q_nope_h            K_h: k_b of head h, [c rows, nope cols] of ggml type tk, kh bytes apart
 *   p_h     = softmax(scale (lat q_lat_h + kpe q_pe_h))   over the s cached positions (lat [s, c], kpe [s, rope])
 *   out_h   = V_h (lat^T p_h)         V_h: v_b of head h, [vd rows, c cols] of type tv, vh bytes apart
 * q_nope [heads, nope] q_hs floats between heads, q_pe [heads, rope] qp_hs apart, out [heads, vd] contiguous.
 * Returns 0, -1 for a type without a kernel, -2 for shapes the kernels cannot take, -3 out of memory. */
int k2k_mla_decode(int tk, const void *kb, int64_t kh, int tv, const void *vb, int64_t vh, int64_t heads,
                   int64_t nope, int64_t rope, int64_t c, int64_t vd, const float *q_nope, int64_t q_hs,
                   const float *q_pe, int64_t qp_hs, const float *lat, const float *kpe, int64_t s, float scale,
                   float *out) {
    const tinfo_t *ik = tinfo(tk), *iv = tinfo(tv);
    if (!ik || !iv || !grids_ready(tk) || !grids_ready(tv)) return -1;
    if (heads <= 0 || s <= 0 || nope <= 0 || c <= 0 || vd <= 0 || rope < 0 || c % 8 || rope % 8 || nope % ik->blk ||
        c % iv->blk || kh < c * k2k_row_bytes(tk, nope) || vh < vd * k2k_row_bytes(tv, c))
        return -2;
    if ((IS_R16(tk) && c % R16_ROWS) || (IS_R16(tv) && vd % R16_ROWS)) return -2;
    call_lock();
    ensure_init();
    const int nth = pool_threads();
    if (nth > 1024) {
        call_unlock();
        return -2;
    }
    mla_ctx x;
    memset(&x, 0, sizeof x);
    x.kk = get_kernel(tk), x.kv = get_kernel(tv);
    x.kb = (const uint8_t *)kb, x.vb = (const uint8_t *)vb, x.kh = kh, x.vh = vh;
    x.krs = k2k_row_bytes(tk, nope), x.vrs = k2k_row_bytes(tv, c);
    x.nbk = (int)(nope / ik->blk), x.nbv = (int)(c / iv->blk);
    x.heads = heads, x.nope = nope, x.rope = rope, x.c = c, x.vd = vd, x.s = s;
    x.qn = q_nope, x.qp = q_pe, x.lat = lat, x.kpe = kpe, x.q_hs = q_hs, x.qp_hs = qp_hs;
    x.scale = scale, x.out = out;
    x.abytes = al64(act_bytes(nope > c ? nope : c));
    const size_t fq = al64(sizeof(float) * (size_t)(heads * c)), fm = al64(sizeof(float) * (size_t)(nth * heads)),
                 fa = al64(sizeof(float) * (size_t)(nth * heads * c)),
                 fs = al64(sizeof(float) * (size_t)(nth * heads * MLA_KB));
    uint8_t *buf = (uint8_t *)scratch(fq + 2 * fm + fa + fs + x.abytes * (size_t)heads);
    if (!buf) {
        call_unlock();
        return -3;
    }
    x.qlat = (float *)buf, x.m = (float *)(buf + fq), x.den = (float *)(buf + fq + fm);
    x.acc = (float *)(buf + fq + 2 * fm), x.sc = (float *)(buf + fq + 2 * fm + fa), x.act = buf + fq + 2 * fm + fa + fs;
    pool_run(mla_task, &x);
    call_unlock();
    return 0;
}
