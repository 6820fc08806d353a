// Matrix products with one small dimension (a few rows of activations against a weight matrix): the grouped FFN's
// groups of a word-expert table, where each expert sees a handful of tokens. sgemm packs the big operand (the
// weights) into a panel before multiplying, which for M = 1..16 rows costs about as much as the product and makes
// the pass over the weights 2-4x slower than streaming them. These kernels read the weights once, in their own
// layout, with the small operand held in registers or L1. GCC vector extensions (16 floats: one AVX-512 register,
// two AVX2 ones) keep them portable; tails of K or N not divisible by 16 run as scalar loops.
// The sums are formed in a different order than sgemm's (float reassociation only). With beta = 1 each product is
// formed in full, then added to c (c + (a b), as sgemm does), so accumulating the same product twice doubles c exactly.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/kernels/cpu/kernels.h"

namespace moe::cpu {
namespace {

constexpr int kL = 16;  // lanes of a vector
typedef float vf __attribute__((vector_size(kL * sizeof(float))));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(vf v) {
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Horizontal sums of 16 vectors at once, as a transpose-and-add tree (4 levels of pairwise shuffles and adds):
// lane p of the result is the sum of the lanes of v[rev4(p)] (rev4: the 4-bit reversal of p). 30 shuffles and 15
// adds for 16 sums, against 16 x 7 for one at a time.
constexpr int rev4(int p) { return ((p & 1) << 3) | ((p & 2) << 1) | ((p & 4) >> 1) | ((p & 8) >> 3); }
inline vf sum16(const vf* v) {
  vf r[8], s[4], t[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: v[2i] folded to 8, 8-15: v[2i+1]
    r[i] =
        __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
        __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // blocks of 4
    s[i] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(r[2 * i], r[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // blocks of 2
    t[i] = __builtin_shufflevector(s[2 * i], s[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(s[2 * i], s[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(t[0], t[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(t[0], t[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// ---------------------------------------------------------------- c = a b^T: dot products along K
// c[MR rows, 4 columns n0..n0+3] (= or +=) a[MR,K] . b[n0..n0+3, K]; MR <= 4. The accumulator of (i, j) is
// acc[rev4(4i + j)], so that sum16 returns the 16 sums in row-major order.
template <int MR>
void nt_tile(float* c, const float* a, const float* b, int K, int ldc, int n0, float beta) {
  vf acc[16] = {};
  const int K16 = K / kL * kL;
  for (int k = 0; k < K16; k += kL) {
    vf w[4], x[MR];
    for (int j = 0; j < 4; ++j) w[j] = load(b + int64_t(n0 + j) * K + k);
    for (int i = 0; i < MR; ++i) x[i] = load(a + int64_t(i) * K + k);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) acc[rev4(4 * i + j)] += x[i] * w[j];
  }
  float s[16];
  store(s, sum16(acc));
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) {
      float v = s[4 * i + j];
      for (int k = K16; k < K; ++k) v += a[int64_t(i) * K + k] * b[int64_t(n0 + j) * K + k];
      float& out = c[int64_t(i) * ldc + n0 + j];
      out = beta == 0.0f ? v : out + v;
    }
}
// one column n of c (the last N % 4)
void nt_column(float* c, const float* a, const float* b, int M, int K, int ldc, int n, float beta) {
  const int K16 = K / kL * kL;
  const float* bn = b + int64_t(n) * K;
  for (int i = 0; i < M; ++i) {
    const float* ai = a + int64_t(i) * K;
    vf acc = {};
    for (int k = 0; k < K16; k += kL) acc += load(ai + k) * load(bn + k);
    float v = hsum(acc);
    for (int k = K16; k < K; ++k) v += ai[k] * bn[k];
    float& out = c[int64_t(i) * ldc + n];
    out = beta == 0.0f ? v : out + v;
  }
}
// ---------------------------------------------------------------- c = a b: rows of b scaled and added
// c[MR rows, nv vectors from column c0] (= or +=) a[MR,K] b[K, c0..]; MR <= 4, nv <= 4
template <int MR>
void nn_tile(float* c, const float* a, const float* b, int N, int K, int c0, int nv, float beta) {
  vf acc[MR][4] = {};
  for (int k = 0; k < K; ++k) {
    const float* bk = b + int64_t(k) * N + c0;
    vf w[4];
    for (int v = 0; v < nv; ++v) w[v] = load(bk + v * kL);
    for (int i = 0; i < MR; ++i) {
      const float x = a[int64_t(i) * K + k];
      for (int v = 0; v < nv; ++v) acc[i][v] += x * w[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < nv; ++v) {
      float* out = c + int64_t(i) * N + c0 + v * kL;
      store(out, beta == 0.0f ? acc[i][v] : load(out) + acc[i][v]);
    }
}
// columns [N16, N) of c[M,N] (= or +=) a[M,K] b[K,N]
void nn_tail(float* c, const float* a, const float* b, int M, int N, int K, int N16, float beta) {
  for (int i = 0; i < M; ++i)
    for (int n = N16; n < N; ++n) {
      float v = 0.0f;
      for (int k = 0; k < K; ++k) v += a[int64_t(i) * K + k] * b[int64_t(k) * N + n];
      float& out = c[int64_t(i) * N + n];
      out = beta == 0.0f ? v : out + v;
    }
}

// one row m of c[M,N] (= or +=) a[K,M]^T b[K,N]
void tn_row(float* cm, const float* a, const float* b, int M, int N, int K, int m, float beta) {
  constexpr int kV = 8;  // vectors of the row per pass over the K rows of b (in registers)
  const int N16 = N / kL * kL;
  for (int c0 = 0; c0 < N16; c0 += kV * kL) {
    const int nv = std::min(kV, (N16 - c0) / kL);
    vf acc[kV] = {};
    for (int k = 0; k < K; ++k) {
      const float x = a[int64_t(k) * M + m];
      const float* bk = b + int64_t(k) * N + c0;
      for (int v = 0; v < nv; ++v) acc[v] += x * load(bk + v * kL);
    }
    for (int v = 0; v < nv; ++v) store(cm + c0 + v * kL, beta == 0.0f ? acc[v] : load(cm + c0 + v * kL) + acc[v]);
  }
  for (int n = N16; n < N; ++n) {
    float v = 0.0f;
    for (int k = 0; k < K; ++k) v += a[int64_t(k) * M + m] * b[int64_t(k) * N + n];
    cm[n] = beta == 0.0f ? v : cm[n] + v;
  }
}

// tile.template operator()<MR>(first row) over row blocks of M: MR = 4, then one block of the remaining 1..3
template <class Tile>
void by_row_blocks(int M, const Tile& tile) {
  int i = 0;
  for (; i + 4 <= M; i += 4) tile.template operator()<4>(i);
  switch (M - i) {
    case 3:
      tile.template operator()<3>(i);
      break;
    case 2:
      tile.template operator()<2>(i);
      break;
    case 1:
      tile.template operator()<1>(i);
      break;
    default:
      break;
  }
}

// Work (multiply-adds) below which a kernel stays on one thread; inside the grouped FFN's parallel region over
// groups the loops below are single-threaded anyway (no nested parallelism).
constexpr int64_t kParWork = int64_t(1) << 20;

}  // namespace

void matmul_nt_small(float* c, const float* a, const float* b, int M, int N, int K, float beta) {
  // column tiles outer: the 4 rows of b of a tile stay in L1 for every row block; b is read once from memory
  const int tiles = N / 4;
#pragma omp parallel for schedule(static) if (int64_t(M) * N * K > kParWork)
  for (int t = 0; t < tiles; ++t)
    by_row_blocks(M, [&]<int MR>(int i) { nt_tile<MR>(c + int64_t(i) * N, a + int64_t(i) * K, b, K, N, 4 * t, beta); });
  for (int n = 4 * tiles; n < N; ++n) nt_column(c, a, b, M, K, N, n, beta);
}

void matmul_nn_small(float* c, const float* a, const float* b, int M, int N, int K, float beta) {
  const int N16 = N / kL * kL, strips = (N16 + 4 * kL - 1) / (4 * kL);
  // column strips outer: a strip of b (K x 64 floats) stays in L2 for every row block; b is read once from memory
#pragma omp parallel for schedule(static) if (int64_t(M) * N * K > kParWork)
  for (int t = 0; t < strips; ++t) {
    const int c0 = t * 4 * kL, nv = std::min(4, (N16 - c0) / kL);
    by_row_blocks(M,
                  [&]<int MR>(int i) { nn_tile<MR>(c + int64_t(i) * N, a + int64_t(i) * K, b, N, K, c0, nv, beta); });
  }
  if (N16 < N) nn_tail(c, a, b, M, N, K, N16, beta);
}

void matmul_tn_small(float* c, const float* a, const float* b, int M, int N, int K, float beta) {
#pragma omp parallel for schedule(static) if (int64_t(M) * N * K > kParWork)
  for (int m = 0; m < M; ++m) tn_row(c + int64_t(m) * N, a, b, M, N, K, m, beta);
}

}  // namespace moe::cpu
