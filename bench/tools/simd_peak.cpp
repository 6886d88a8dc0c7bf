// One core's arithmetic peaks that bound the tier-2 kernel's bf16 path: vdpbf16ps (AVX512-BF16,
// what q.k and p @ V run on), a 512-bit fp32 FMA, and AMX's tdpbf16ps where the kernel grants the
// tiles. 16 independent chains each, so latency does not count.
// Build and run (any x86-64 Linux with AVX512-BF16):
//   g++ -O2 -march=native bench/tools/simd_peak.cpp -o /tmp/simd_peak && /tmp/simd_peak
// The bf16 kernel issues 4 vdpbf16ps per 64 bytes of GQA K/V (4 query heads a kv head; 1 for MHA),
// so dp/s x 16 bytes is one core's GQA ceiling before any other instruction.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>

static double secs(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int main() {
  const long N = 200000000;
  __m512 acc[16];
  for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_ps(i);
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
  auto t0 = std::chrono::steady_clock::now();
  for (long n = 0; n < N / 16; n++) {
    for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    asm volatile("" : "+v"(a));
  }
  double s = secs(t0);
  float x = 0;
  for (int i = 0; i < 16; i++) x += _mm512_reduce_add_ps(acc[i]);
  printf("vdpbf16ps zmm: %.2f G/s (%.0f GMAC/s; GQA ceiling %.1f GB/s a core) [%g]\n", N / s / 1e9,
         N / s * 32 / 1e9, N / s * 16 / 1e9, x);
  __m512 f[16], fa = _mm512_set1_ps(0.5f), fb = _mm512_set1_ps(0.25f);
  for (int i = 0; i < 16; i++) f[i] = _mm512_set1_ps(i * 1e-3f);
  t0 = std::chrono::steady_clock::now();
  for (long n = 0; n < N / 16; n++) {
    for (int i = 0; i < 16; i++) f[i] = _mm512_fmadd_ps(f[i], fa, fb);
    asm volatile("" : "+v"(fa));
  }
  s = secs(t0);
  x = 0;
  for (int i = 0; i < 16; i++) x += _mm512_reduce_add_ps(f[i]);
  printf("vfmadd zmm fp32: %.2f G/s [%g]\n", N / s / 1e9, x);
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) { printf("AMX: the kernel grants no tiles\n"); return 0; }
  struct alignas(64) { uint8_t palette, start, r[14]; uint16_t colsb[16]; uint8_t rows[16]; } c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; t++) { c.colsb[t] = 64; c.rows[t] = 16; }
  _tile_loadconfig(&c);
  alignas(64) static uint16_t A[512];
  alignas(64) static float C[256];
  for (int i = 0; i < 512; i++) A[i] = 0x3f80;
  _tile_loadd(4, A, 64); _tile_loadd(5, A, 64); _tile_loadd(6, A, 64); _tile_loadd(7, A, 64);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const long M = 20000000;
  t0 = std::chrono::steady_clock::now();
  for (long n = 0; n < M / 4; n++) {
    _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 6, 5); _tile_dpbf16ps(3, 6, 7);
  }
  s = secs(t0);
  _tile_stored(0, C, 64);
  _tile_release();
  printf("tdpbf16ps: %.0f M/s (%.0f GMAC/s) [%g]\n", M / s / 1e6, M / s * 16 * 16 * 32 / 1e9, C[0]);
#else
  printf("AMX: not in this build target\n");
#endif
}
