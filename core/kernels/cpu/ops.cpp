// Embedding, activations (GELU tanh approximation, SwiGLU), softmax cross-entropy and elementwise helpers.
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/error.h"
#include "core/kernels/cpu/kernels.h"
#include "core/kernels/cpu/vec_math.h"

namespace moe::cpu {
namespace {

using detail::row_max;
using detail::vexp;

constexpr int64_t kParMin = 16384;         // below this many elements a row loop stays on one thread
constexpr int64_t kParMinFlat = 1 << 16;  // elementwise loops: memory-bound, only worth splitting when large

inline float vsigmoid(float x) { return 1.0f / (1.0f + vexp(-x)); }

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluC = 0.044715f;

}  // namespace

// ---------------------------------------------------------------- embedding
// out[N,C] = wte[ids[n], :]
void embedding_forward(float* out, const int32_t* ids, const float* wte, int N, int C) {
  for (int n = 0; n < N; ++n) MOE_CHECK(ids[n] >= 0, "embedding_forward: negative token id " << ids[n] << " at " << n);
#pragma omp parallel for if (int64_t(N) * C > kParMin) schedule(static)
  for (int n = 0; n < N; ++n) std::memcpy(out + int64_t(n) * C, wte + int64_t(ids[n]) * C, sizeof(float) * C);
}

// dwte[V,C] += dout[N,C] scattered at ids. Repeated ids would race across rows, so the threads split the
// columns instead: each walks every row over its own column range.
void embedding_backward(float* dwte, const float* dout, const int32_t* ids, int N, int C) {
  for (int n = 0; n < N; ++n) MOE_CHECK(ids[n] >= 0, "embedding_backward: negative token id " << ids[n] << " at " << n);
#pragma omp parallel if (int64_t(N) * C > kParMin && C >= 64)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int c0 = int(int64_t(C) * tid / nth), c1 = int(int64_t(C) * (tid + 1) / nth);
    for (int n = 0; n < N; ++n) {
      float* dst = dwte + int64_t(ids[n]) * C;
      const float* src = dout + int64_t(n) * C;
#pragma omp simd
      for (int c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

// ---------------------------------------------------------------- GELU (tanh approximation)
// gelu(x) = 0.5 x (1 + tanh(u)), u = k (x + c x^3); written as x * sigmoid(2u) (same function, no cancellation).
void gelu_forward(float* out, const float* inp, int64_t N) {
#pragma omp parallel for simd if (N > kParMin) schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const float x = inp[i];
    const float u = kGeluK * (x + kGeluC * x * x * x);
    out[i] = x * vsigmoid(2.0f * u);
  }
}

// with s = sigmoid(2u) = 1 / (1 + e), e = exp(-2u): gelu'(x) = s + 2 x s (1 - s) k (1 + 3 c x^2), 1 - s = e s
void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t N) {
#pragma omp parallel for simd if (N > kParMin) schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const float x = inp[i];
    const float u = kGeluK * (x + kGeluC * x * x * x);
    const float e = vexp(-2.0f * u), s = 1.0f / (1.0f + e);  // 1 - s = e s, without cancellation
    const float du = kGeluK * (1.0f + 3.0f * kGeluC * x * x);
    dinp[i] = dout[i] * (s + 2.0f * x * (e * s) * s * du);  // e s <= 1: no overflow
  }
}

// ---------------------------------------------------------------- SwiGLU
// out = silu(gate) * up, silu(g) = g sigmoid(g)
void swiglu_forward(float* out, const float* gate, const float* up, int64_t NF) {
#pragma omp parallel for simd if (NF > kParMin) schedule(static)
  for (int64_t i = 0; i < NF; ++i) {
    const float g = gate[i];
    out[i] = g * vsigmoid(g) * up[i];
  }
}

// s = sigmoid(g) = 1 / (1 + e), e = exp(-g): dgate = dout * up * s (1 + g (1 - s)), dup = dout * g s
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t NF) {
#pragma omp parallel for simd if (NF > kParMin) schedule(static)
  for (int64_t i = 0; i < NF; ++i) {
    const float g = gate[i], e = vexp(-g), s = 1.0f / (1.0f + e), dy = dout[i];  // 1 - s = e s
    dgate[i] = dy * up[i] * s * (1.0f + g * (e * s));
    dup[i] = dy * g * s;
  }
}

// ---------------------------------------------------------------- softmax cross-entropy
// losses[N] = logsumexp(logits[n]) - logits[n, target] (0 where target < 0); probs[N,V] = softmax(logits)
float cross_entropy_forward(float* losses, float* probs, const float* logits, const int32_t* targets, int N, int V) {
  for (int n = 0; n < N; ++n)
    MOE_CHECK(targets[n] < V, "cross_entropy_forward: target " << targets[n] << " at row " << n << " >= V=" << V);
  double total = 0.0;
  int count = 0;
#pragma omp parallel for if (int64_t(N) * V > kParMin) schedule(static) reduction(+ : total, count)
  for (int n = 0; n < N; ++n) {
    const float* z = logits + int64_t(n) * V;  // [V]
    float* p = probs + int64_t(n) * V;         // [V]
    const detail::SoftmaxStats st = detail::softmax_row(p, z, V);
    const int t = targets[n];
    if (t >= 0) {
      losses[n] = std::log(st.sum) - (z[t] - st.max);
      total += losses[n];
      ++count;
    } else {
      losses[n] = 0.0f;
    }
  }
  return count > 0 ? static_cast<float>(total / count) : 0.0f;
}

// dlogits[N,V] = (probs - onehot(target)) * dloss / count (0 for ignored rows)
void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets, int N, int V, float dloss) {
  int count = 0;
  for (int n = 0; n < N; ++n) count += targets[n] >= 0;
  const float g = count > 0 ? dloss / count : 0.0f;
#pragma omp parallel for if (int64_t(N) * V > kParMin) schedule(static)
  for (int n = 0; n < N; ++n) {
    float* d = dlogits + int64_t(n) * V;
    const int t = targets[n];
    if (t < 0) {
      std::memset(d, 0, sizeof(float) * V);
      continue;
    }
    const float* p = probs + int64_t(n) * V;
#pragma omp simd
    for (int i = 0; i < V; ++i) d[i] = p[i] * g;
    d[t] -= g;
  }
}

// ---------------------------------------------------------------- elementwise helpers
// Short inputs take a plain simd loop: `omp parallel for if (false)` still enters a one-thread team, and for a
// reduction that made a few-KiB sum of squares ~5x slower (grad_norm calls it once per touched row of a table).
void add_inplace(float* y, const float* x, int64_t n) {
  if (n <= kParMinFlat) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
    return;
  }
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void add(float* out, const float* a, const float* b, int64_t n) {
  if (n <= kParMinFlat) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
    return;
  }
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void scale_inplace(float* y, float s, int64_t n) {
  if (n <= kParMinFlat) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] *= s;
    return;
  }
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] *= s;
}

double sum_squares(const float* x, int64_t n) {
  double s = 0.0;
  if (n <= kParMinFlat) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
    return s;
  }
#pragma omp parallel for simd schedule(static) reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  return s;
}

void mul(float* out, const float* a, const float* b, int64_t n) {
  if (n <= kParMinFlat) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
    return;
  }
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

}  // namespace moe::cpu
