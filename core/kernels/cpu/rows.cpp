// Passes over the touched rows of a row-sparse table (kernels.h "row-sparse tables"): zeroing, scaling, the sum of
// squares. Rows in parallel (disjoint), each walked with the next row prefetched (core/prefetch.h).
#include "core/kernels/cpu/kernels.h"
#include "core/prefetch.h"

#include <algorithm>

namespace moe::cpu {

void zero_rows(float* x, const int64_t* rows, int64_t n_rows, int64_t row_size) {
#pragma omp parallel for schedule(static) if (n_rows * row_size > kParRows)
  for (int64_t k = 0; k < n_rows; ++k) {
    const int64_t r = rows[k], next = k + 1 < n_rows ? (rows[k + 1] - r) * row_size : 0;
    walk_row<true>(x + r * row_size, row_size, next, [](float* p, int64_t n) { std::fill(p, p + n, 0.0f); });
  }
}

void scale_rows(float* x, float s, const int64_t* rows, int64_t n_rows, int64_t row_size) {
#pragma omp parallel for schedule(static) if (n_rows * row_size > kParRows)
  for (int64_t k = 0; k < n_rows; ++k) scale_inplace(x + rows[k] * row_size, s, row_size);
}

double sum_squares_rows(const float* x, const int64_t* rows, int64_t n_rows, int64_t row_size) {
  double acc = 0;
#pragma omp parallel for schedule(static) reduction(+ : acc) if (n_rows * row_size > kParRows)
  for (int64_t k = 0; k < n_rows; ++k) {
    const int64_t next = k + 1 < n_rows ? (rows[k + 1] - rows[k]) * row_size : 0;
    walk_row<false>(x + rows[k] * row_size, row_size, next,
                    [&](const float* p, int64_t n) { acc += sum_squares(p, n); });
  }
  return acc;
}

}  // namespace moe::cpu
