// Prototype (not the shipped kernel): tier 2's decode attention with AMX tiles for both products,
// to test session 17's guess that such a path would lift this project's 2-core machine to 0.9 of
// its DRAM read. One (row, kv head) at a time: K row-major [L][D] as the cache holds it (the q.k
// tile's A operand, loaded in place), V transposed in blocks (per span of SPAN positions:
// [D/64][SPAN/32][64 dims][32 positions], the p @ V tile's A operand), the softmax in two passes
// over a span (scores of the span, then p @ V with the accumulators held in tiles over the span).
// bf16, D = 128; the first row is checked against a float64 reference (maxerr).
// Build: g++ -O3 -march=native -fopenmp [switches] amx_span.cpp -o amx_span
// Switches: -DHUGE (madvise huge pages), -DPF (prefetch the span's V during q.k, the next span's K
// during p @ V, into L2), -DSEQ -DDIST=n (prefetch n bytes ahead in the order the bytes are used),
// -DNO_QK / -DNO_SM / -DNO_PV (leave a part out), -DNODP (no tile products: loads and stores only).
// Run: ./amx_span H KVH CONTEXT ROWS THREADS  -> KV bytes read per second. bench/tools/amx_span.sh
// runs the set that bench/results/local-2026-12-07-session18/ holds.
#include <immintrin.h>
#include "../../ghmpi/kernels/exp512.h"
#include <sys/syscall.h>
#include <unistd.h>
#include <omp.h>
#include <sys/mman.h>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#ifdef NODP
#undef _tile_dpbf16ps
#define _tile_dpbf16ps(a,b,c) do{}while(0)
#endif
#include <algorithm>
constexpr float NEG_INF = -INFINITY;
struct alignas(64) TileConfig { uint8_t palette_id, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
static inline uint16_t f2bf(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return u >> 16; }
static inline float bf2f(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; memcpy(&f, &u, 4); return f; }

// lane-group reduce: lanes j with the same j % nr combined
static inline __m512 group_max(__m512 v, int nr) {
  for (int s = 8; s >= nr; s /= 2) {
    __m512i idx = _mm512_and_si512(_mm512_add_epi32(_mm512_set_epi32(15,14,13,12,11,10,9,8,7,6,5,4,3,2,1,0), _mm512_set1_epi32(s)), _mm512_set1_epi32(15));
    v = _mm512_max_ps(v, _mm512_permutexvar_ps(idx, v));
  }
  return v;
}
static inline __m512 group_sum(__m512 v, int nr) {
  for (int s = 8; s >= nr; s /= 2) {
    __m512i idx = _mm512_and_si512(_mm512_add_epi32(_mm512_set_epi32(15,14,13,12,11,10,9,8,7,6,5,4,3,2,1,0), _mm512_set1_epi32(s)), _mm512_set1_epi32(15));
    v = _mm512_add_ps(v, _mm512_permutexvar_ps(idx, v));
  }
  return v;
}

constexpr int SPAN = 256;
#ifndef PFH
#define PFH _MM_HINT_T1
#endif
#ifndef DIST
#define DIST 8192
#endif
struct Seq { const char* K; const char* V; int64_t SB, total;
  void at(int64_t v) const { v += DIST; if (v >= total) return; int64_t s = v / (2 * SB), w = v % (2 * SB);
    const char* p = (w < SB ? K : V) + s * SB + w % SB; for (int l = 0; l < 64; ++l) _mm_prefetch(p + l * 64, PFH); } };
static inline void pf(const void* p, int64_t bytes) { const char* c = (const char*)p; for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, PFH); }
// qt: D/32 tiles of [16 dim pairs][nr][2] bf16 (colsb nr*4)
// out [nr][D]
void attend(const uint16_t* qt, const uint16_t* K, const uint16_t* V, int64_t L, int nr, int D,
            float scale, float* out, float* S /*SPAN*nr*/, float* acc /*D*nr*/, uint16_t* pb /*SPAN*nr*/) {
  // configure
  TileConfig c{}; c.palette_id = 1;
  for (int t = 0; t < 4; ++t) { c.rows[t] = 16; c.colsb[t] = nr * 4; }
  c.rows[4] = 16; c.colsb[4] = 64;      // K A
  c.rows[5] = 16; c.colsb[5] = nr * 4;  // q B
  c.rows[6] = 16; c.colsb[6] = 64;      // V^T A
  c.rows[7] = 16; c.colsb[7] = nr * 4;  // p B
  _tile_loadconfig(&c);
  float M[16], Lsum[16];
  for (int h = 0; h < nr; ++h) { M[h] = NEG_INF; Lsum[h] = 0; }
  memset(acc, 0, sizeof(float) * D * nr);
  const int nc = D / 32;
  // permutation for p: dest word d in group of 2nr: h = d/2 % nr .. within group g: src = g*2nr + (d%2)*nr + d/2
  alignas(64) uint16_t pidx[32];
  for (int d = 0; d < 32; ++d) { int g = d / (2 * nr), e = d % (2 * nr); pidx[d] = g * 2 * nr + (e % 2) * nr + e / 2; }
  const __m512i vpidx = _mm512_loadu_si512(pidx);
  Seq sq{(const char*)K, (const char*)V, (int64_t)SPAN * D * 2, 2 * L * D * 2};
  for (int64_t t0 = 0; t0 < L; t0 += SPAN) {
    const int n = (int)std::min<int64_t>(SPAN, L - t0);  // assume multiple of 32 for prototype
    // q.k: 4 blocks of 16 at a time into tiles 0..3
#ifndef NO_QK
    for (int b0 = 0; b0 < n / 16; b0 += 4) {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int cc = 0; cc < nc; ++cc) {
        _tile_loadd(5, qt + cc * 16 * nr * 2, nr * 4);
#ifdef SEQ
        sq.at(2 * t0 * D * 2 + (b0 / 4) * 16384 + cc * 4096);
#endif
#ifdef PF
        { const int64_t step = (int64_t)n * D * 2 / ((n / 64) * nc); const int64_t k = (b0 / 4) * nc + cc;
          pf((const char*)(V + t0 * D) + k * step, step); }
#endif
        const uint16_t* kb = K + (t0 + b0 * 16) * D + cc * 32;
        _tile_loadd(4, kb, D * 2); _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(4, kb + 16 * D, D * 2); _tile_dpbf16ps(1, 4, 5);
        _tile_loadd(4, kb + 32 * D, D * 2); _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(4, kb + 48 * D, D * 2); _tile_dpbf16ps(3, 4, 5);
      }
      float* sb = S + b0 * 16 * nr;
      _tile_stored(0, sb, nr * 4); _tile_stored(1, sb + 16 * nr, nr * 4);
      _tile_stored(2, sb + 32 * nr, nr * 4); _tile_stored(3, sb + 48 * nr, nr * 4);
    }
#endif
    // softmax over span, [pos][nr] layout
#ifndef NO_SM
    const int nv = n * nr / 16;
    const __m512 vs = _mm512_set1_ps(scale);
    __m512 mx = _mm512_set1_ps(NEG_INF);
    for (int i = 0; i < nv; ++i) mx = _mm512_max_ps(mx, _mm512_loadu_ps(S + 16 * i));
    mx = _mm512_mul_ps(group_max(mx, nr), vs);
    alignas(64) float mxa[16]; _mm512_store_ps(mxa, mx);
    alignas(64) float al[16];
    for (int h = 0; h < nr; ++h) {
      float mn = std::max(M[h], mxa[h]);
      al[h] = M[h] == NEG_INF ? 0.f : std::exp(M[h] - mn);
      M[h] = mn;
    }
    for (int j = nr; j < 16; ++j) { mxa[j] = M[j % nr]; al[j] = al[j % nr]; }
    for (int h = 0; h < nr; ++h) mxa[h] = M[h];
    const __m512 vm = _mm512_load_ps(mxa);
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < nv; i += 2) {
      __m512 p0 = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(S + 16 * i), vs, vm));
      __m512 p1 = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(S + 16 * i + 16), vs, vm));
      __m512i pbf = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  // words 0..15 p0, 16..31 p1
      __m512i perm = _mm512_permutexvar_epi16(vpidx, pbf);
      // sum on the rounded values? use fp32 values as current kernel (approx)
      sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
      _mm512_storeu_si512(pb + 16 * i, perm);
    }
    sum = group_sum(sum, nr);
    alignas(64) float sa[16]; _mm512_store_ps(sa, sum);
    for (int h = 0; h < nr; ++h) Lsum[h] = Lsum[h] * al[h] + sa[h];
    // rescale acc [D][nr]
    const __m512 va = _mm512_load_ps(al);
    for (int i = 0; i < D * nr / 16; ++i) _mm512_storeu_ps(acc + 16 * i, _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * i), va));
#endif
#ifndef NO_PV
    // p@V: groups of 4 dim-tiles (64 dims)
    const uint16_t* vbase = V + t0 * D;  // block-major: block b at b*32*D
    for (int g = 0; g < D / 64; ++g) {
      float* ag = acc + g * 64 * nr;
      _tile_loadd(0, ag, nr * 4); _tile_loadd(1, ag + 16 * nr, nr * 4);
      _tile_loadd(2, ag + 32 * nr, nr * 4); _tile_loadd(3, ag + 48 * nr, nr * 4);
      for (int b = 0; b < n / 32; ++b) {
        _tile_loadd(7, pb + b * 32 * nr, nr * 4);
#ifdef SEQ
        sq.at(2 * t0 * D * 2 + SPAN * D * 2 + (g * (n / 32) + b) * 4096);
#endif
#ifdef PF
        if (t0 + SPAN < L) { const int64_t nn = std::min<int64_t>(SPAN, L - t0 - SPAN); const int64_t step = nn * D * 2 / ((D / 64) * (n / 32));
          const int64_t k = g * (n / 32) + b; pf((const char*)(K + (t0 + SPAN) * D) + k * step, step); }
#endif
        const uint16_t* vb = vbase + g * SPAN * 64 + b * 2048;
        _tile_loadd(6, vb, 64); _tile_dpbf16ps(0, 6, 7);
        _tile_loadd(6, vb + 16 * 32, 64); _tile_dpbf16ps(1, 6, 7);
        _tile_loadd(6, vb + 32 * 32, 64); _tile_dpbf16ps(2, 6, 7);
        _tile_loadd(6, vb + 48 * 32, 64); _tile_dpbf16ps(3, 6, 7);
      }
      _tile_stored(0, ag, nr * 4); _tile_stored(1, ag + 16 * nr, nr * 4);
      _tile_stored(2, ag + 32 * nr, nr * 4); _tile_stored(3, ag + 48 * nr, nr * 4);
    }
#endif
  }
  for (int h = 0; h < nr; ++h)
    for (int d = 0; d < D; ++d) out[h * D + d] = acc[d * nr + h] / Lsum[h];
  _tile_release();
}

int main(int argc, char** argv) {
  if (syscall(SYS_arch_prctl, 0x1023, 18)) { puts("no amx"); return 1; }
  int H = atoi(argv[1]), KVH = atoi(argv[2]); int64_t Lc = atoll(argv[3]); int B = atoi(argv[4]);
  int threads = atoi(argv[5]);
  const int D = 128, nr = H / KVH;
  const int64_t per = Lc * D;  // elements per (row, head)
  const int64_t n_items = (int64_t)B * KVH;
  struct HB { uint16_t* p; size_t n; uint16_t& operator[](size_t i) { return p[i]; } uint16_t* data() { return p; } uint16_t* begin() { return p; } uint16_t* end() { return p + n; } };
  auto hb = [](size_t n) { size_t bytes = (n * 2 + (2 << 20) - 1) / (2 << 20) * (2 << 20); void* p = aligned_alloc(2 << 20, bytes);
#ifdef HUGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return HB{(uint16_t*)p, n}; };
  HB K = hb(n_items * per), V = hb(n_items * per), Vb = hb(n_items * per);
  srand(1);
  for (auto& x : K) x = f2bf((rand() / (float)RAND_MAX - 0.5f));
  for (auto& x : V) x = f2bf((rand() / (float)RAND_MAX - 0.5f));
  for (int64_t it = 0; it < n_items; ++it)
    for (int64_t t = 0; t < Lc; ++t) for (int d = 0; d < D; ++d)
      Vb[it * per + (t / SPAN) * SPAN * D + (d / 64) * (SPAN * 64) + ((t % SPAN) / 32) * 2048 + (d % 64) * 32 + t % 32] = V[it * per + t * D + d];
  std::vector<uint16_t> q(H * D);
  for (auto& x : q) x = f2bf((rand() / (float)RAND_MAX - 0.5f) * 4);
  // pack q tiles per kv head
  std::vector<uint16_t> qt(KVH * (D / 32) * 16 * nr * 2);
  for (int g = 0; g < KVH; ++g) for (int c = 0; c < D / 32; ++c) for (int r = 0; r < 16; ++r) for (int h = 0; h < nr; ++h) {
    uint16_t* e = qt.data() + g * (D / 32) * 16 * nr * 2 + ((c * 16 + r) * nr + h) * 2;
    e[0] = q[(g * nr + h) * D + 32 * c + 2 * r]; e[1] = q[(g * nr + h) * D + 32 * c + 2 * r + 1];
  }
  std::vector<float> out(n_items * nr * D);
  float scale = 1.0f / sqrtf(D);
  omp_set_num_threads(threads);
  auto run = [&]() {
#pragma omp parallel
    {
      if (syscall(SYS_arch_prctl, 0x1023, 18)) abort();
      std::vector<float> S(SPAN * nr), acc(D * nr); std::vector<uint16_t> pb(SPAN * nr);
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < n_items; ++it) {
        int g = it % KVH;
        attend(qt.data() + g * (D / 32) * 16 * nr * 2, K.data() + it * per, Vb.data() + it * per, Lc, nr, D, scale,
               out.data() + it * nr * D, S.data(), acc.data(), pb.data());
      }
    }
  };
  run();
  // check item 0 vs reference (fp64, bf16 inputs)
  double maxerr = 0;
  for (int h = 0; h < nr; ++h) {
    std::vector<double> s(Lc); double m = -1e30;
    for (int64_t t = 0; t < Lc; ++t) { double a = 0; for (int d = 0; d < D; ++d) a += bf2f(q[h * D + d]) * bf2f(K[t * D + d]); s[t] = a * scale; m = std::max(m, s[t]); }
    double l = 0; for (auto& x : s) { x = exp(x - m); l += x; }
    for (int d = 0; d < D; ++d) { double o = 0; for (int64_t t = 0; t < Lc; ++t) o += s[t] * bf2f(V[t * D + d]); o /= l; maxerr = std::max(maxerr, fabs(o - out[h * D + d])); }
  }
  int reps = 0; auto t0 = std::chrono::steady_clock::now(); double el = 0;
  while (el < 1.0) { run(); ++reps; el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
  double bytes = 2.0 * n_items * per * 2;
  printf("H %d KVH %d L %ld B %d thr %d: %.1f GB/s (kv %.2f GB) maxerr %.2e\n", H, KVH, (long)Lc, B, threads, bytes * reps / el / 1e9, bytes / 1e9, maxerr);
  return 0;
}
