/* The exported entry points other than matmul (matmul.c), MoE (moe.c) and the codebooks (grids.c): version, ISA,
 * threads, knobs, activation quantization, row sizes, the type table, the read-bandwidth probe. */
#include "common.h"
#include "k2kern.h"
#include "kernels.h"

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

#ifndef K2K_SRC_TAG
#define K2K_SRC_TAG "unknown"
#endif
int k2k_abi_version(void) { return K2K_ABI_VERSION; }
/* hash of the source this binary was built from (set by setup.py / the on-demand build) */
const char *k2k_src_tag(void) { return K2K_SRC_TAG; }

int k2k_isa(void) {
    call_lock();
    ensure_init();
    int r = g_isa;
    call_unlock();
    return r;
}

int k2k_isa_hw(void) {
    isa_init();
    return g_isa_hw;
}

/* cap the ISA (tests / debugging); returns the effective ISA */
int k2k_set_isa(int isa) {
    call_lock();
    ensure_init();
    g_isa = isa < g_isa_hw ? (isa < 0 ? 0 : isa) : g_isa_hw;
    int r = g_isa;
    call_unlock();
    return r;
}

int k2k_set_threads(int n, int pin) {
    call_lock();
    ensure_init();
    if (n <= 0) n = pool_physical() > 0 ? pool_physical() : 1;
    int r = pool_start(n, pin);
    call_unlock();
    return r;
}

int k2k_get_threads(void) {
    call_lock();
    ensure_init();
    int r = pool_threads();
    call_unlock();
    return r;
}

/* physical cores among the CPUs this process may run on */
int k2k_default_threads(void) {
    call_lock();
    ensure_init();
    int r = pool_physical() > 0 ? pool_physical() : 1;
    call_unlock();
    return r;
}

int k2k_numa_nodes(void) {
    call_lock();
    ensure_init();
    int r = g_numa_nodes;
    call_unlock();
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
    call_lock();
    ensure_init();
    if (bytes >= 0) g_pfd = bytes;
    if (l2 >= 0) g_pf_l2 = l2 ? 1 : 0;
    int r = g_pfd;
    call_unlock();
    return r;
}

/* decode-once paths for many tokens on (1) / off (0); < 0 only queries */
int k2k_set_panel(int on) {
    call_lock();
    ensure_init();
    if (on >= 0) g_panel = on != 0;
    int r = g_panel;
    call_unlock();
    return r;
}

/* row-pair kernels for single-token calls: 1 on, 0 off, < 0 leaves it; returns the setting in effect */
int k2k_set_pairs(int on) {
    call_lock();
    ensure_init();
    if (on >= 0) g_no_pairs = !on;
    int r = !g_no_pairs;
    call_unlock();
    return r;
}

/* AVX-VNNI kernels at the AVX2 level: 1 on (where the CPU has it), 0 off, < 0 leaves it; returns the setting in effect */
int k2k_set_avxvnni(int on) {
    call_lock();
    ensure_init();
#if K2K_X86
    if (on >= 0) g_avxvnni = on && g_avxvnni_hw;
    int r = g_avxvnni;
#else
    int r = 0 * on;
#endif
    call_unlock();
    return r;
}

/* a type has a kernel here once its codebooks (if any) were handed over */
int k2k_supported(int type) { return tinfo(type) != NULL && grids_ready(type); }

/* Bytes of one token's activation buffer for cols values, and the buffer itself (tests: every ISA must write
 * the same bytes).  layout: 0 natural, 1 Q4_K/Q5_K 512-bit, 2 Q2_K/Q3_K 512-bit, 3 Q8_0 blocks, 4 IQ4_XS. */
int64_t k2k_act_bytes(int64_t cols) { return (int64_t)al64(act_bytes(cols)); }

int k2k_quantize_act(const float *x, int64_t cols, int layout, void *buf) {
    if (layout < 0 || layout > LAYOUT_IQ4X || cols <= 0 || cols % (layout == LAYOUT_Q8_0 ? 32 : 256)) return -2;
    call_lock();
    ensure_init();
    quantize_act(x, cols, layout, (uint8_t *)buf);
    call_unlock();
    return 0;
}

int64_t k2k_row_bytes(int type, int64_t cols) {
    const tinfo_t *ti = tinfo(type);
    if (!ti || cols <= 0 || cols % ti->blk) return -1;
    return cols / ti->blk * ti->bytes;
}

/* the gguf name of a type id with a kernel here, NULL for the others (tests compare the ids with gguf's) */
const char *k2k_type_name(int type) {
    const tinfo_t *ti = tinfo(type);
    return ti ? ti->name : NULL;
}

/* Wall seconds spent in the kernels' pool calls since the library loaded, and how many (*calls): read before and
 * after a decoded token, the share of its time that runs in the kernels. */
double k2k_pool_seconds(int64_t *calls) {
    call_lock();
    double r = pool_seconds(calls);
    call_unlock();
    return r;
}

/* Read bandwidth of buf (64-byte aligned) with the pool: best of reps passes, GB/s. */
double k2k_read_bw(const void *buf, int64_t n, int reps) {
    call_lock();
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
    call_unlock();
    return best;
}
