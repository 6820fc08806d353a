// AdamW on the CPU (kernels.h): the dense update in parallel chunks, and lazy Adam over the touched rows of a
// row-sparse table. Built with -fno-math-errno (CMakeLists.txt), else GCC keeps the sqrt, and so the loop, scalar.
#include <algorithm>
#include <cmath>

#include "core/kernels/cpu/kernels.h"
#include "core/prefetch.h"

namespace moe::cpu {
namespace {

constexpr int64_t kChunk = 16384;    // elements per parallel work item of a dense update

// The AdamW update of n contiguous elements with bias corrections bc1, bc2. The gradient is read as gscale * g,
// exactly as if it had been scaled in memory first (clip_grad_norm).
inline void update(float* w, const float* g, float* m, float* v, int64_t n, const AdamWHyper& h, float bc1,
                   float bc2) {
  const float lr = h.lr, b1 = h.b1, b2 = h.b2, eps = h.eps, decay = h.decay, gs = h.gscale;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float gj = g[j] * gs;
    m[j] = b1 * m[j] + (1.0f - b1) * gj;
    v[j] = b2 * v[j] + (1.0f - b2) * gj * gj;
    const float mhat = m[j] / bc1;
    const float vhat = v[j] / bc2;
    w[j] -= lr * (mhat / (std::sqrt(vhat) + eps) + decay * w[j]);
  }
}

// The same update of one row of a row-sparse table, walking it 64 lines (1024 floats) at a time and prefetching
// the matching lines of the next row to update (offset `next` from w, g, m, v; 0: none) as it goes: spreading the
// prefetches over the row keeps the memory system busy without flooding it (core/prefetch.h). Long rows
// (> kPrefetchRowMax floats) get none: the hardware prefetchers follow them, and the next row would be evicted
// before its turn.
inline void update_row(float* w, const float* g, float* m, float* v, int64_t n, int64_t next, const AdamWHyper& h,
                       float bc1, float bc2) {
  constexpr int64_t kBlock = 1024;
  if (n > kPrefetchRowMax) next = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n - j0);
    if (next)
      for (int64_t j = j0; j < j0 + len; j += 16) {
        __builtin_prefetch(w + next + j, 1);
        __builtin_prefetch(g + next + j, 0);
        __builtin_prefetch(m + next + j, 1);
        __builtin_prefetch(v + next + j, 1);
      }
    update(w + j0, g + j0, m + j0, v + j0, len, h, bc1, bc2);
  }
}

}  // namespace

void adamw(float* w, const float* g, float* m, float* v, int64_t n, const AdamWHyper& h, float bc1, float bc2) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 4)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t o = c * kChunk;
    update(w + o, g + o, m + o, v + o, std::min(kChunk, n - o), h, bc1, bc2);
  }
}

// rows are disjoint, so they are updated in parallel (one parallel region per tensor, not per row)
void adamw_rows(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows, int64_t n_rows,
                int64_t row_size, const AdamWHyper& h) {
  const int64_t rs = row_size, nt = n_rows;
#pragma omp parallel for schedule(static) if (nt * rs > kParRows)
  for (int64_t k = 0; k < nt; ++k) {
    const int64_t r = rows[k];
    const int64_t next = k + 1 < nt ? (rows[k + 1] - r) * rs : 0;
    if (k + 1 < nt) __builtin_prefetch(row_t + rows[k + 1], 1);
    const int32_t tr = ++row_t[r];
    const float rb1 = 1.0f - std::pow(h.b1, static_cast<float>(tr));
    const float rb2 = 1.0f - std::pow(h.b2, static_cast<float>(tr));
    update_row(w + r * rs, g + r * rs, m + r * rs, v + r * rs, rs, next, h, rb1, rb2);
  }
}

}  // namespace moe::cpu
