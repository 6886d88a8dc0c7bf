// One core's read rate from memory through different loads, for comparing the attention kernels'
// rates with (bench/tools/amx_span.sh): 1 GiB read three times, the last rate printed.
// Modes: 0 zmm loads in order; 1 tile loads of 16 rows x 64 B at a 256 B stride, four 4 KiB
// blocks a column at a time (the q.k tile's order); 2 the same, one block at a time; 3 tile loads
// of contiguous 1 KiB; 4 mode 3 with a prefetch 8 KiB ahead; 5 mode 3 over two halves taken
// 64 KiB in turn (K and V spans); 6 mode 5 with prefetches DIST ahead; 7 zmm loads with
// prefetches DIST ahead. HUGE=1 in the environment: madvise huge pages.
// Build: g++ -O3 -march=native [-DDIST=n] stream_probe.cpp -o stream_probe; run: ./stream_probe MODE
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cstdint>
#include <sys/mman.h>
#ifndef DIST
#define DIST 4096
#endif
struct alignas(64) TileConfig { uint8_t palette_id, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
int main(int argc, char** argv) {
  syscall(SYS_arch_prctl, 0x1023, 18);
  int mode = atoi(argv[1]);
  size_t n = 1ull << 30; char* buf = (char*)aligned_alloc(2<<20, n); if (getenv("HUGE")) madvise(buf, n, MADV_HUGEPAGE); memset(buf, 1, n);
  TileConfig c{}; c.palette_id = 1; for (int t = 0; t < 8; ++t) { c.rows[t] = 16; c.colsb[t] = 64; } _tile_loadconfig(&c);
  __m512i acc = _mm512_setzero_si512();
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    if (mode == 0) for (size_t o = 0; o < n; o += 256) { acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + o)); acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + o + 64)); acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + o + 128)); acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + o + 192)); }
    if (mode == 1) for (size_t o = 0; o < n; o += 16384) for (int cc = 0; cc < 4; ++cc) { _tile_loadd(0, buf + o + cc * 64, 256); _tile_loadd(1, buf + o + 4096 + cc * 64, 256); _tile_loadd(2, buf + o + 8192 + cc * 64, 256); _tile_loadd(3, buf + o + 12288 + cc * 64, 256); }
    if (mode == 2) for (size_t o = 0; o < n; o += 4096) { _tile_loadd(0, buf + o, 256); _tile_loadd(1, buf + o + 64, 256); _tile_loadd(2, buf + o + 128, 256); _tile_loadd(3, buf + o + 192, 256); }
    if (mode == 3) for (size_t o = 0; o < n; o += 4096) { _tile_loadd(0, buf + o, 64); _tile_loadd(1, buf + o + 1024, 64); _tile_loadd(2, buf + o + 2048, 64); _tile_loadd(3, buf + o + 3072, 64); }
    if (mode == 4) for (size_t o = 0; o < n; o += 4096) { { _tile_loadd(0, buf + o, 64); _tile_loadd(1, buf + o + 1024, 64); _tile_loadd(2, buf + o + 2048, 64); _tile_loadd(3, buf + o + 3072, 64); } _mm_prefetch(buf + o + 8192, _MM_HINT_T0);}
    if (mode == 5 || mode == 6) {  // K and V: two halves, alternating 64 KiB spans; sw prefetch DIST ahead in the sequence
      const size_t half = n / 2, span = 65536;
      auto addr = [&](size_t v) { size_t s = v / (2 * span), w = v % (2 * span); return buf + (w < span ? 0 : half) + s * span + w % span; };
      for (size_t v = 0; v < n; v += 4096) {
        if (mode == 6) for (int l = 0; l < 64; ++l) if (v + DIST + l * 64 < n) _mm_prefetch(addr(v + DIST + l * 64), _MM_HINT_T0);
        char* p = addr(v);
        _tile_loadd(0, p, 64); _tile_loadd(1, p + 1024, 64); _tile_loadd(2, p + 2048, 64); _tile_loadd(3, p + 3072, 64);
      }
    }
    if (mode == 7) for (size_t o = 0; o < n; o += 256) { _mm_prefetch(buf + o + DIST, _MM_HINT_T0); _mm_prefetch(buf + o + DIST + 64, _MM_HINT_T0); _mm_prefetch(buf + o + DIST + 128, _MM_HINT_T0); _mm_prefetch(buf + o + DIST + 192, _MM_HINT_T0); acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + o)); acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + o + 64)); acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + o + 128)); acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + o + 192)); }
    double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("mode %d: %.1f GB/s\n", mode, n / el / 1e9);
  }
  _tile_stored(0, buf, 64);
  return _mm512_reduce_add_epi32(acc) == 7;
}
