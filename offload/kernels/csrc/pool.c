/* The persistent thread pool (the caller's thread is worker 0), the lock that serializes public calls, first-call
 * initialization (CPU order, environment knobs) and the scratch buffers. */
#include "common.h"

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

double now_s(void) {
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
int read_cpulist(const char *path, int *out, int cap) {
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

int g_numa_nodes = 1;

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

int pool_start(int n, int pin) {
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

/* wall time and count of pool_run calls since the start (k2k_pool_seconds: how much of a token the kernels take) */
static double g_pool_s = 0;
static int64_t g_pool_calls = 0;

static void pool_run_(task_fn fn, void *ctx);
void pool_run(task_fn fn, void *ctx) {
    const double t0 = now_s();
    pool_run_(fn, ctx);
    g_pool_s += now_s() - t0;
    g_pool_calls++;
}

double pool_seconds(int64_t *calls) {
    if (calls) *calls = g_pool_calls;
    return g_pool_s;
}

static void pool_run_(task_fn fn, void *ctx) {
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
void pool_barrier(int nth, int *local_sense) {
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

void ensure_init(void) {
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


void call_lock(void) { pthread_mutex_lock(&P.call_mu); }
void call_unlock(void) { pthread_mutex_unlock(&P.call_mu); }
int pool_threads(void) { return P.nth; }
int pool_physical(void) { return P.physical; }

static uint8_t *g_scratch = NULL;
static size_t g_scratch_cap = 0;
void *scratch(size_t n) {
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

/* Per-thread scratch for decoded weight rows (pnl_gemm's panel, run_rows' decoded codebook row): 64-byte aligned, at
 * least n bytes, kept and grown (pool workers live as long as the process; the two users never nest) */
static __thread uint8_t *t_rows = NULL;
static __thread size_t t_rows_cap = 0;
uint8_t *thread_rows_buf(size_t n) {
    if (t_rows_cap < n) {
        free(t_rows);
        t_rows = NULL, t_rows_cap = 0;
        if (posix_memalign((void **)&t_rows, 64, n) != 0) abort(); /* a few hundred KiB */
        t_rows_cap = n;
    }
    return t_rows;
}

