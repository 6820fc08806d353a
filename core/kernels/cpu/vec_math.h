// Vectorisable math helpers shared by the CPU kernels (internal to core/kernels/cpu).
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>

namespace moe::cpu::detail {

// exp(x) in float that vectorises under `omp simd` (glibc's expf does not without -ffast-math): Cephes' expf,
// range reduction x = n ln2 + r, degree-6 polynomial, scale by 2^n through the exponent bits; <= 2 ulp.
// Returns 0 below -87.3 (no denormals) and saturates at exp(88) ~ 1.6e38 above 88; NaN propagates.
inline float vexp(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
  const float fn = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2), |n| <= 127
  const float r = (xc - fn * 0.693359375f) - fn * -2.12194440e-4f;           // x - n ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(fn) + 127) << 23);  // 2^n
  return x < -87.3f ? 0.0f : e * scale;
}

// max of x[0..n) (-inf for n == 0). `omp simd reduction(max)` over std::max stays scalar in GCC without
// -ffast-math; 16 independent lanes of compare-and-select vectorise.
inline float row_max(const float* x, int n) {
  constexpr int kLanes = 16;
  float m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = -INFINITY;
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
  float r = -INFINITY;
  for (int l = 0; l < kLanes; ++l) r = m[l] > r ? m[l] : r;
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

struct SoftmaxStats {
  float max;  // max of z
  float sum;  // sum of exp(z - max); log-sum-exp = max + log(sum)
};

// p[0..n) = softmax(z[0..n)) (p may alias z). Returns the max and shifted sum, so a caller can form
// log(sum) - (z[t] - max) without the cancellation of (max + log(sum)) - z[t] at large logits.
inline SoftmaxStats softmax_row(float* p, const float* z, int n) {
  const float mx = row_max(z, n);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) {
    p[j] = vexp(z[j] - mx);
    sum += p[j];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int j = 0; j < n; ++j) p[j] *= inv;
  return {mx, sum};
}

}  // namespace moe::cpu::detail
