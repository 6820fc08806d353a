// The kernels of the inference path (serving and generation): a batch-invariant linear layer on weights in the
// inference layout, rotary embedding at per-row positions, the scatter into a paged KV cache and attention over it
// (kernels.h states the contracts).
//
// Batch invariance (linear_rows): every output element out[n,o] is computed by one fixed sequence of operations:
// acc = 0, then acc = fma(inp[n,k], w[o,k], acc) for k = 0, 1, ..., IC-1 in order, then + bias[o]. The SIMD lanes
// hold different outputs (a panel of kW consecutive outputs, so the weights are packed by output panels: pack_rows),
// never parts of one sum; register tiles of up to kR rows x kP panels only decide which elements are computed
// together, and each element is computed by exactly one thread: a row's result does not depend on N, the other rows,
// its place in the batch or the thread count. (OpenBLAS sgemm does not promise this: its kernels and blocking change
// with the matrix sizes.)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <bit>
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
// kW outputs per panel (vector lanes); tiles of up to kR rows x kP panels (kR * kP accumulators, kP weight vectors and
// one broadcast in the registers); one row at a time uses kP1 panels (enough independent FMA chains).
#if defined(__AVX512F__)
constexpr int kW = 16, kR = 6, kP = 4, kP1 = 8;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vbcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v, int n) {  // the first n lanes
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
}
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kW = 8, kR = 4, kP = 3, kP1 = 6;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vbcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v, int n) {
  alignas(32) float t[kW];
  _mm256_store_ps(t, v);
  std::memcpy(p, t, sizeof(float) * n);
}
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
#else
// portable lanes: plain arrays (std::fma per lane: the same operations, in the same order)
constexpr int kW = 8, kR = 2, kP = 2, kP1 = 4;
struct Vec {
  float l[kW];
};
inline Vec vzero() { return Vec{}; }
inline Vec vbcast(const float* p) {
  Vec v;
  for (float& e : v.l) e = *p;
  return v;
}
inline Vec vload(const float* p) {
  Vec v;
  for (int i = 0; i < kW; ++i) v.l[i] = p[i];
  return v;
}
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < kW; ++i) c.l[i] = std::fma(a.l[i], b.l[i], c.l[i]);
  return c;
}
inline void vstore(float* p, Vec v, int n) { std::memcpy(p, v.l, sizeof(float) * n); }
inline Vec vadd(Vec a, Vec b) {
  for (int i = 0; i < kW; ++i) a.l[i] += b.l[i];
  return a;
}
#endif

// out[nr rows, outputs of np panels] (row stride ldo; the last panel has `last` valid outputs) = x[nr,K] (ldx) times
// the panels at pw (each [K][kW], consecutive) + bias. Rows past nr and panels past np are computed on row 0 /
// panel 0 and dropped.
template <int R, int P>
void linear_tile(float* out, int64_t ldo, const float* x, int64_t ldx, const float* pw, const float* bias, int K,
                 int nr, int np, int last) {
  const float* xr[R];
  const float* wp[P];
  for (int r = 0; r < R; ++r) xr[r] = x + (r < nr ? r : 0) * ldx;
  for (int p = 0; p < P; ++p) wp[p] = pw + int64_t(p < np ? p : 0) * K * kW;
  Vec acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = vzero();
  for (int k = 0; k < K; ++k) {
    Vec wv[P];
    for (int p = 0; p < P; ++p) wv[p] = vload(wp[p] + int64_t(k) * kW);
    for (int r = 0; r < R; ++r) {
      const Vec xb = vbcast(xr[r] + k);
      for (int p = 0; p < P; ++p) acc[r][p] = vfma(xb, wv[p], acc[r][p]);
    }
  }
  for (int p = 0; p < np; ++p) {
    const int n = p == np - 1 ? last : kW;
    float* o = out + p * kW;
    Vec b = vzero();
    if (bias) {
      alignas(64) float t[kW] = {};
      std::memcpy(t, bias + p * kW, sizeof(float) * n);
      b = vload(t);
    }
    for (int r = 0; r < nr; ++r) vstore(o + r * ldo, bias ? vadd(acc[r][p], b) : acc[r][p], n);
  }
}

// the rows [0, N) times panels [0, np) (the last with `last` outputs): tiles of R rows x P panels
template <int R, int P>
void linear_block(float* out, int64_t ldo, const float* x, int64_t ldx, const float* pw, const float* bias, int N,
                  int K, int np, int last) {
  for (int p0 = 0; p0 < np; p0 += P) {
    const int n_p = std::min(P, np - p0), l = p0 + n_p == np ? last : kW;
    const float* bp = bias ? bias + p0 * kW : nullptr;
    for (int n0 = 0; n0 < N; n0 += R)
      linear_tile<R, P>(out + int64_t(n0) * ldo + p0 * kW, ldo, x + int64_t(n0) * ldx, ldx, pw + int64_t(p0) * K * kW,
                        bp, K, std::min(R, N - n0), n_p, l);
  }
}

// the tile height for N rows: all of them when fewer than kR (no wasted rows), else kR
template <int R = kR>
void linear_rows_block(float* out, int64_t ldo, const float* x, int64_t ldx, const float* pw, const float* bias, int N,
                       int K, int np, int last) {
  if constexpr (R > 1) {
    if (N < R) return linear_rows_block<R - 1>(out, ldo, x, ldx, pw, bias, N, K, np, last);
  }
  if (R == 1) return linear_block<1, kP1>(out, ldo, x, ldx, pw, bias, N, K, np, last);
  linear_block<R, kP>(out, ldo, x, ldx, pw, bias, N, K, np, last);
}

constexpr double kParMinMacs = double(1 << 18);  // below this many multiply-adds linear_rows stays on one thread

}  // namespace

// ---------------------------------------------------------------- linear layer, batch-invariant
int rows_panel() { return kW; }

int64_t packed_rows_floats(int IC, int OC) { return int64_t((OC + kW - 1) / kW) * kW * IC; }

// panel p, input k, lane j = w[p * kW + j, k] (0 past OC)
void pack_rows(float* packed, const float* w, int IC, int OC) {
  MOE_CHECK(IC >= 0 && OC >= 0, "pack_rows: negative size IC=" << IC << " OC=" << OC);
  const int np = (OC + kW - 1) / kW;
  for (int p = 0; p < np; ++p)
    for (int j = 0; j < kW; ++j) {
      const int o = p * kW + j;
      float* dst = packed + int64_t(p) * IC * kW + j;
      for (int k = 0; k < IC; ++k) dst[int64_t(k) * kW] = o < OC ? w[int64_t(o) * IC + k] : 0.0f;
    }
}

// out[N,OC] = inp[N,IC] @ w^T + bias with w packed. Work items: groups of panels (all rows of the batch for them:
// the panels stay in L1/L2 while the rows stream past), split statically over the threads.
void linear_rows(float* out, const float* inp, const float* packed, const float* bias, int N, int IC, int OC) {
  MOE_CHECK(N >= 0 && IC >= 0 && OC >= 0, "linear_rows: negative size N=" << N << " IC=" << IC << " OC=" << OC);
  if (N == 0 || OC == 0) return;
  const int np = (OC + kW - 1) / kW, last = OC - (np - 1) * kW;
  const int per = N == 1 ? kP1 : kP;  // panels per work item
  const int items = (np + per - 1) / per;
  const bool par = double(N) * IC * OC > kParMinMacs && items > 1 && !omp_in_parallel();
#pragma omp parallel for schedule(static) if (par)
  for (int it = 0; it < items; ++it) {
    const int p0 = it * per, n_p = std::min(per, np - p0);
    linear_rows_block(out + p0 * kW, OC, inp, IC, packed + int64_t(p0) * IC * kW, bias ? bias + p0 * kW : nullptr, N,
                      IC, n_p, p0 + n_p == np ? last : kW);
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

namespace {

// ---------------------------------------------------------------- attention over the cache: scores and values
// s[t] = scale * <q[D], k at offset at[t]> for t < len. Generic lanes: the compiler's simd reduction over D.
void scores_generic(float* s, const float* q, const float* k_pool, const int64_t* at, int len, int D, float scale) {
  for (int t = 0; t < len; ++t) {
    const float* kt = k_pool + at[t];  // [D]
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int i = 0; i < D; ++i) dot += q[i] * kt[i];
    s[t] = dot * scale;
  }
}

// y[h][D] = sum_t p[h][t] v_t for the heads h < nh, p rows of stride ldp, in order of t
void values_generic(float* y, int64_t ldy, const float* p, int64_t ldp, int nh, const float* v_pool, const int64_t* at,
                    int len, int D) {
  for (int h = 0; h < nh; ++h) {
    float* yh = y + h * ldy;
    std::memset(yh, 0, sizeof(float) * D);
    for (int t = 0; t < len; ++t) {
      const float pt = p[h * ldp + t];
      const float* vt = v_pool + at[t];  // [D]
#pragma omp simd
      for (int i = 0; i < D; ++i) yh[i] += pt * vt[i];
    }
  }
}

#if defined(__AVX512F__)
// 16 dot products at once: acc[j] holds 16 lane partials of dot j; the sums come out of a fixed network that adds
// lane i and lane i + w/2 of every accumulator (w = 16, then halves): every dot's lanes in the same grouping, whatever
// its place among the 16. slot[j] is the output lane of accumulator j (probed once).
__m512 network16(__m512 (&a)[16]) {
  __m512 t[8], u[4], v[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xee));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; ++i)
    v[i] =
        _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xee));
  return _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xdd));
}

const std::array<int, 16>& network16_slot() {
  static const std::array<int, 16> slot = [] {
    __m512 a[16];
    for (int j = 0; j < 16; ++j) a[j] = _mm512_set1_ps(static_cast<float>(j + 1));
    float r[16];
    _mm512_storeu_ps(r, network16(a));
    std::array<int, 16> s{};
    for (int lane = 0; lane < 16; ++lane) s[static_cast<int>(r[lane]) / 16 - 1] = lane;
    return s;
  }();
  return slot;
}

// scores_generic for D = 16 NV: each dot = lane partials (a product, then fma over the NV vectors), summed by the
// network, 16 positions at a time (missing positions of the last group computed on position t0 and dropped)
template <int NV>
void scores16(float* s, const float* q, const float* k_pool, const int64_t* at, int len, float scale) {
  __m512 qv[NV];
  for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(q + 16 * v);
  const std::array<int, 16>& slot = network16_slot();
  for (int t0 = 0; t0 < len; t0 += 16) {
    const int n = std::min(16, len - t0);
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) {
      const float* kt = k_pool + at[t0 + (j < n ? j : 0)];
      acc[j] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kt));
      for (int v = 1; v < NV; ++v) acc[j] = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(kt + 16 * v), acc[j]);
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, network16(acc));
    for (int j = 0; j < n; ++j) s[t0 + j] = sums[slot[j]] * scale;
  }
}

// values_generic for D = 16 NV: the heads' accumulators in registers (up to kMaxAcc vectors), one fma per element
// and position, in order of t
template <int NV>
void values16(float* y, int64_t ldy, const float* p, int64_t ldp, int nh, const float* v_pool, const int64_t* at,
              int len) {
  constexpr int kHeads = std::max(1, 24 / NV);  // heads per pass
  for (int h0 = 0; h0 < nh; h0 += kHeads) {
    const int hc = std::min(kHeads, nh - h0);
    __m512 acc[kHeads][NV];
    for (int h = 0; h < kHeads; ++h)
      for (int v = 0; v < NV; ++v) acc[h][v] = _mm512_setzero_ps();
    for (int t = 0; t < len; ++t) {
      __m512 vt[NV];
      for (int v = 0; v < NV; ++v) vt[v] = _mm512_loadu_ps(v_pool + at[t] + 16 * v);
      for (int h = 0; h < hc; ++h) {
        const __m512 pt = _mm512_set1_ps(p[(h0 + h) * ldp + t]);
        for (int v = 0; v < NV; ++v) acc[h][v] = _mm512_fmadd_ps(pt, vt[v], acc[h][v]);
      }
    }
    for (int h = 0; h < hc; ++h)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + (h0 + h) * ldy + 16 * v, acc[h][v]);
  }
}
#endif

// The kernels for head dim D (each D always gets the same ones: a model's attention is batch invariant)
struct AttnKernels {
  void (*scores)(float*, const float*, const float*, const int64_t*, int, float) = nullptr;
  void (*values)(float*, int64_t, const float*, int64_t, int, const float*, const int64_t*, int) = nullptr;
};
AttnKernels attn_kernels(int D) {
#if defined(__AVX512F__)
  switch (D) {
    case 16:
      return {&scores16<1>, &values16<1>};
    case 32:
      return {&scores16<2>, &values16<2>};
    case 48:
      return {&scores16<3>, &values16<3>};
    case 64:
      return {&scores16<4>, &values16<4>};
    case 96:
      return {&scores16<6>, &values16<6>};
    case 128:
      return {&scores16<8>, &values16<8>};
    case 256:
      return {&scores16<16>, &values16<16>};
    default:
      break;
  }
#endif
  return {};
}

}  // namespace

namespace {

// Where row n's positions live: position t of kv head g is at offset at(t) of k_pool / v_pool.
struct PagedRow {
  const int32_t* blocks;  // the row's block table
  int block_size;
  int64_t row;   // floats per slot (Hkv * D)
  int64_t head;  // g * D: the kv head within a slot
  int64_t at(int t) const { return (int64_t(blocks[t / block_size]) * block_size + t % block_size) * row + head; }
};

// The checks both paged attentions make; returns the longest context of the rows.
int paged_max_len(const int32_t* pos, int block_size, int N, int H, int Hkv, int D, const char* fn) {
  MOE_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && D > 0,
            fn << ": H=" << H << " must be a positive multiple of Hkv=" << Hkv << ", D=" << D);
  MOE_CHECK(block_size > 0, fn << ": block size " << block_size << " must be positive");
  int max_len = 0;
  for (int n = 0; n < N; ++n) {
    MOE_CHECK(pos[n] >= 0, fn << ": row " << n << " has negative position " << pos[n]);
    max_len = std::max(max_len, pos[n] + 1);
  }
  return max_len;
}

// Full attention of one (row, kv head): the group's G query heads qg[G,D] over the len positions at offsets
// at[len] -> yg[G,D]. s[G, lds] scratch (scores, then probabilities).
void attend_full(float* yg, const float* qg, const float* k_pool, const float* v_pool, const int64_t* at, int len,
                 int G, int D, float scale, const AttnKernels& kern, float* s, int64_t lds) {
  for (int j = 0; j < G; ++j) {
    float* sj = s + j * lds;
    if (kern.scores)
      kern.scores(sj, qg + j * D, k_pool, at, len, scale);
    else
      scores_generic(sj, qg + j * D, k_pool, at, len, D, scale);
    detail::softmax_row(sj, sj, len);
  }
  if (kern.values)
    kern.values(yg, D, s, lds, G, v_pool, at, len);
  else
    values_generic(yg, D, s, lds, G, v_pool, at, len, D);
}

}  // namespace

// Per (row, kv head): the scores of the group's query heads against every cached key, a softmax per head
// (detail::softmax_row: max, exp, one sum, multiply by the inverse), then the probability-weighted values of all the
// group's heads in one pass over the positions. Each (row, head) is computed in the same order whatever the batch:
// the batch only decides which items run.
void attention_paged(float* out, const float* q, const float* k_pool, const float* v_pool, const int32_t* pos,
                     const int32_t* table, const int32_t* table_start, int block_size, int N, int H, int Hkv, int D) {
  const int max_len = paged_max_len(pos, block_size, N, H, Hkv, D, "attention_paged");
  if (N == 0) return;
  const int group = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttnKernels kern = attn_kernels(D);
  const int items = N * Hkv;
  const bool par = int64_t(items) * max_len * group * D > 32768 && items > 1 && !omp_in_parallel();
#pragma omp parallel if (par)
  {
    std::vector<float> s(size_t(group) * max_len);  // [group, len] scores, then probabilities
    std::vector<int64_t> at(max_len);               // offset of each position's (slot, kv head) row
#pragma omp for schedule(dynamic, 1)
    for (int it = 0; it < items; ++it) {
      const int n = it / Hkv, g = it % Hkv, len = pos[n] + 1;
      const PagedRow pr{table + table_start[n], block_size, int64_t(Hkv) * D, int64_t(g) * D};
      for (int t = 0; t < len; ++t) at[t] = pr.at(t);
      const int64_t o = (int64_t(n) * H + g * group) * D;  // the group's [group, D] in q and out
      attend_full(out + o, q + o, k_pool, v_pool, at.data(), len, group, D, scale, kern, s.data(), max_len);
    }
  }
}

// ---------------------------------------------------------------- SparQ: the side tables
void value_sums_paged(float* v_sums, const float* v_pool, const int32_t* pos, const int32_t* table,
                      const int32_t* table_start, int block_size, int N, int Hkv, int D) {
  MOE_CHECK(block_size > 0 && Hkv > 0 && D > 0,
            "value_sums_paged: block size " << block_size << ", Hkv " << Hkv << ", D " << D << " must be positive");
  std::vector<float> acc(D);
  for (int n = 0; n < N; ++n) {
    const int p = pos[n];
    MOE_CHECK(p >= 0, "value_sums_paged: row " << n << " has negative position " << p);
    if ((p + 1) % block_size != 0) continue;  // only a row that ends its block
    const int j = p / block_size;
    const int32_t* blocks = table + table_start[n];
    for (int g = 0; g < Hkv; ++g) {
      const PagedRow pr{blocks, block_size, int64_t(Hkv) * D, int64_t(g) * D};
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int t = j * block_size; t <= p; ++t) {
        const float* vt = v_pool + pr.at(t);  // [D]
#pragma omp simd
        for (int i = 0; i < D; ++i) acc[i] += vt[i];
      }
      float* dst = v_sums + (int64_t(blocks[j]) * Hkv + g) * D;  // [D]
      const float* prev = j > 0 ? v_sums + (int64_t(blocks[j - 1]) * Hkv + g) * D : nullptr;
      for (int i = 0; i < D; ++i) dst[i] = prev ? prev[i] + acc[i] : acc[i];
    }
  }
}

void scatter_columns(float* k_cols, const float* k, const int32_t* slots, int block_size, int N, int Hkv, int D) {
  MOE_CHECK(block_size > 0, "scatter_columns: block size " << block_size << " must be positive");
  for (int n = 0; n < N; ++n) {
    MOE_CHECK(slots[n] >= 0, "scatter_columns: row " << n << " has negative slot " << slots[n]);
    const int64_t blk = slots[n] / block_size, off = slots[n] % block_size;
    for (int g = 0; g < Hkv; ++g) {
      const float* kg = k + (int64_t(n) * Hkv + g) * D;                // [D]
      float* col = k_cols + ((blk * Hkv + g) * D) * block_size + off;  // [D] at stride block_size
      for (int i = 0; i < D; ++i) col[int64_t(i) * block_size] = kg[i];
    }
  }
}

namespace {

// ---------------------------------------------------------------- SparQ: one (row, kv head)
// What every item of one attention_sparq call shares.
struct SparqCall {
  const float* k_pool;  // [slots, Hkv, D]
  const float* v_pool;  // [slots, Hkv, D]
  const float* v_sums;  // [num_blocks, Hkv, D]
  const float* k_cols;  // [num_blocks, Hkv, D, block_size] or null
  int Hkv, G, D;
  float scale;  // 1/sqrt(D)
  AttnKernels kern;
};

constexpr int kTile = 16;  // positions per tile of approximate scores (the SIMD lanes)

// Per-thread scratch, sized for the call's longest context.
struct SparqScratch {
  std::vector<float> s;        // [G, max_len] approximate scores, then their softmax
  std::vector<float> c;        // [max_len] the group's sum of them
  std::vector<float> p;        // [G, max_len] exact scores of the top positions, then probabilities
  std::vector<float> qi;       // [G, D] the group's queries at the chosen components
  std::vector<float> vm;       // [D] the mean value
  std::vector<float> tile;     // [D, kTile] key components of up to kTile positions
  std::vector<int32_t> sel;    // [max(max_len, D)] selection: components, then positions
  std::vector<uint64_t> keys;  // [max(max_len, D)] the selection's keys
  std::vector<uint8_t> mark;   // [max(max_len, D)] the chosen indices
  std::vector<int64_t> at;     // [max_len] offsets of the top positions
  SparqScratch(int G, int D, int max_len)
      : s(size_t(G) * max_len),
        c(max_len),
        p(size_t(G) * max_len),
        qi(size_t(G) * D),
        vm(D),
        tile(size_t(D) * kTile),
        sel(std::max(max_len, D)),
        keys(std::max(max_len, D)),
        mark(std::max(max_len, D)),
        at(max_len) {}
};

// The n largest of x[0..len) (x >= 0; ties: the lower index) into idx[0..n), in increasing order. The selection
// runs on keys (~bits(x) << 32 | index): for x >= 0 the float's bits order like its value, so the n smallest keys
// are the n largest values, lower index first among equal ones, with no indirection; the chosen indices come out in
// order by one pass over a mark per index. keys[len], mark[len] scratch.
void top_n(int32_t* idx, uint64_t* keys, uint8_t* mark, const float* x, int len, int n) {
  for (int i = 0; i < len; ++i) keys[i] = uint64_t(~std::bit_cast<uint32_t>(x[i])) << 32 | static_cast<uint32_t>(i);
  n = std::min(n, len);
  if (n < len) std::nth_element(keys, keys + n, keys + len);
  std::memset(mark, 0, static_cast<size_t>(std::max(len, 0)));
  for (int i = 0; i < n; ++i) mark[keys[i] & 0xffffffffu] = 1;
  for (int i = 0, m = 0; i < len; ++i)
    if (mark[i]) idx[m++] = i;
}

// The r components I of the group's queries qg[G,D] (by the sum of |q_h[i]| over the group) into sel[0..r);
// qi[G, r] = the queries at I; sc[G] = each head's score scale 1/sqrt(D * sum_I |q_h| / sum |q_h|).
void pick_components(SparqScratch& w, float* sc, const float* qg, int r, const SparqCall& c) {
  const int D = c.D;
  float* a = w.vm.data();  // [D] borrowed: the mean comes later
  for (int i = 0; i < D; ++i) a[i] = 0.0f;
  for (int h = 0; h < c.G; ++h)
    for (int i = 0; i < D; ++i) a[i] += std::fabs(qg[h * D + i]);
  top_n(w.sel.data(), w.keys.data(), w.mark.data(), a, D, r);
  for (int h = 0; h < c.G; ++h) {
    const float* qh = qg + h * D;
    float all = 0.0f, in = 0.0f;
    for (int i = 0; i < D; ++i) all += std::fabs(qh[i]);
    for (int m = 0; m < r; ++m) {
      w.qi[h * r + m] = qh[w.sel[m]];
      in += std::fabs(qh[w.sel[m]]);
    }
    sc[h] = in > 0.0f ? 1.0f / std::sqrt(static_cast<float>(D) * (in / all)) : c.scale;
  }
}

// s[h * lds + l] = scale[h] * sum_m qi[h][m] * col(m)[l] for l < n (n <= kTile): one fma chain per (head, position)
// in increasing m, from 0; col(m) = the kTile positions' component I[m]: cols[m * ld] (a tile) or, with I given,
// cols + I[m] * ld (the key columns of a block).
void tile_dots(float* s, int64_t lds, const float* qi, const float* sc, int G, int r, const int32_t* I,
               const float* cols, int64_t ld, int n) {
  for (int h = 0; h < G; ++h) {
    const float* qh = qi + h * r;
    float acc[kTile] = {};
    for (int m = 0; m < r; ++m) {
      const float q = qh[m];
      const float* col = cols + (I ? int64_t(I[m]) : int64_t(m)) * ld;  // [kTile]
#pragma omp simd
      for (int l = 0; l < kTile; ++l) acc[l] = std::fma(q, col[l], acc[l]);
    }
    for (int l = 0; l < n; ++l) s[h * lds + l] = acc[l] * sc[h];
  }
}

// The lines of the key components I[0..r) that the tile at t0 reads (the key columns are not read in an order a
// hardware prefetcher follows), kPrefetch tiles ahead.
constexpr int kPrefetch = 2;
void prefetch_tile(const int32_t* I, int r, int t0, int len, const PagedRow& pr, int g, const SparqCall& c) {
  const int bs = pr.block_size;
  if (c.k_cols) {
    const float* base = c.k_cols + ((int64_t(pr.blocks[t0 / bs]) * c.Hkv + g) * c.D) * bs + t0 % bs;
    for (int m = 0; m < r; ++m) __builtin_prefetch(base + int64_t(I[m]) * bs);
    return;
  }
  for (int t = t0; t < std::min(t0 + kTile, len); ++t)  // (the block table ends with the row's context)
    for (int i = 0; i < c.D; i += 16) __builtin_prefetch(c.k_pool + pr.at(t) + i);
}

// w.s[h][t] = sc[h] * sum_m qi[h][m] * K_t[I[m]] for t < len (tile_dots), kTile positions at a time: straight from
// the key columns when a tile is a whole run of kTile positions of one block, else from the components copied (from
// the key columns or gathered from the key rows) into a tile: the same bits either way.
void approx_scores(SparqScratch& w, const float* sc, int r, int len, int64_t lds, const PagedRow& pr, int g,
                   const SparqCall& c) {
  const int32_t* I = w.sel.data();
  const int bs = pr.block_size;
  float* tile = w.tile.data();  // [r, kTile]
  for (int t0 = 0; t0 < len; t0 += kTile) {
    const int n = std::min(kTile, len - t0);
    if (t0 + kPrefetch * kTile < len) prefetch_tile(I, r, t0 + kPrefetch * kTile, len, pr, g, c);
    const float* base = nullptr;  // t0's block's key columns [D, bs], at t0's offset in the block
    if (c.k_cols) base = c.k_cols + ((int64_t(pr.blocks[t0 / bs]) * c.Hkv + g) * c.D) * bs + t0 % bs;
    if (base && n == kTile && t0 % bs + kTile <= bs) {
      tile_dots(w.s.data() + t0, lds, w.qi.data(), sc, c.G, r, I, base, bs, n);
      continue;
    }
    std::fill(tile, tile + int64_t(r) * kTile, 0.0f);
    for (int l = 0; l < n; ++l) {
      const int t = t0 + l;
      if (c.k_cols) {
        const float* bt = c.k_cols + ((int64_t(pr.blocks[t / bs]) * c.Hkv + g) * c.D) * bs + t % bs;
        for (int m = 0; m < r; ++m) tile[m * kTile + l] = bt[int64_t(I[m]) * bs];
      } else {
        const float* kt = c.k_pool + pr.at(t);  // [D]
        for (int m = 0; m < r; ++m) tile[m * kTile + l] = kt[I[m]];
      }
    }
    tile_dots(w.s.data() + t0, lds, w.qi.data(), sc, c.G, r, nullptr, tile, kTile, n);
  }
}

// w.vm[D] = the mean value over positions 0..len-1: the prefix sum through the block before the last one, plus
// the last block's rows
void mean_value(SparqScratch& w, int len, const PagedRow& pr, int g, const SparqCall& c) {
  const int D = c.D, j = (len - 1) / pr.block_size;
  float* vm = w.vm.data();
  const float* prev = j > 0 ? c.v_sums + (int64_t(pr.blocks[j - 1]) * c.Hkv + g) * D : nullptr;
  for (int i = 0; i < D; ++i) vm[i] = prev ? prev[i] : 0.0f;
  for (int t = j * pr.block_size; t < len; ++t) {
    const float* vt = c.v_pool + pr.at(t);  // [D]
#pragma omp simd
    for (int i = 0; i < D; ++i) vm[i] += vt[i];
  }
  const float inv = 1.0f / static_cast<float>(len);
  for (int i = 0; i < D; ++i) vm[i] *= inv;
}

// SparQ of one (row, kv head): yg[G,D] from qg[G,D] over positions 0..len-1 (len > k), r components, k keys
void attend_sparq(float* yg, const float* qg, int len, int r, int k, const PagedRow& pr, int g, const SparqCall& c,
                  SparqScratch& w) {
  const int G = c.G, D = c.D;
  const int64_t lds = static_cast<int64_t>(w.c.size());
  float sc[256];  // each head's approximate-score scale (G <= 256: checked by the caller)
  pick_components(w, sc, qg, r, c);
  approx_scores(w, sc, r, len, lds, pr, g, c);
  for (int t = 0; t < len; ++t) w.c[t] = 0.0f;
  for (int h = 0; h < G; ++h) {
    float* sh = w.s.data() + h * lds;
    detail::softmax_row(sh, sh, len);
    for (int t = 0; t < len; ++t) w.c[t] += sh[t];
  }
  top_n(w.sel.data(), w.keys.data(), w.mark.data(), w.c.data(), len, k);
  for (int m = 0; m < k; ++m) {  // the top positions' offsets, in increasing order; their rows fetched early
    w.at[m] = pr.at(w.sel[m]);
    for (int i = 0; i < D; i += 16) {
      __builtin_prefetch(c.k_pool + w.at[m] + i, 0, 2);
      __builtin_prefetch(c.v_pool + w.at[m] + i, 0, 2);
    }
  }
  float alpha[256];
  for (int h = 0; h < G; ++h) {
    alpha[h] = 0.0f;
    for (int m = 0; m < k; ++m) alpha[h] += w.s[h * lds + w.sel[m]];
  }
  attend_full(yg, qg, c.k_pool, c.v_pool, w.at.data(), k, G, D, c.scale, c.kern, w.p.data(), lds);
  mean_value(w, len, pr, g, c);
  for (int h = 0; h < G; ++h)
    for (int i = 0; i < D; ++i) yg[h * D + i] = alpha[h] * yg[h * D + i] + (1.0f - alpha[h]) * w.vm[i];
}

}  // namespace

// Items (row, kv head) as attention_paged; a SparQ row's item reads r components of every key (by column when the
// key columns are kept), k key and value rows, and the mean value from the value sums.
void attention_sparq(float* out, const float* q, const float* k_pool, const float* v_pool, const float* v_sums,
                     const float* k_cols, const int32_t* pos, const int32_t* table, const int32_t* table_start,
                     const int32_t* rk, int block_size, int N, int H, int Hkv, int D) {
  const int max_len = paged_max_len(pos, block_size, N, H, Hkv, D, "attention_sparq");
  MOE_CHECK(v_sums, "attention_sparq: the value sums are required");
  MOE_CHECK(H / Hkv <= 256, "attention_sparq: " << H / Hkv << " query heads per kv head (at most 256)");
  for (int n = 0; n < N; ++n)
    MOE_CHECK(rk[2 * n] >= 0 && rk[2 * n] <= D && rk[2 * n + 1] >= 0,
              "attention_sparq: row " << n << " asks for r = " << rk[2 * n] << " components (0.." << D
                                      << ") and k = " << rk[2 * n + 1] << " keys (>= 0)");
  if (N == 0) return;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const SparqCall c{k_pool, v_pool, v_sums, k_cols, Hkv, H / Hkv, D, scale, attn_kernels(D)};
  const int items = N * Hkv;
  const bool par = int64_t(items) * max_len * c.G * D > 32768 && items > 1 && !omp_in_parallel();
#pragma omp parallel if (par)
  {
    SparqScratch w(c.G, D, max_len);
#pragma omp for schedule(dynamic, 1)
    for (int it = 0; it < items; ++it) {
      const int n = it / Hkv, g = it % Hkv, len = pos[n] + 1, r = rk[2 * n], k = rk[2 * n + 1];
      const PagedRow pr{table + table_start[n], block_size, int64_t(Hkv) * D, int64_t(g) * D};
      const int64_t o = (int64_t(n) * H + g * c.G) * D;  // the group's [G, D] in q and out
      if (r > 0 && k > 0 && len > k) {
        attend_sparq(out + o, q + o, len, r, k, pr, g, c, w);
        continue;
      }
      for (int t = 0; t < len; ++t) w.at[t] = pr.at(t);
      attend_full(out + o, q + o, k_pool, v_pool, w.at.data(), len, c.G, D, c.scale, c.kern, w.s.data(), max_len);
    }
  }
}

}  // namespace moe::cpu
