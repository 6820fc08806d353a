// The kernels of the inference path (serving and generation): a batch-invariant linear layer, rotary embedding at
// per-row positions, the scatter into a paged KV cache and attention over it (kernels.h states the contracts).
//
// Batch invariance (linear_rows): every output element out[n,o] is one dot product of inp[n,:] and w[o,:] computed
// by one fixed sequence of operations: kW-wide SIMD lanes (lane l accumulates the products k = l, l + kW, ... with
// FMA, in order of k; a masked tail for IC % kW), then the lanes added in a fixed grouping (the reduction network
// below), then + bias[o]. Register tiles (kW elements: 1 x kW, 2 x kW/2 or 4 x kW/4 rows x outputs, chosen by N)
// only decide which elements are computed together, never how one is, and each element is computed by exactly one
// thread: a row's result does not depend on N, the other rows, its place in the batch or the thread count.
// (OpenBLAS sgemm does not promise this: its kernels and blocking change with the matrix sizes.)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/kernels/cpu/kernels.h"
#include "core/kernels/cpu/vec_math.h"

// GCC 12's AVX-512 headers fill unused lanes from a self-initialised "undefined" vector, which its own
// -Wuninitialized reports at every inlined use (GCC bug 105593); nothing here reads an undefined lane.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace moe::cpu {
namespace {

// ---------------------------------------------------------------- SIMD lanes for linear_rows
// A register tile holds kW accumulators of kW lanes (one per output element of the tile); reduce() turns them into
// the kW sums at once by a fixed network: each step adds lane i and lane i + w/2 of every accumulator (w = kW, then
// halves), the shuffles only moving data, so every accumulator's lanes are added in the same grouping whatever its
// place in the tile. The network's output order is found once by a probe (out_slot).
#if defined(__AVX512F__)
constexpr int kW = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload_tail(const float* p, int n) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec network(Vec (&a)[kW]) {
  Vec t[8], u[4], v[2];
  for (int i = 0; i < 8; ++i)  // lane i + lane i+8 (128-bit chunks 0,1 vs 2,3)
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xee));
  for (int i = 0; i < 4; ++i)  // lane i + lane i+4 (chunks 0 vs 1 of each half)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; ++i)  // lane i + lane i+2 within a chunk
    v[i] =
        _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xee));
  return _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xdd));  // lane i + i+1
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kW = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload_tail(const float* p, int n) {
  alignas(32) static constexpr int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - n)));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec network(Vec (&a)[kW]) {
  Vec t[4], u[2];
  for (int i = 0; i < 4; ++i)  // lane i + lane i+4
    t[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
  for (int i = 0; i < 2; ++i)  // lane i + lane i+2
    u[i] =
        _mm256_add_ps(_mm256_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm256_shuffle_ps(t[2 * i], t[2 * i + 1], 0xee));
  return _mm256_add_ps(_mm256_shuffle_ps(u[0], u[1], 0x88), _mm256_shuffle_ps(u[0], u[1], 0xdd));  // lane i + i+1
}
#else
// portable lanes: plain arrays; the same fixed grouping (the compiler does not reassociate)
constexpr int kW = 8;
struct Vec {
  float l[kW];
};
inline Vec vzero() { return Vec{}; }
inline Vec vset(float x) {
  Vec v;
  for (float& e : v.l) e = x;
  return v;
}
inline Vec vload(const float* p) {
  Vec v;
  for (int i = 0; i < kW; ++i) v.l[i] = p[i];
  return v;
}
inline Vec vload_tail(const float* p, int n) {
  Vec v{};
  for (int i = 0; i < n; ++i) v.l[i] = p[i];
  return v;
}
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < kW; ++i) c.l[i] = std::fma(a.l[i], b.l[i], c.l[i]);
  return c;
}
inline void vstore(float* p, Vec v) {
  for (int i = 0; i < kW; ++i) p[i] = v.l[i];
}
inline Vec network(Vec (&a)[kW]) {
  Vec out;
  for (int j = 0; j < kW; ++j) {
    Vec x = a[j];
    for (int w = kW / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) x.l[i] += x.l[i + w];
    out.l[j] = x.l[0];
  }
  return out;
}
#endif

// slot[j]: the lane of network()'s result that holds accumulator j's sum (probed once: accumulator j = j + 1
// everywhere sums to kW * (j + 1))
const std::array<int, kW>& out_slot() {
  static const std::array<int, kW> slot = [] {
    Vec a[kW];
    for (int j = 0; j < kW; ++j) a[j] = vset(static_cast<float>(j + 1));
    float r[kW];
    vstore(r, network(a));
    std::array<int, kW> s{};
    for (int lane = 0; lane < kW; ++lane) s[static_cast<int>(r[lane]) / kW - 1] = lane;
    return s;
  }();
  return slot;
}

// out[nr,no] (row stride ldo) = x[nr,K] (ldx) . w[no,K] (ldw) + bias: one tile of R x O = kW elements (nr <= R rows,
// no <= O outputs; the missing ones are computed on row 0 / output 0 and dropped)
template <int R, int O>
void linear_tile(float* out, int64_t ldo, const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias,
                 int K, int nr, int no) {
  static_assert(R * O == kW, "a tile holds one accumulator per lane");
  const float* xr[R];
  const float* wo[O];
  for (int r = 0; r < R; ++r) xr[r] = x + (r < nr ? r : 0) * ldx;
  for (int o = 0; o < O; ++o) wo[o] = w + (o < no ? o : 0) * ldw;
  Vec acc[kW];
  for (Vec& a : acc) a = vzero();
  int k = 0;
  for (; k + kW <= K; k += kW) {
    Vec xv[R];
    for (int r = 0; r < R; ++r) xv[r] = vload(xr[r] + k);
    for (int o = 0; o < O; ++o) {
      const Vec wv = vload(wo[o] + k);
      for (int r = 0; r < R; ++r) acc[r * O + o] = vfma(xv[r], wv, acc[r * O + o]);
    }
  }
  if (k < K) {
    const int n = K - k;
    Vec xv[R];
    for (int r = 0; r < R; ++r) xv[r] = vload_tail(xr[r] + k, n);
    for (int o = 0; o < O; ++o) {
      const Vec wv = vload_tail(wo[o] + k, n);
      for (int r = 0; r < R; ++r) acc[r * O + o] = vfma(xv[r], wv, acc[r * O + o]);
    }
  }
  float sums[kW];
  vstore(sums, network(acc));
  const std::array<int, kW>& slot = out_slot();
  for (int r = 0; r < nr; ++r)
    for (int o = 0; o < no; ++o) {
      const float s = sums[slot[r * O + o]];
      out[r * ldo + o] = bias ? s + bias[o] : s;
    }
}

// all rows [0, N) against outputs [0, no) of w: tiles of R rows (the tile shape is a speed choice only)
template <int R>
void linear_block(float* out, int64_t ldo, const float* x, int64_t ldx, const float* w, const float* bias, int N, int K,
                  int no) {
  constexpr int O = kW / R;
  for (int o0 = 0; o0 < no; o0 += O)
    for (int n0 = 0; n0 < N; n0 += R)
      linear_tile<R, O>(out + int64_t(n0) * ldo + o0, ldo, x + int64_t(n0) * ldx, ldx, w + int64_t(o0) * K, K,
                        bias ? bias + o0 : nullptr, K, std::min(R, N - n0), std::min(O, no - o0));
}

constexpr double kParMinMacs = double(1 << 18);  // below this many multiply-adds linear_rows stays on one thread

}  // namespace

// ---------------------------------------------------------------- linear layer, batch-invariant
// out[N,OC] = inp[N,IC] @ w[OC,IC]^T + bias[OC]. Work items are blocks of kO outputs (all rows of the batch for
// them: the weight block stays in L1 while the rows stream past), split statically over the threads.
void linear_rows(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC) {
  MOE_CHECK(N >= 0 && IC >= 0 && OC >= 0, "linear_rows: negative size N=" << N << " IC=" << IC << " OC=" << OC);
  if (N == 0 || OC == 0) return;
  constexpr int kBlock = 4 * kW;  // outputs per work item
  const int n_blk = (OC + kBlock - 1) / kBlock;
  const bool par = double(N) * IC * OC > kParMinMacs && n_blk > 1 && !omp_in_parallel();
#pragma omp parallel for schedule(static) if (par)
  for (int b = 0; b < n_blk; ++b) {
    const int o0 = b * kBlock, no = std::min(kBlock, OC - o0);
    float* o = out + o0;
    const float* wb = w + int64_t(o0) * IC;
    const float* bb = bias ? bias + o0 : nullptr;
    if (N >= 4)
      linear_block<4>(o, OC, inp, IC, wb, bb, N, IC, no);
    else if (N >= 2)
      linear_block<2>(o, OC, inp, IC, wb, bb, N, IC, no);
    else
      linear_block<1>(o, OC, inp, IC, wb, bb, N, IC, no);
  }
}

// ---------------------------------------------------------------- rotary embedding at per-row positions
void rope_cos_sin(float* cs, int T, int D, int pos0, float theta) {
  MOE_CHECK(D % 2 == 0, "rope: head dim D=" << D << " must be even");
  const int half = D / 2;
  for (int i = 0; i < half; ++i) {
    const double inv_freq = std::pow(static_cast<double>(theta), -2.0 * i / D);
    for (int t = 0; t < T; ++t) {
      const double a = static_cast<double>(pos0 + t) * inv_freq;
      cs[(int64_t(t) * half + i) * 2] = static_cast<float>(std::cos(a));
      cs[(int64_t(t) * half + i) * 2 + 1] = static_cast<float>(std::sin(a));
    }
  }
}

void rope_rows(float* x, const int32_t* pos, const float* cs, int N, int nh, int D) {
  MOE_CHECK(D % 2 == 0, "rope_rows: head dim D=" << D << " must be even");
  const int half = D / 2;
  for (int n = 0; n < N; ++n) {
    MOE_CHECK(pos[n] >= 0, "rope_rows: row " << n << " has negative position " << pos[n]);
    const float* tab = cs + int64_t(pos[n]) * D;  // [D/2, 2]
    for (int h = 0; h < nh; ++h) {
      float* xh = x + (int64_t(n) * nh + h) * D;  // [D]
#pragma omp simd
      for (int i = 0; i < half; ++i) {
        const float c = tab[2 * i], s = tab[2 * i + 1];
        const float x0 = xh[2 * i], x1 = xh[2 * i + 1];
        xh[2 * i] = x0 * c - x1 * s;
        xh[2 * i + 1] = x0 * s + x1 * c;
      }
    }
  }
}

// ---------------------------------------------------------------- paged KV cache
void scatter_rows(float* dst, const float* src, const int32_t* idx, int N, int C) {
  for (int n = 0; n < N; ++n) {
    MOE_CHECK(idx[n] >= 0, "scatter_rows: row " << n << " has negative destination " << idx[n]);
    std::memcpy(dst + int64_t(idx[n]) * C, src + int64_t(n) * C, sizeof(float) * C);
  }
}

// Per (row, kv head): the scores of the group's query heads against every cached key, a softmax per head
// (detail::softmax_row: max, exp, one sum, multiply by the inverse), then the probability-weighted values. Each
// (row, head) is computed in the same order whatever the batch: the batch only decides which items run.
void attention_paged(float* out, const float* q, const float* k_pool, const float* v_pool, const int32_t* pos,
                     const int32_t* table, const int32_t* table_start, int block_size, int N, int H, int Hkv, int D) {
  MOE_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && D > 0,
            "attention_paged: H=" << H << " must be a positive multiple of Hkv=" << Hkv << ", D=" << D);
  MOE_CHECK(block_size > 0, "attention_paged: block size " << block_size << " must be positive");
  if (N == 0) return;
  const int group = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t row = int64_t(Hkv) * D;  // floats per cached position
  int max_len = 0;
  for (int n = 0; n < N; ++n) {
    MOE_CHECK(pos[n] >= 0, "attention_paged: row " << n << " has negative position " << pos[n]);
    max_len = std::max(max_len, pos[n] + 1);
  }
  const int items = N * Hkv;
  const bool par = int64_t(items) * max_len * group * D > 32768 && items > 1 && !omp_in_parallel();
#pragma omp parallel if (par)
  {
    std::vector<float> s(size_t(group) * max_len);  // [group, len] scores, then probabilities
    std::vector<int64_t> at(max_len);               // offset of each position's (slot, kv head) row
#pragma omp for schedule(dynamic, 1)
    for (int it = 0; it < items; ++it) {
      const int n = it / Hkv, g = it % Hkv, len = pos[n] + 1;
      const int32_t* blocks = table + table_start[n];
      for (int t = 0; t < len; ++t)
        at[t] = (int64_t(blocks[t / block_size]) * block_size + t % block_size) * row + int64_t(g) * D;
      for (int j = 0; j < group; ++j) {
        const float* qh = q + (int64_t(n) * H + g * group + j) * D;  // [D]
        float* sj = s.data() + size_t(j) * max_len;
        for (int t = 0; t < len; ++t) {
          const float* kt = k_pool + at[t];  // [D]
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int i = 0; i < D; ++i) dot += qh[i] * kt[i];
          sj[t] = dot * scale;
        }
        detail::softmax_row(sj, sj, len);
      }
      for (int j = 0; j < group; ++j) {
        float* yh = out + (int64_t(n) * H + g * group + j) * D;  // [D]
        const float* pj = s.data() + size_t(j) * max_len;
        std::memset(yh, 0, sizeof(float) * D);
        for (int t = 0; t < len; ++t) {
          const float p = pj[t];
          const float* vt = v_pool + at[t];  // [D]
#pragma omp simd
          for (int i = 0; i < D; ++i) yh[i] += p * vt[i];
        }
      }
    }
  }
}

}  // namespace moe::cpu
