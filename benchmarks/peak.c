/* The CPU's int8 and bf16 compute peak, registers only (no memory traffic): what bench_peers divides by.

     cc -O2 -pthread benchmarks/peak.c -o peak && ./peak amx-int8|amx-bf16|vnni THREADS ITERS

   Prints ops/s (one multiply-add = 2 ops) over THREADS threads, each running ITERS iterations of
   independent accumulations: AMX TDPBUSD / TDPBF16PS on four tile accumulators (16 x 16 x 64 int8 or
   16 x 16 x 32 bf16 multiply-adds per instruction), or AVX-512 VNNI VPDPBUSD on twelve zmm accumulators
   (64 int8 multiply-adds each). Linux needs arch_prctl(ARCH_REQ_XCOMP_PERM) before a thread touches
   the AMX tiles. A GEMM library reaches a fraction of this; this is the ceiling. */
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
static int kind;  /* 0 amx int8, 1 amx bf16, 2 avx512 vnni */

__attribute__((target("amx-tile,amx-int8,amx-bf16")))
static void amx(long n, int bf16) {
  tilecfg cfg; memset(&cfg, 0, sizeof cfg); cfg.palette = 1;
  for (int i = 0; i < 8; i++) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
  _tile_loadconfig(&cfg);
  static __attribute__((aligned(64))) uint8_t buf[16 * 64];
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, buf, 64); _tile_loadd(5, buf, 64); _tile_loadd(6, buf, 64); _tile_loadd(7, buf, 64);
  if (bf16) for (long i = 0; i < n; i++) { _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(1, 4, 6); _tile_dpbf16ps(2, 7, 5); _tile_dpbf16ps(3, 7, 6); }
  else for (long i = 0; i < n; i++) { _tile_dpbusd(0, 4, 5); _tile_dpbusd(1, 4, 6); _tile_dpbusd(2, 7, 5); _tile_dpbusd(3, 7, 6); }
  _tile_stored(0, buf, 64);
  _tile_release();
}

__attribute__((target("avx512f,avx512vnni")))
static void vnni(long n) {
  __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
  __m512i c[12];
  for (int j = 0; j < 12; j++) c[j] = _mm512_setzero_si512();
  for (long i = 0; i < n; i++)
    for (int j = 0; j < 12; j++) { c[j] = _mm512_dpbusd_epi32(c[j], a, b); __asm__ volatile("" : "+v"(c[j])); }
  volatile int sink = _mm512_reduce_add_epi32(c[0]); (void)sink;
}

static void *work(void *arg) {
  (void)arg;
  if (kind == 2) vnni(iters); else amx(iters, kind);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 4) { fprintf(stderr, "usage: peak amx-int8|amx-bf16|vnni THREADS ITERS\n"); return 2; }
  kind = !strcmp(argv[1], "amx-bf16") ? 1 : !strcmp(argv[1], "vnni") ? 2 : 0;
  int threads = atoi(argv[2]); iters = atol(argv[3]);
  if (kind < 2 && syscall(SYS_arch_prctl, 0x1023, 18)) { perror("arch_prctl(ARCH_REQ_XCOMP_PERM)"); return 1; }
  pthread_t t[64];
  double t0 = now();
  for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, work, NULL);
  for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
  double s = now() - t0;
  /* ops per instruction: AMX 16x16x64 (int8) or 16x16x32 (bf16) MACs x 2; VNNI 64 MACs x 2 */
  double per = kind == 0 ? 4.0 * 16 * 16 * 64 * 2 : kind == 1 ? 4.0 * 16 * 16 * 32 * 2 : 12.0 * 64 * 2;
  printf("%.6e\n", per * iters * threads / s);
  return 0;
}
