/* The CPU's int8 and bf16 compute peak, registers only (no memory traffic): what bench_peers divides by.

     cc -O2 -pthread benchmarks/peak.c -o peak && ./peak amx-int8|amx-bf16|vnni|avx512-bf16 THREADS ITERS

   Prints ops/s (one multiply-add = 2 ops) over THREADS threads, each running ITERS iterations of
   independent accumulations: AMX TDPBUSD / TDPBF16PS on four tile accumulators (16 x 16 x 64 int8 or
   16 x 16 x 32 bf16 multiply-adds per instruction), or on twelve zmm accumulators AVX-512 VNNI VPDPBUSD
   (64 int8 multiply-adds each) and AVX-512 BF16 VDPBF16PS (32 bf16 multiply-adds each). Linux needs
   arch_prctl(ARCH_REQ_XCOMP_PERM) before a thread touches the AMX tiles. A GEMM library reaches a
   fraction of this; this is the ceiling. */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

typedef struct { uint8_t palette, start; uint8_t pad[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed)) tilecfg;

static long iters;
static int kind;  /* 0 amx int8, 1 amx bf16, 2 avx512 vnni, 3 avx512 bf16 */

__attribute__((target("amx-tile,amx-int8,amx-bf16")))
static void amx(long n, int bf16) {
  tilecfg cfg; memset(&cfg, 0, sizeof cfg); cfg.palette = 1;
  for (int i = 0; i < 8; i++) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
  _tile_loadconfig(&cfg);
  static __attribute__((aligned(64))) uint8_t buf[16 * 64];
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, buf, 64); _tile_loadd(5, buf, 64); _tile_loadd(6, buf, 64); _tile_loadd(7, buf, 64);
  if (bf16)
    for (long i = 0; i < n; i++) {
      _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(1, 4, 6); _tile_dpbf16ps(2, 7, 5); _tile_dpbf16ps(3, 7, 6);
    }
  else
    for (long i = 0; i < n; i++) {
      _tile_dpbusd(0, 4, 5); _tile_dpbusd(1, 4, 6); _tile_dpbusd(2, 7, 5); _tile_dpbusd(3, 7, 6);
    }
  _tile_stored(0, buf, 64);
  _tile_release();
}

/* Twelve named accumulators, not an array: GCC 12 -O2 kept an array c[12] in memory, and each
   VPDPBUSD then waited on a store and reload (0.46 TOPS on a 2-core Zen 5 where onnxruntime's own
   MatMulInteger ran at 0.84). */
#define VNNI12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
__attribute__((target("avx512f,avx512vnni")))
static void vnni(long n) {
  __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
#define ZERO(j) __m512i c##j = _mm512_setzero_si512();
#define STEP(j) c##j = _mm512_dpbusd_epi32(c##j, a, b);
#define KEEP(j) __asm__ volatile("" : "+v"(c##j));
#define SUM(j) + _mm512_reduce_add_epi32(c##j)
  VNNI12(ZERO)
  for (long i = 0; i < n; i++) { VNNI12(STEP) VNNI12(KEEP) }
  volatile int sink = 0 VNNI12(SUM); (void)sink;
}

/* AVX-512 BF16 VDPBF16PS: 16 fp32 lanes, each the sum of 2 bf16 products (32 multiply-adds). */
__attribute__((target("avx512f,avx512bf16")))
static void bf16dp(long n) {
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f80);
#define ZEROF(j) __m512 c##j = _mm512_setzero_ps();
#define STEPF(j) c##j = _mm512_dpbf16_ps(c##j, a, b);
#define SUMF(j) + _mm512_reduce_add_ps(c##j)
  VNNI12(ZEROF)
  for (long i = 0; i < n; i++) { VNNI12(STEPF) VNNI12(KEEP) }
  volatile float sink = 0 VNNI12(SUMF); (void)sink;
}

static void *work(void *arg) {
  (void)arg;
  if (kind == 2) vnni(iters); else if (kind == 3) bf16dp(iters); else amx(iters, kind);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 4) { fprintf(stderr, "usage: peak amx-int8|amx-bf16|vnni|avx512-bf16 THREADS ITERS\n"); return 2; }
  kind = !strcmp(argv[1], "amx-bf16") ? 1 : !strcmp(argv[1], "vnni") ? 2 : !strcmp(argv[1], "avx512-bf16") ? 3 : 0;
  int threads = atoi(argv[2]); iters = atol(argv[3]);
  if (kind < 2 && syscall(SYS_arch_prctl, 0x1023, 18)) { perror("arch_prctl(ARCH_REQ_XCOMP_PERM)"); return 1; }
  pthread_t t[64];
  double t0 = now();
  for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, work, NULL);
  for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
  double s = now() - t0;
  /* ops per instruction: AMX 16x16x64 (int8) or 16x16x32 (bf16) MACs x 2; VNNI 64, VDPBF16PS 32 MACs x 2 */
  double per = kind == 0 ? 4.0 * 16 * 16 * 64 * 2 : kind == 1 ? 4.0 * 16 * 16 * 32 * 2
             : kind == 2 ? 12.0 * 64 * 2 : 12.0 * 32 * 2;
  printf("%.6e\n", per * iters * threads / s);
  return 0;
}
