// RMSNorm and LayerNorm, forward and backward side by side (one pass over each row).
// Backward: dinp is written per row in parallel; the parameter gradients (dw, db) are reduced through one
// private partial sum per thread, added into dw/db at the end (no atomics, deterministic for a fixed thread count).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/kernels/cpu/kernels.h"

namespace moe::cpu {
namespace {
constexpr int64_t kParMin = 16384;  // below this many elements a loop stays on one thread
}

// ---------------------------------------------------------------- RMSNorm
// out[N,C] = inp * rstd * w, rstd[N] = 1 / sqrt(mean(inp^2) + eps)
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) {
#pragma omp parallel for if (int64_t(N) * C > kParMin) schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* x = inp + int64_t(n) * C;  // [C]
    float* y = out + int64_t(n) * C;        // [C]
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int c = 0; c < C; ++c) ss += x[c] * x[c];
    const float r = 1.0f / std::sqrt(ss / C + eps);
    rstd[n] = r;
#pragma omp simd
    for (int c = 0; c < C; ++c) y[c] = x[c] * r * w[c];
  }
}

// y = x r w, r = (mean(x^2) + eps)^-1/2:
//   dx = r * (dy * w) - r^3 / C * x * sum(dy * w * x);   dw += dy * x * r
void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd,
                      int N, int C) {
  const bool par = int64_t(N) * C > kParMin;
  const int nt = par ? omp_get_max_threads() : 1;
  std::vector<float> part(size_t(nt) * C, 0.0f);  // [nt, C] per-thread dw partials
#pragma omp parallel num_threads(nt) if (par)
  {
    float* dwp = part.data() + size_t(omp_get_thread_num()) * C;
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      const float* x = inp + int64_t(n) * C;    // [C]
      const float* dy = dout + int64_t(n) * C;  // [C]
      float* dx = dinp + int64_t(n) * C;        // [C]
      const float r = rstd[n];
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int c = 0; c < C; ++c) s += dy[c] * w[c] * x[c];
      const float k = r * r * r * s / C;
#pragma omp simd
      for (int c = 0; c < C; ++c) {
        dx[c] = r * dy[c] * w[c] - k * x[c];
        dwp[c] += dy[c] * x[c] * r;
      }
    }
  }
  for (int t = 0; t < nt; ++t) {
    const float* p = part.data() + size_t(t) * C;
#pragma omp simd
    for (int c = 0; c < C; ++c) dw[c] += p[c];
  }
}

// ---------------------------------------------------------------- LayerNorm
// out[N,C] = (inp - mean) * rstd * w + b; mean[N], rstd[N] = 1 / sqrt(var + eps) (biased variance)
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N,
                       int C, float eps) {
#pragma omp parallel for if (int64_t(N) * C > kParMin) schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* x = inp + int64_t(n) * C;  // [C]
    float* y = out + int64_t(n) * C;        // [C]
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int c = 0; c < C; ++c) s += x[c];
    const float m = s / C;
    float v = 0.0f;  // two-pass variance: no cancellation for rows with a large mean
#pragma omp simd reduction(+ : v)
    for (int c = 0; c < C; ++c) v += (x[c] - m) * (x[c] - m);
    const float r = 1.0f / std::sqrt(v / C + eps);
    mean[n] = m;
    rstd[n] = r;
#pragma omp simd
    for (int c = 0; c < C; ++c) y[c] = (x[c] - m) * r * w[c] + b[c];
  }
}

// xhat = (x - mean) r, g = dy * w:  dx = r * (g - mean(g) - xhat * mean(g * xhat));  dw += dy * xhat;  db += dy
void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                        const float* mean, const float* rstd, int N, int C) {
  const bool par = int64_t(N) * C > kParMin;
  const int nt = par ? omp_get_max_threads() : 1;
  std::vector<float> part(size_t(nt) * 2 * C, 0.0f);  // [nt, 2, C] per-thread (dw, db) partials
#pragma omp parallel num_threads(nt) if (par)
  {
    float* dwp = part.data() + size_t(omp_get_thread_num()) * 2 * C;
    float* dbp = dwp + C;
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      const float* x = inp + int64_t(n) * C;    // [C]
      const float* dy = dout + int64_t(n) * C;  // [C]
      float* dx = dinp + int64_t(n) * C;        // [C]
      const float m = mean[n], r = rstd[n];
      float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
      for (int c = 0; c < C; ++c) {
        const float g = dy[c] * w[c];
        sg += g;
        sgx += g * (x[c] - m) * r;
      }
      sg /= C;
      sgx /= C;
#pragma omp simd
      for (int c = 0; c < C; ++c) {
        const float xhat = (x[c] - m) * r;
        dx[c] = r * (dy[c] * w[c] - sg - xhat * sgx);
        dwp[c] += dy[c] * xhat;
        dbp[c] += dy[c];
      }
    }
  }
  for (int t = 0; t < nt; ++t) {
    const float* p = part.data() + size_t(t) * 2 * C;
#pragma omp simd
    for (int c = 0; c < C; ++c) {
      dw[c] += p[c];
      db[c] += p[C + c];
    }
  }
}

}  // namespace moe::cpu
