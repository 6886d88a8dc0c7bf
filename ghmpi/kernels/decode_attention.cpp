// Decode attention for tier 2: one new query token per row over that row's cached context.
//
// Memory bound: every step reads each row's whole K and V. So the kernel is built to stream:
// - a work item is (row, context chunk, kv-head group); it walks its positions in blocks of 16,
//   and within a block its kv heads one by one: a unit (block, kv head) reads 16 K rows of D
//   (scores, softmax), then the 16 V rows (p @ V), a few KiB that stay in L1 in between;
// - every K/V byte is read once for all n_rep query heads of its kv head (GQA);
// - K and V of the unit GHMPI_PREFETCH_UNITS ahead are prefetched into L2, a few lines per
//   iteration of the arithmetic (struct Prefetch): the unit order is strided in memory (one kv
//   head's rows are pos_stride apart), which the hardware prefetchers do not follow, and a
//   burst of prefetches would stall the core once its miss buffers are full;
// - rows are split along the context (flash-decoding) when there are too few rows for the
//   threads, and a final pass combines the chunks' partial softmax sums; the kv heads are split
//   too when even that leaves threads idle;
// - fp32 accumulation and an online softmax, block by block (no scores buffer of the whole row).
// Threads come from ATen's intra-op pool (at::parallel_for), so torch.set_num_threads rules.
//
// Called through ctypes (extern "C", raw pointers): only <ATen/Parallel.h> is needed, which
// compiles in about a second, where <torch/extension.h> takes half a minute.
//
// Vector code: AVX-512F where the compiler targets it (the build passes -march=native), for head
// dims that are a multiple of 16; plain C++ elsewhere (auto-vectorised for the host). With
// AVX512-BF16 and a bf16 query over a bf16 cache, q.k and p@V use vdpbf16ps (p rounded to bf16 for
// p@V, as torch's bf16 attention does): half the instructions, no conversions of K or V.
// Scores of 16 positions (or 2 heads x 8 positions) are reduced together (hsum16), V accumulators
// stay in registers over a block and take the online softmax's rescale as they are loaded. With AMX (AMX-BF16 in the build target and the kernel granting tile use), a full block
// of 16 positions runs on tiles instead: q.k is one tile product per 32 dims (the K rows load as
// a tile straight from the cache, the kv group's query heads are the other operand), and p @ V one
// per 16 dims (the block's V rows interleaved in pairs of positions, all heads' p at once).
// The tiles are opt-in (-DGHMPI_USE_AMX): with the vector code as it is now, vdpbf16ps ran
// 1.6-1.75x faster than the tiles on the H200 host's Xeon, GQA and MHA alike, interleaved in one
// call (bench/results/h200-2026-12-03-session6/ab/); each tile product there waits on a tile
// store and reload, and q.k fills 4 of a tile's 16 columns. (On the H100 host the tiles had beaten
// the vector code of that time: bench/results/h100-2026-11-23-amx/.)
// GHMPI_PORTABLE forces the plain code (tests build both); GHMPI_NO_AMX_PV keeps the tiles to q.k.

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && !defined(GHMPI_PORTABLE)
#include <immintrin.h>
#include "exp512.h"  // shared with bench/tools/amx_span.cpp
#define GHMPI_AVX512 1
#else
#define GHMPI_AVX512 0
#endif
#if GHMPI_AVX512 && defined(__AVX512BF16__)
#define GHMPI_BF16DP 1  // vdpbf16ps: bf16 pairs multiplied and summed into fp32
#else
#define GHMPI_BF16DP 0
#endif
#if GHMPI_BF16DP && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__) && \
    defined(GHMPI_USE_AMX)
#define GHMPI_AMX 1  // tile products for q.k and p @ V (bf16 mode): opt-in, see the note above
#include <sys/syscall.h>
#include <unistd.h>
#else
#define GHMPI_AMX 0
#endif

namespace {

enum KvType : int { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2 };
constexpr int TB = 16;  // positions per block: one 16-lane vector of scores per query head
#ifndef GHMPI_PREFETCH_UNITS
#define GHMPI_PREFETCH_UNITS 3  // how many units (block x kv head) ahead K and V are prefetched
#endif
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// ---- scalar conversions (portable path, tails) --------------------------------------------

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400));
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <int KV>
inline float load1(const void* base, int64_t i) {
  if constexpr (KV == KV_F32) return static_cast<const float*>(base)[i];
  else if constexpr (KV == KV_BF16) return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
  else return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
}

template <int KV> constexpr int64_t elsize() { return KV == KV_F32 ? 4 : 2; }

// The K or V rows of a unit ahead (n runs of `bytes`, `stride` apart; none where n <= 0), into L2
// by default: prefetcht0 (into L1, 32 KiB on some cores) costs more than the L2 hit it would save.
// The compute loops issue them a row or a few per step (pace(steps), then step() per iteration of
// their arithmetic): a whole unit's lines in one burst stalls the pipeline once the core's miss
// buffers are full, so memory and arithmetic would take turns instead of overlapping.
struct Prefetch {
  const char* p;  // the next row
  int64_t stride, n, bytes;
  int64_t per = 0;  // rows per step
  void pace(int64_t steps) { per = steps > 0 ? (n + steps - 1) / steps : n; }
  void step() {
#ifndef GHMPI_NO_PREFETCH
#ifndef GHMPI_PREFETCH_LOCALITY
#define GHMPI_PREFETCH_LOCALITY 2  // 3: into L1 (prefetcht0), 2: L2 (prefetcht1)
#endif
    for (int64_t k = 0; k < per && n > 0; ++k, --n, p += stride)
      for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, GHMPI_PREFETCH_LOCALITY);
#endif
  }
  void rest() { per = n; step(); }  // what the loops left
};

#if GHMPI_AVX512
// 16 elements of K or V at p, as fp32
template <int KV>
inline __m512 load16(const void* p) {
  if constexpr (KV == KV_F32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (KV == KV_BF16) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  }
}

// Lane j of the result = sum of all lanes of v[j]: a transpose-and-add tree, 45 instructions for
// 16 dot products instead of 16 separate horizontal sums.
inline __m512 hsum16(const __m512* v) {
  __m512 s[8], u[4], w[2];
  for (int j = 0; j < 8; ++j)
    s[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                         _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j)
    u[j] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * j], s[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * j], s[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int j = 0; j < 2; ++j)
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of one kv head's n_rep query heads against n <= 16 positions:
// S[r * TB + i] = scale * q_r . k_i, k_i at kp + i * stride bytes. q (n_rep, D) fp32.
// K is read in place (fp32, a full block) or converted to fp32 once into kf (16 x D, zero past n).
// fp32 K: query heads go in pairs, as in scores_block_dp (2 heads x 8 positions per hsum16, each K
// load from the cache feeding two FMAs); a last odd head, and converted K (in L1 already, where
// pairs measured slower on Zen 4), take 16 positions per hsum16.
template <int KV>
inline void scores_block(const float* q, const char* kp, int64_t stride, int n, int64_t n_rep,
                         int64_t D, float scale, float* kf, float* S, Prefetch& pf) {
  const float* k = reinterpret_cast<const float*>(kp);
  int64_t ks = stride / 4;  // floats between rows
  if (KV != KV_F32 || n < TB) {
    for (int i = 0; i < n; ++i)
      for (int64_t d = 0; d < D; d += 16)
        _mm512_storeu_ps(kf + i * D + d, load16<KV>(kp + i * stride + d * elsize<KV>()));
    std::fill(kf + n * D, kf + TB * D, 0.0f);
    k = kf;
    ks = D;
  }
  pf.pace(n_rep * (D / 16));
  const __m512 vscale = _mm512_set1_ps(scale);
  const int64_t paired = KV == KV_F32 ? n_rep / 2 * 2 : 0;
  int64_t r = 0;
  for (; r < paired; r += 2) {
    const float* q0 = q + r * D;
    const float* q1 = q0 + D;
    for (int i0 = 0; i0 < TB; i0 += 8) {
      const float* k0 = k + i0 * ks;
      __m512 acc[16];  // acc[j]: head r, position i0 + j; acc[8 + j]: head r + 1
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        pf.step();
        const __m512 a = _mm512_loadu_ps(q0 + d), b = _mm512_loadu_ps(q1 + d);
        for (int j = 0; j < 8; ++j) {
          const __m512 kv = _mm512_loadu_ps(k0 + j * ks + d);
          acc[j] = _mm512_fmadd_ps(a, kv, acc[j]);
          acc[8 + j] = _mm512_fmadd_ps(b, kv, acc[8 + j]);
        }
      }
      const __m512 s = _mm512_mul_ps(hsum16(acc), vscale);
      _mm256_storeu_ps(S + r * TB + i0, _mm512_castps512_ps256(s));
      _mm256_storeu_ps(S + (r + 1) * TB + i0, _mm512_extractf32x8_ps(s, 1));
    }
  }
  for (; r < n_rep; ++r) {
    const float* qr = q + r * D;
    __m512 acc[TB];
    for (int i = 0; i < TB; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      pf.step();
      const __m512 qv = _mm512_loadu_ps(qr + d);
      for (int i = 0; i < TB; ++i) acc[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + i * ks + d), acc[i]);
    }
    _mm512_storeu_ps(S + r * TB, _mm512_mul_ps(hsum16(acc), vscale));
  }
}

// acc_r = alpha_r acc_r + sum_i p[r][i] * v_i for one kv head's n_rep query heads, v_i at
// vp + i * stride bytes: the accumulators of RG heads x PC 16-lane chunks are loaded once, rescaled
// to the block's new running max (the online softmax's alpha, folded in here instead of a pass of
// its own over A) and stay in registers over the block's positions.
template <int KV, int RG, int PC>
inline void values_pass(const char* vp, int64_t stride, int n, int64_t d, const float* S,
                        const float* alpha, float* A, int64_t D, Prefetch& pf) {
  __m512 acc[RG][PC];
  for (int r = 0; r < RG; ++r)
    for (int c = 0; c < PC; ++c)
      acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(A + r * D + d + c * 16), _mm512_set1_ps(alpha[r]));
  for (int i = 0; i < n; ++i) {
    pf.step();
    __m512 x[PC];
    for (int c = 0; c < PC; ++c) x[c] = load16<KV>(vp + i * stride + (d + c * 16) * elsize<KV>());
    for (int r = 0; r < RG; ++r) {
      const __m512 p = _mm512_set1_ps(S[r * TB + i]);
      for (int c = 0; c < PC; ++c) acc[r][c] = _mm512_fmadd_ps(p, x[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RG; ++r)
    for (int c = 0; c < PC; ++c) _mm512_storeu_ps(A + r * D + d + c * 16, acc[r][c]);
}

template <int KV, int RG, int PC>
inline void values_heads(const char* vp, int64_t stride, int n, int64_t D, const float* S,
                         const float* alpha, float* A, Prefetch& pf) {
  int64_t d = 0;
  for (; d + 16 * PC <= D; d += 16 * PC) values_pass<KV, RG, PC>(vp, stride, n, d, S, alpha, A, D, pf);
  for (; d < D; d += 16) values_pass<KV, RG, 1>(vp, stride, n, d, S, alpha, A, D, pf);
}

template <int KV>
inline void values_block(const char* vp, int64_t stride, int n, int64_t n_rep, int64_t D,
                         const float* S, const float* alpha, float* A, Prefetch& pf) {
  const int64_t p4 = D / 64 + D % 64 / 16, p2 = D / 128 + D % 128 / 16;  // passes per head group
  pf.pace((n_rep / 4 * p4 + n_rep % 4 / 2 * p2 + n_rep % 2 * p2) * n);
  int64_t r = 0;
  for (; r + 4 <= n_rep; r += 4) values_heads<KV, 4, 4>(vp, stride, n, D, S + r * TB, alpha + r, A + r * D, pf);
  for (; r + 2 <= n_rep; r += 2) values_heads<KV, 2, 8>(vp, stride, n, D, S + r * TB, alpha + r, A + r * D, pf);
  for (; r < n_rep; ++r) values_heads<KV, 1, 8>(vp, stride, n, D, S + r * TB, alpha + r, A + r * D, pf);
}

// The maximum of a vector's 16 lanes, in every lane (no round trip through a scalar).
inline __m512 max16(__m512 s) {
  s = _mm512_max_ps(s, _mm512_shuffle_f32x4(s, s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm512_max_ps(s, _mm512_shuffle_f32x4(s, s, _MM_SHUFFLE(2, 3, 0, 1)));
  s = _mm512_max_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_max_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(2, 3, 0, 1)));
}

// Online softmax of one kv head's n_rep query heads over a block of n <= 16 positions, one vector
// per head. S (n_rep, TB): the scores in, the weights p = e^(s - m) out (zero past n); M: the
// heads' running maxima, raised to the block's; alpha[r] = e^(m_old - m_new), the factor the
// head's accumulators and sums are rescaled by (0 for its first block); Lv: the running sums, 16
// lanes per head (Lv = alpha Lv + p, lanes added once at the end, no reduction per block). DP:
// p is rounded to bf16 (p @ V runs on it, as torch's bf16 attention; the sums add what is used),
// and its bf16 pairs go to Pp, 8 uint32 per head.
// Each head is one chain of vector operations, independent of the others', and the maxima stay in
// vectors: M and alpha are written as scalars and read back whole. (Gathering the heads' maxima
// into one vector through memory, as this did before, stalled twice per block on loads that store
// forwarding cannot serve: 64 ns a block of 4 heads on Zen 4 against 45 now.)
template <bool DP>
inline void softmax_block(float* S, int n, int64_t n_rep, float* M, float* Lv, float* alpha,
                          uint32_t* Pp) {
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
  const __m512 ninf = _mm512_set1_ps(NEG_INF);
  for (int64_t r = 0; r < n_rep; ++r) {
    float* sr = S + r * TB;
    const __m512 s = _mm512_mask_loadu_ps(ninf, mask, sr);
    const __m512 mo = _mm512_set1_ps(M[r]);
    const __m512 mn = _mm512_max_ps(mo, max16(s));
    const __mmask16 seen = _mm512_cmp_ps_mask(mo, ninf, _CMP_NEQ_OQ);
    const __m512 a = _mm512_maskz_mov_ps(seen, exp512(_mm512_sub_ps(mo, mn)));
    _mm_store_ss(alpha + r, _mm512_castps512_ps128(a));
    _mm_store_ss(M + r, _mm512_castps512_ps128(mn));
    __m512 p = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(s, mn)));
#if GHMPI_BF16DP
    if constexpr (DP) {
      const __m256bh pb = _mm512_cvtneps_pbh(p);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(Pp + r * 8), (__m256i)pb);
      p = _mm512_cvtpbh_ps(pb);
    }
#endif
    _mm512_storeu_ps(sr, p);
    _mm512_storeu_ps(Lv + r * 16, _mm512_fmadd_ps(_mm512_loadu_ps(Lv + r * 16), a, p));
  }
}
#endif

#if GHMPI_BF16DP
// bf16 mode (a bf16 query over a bf16 cache, as torch computes it): q . k with vdpbf16ps straight
// from the cache, and p @ V with p rounded to bf16, two positions per instruction.

// Scores as scores_block, q (n_rep, D) bf16, K rows bf16 read in place; D % 32 == 0. Query heads
// go in pairs: 16 accumulators = 2 heads x 8 positions, so each K load feeds two vdpbf16ps and one
// hsum16 gives [head r: 8 positions | head r+1: the same 8]; a last odd head (and MHA) takes 16
// positions per hsum16. A partial block is first copied into kb (TB x D bf16), zero past n.
inline void scores_block_dp(const uint16_t* q, const char* kp, int64_t stride, int n,
                            int64_t n_rep, int64_t D, float scale, uint16_t* kb, float* S,
                            Prefetch& pf) {
  pf.pace(n_rep * (D / 32));
  if (n < TB) {
    for (int i = 0; i < TB; ++i) {
      if (i < n) std::memcpy(kb + i * D, kp + i * stride, D * 2);
      else std::memset(kb + i * D, 0, D * 2);
    }
    kp = reinterpret_cast<const char*>(kb);
    stride = D * 2;
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t r = 0;
  for (; r + 2 <= n_rep; r += 2) {
    const uint16_t* q0 = q + r * D;
    const uint16_t* q1 = q0 + D;
    for (int i0 = 0; i0 < TB; i0 += 8) {
      const char* k0 = kp + i0 * stride;
      __m512 acc[16];  // acc[j]: head r, position i0 + j; acc[8 + j]: head r + 1
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 32) {
        pf.step();
        const __m512bh a = (__m512bh)_mm512_loadu_si512(q0 + d), b = (__m512bh)_mm512_loadu_si512(q1 + d);
        for (int j = 0; j < 8; ++j) {
          const __m512bh k = (__m512bh)_mm512_loadu_si512(k0 + j * stride + d * 2);
          acc[j] = _mm512_dpbf16_ps(acc[j], a, k);
          acc[8 + j] = _mm512_dpbf16_ps(acc[8 + j], b, k);
        }
      }
      const __m512 s = _mm512_mul_ps(hsum16(acc), vscale);
      _mm256_storeu_ps(S + r * TB + i0, _mm512_castps512_ps256(s));
      _mm256_storeu_ps(S + (r + 1) * TB + i0, _mm512_extractf32x8_ps(s, 1));
    }
  }
  for (; r < n_rep; ++r) {
    const uint16_t* qr = q + r * D;
    __m512 acc[TB];
    for (int i = 0; i < TB; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      pf.step();
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(qr + d);
      for (int i = 0; i < TB; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], qv, (__m512bh)_mm512_loadu_si512(kp + i * stride + d * 2));
    }
    _mm512_storeu_ps(S + r * TB, _mm512_mul_ps(hsum16(acc), vscale));
  }
}

// acc += sum_i p_i v_i over pairs of positions: rows i and i+1 interleaved (unpacklo/hi) make
// 16 (v_i[d], v_i+1[d]) pairs per register, times the broadcast pair (p_i, p_i+1). The
// accumulators of a 32-dim chunk are [lo | hi] in unpack order; unpermute() restores d order.
// Pp: per head, 8 uint32 = the block's 16 p values as bf16 pairs. alpha: the rescale, as in
// values_pass (a lane-wise product: the unpack order does not matter to it).
template <int RG, int PC>
inline void values_pass_dp(const char* vp, int64_t stride, int n, int64_t d, const uint32_t* Pp,
                           const float* alpha, float* A, int64_t D, Prefetch& pf) {
  __m512 acc[RG][2 * PC];
  for (int r = 0; r < RG; ++r)
    for (int c = 0; c < 2 * PC; ++c)
      acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(A + r * D + d + c * 16), _mm512_set1_ps(alpha[r]));
  for (int i = 0; i < n; i += 2) {
    pf.step();
    __m512i lo[PC], hi[PC];
    for (int c = 0; c < PC; ++c) {
      const __m512i a = _mm512_loadu_si512(vp + i * stride + (d + c * 32) * 2);
      const __m512i b = i + 1 < n ? _mm512_loadu_si512(vp + (i + 1) * stride + (d + c * 32) * 2)
                                  : _mm512_setzero_si512();
      lo[c] = _mm512_unpacklo_epi16(a, b);
      hi[c] = _mm512_unpackhi_epi16(a, b);
    }
    for (int r = 0; r < RG; ++r) {
      const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(Pp[r * 8 + i / 2]));
      for (int c = 0; c < PC; ++c) {
        acc[r][2 * c] = _mm512_dpbf16_ps(acc[r][2 * c], (__m512bh)lo[c], p);
        acc[r][2 * c + 1] = _mm512_dpbf16_ps(acc[r][2 * c + 1], (__m512bh)hi[c], p);
      }
    }
  }
  for (int r = 0; r < RG; ++r)
    for (int c = 0; c < 2 * PC; ++c) _mm512_storeu_ps(A + r * D + d + c * 16, acc[r][c]);
}

// Passes of 16 accumulators where D allows (8 for one head): enough independent vdpbf16ps
// chains to cover its latency (a single head's 32 dims would be 2 chains, latency bound).
template <int RG, int PC>
inline void values_heads_dp(const char* vp, int64_t stride, int n, int64_t D, const uint32_t* Pp,
                            const float* alpha, float* A, Prefetch& pf) {
  int64_t d = 0;
  for (; d + 32 * PC <= D; d += 32 * PC) values_pass_dp<RG, PC>(vp, stride, n, d, Pp, alpha, A, D, pf);
  for (; d < D; d += 32) values_pass_dp<RG, 1>(vp, stride, n, d, Pp, alpha, A, D, pf);
}

inline void values_block_dp(const char* vp, int64_t stride, int n, int64_t n_rep, int64_t D,
                            const uint32_t* Pp, const float* alpha, float* A, Prefetch& pf) {
  const int64_t p4 = D / 64 + D % 64 / 32, p1 = D / 128 + D % 128 / 32;  // passes per head group
  pf.pace((n_rep / 4 * p4 + n_rep % 4 / 2 * p1 + n_rep % 2 * p1) * ((n + 1) / 2));
  int64_t r = 0;
  for (; r + 4 <= n_rep; r += 4) values_heads_dp<4, 2>(vp, stride, n, D, Pp + r * 8, alpha + r, A + r * D, pf);
  for (; r + 2 <= n_rep; r += 2) values_heads_dp<2, 4>(vp, stride, n, D, Pp + r * 8, alpha + r, A + r * D, pf);
  for (; r < n_rep; ++r) values_heads_dp<1, 4>(vp, stride, n, D, Pp + r * 8, alpha + r, A + r * D, pf);
}

// The unpack order of a 32-dim chunk back to d order: lane j of lo holds d = 8 (j / 4) + j % 4,
// lane j of hi d = 8 (j / 4) + 4 + j % 4.
inline void unpermute(float* a, int64_t D) {
  float t[32];
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    for (int j = 0; j < 16; ++j) {
      t[8 * (j / 4) + j % 4] = a[d0 + j];
      t[8 * (j / 4) + 4 + j % 4] = a[d0 + 16 + j];
    }
    std::memcpy(a + d0, t, sizeof(t));
  }
}
#endif

#if GHMPI_AMX
// Linux hands out the tile registers' state on request, once per process.
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// q.k: tiles 0 (scores: 16 positions x 16 fp32), 1 (K: 16 positions x 32 bf16), 2 (q: 16 dim
// pairs x 16 heads x 2 bf16). p @ V: tiles 3 (n_rep heads x 16 dims fp32), 4 (p: n_rep heads x
// 16 positions bf16), 5 (V: 8 position pairs x 16 dims x 2 bf16). Loaded per item, released after
// it, so no other user of the tiles on this thread (a library's matrix product) sees them.
inline void amx_begin(int64_t n_rep) {
  TileConfig c{};
  c.palette_id = 1;
  for (int t = 0; t < 3; ++t) { c.colsb[t] = 64; c.rows[t] = 16; }
  c.colsb[3] = 64; c.rows[3] = static_cast<uint8_t>(n_rep);
  c.colsb[4] = 32; c.rows[4] = static_cast<uint8_t>(n_rep);
  c.colsb[5] = 64; c.rows[5] = 8;
  _tile_loadconfig(&c);
}

// qt: per chunk of 32 dims, the tile operand B[r][h] = (q_h[2r], q_h[2r+1]) for the n_rep heads
// (columns past n_rep are zero): D / 32 tiles of 1 KiB.
inline void pack_q_tiles(const uint16_t* q, int64_t n_rep, int64_t D, uint16_t* qt) {
  std::memset(qt, 0, static_cast<size_t>(D / 32) * 1024);
  for (int64_t c = 0; c < D / 32; ++c)
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t h = 0; h < n_rep; ++h) {
        uint16_t* e = qt + ((c * 16 + r) * 16 + h) * 2;
        e[0] = q[h * D + 32 * c + 2 * r];
        e[1] = q[h * D + 32 * c + 2 * r + 1];
      }
}

// Scores as scores_block_dp for a full block of 16 positions: C (16 x 16) = K (16 x D) . q^T,
// 32 dims per tile product; S[r * TB + i] = scale * C[i][r]. ct: 1 KiB scratch.
inline void scores_block_amx(const uint16_t* qt, const char* kp, int64_t stride, int64_t n_rep,
                             int64_t D, float scale, float* ct, float* S) {
  _tile_zero(0);
  for (int64_t c = 0; c < D / 32; ++c) {
    _tile_loadd(1, kp + c * 64, stride);
    _tile_loadd(2, qt + c * 512, 64);
    _tile_dpbf16ps(0, 1, 2);
  }
  _tile_stored(0, ct, 64);
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5,
                                                           4, 3, 2, 1, 0), _mm512_set1_epi32(16));
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < n_rep; ++r)
    _mm512_storeu_ps(S + r * TB, _mm512_mul_ps(
        _mm512_i32gather_ps(_mm512_add_epi32(rows, _mm512_set1_epi32(static_cast<int>(r))), ct, 4),
        vscale));
}

// acc += p @ V for a full block of 16 positions, as values_block_dp computes it (p in bf16, the
// accumulators of each 32-dim chunk in its [lo | hi] unpack order): the block's V rows are
// interleaved in pairs of positions into D / 16 tiles (vt, 16 * D uint16), then one tile product
// per 16 dims takes all n_rep heads' p at once. Pp: the heads' p as bf16, 32 bytes per head.
inline void values_block_amx(const char* vp, int64_t stride, int64_t n_rep, int64_t D,
                             const uint32_t* Pp, float* A, uint16_t* vt, float* cb) {
  for (int r = 0; r < 8; ++r) {
    const char* a = vp + (2 * r) * stride;
    const char* b = a + stride;
    for (int64_t c = 0; c < D / 32; ++c) {
      const __m512i x = _mm512_loadu_si512(a + c * 64), y = _mm512_loadu_si512(b + c * 64);
      _mm512_storeu_si512(vt + ((2 * c) * 8 + r) * 32, _mm512_unpacklo_epi16(x, y));
      _mm512_storeu_si512(vt + ((2 * c + 1) * 8 + r) * 32, _mm512_unpackhi_epi16(x, y));
    }
  }
  _tile_loadd(4, Pp, 32);
  for (int64_t j = 0; j < D / 16; ++j) {
    _tile_zero(3);
    _tile_loadd(5, vt + j * 256, 64);
    _tile_dpbf16ps(3, 4, 5);
    _tile_stored(3, cb, 64);
    for (int64_t h = 0; h < n_rep; ++h) {
      float* ah = A + h * D + j * 16;
      _mm512_storeu_ps(ah, _mm512_add_ps(_mm512_loadu_ps(ah), _mm512_loadu_ps(cb + h * 16)));
    }
  }
}
#endif

// A[r] *= alpha[r] for n_rep heads of D (the paths that do not fold it into their p @ V)
inline void rescale(float* A, const float* alpha, int64_t n_rep, int64_t D) {
  for (int64_t r = 0; r < n_rep; ++r)
    if (alpha[r] != 1.0f)
      for (int64_t d = 0; d < D; ++d) A[r * D + d] *= alpha[r];
}

struct Problem {
  const float* q;       // (B, H, D) fp32, unscaled
  const void* k;        // slots x positions x kv heads x D at the strides below
  const void* v;
  const int64_t* slots;    // (B,)
  const int64_t* lengths;  // (B,)
  int64_t H, D, n_rep;
  int64_t slot_stride, pos_stride, head_stride;  // elements; D is contiguous
  float scale;
  float* out;  // (B, H*D) fp32
  bool amx;    // tile products for q.k in bf16 mode (built for AMX and granted by the kernel)
};

struct Item {
  int64_t b, t0, t1, g0, g1;
  int64_t part;  // index of its partial result, or -1: the item covers its row's whole context
};

// Per-thread working set: scores of one block, running max/sum and accumulators of the heads of
// one item. Reused across calls.
struct Scratch {
  std::vector<float> s, m, l, acc, kf;
  std::vector<float> lv;     // vector paths: running sums, 16 lanes per head, added at the end
  std::vector<float> alpha;  // one unit's rescale factors, per head
  std::vector<uint16_t> qb;  // bf16 mode: the item's query heads in bf16
  std::vector<uint32_t> pp;  // bf16 mode: a block's p as bf16 pairs, 8 per head
  std::vector<uint16_t> qt;  // AMX: the item's kv groups' query tiles
  std::vector<float> ct;     // AMX: one stored score tile
  std::vector<uint16_t> vt;  // AMX: a block's V rows interleaved in position pairs
  void ensure(int64_t nh, int64_t D) {
    if (static_cast<int64_t>(qt.size()) < nh * D * 16) qt.resize(nh * D * 16);
    if (static_cast<int64_t>(vt.size()) < 16 * D) vt.resize(16 * D);
    if (ct.size() < 256) ct.resize(256);
    if (static_cast<int64_t>(qb.size()) < nh * D) qb.resize(nh * D);
    if (static_cast<int64_t>(pp.size()) < nh * 8) pp.resize(nh * 8);
    if (static_cast<int64_t>(m.size()) < nh) {
      s.resize(nh * TB); m.resize(nh); l.resize(nh); lv.resize(nh * 16); alpha.resize(nh);
    }
    if (static_cast<int64_t>(acc.size()) < nh * D) acc.resize(nh * D);
    if (static_cast<int64_t>(kf.size()) < TB * D) kf.resize(TB * D);
  }
};

// One item: online softmax over positions [t0, t1) of row b for kv heads [g0, g1).
// Writes either the normalised output (part < 0) or (m, l, acc) to partials.
template <int KV, bool VEC, bool DP>
void run_item(const Problem& P, const Item& it, float* partials) {
  thread_local Scratch sc;
  const int64_t D = P.D, n_rep = P.n_rep, ng = it.g1 - it.g0, nh = ng * n_rep;
  sc.ensure(nh, D);
  float* S = sc.s.data();
  float* M = sc.m.data();
  float* L = sc.l.data();
  float* A = sc.acc.data();
  float* Lv = sc.lv.data();
  float* alpha = sc.alpha.data();
  std::fill(M, M + nh, NEG_INF);
  std::fill(L, L + nh, 0.0f);
  std::fill(Lv, Lv + nh * 16, 0.0f);
  std::fill(A, A + nh * D, 0.0f);
  const int64_t h0 = it.g0 * n_rep;
  const float* q = P.q + (it.b * P.H + h0) * D;  // (nh, D): the item's query heads
  const int64_t es = elsize<KV>();
  const int64_t pos_stride = P.pos_stride, head_stride = P.head_stride;
  const int64_t first = P.slots[it.b] * P.slot_stride + it.g0 * head_stride;
  const char* kbase = static_cast<const char*>(P.k) + first * es;
  const char* vbase = static_cast<const char*>(P.v) + first * es;
#if GHMPI_BF16DP
  if constexpr (DP) {  // exact: q was bf16 before the caller widened it
    for (int64_t x = 0; x < nh * D; x += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sc.qb.data() + x),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(q + x)));
  }
#endif
#if GHMPI_AMX
  const bool amx = DP && P.amx && n_rep <= 16;
  if (amx) {
    amx_begin(n_rep);
    for (int64_t g = 0; g < ng; ++g)
      pack_q_tiles(sc.qb.data() + g * n_rep * D, n_rep, D, sc.qt.data() + g * (D / 32) * 512);
  }
#endif

  // The loop walks units of (block of TB positions, kv head): a unit's K rows (TB runs of D
  // elements, pos_stride apart) give its heads' scores, the online softmax turns them into
  // weights, then its V rows are accumulated. Units go in memory order: in the head-major layout
  // (tier 2's KVCache) a kv head's blocks one after another, so each head's K and V are two
  // sequential streams that the hardware prefetchers follow; in the position-major layout, a
  // block's kv heads one after another. The K (and V) of the unit GHMPI_PREFETCH_UNITS ahead are
  // prefetched while this unit's K (and V) are computed on: pk and pv, paced by the vector loops;
  // rest() issues what a path without pacing (AMX, portable) left.
  const int64_t row = pos_stride * es, unit_bytes = D * es;
  const int64_t nb = (it.t1 - it.t0 + TB - 1) / TB, nu = nb * ng;
  const bool head_major = head_stride > pos_stride;
  auto unit = [&](int64_t u, int64_t& t, int64_t& g) {
    if (head_major) { g = u / nb; t = it.t0 + u % nb * TB; }
    else { g = u % ng; t = it.t0 + u / ng * TB; }
  };
  for (int64_t u = 0; u < nu; ++u) {
    int64_t t, g;
    unit(u, t, g);
    const int n = static_cast<int>(std::min<int64_t>(TB, it.t1 - t));
    const int64_t h = g * n_rep;  // the unit's first query head in the item
    const int64_t off = (t * pos_stride + g * head_stride) * es;
    int64_t na = 0, offa = 0;  // the unit ahead: none past the item's end
    if (u + GHMPI_PREFETCH_UNITS < nu) {
      int64_t ta, ga;
      unit(u + GHMPI_PREFETCH_UNITS, ta, ga);
      na = std::min<int64_t>(TB, it.t1 - ta);
      offa = (ta * pos_stride + ga * head_stride) * es;
    }
    Prefetch pk{kbase + offa, row, na, unit_bytes}, pv{vbase + offa, row, na, unit_bytes};
    // scores S[r][i] = scale * q_(h+r) . k_(t+i)
#if GHMPI_AMX
    if (amx && n == TB) {  // a full block: the tile reads exactly its 16 positions
      scores_block_amx(sc.qt.data() + g * (D / 32) * 512, kbase + off, row, n_rep, D, P.scale,
                       sc.ct.data(), S);
    } else
#endif
#if GHMPI_BF16DP
    if constexpr (DP) {
      scores_block_dp(sc.qb.data() + h * D, kbase + off, row, n, n_rep, D, P.scale,
                      reinterpret_cast<uint16_t*>(sc.kf.data()), S, pk);
    } else
#endif
#if GHMPI_AVX512
    if constexpr (VEC) {
      scores_block<KV>(q + h * D, kbase + off, row, n, n_rep, D, P.scale, sc.kf.data(), S, pk);
    } else
#endif
    {
      for (int i = 0; i < n; ++i) {
        const char* kp = kbase + off + i * row;
        float* kf = sc.kf.data();
        for (int64_t d = 0; d < D; ++d) kf[d] = load1<KV>(kp, d);
        for (int64_t r = 0; r < n_rep; ++r) {
          const float* qh = q + (h + r) * D;
          float s = 0.0f;
          for (int64_t d = 0; d < D; ++d) s += qh[d] * kf[d];
          S[r * TB + i] = s * P.scale;
        }
      }
    }
    // online softmax: S becomes the block's weights p; alpha rescales the accumulators
#if GHMPI_AVX512
    if constexpr (VEC) {
      softmax_block<DP>(S, n, n_rep, M + h, Lv + h * 16, alpha, sc.pp.data());
    } else
#endif
    {
      for (int64_t r = 0; r < n_rep; ++r) {
        float* sr = S + r * TB;
        float mx = M[h + r];
        for (int i = 0; i < n; ++i) mx = std::max(mx, sr[i]);
        alpha[r] = M[h + r] == NEG_INF ? 0.0f : std::exp(M[h + r] - mx);
        float sum = 0.0f;
        for (int i = 0; i < n; ++i) { sr[i] = std::exp(sr[i] - mx); sum += sr[i]; }
        L[h + r] = L[h + r] * alpha[r] + sum;
        M[h + r] = mx;
      }
    }
    pk.rest();
    // acc_(h+r) = alpha_r acc_(h+r) + sum_i p[r][i] * v_(t+i)
    float* Ah = A + h * D;
#if GHMPI_AMX && !defined(GHMPI_NO_AMX_PV)  // GHMPI_NO_AMX_PV: tiles for q.k only
    if (amx && n == TB) {
      rescale(Ah, alpha, n_rep, D);
      values_block_amx(vbase + off, row, n_rep, D, sc.pp.data(), Ah, sc.vt.data(), sc.ct.data());
    } else
#endif
#if GHMPI_BF16DP
    if constexpr (DP) {
      values_block_dp(vbase + off, row, n, n_rep, D, sc.pp.data(), alpha, Ah, pv);
    } else
#endif
#if GHMPI_AVX512
    if constexpr (VEC) {
      values_block<KV>(vbase + off, row, n, n_rep, D, S, alpha, Ah, pv);
    } else
#endif
    {
      rescale(Ah, alpha, n_rep, D);
      float* vf = sc.kf.data();
      for (int i = 0; i < n; ++i) {
        const char* vp = vbase + off + i * row;
        for (int64_t d = 0; d < D; ++d) vf[d] = load1<KV>(vp, d);
        for (int64_t r = 0; r < n_rep; ++r) {
          const float p = S[r * TB + i];
          float* ah = Ah + r * D;
          for (int64_t d = 0; d < D; ++d) ah[d] += p * vf[d];
        }
      }
    }
    pv.rest();
  }
#if GHMPI_AVX512
  if constexpr (VEC) {  // the running sums' lanes added up
    for (int64_t x = 0; x < nh; ++x) L[x] = _mm512_reduce_add_ps(_mm512_loadu_ps(Lv + x * 16));
  }
#endif
#if GHMPI_BF16DP
  if constexpr (DP) {
    for (int64_t h = 0; h < nh; ++h) unpermute(A + h * D, D);
  }
#endif
#if GHMPI_AMX
  if (amx) _tile_release();
#endif
  if (it.part < 0) {  // whole context: normalise into the output
    float* o = P.out + (it.b * P.H + h0) * D;
    for (int64_t h = 0; h < nh; ++h) {
      const float inv = L[h] > 0.0f ? 1.0f / L[h] : 0.0f;
      for (int64_t d = 0; d < D; ++d) o[h * D + d] = A[h * D + d] * inv;
    }
  } else {  // partial: (m[nh], l[nh], acc[nh, D]) for the combine pass
    float* pp = partials + it.part * nh * (D + 2);
    std::memcpy(pp, M, nh * sizeof(float));
    std::memcpy(pp + nh, L, nh * sizeof(float));
    std::memcpy(pp + 2 * nh, A, nh * D * sizeof(float));
  }
}

// Items differ in size (a short row, a context chunk): each thread takes the next one left, so
// none waits while another still has a queue.
template <int KV, bool VEC, bool DP = false>
void run_items(const Problem& P, const std::vector<Item>& items, float* partials) {
  const int64_t n = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) run_item<KV, VEC, DP>(P, items[i], partials);
  });
}

}  // namespace

extern "C" {

// Returns 0, or -(1 + b) when row b's slot or length is out of range (nothing is written then),
// or -1000000000 for an unsupported kv type.
// q (B, H, D) fp32 contiguous; k, v: caches of n_slots x max_len positions x n_kv heads x D in
// kv_type, element (s, t, h, d) at s * slot_stride + t * pos_stride + h * head_stride + d (both
// caches alike: tier 2's head-major layout, or a contiguous (n_slots, max_len, n_kv, D));
// slots, lengths (B,) int64; out (B, H * D) fp32. min_chunk: shortest context piece a row is
// split into (positions; 0 = default). q_bf16: q holds bf16 values (then a bf16 cache is read with
// bf16 dot products where the CPU has them, p @ V on bf16 p, as torch computes bf16 attention).
// k_new, v_new: null, or (B, n_kv, D) contiguous in kv_type: row b's own token, stored at position
// lengths[b] - 1 of its slot before any row attends (a decode step's append, without a pass of
// its own through torch).
int64_t ghmpi_decode_attention(const float* q, void* k, void* v, int64_t kv_type,
                               const int64_t* slots, const int64_t* lengths, int64_t B, int64_t H,
                               int64_t n_kv, int64_t D, int64_t n_slots, int64_t max_len,
                               int64_t slot_stride, int64_t pos_stride, int64_t head_stride,
                               float* out, int64_t min_chunk, int64_t q_bf16, const void* k_new,
                               const void* v_new) {
  if (kv_type < 0 || kv_type > 2) return -1000000000;
  const int64_t lo = k_new != nullptr ? 1 : 0;  // an appended token needs a position
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (slots[b] < 0 || slots[b] >= n_slots || lengths[b] < lo || lengths[b] > max_len) return -(1 + b);
    total += lengths[b];
  }
  if (k_new != nullptr) {
    const int64_t es = kv_type == KV_F32 ? 4 : 2, bytes = D * es;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < n_kv; ++h) {
        const int64_t at = (slots[b] * slot_stride + (lengths[b] - 1) * pos_stride + h * head_stride) * es;
        const int64_t from = (b * n_kv + h) * bytes;
        std::memcpy(static_cast<char*>(k) + at, static_cast<const char*>(k_new) + from, bytes);
        std::memcpy(static_cast<char*>(v) + at, static_cast<const char*>(v_new) + from, bytes);
      }
  }
  Problem P{q, k, v, slots, lengths, H, D, H / n_kv, slot_stride, pos_stride, head_stride,
            1.0f / std::sqrt(static_cast<float>(D)), out, false};
#if GHMPI_AMX
  P.amx = amx_permitted();
#endif

  // Split: chunks of at least min_chunk positions, small enough for ~4 items per thread; then
  // kv-head groups if rows x chunks still leave threads without work.
  const int64_t threads = std::max<int>(1, at::get_num_threads());
  if (min_chunk <= 0) min_chunk = 256;
  int64_t chunk = std::max<int64_t>(min_chunk, (total + 4 * threads - 1) / (4 * threads));
  chunk = (chunk + TB - 1) / TB * TB;
  int64_t n_rc = 0;
  for (int64_t b = 0; b < B; ++b) n_rc += std::max<int64_t>(1, (lengths[b] + chunk - 1) / chunk);
  int64_t groups = 1;
  if (n_rc < 2 * threads) {
    const int64_t want = std::min<int64_t>(n_kv, (2 * threads + n_rc - 1) / n_rc);
    groups = want;
    while (n_kv % groups) ++groups;  // a divisor of n_kv, so groups are equal
  }
  const int64_t gsize = n_kv / groups;

  std::vector<Item> items;
  items.reserve(n_rc * groups);
  std::vector<int64_t> first(B + 1);  // row b's items are items[first[b] .. first[b+1])
  int64_t parts = 0;
  for (int64_t b = 0; b < B; ++b) {
    first[b] = static_cast<int64_t>(items.size());
    const int64_t len = lengths[b];
    const int64_t nc = std::max<int64_t>(1, (len + chunk - 1) / chunk);
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t g = 0; g < groups; ++g)
        items.push_back({b, c * chunk, std::min(len, (c + 1) * chunk), g * gsize, (g + 1) * gsize,
                         nc > 1 ? parts++ : -1});
  }
  first[B] = static_cast<int64_t>(items.size());

  const int64_t nh = gsize * P.n_rep;
  thread_local std::vector<float> partials;
  if (static_cast<int64_t>(partials.size()) < parts * nh * (D + 2)) partials.resize(parts * nh * (D + 2));
  float* pp = partials.data();

  const bool vec = GHMPI_AVX512 && D % 16 == 0;
  if (kv_type == KV_F32) vec ? run_items<KV_F32, true>(P, items, pp) : run_items<KV_F32, false>(P, items, pp);
  else if (kv_type == KV_BF16 && vec && q_bf16 && D % 32 == 0 && GHMPI_BF16DP) run_items<KV_BF16, true, GHMPI_BF16DP>(P, items, pp);
  else if (kv_type == KV_BF16) vec ? run_items<KV_BF16, true>(P, items, pp) : run_items<KV_BF16, false>(P, items, pp);
  else vec ? run_items<KV_F16, true>(P, items, pp) : run_items<KV_F16, false>(P, items, pp);
  if (parts == 0) return 0;

  // combine the chunks of split rows: o_h = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c
  std::vector<int64_t> split_rows;
  for (int64_t b = 0; b < B; ++b)
    if (items[first[b]].part >= 0) split_rows.push_back(b);
  at::parallel_for(0, static_cast<int64_t>(split_rows.size()) * groups, 1, [&](int64_t a, int64_t e) {
    std::vector<float> w;
    for (int64_t x = a; x < e; ++x) {
      const int64_t b = split_rows[x / groups], g = x % groups;
      const int64_t nc = (first[b + 1] - first[b]) / groups;
      float* o = out + (b * H + g * nh) * D;
      w.resize(nc);
      for (int64_t h = 0; h < nh; ++h) {
        float mx = NEG_INF;
        for (int64_t c = 0; c < nc; ++c)
          mx = std::max(mx, pp[items[first[b] + c * groups + g].part * nh * (D + 2) + h]);
        float l = 0.0f;
        for (int64_t c = 0; c < nc; ++c) {
          const float* part = pp + items[first[b] + c * groups + g].part * nh * (D + 2);
          w[c] = part[h] == NEG_INF ? 0.0f : std::exp(part[h] - mx);
          l += w[c] * part[nh + h];
        }
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float* oh = o + h * D;
        for (int64_t d = 0; d < D; ++d) oh[d] = 0.0f;
        for (int64_t c = 0; c < nc; ++c) {
          const float* acc = pp + items[first[b] + c * groups + g].part * nh * (D + 2) + 2 * nh + h * D;
          const float f = w[c] * inv;
          for (int64_t d = 0; d < D; ++d) oh[d] += f * acc[d];
        }
      }
    }
  });
  return 0;
}

// Streams n floats (all threads, contiguous blocks) and returns their sum: the read bandwidth
// limit that `bench attention` sets the kernel against.
double ghmpi_read_sum(const float* x, int64_t n) {
  const int64_t threads = std::max<int>(1, at::get_num_threads());
  std::vector<double> part(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
      int64_t i = lo;
#if GHMPI_AVX512
      __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (; i + 64 <= hi; i += 64) {
        __builtin_prefetch(x + i + 1024, 0, 3);  // 4 KiB ahead
        __builtin_prefetch(x + i + 1040, 0, 3);
        __builtin_prefetch(x + i + 1056, 0, 3);
        __builtin_prefetch(x + i + 1072, 0, 3);
        s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + i));
        s1 = _mm512_add_ps(s1, _mm512_loadu_ps(x + i + 16));
        s2 = _mm512_add_ps(s2, _mm512_loadu_ps(x + i + 32));
        s3 = _mm512_add_ps(s3, _mm512_loadu_ps(x + i + 48));
      }
      double s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#else
      double s = 0.0;
#endif
      float r[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (; i + 8 <= hi; i += 8)
        for (int j = 0; j < 8; ++j) r[j] += x[i + j];
      for (; i < hi; ++i) r[0] += x[i];
      for (int j = 0; j < 8; ++j) s += r[j];
      part[t] = s;
    }
  });
  double s = 0.0;
  for (double v : part) s += v;
  return s;
}

// What the build targets, for the log line.
const char* ghmpi_kernel_isa() {
#if GHMPI_AMX
  if (amx_permitted()) return "avx512+bf16+amx";
#endif
  return GHMPI_BF16DP ? "avx512+bf16" : GHMPI_AVX512 ? "avx512" : "portable";
}

}  // extern "C"
