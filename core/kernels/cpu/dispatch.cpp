// The token dispatch kernels of the MoE layer (kernels.h "token dispatch"): row gathers and gate-weighted combines
// between token order [N,C] and a permuted order [R,C]. Rows are copied or summed whole; a loop over tokens or rows
// is split over threads only when it moves enough floats to pay for it.
#include <cstring>

#include "core/kernels/cpu/kernels.h"

namespace moe::cpu {
namespace {
constexpr int64_t kParFloats = 65536;  // below this many floats moved, one thread
}  // namespace

void gather_rows(float* out, const float* x, const int32_t* slot, const float* gate, int R, int k, int C) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(R) * C > kParFloats)
  for (int r = 0; r < R; ++r) {
    const float* src = x + static_cast<int64_t>(slot[r] / k) * C;
    float* dst = out + static_cast<int64_t>(r) * C;
    if (!gate) {
      std::memcpy(dst, src, sizeof(float) * C);
      continue;
    }
    const float g = gate[slot[r]];
    for (int c = 0; c < C; ++c) dst[c] = g * src[c];
  }
}

void combine_rows(float* out, const float* y, const int32_t* row, const float* gate, int N, int k, int C,
                  bool accumulate) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * C > kParFloats)
  for (int n = 0; n < N; ++n) {
    float* o = out + static_cast<int64_t>(n) * C;
    if (!accumulate) std::memset(o, 0, sizeof(float) * C);
    for (int j = 0; j < k; ++j) {
      const int s = n * k + j, r = row[s];
      if (r < 0) continue;
      const float* yr = y + static_cast<int64_t>(r) * C;
      if (!gate) {
        for (int c = 0; c < C; ++c) o[c] += yr[c];
        continue;
      }
      const float g = gate[s];
      for (int c = 0; c < C; ++c) o[c] += g * yr[c];
    }
  }
}

void row_dots(float* dot, const float* a, const float* y, const int32_t* row, int N, int k, int C) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(N) * k * C > kParFloats)
  for (int s = 0; s < N * k; ++s) {
    if (row[s] < 0) {
      dot[s] = 0.0f;
      continue;
    }
    const float* an = a + static_cast<int64_t>(s / k) * C;
    const float* yr = y + static_cast<int64_t>(row[s]) * C;
    double acc = 0.0;
    for (int c = 0; c < C; ++c) acc += static_cast<double>(an[c]) * yr[c];
    dot[s] = static_cast<float>(acc);
  }
}

}  // namespace moe::cpu
