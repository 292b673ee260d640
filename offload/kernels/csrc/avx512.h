/* AVX-512 VNNI target attributes (x86 only), or in the SIMDe-emulated test build the emulation (emu512.h), and the
 * permutexvar index tables the K-quant and IQ kernels share. */
#ifndef K2K_AVX512_H
#define K2K_AVX512_H
#include "common.h"
#if K2K_X86
#include "avx2.h"
#ifndef K2K_EMULATE_AVX512
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")))
/* + AVX512_VBMI (vpermb / vpermi2b), for the kernels picked only where the CPU reports it */
#define T512V __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c,bmi2")))
#else
#include "emu512.h"
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

#endif /* K2K_X86 */
#endif /* K2K_AVX512_H */
