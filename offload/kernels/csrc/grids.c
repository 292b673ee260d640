/* The IQ types' codebooks, handed over at run time by the Python loader (from the installed gguf package). */
#include "common.h"
#include "k2kern.h"

uint64_t *g_iq2xxs, *g_iq2xs, *g_iq2s, *g_iq1s;
uint32_t *g_iq3xxs, *g_iq3s;
int8_t g_kv[16];       /* IQ4_NL / IQ4_XS non-linear 4-bit values */
uint8_t g_kvu[16];     /* the same + 128 (unsigned, for dpbusd) */
uint8_t g_ksigns[128]; /* 7 sign bits + parity as bit 7 */
static int g_kv_set = 0, g_ksigns_set = 0;

int grids_ready(int type) {
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

/* Hand over one IQ codebook (see "IQ codebooks" in common.h): id = the ggml type whose grid it is (IQ2_XXS 256 x 8,
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
    call_lock();
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
    call_unlock();
    return rc;
}

