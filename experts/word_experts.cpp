// Word-expert table: forward and backward side by side, one small GEMM per used expert, OpenMP across experts.
// Nothing here loops over, clears or allocates the whole table per step (init_weights, at construction, is the one
// dense pass).
#include "experts/word_experts.h"

#include <algorithm>
#include <omp.h>

#include <climits>

#include "core/error.h"
#include "core/prefetch.h"
#include "core/kernels/cpu/kernels.h"

namespace moe::experts {
namespace {
// Below this many multiply-adds per GEMM pass (rows * C * F) the groups run on one thread: an OpenMP region costs
// more than it saves. Above it the groups are spread over threads; a BLAS call inside the region runs
// single-threaded (OpenMP build of OpenBLAS), so threads never oversubscribe.
constexpr int64_t kParMin = 16384;
// Groups ahead whose rows a thread prefetches: with T threads taking groups one by one, a thread's next group is
// about T further on.
int64_t prefetch_ahead(bool parallel) { return parallel ? std::max(1, omp_get_max_threads()) : 1; }
}  // namespace

WordExpertTable::WordExpertTable(ParamStore& ps, const std::string& prefix, const WordExpertDims& dims) : d_(dims) {
  MOE_CHECK(dims.num_local_experts > 0,
            "word experts '" << prefix << "': num_local_experts must be positive, got " << dims.num_local_experts);
  MOE_CHECK(dims.d_model > 0 && dims.d_expert > 0, "word experts '" << prefix
                                                                    << "': d_model and d_expert must be positive, got "
                                                                    << dims.d_model << ", " << dims.d_expert);
  MOE_CHECK(dims.activation == proto::SWIGLU || dims.activation == proto::GELU,
            "word experts '" << prefix << "': unsupported activation " << int(dims.activation));
  const int64_t E = dims.num_local_experts, C = dims.d_model, F = dims.d_expert;
  auto add = [&](const char* name, const Shape& shape) {
    Param* p = ps.add_row_sparse(prefix + name, shape, /*decay=*/true);
    p->expert_sharded = true;
    return p;
  };
  if (dims.activation == proto::SWIGLU) w_gate_ = add(".w_gate", {E, F, C});
  w_up_ = add(".w_up", {E, F, C});
  w_down_ = add(".w_down", {E, C, F});
}

void WordExpertTable::init_weights(Rng& rng, float std, float down_std) {
  if (w_gate_) init_normal(w_gate_->value, rng, std);
  init_normal(w_up_->value, rng, std);
  init_normal(w_down_->value, rng, down_std);
}

// y[rows,C]; x[rows,C]; experts[G]; offsets[G+1]
void WordExpertTable::forward(float* y, const float* x, const int64_t* experts, const int64_t* offsets,
                              int64_t n_groups) {
  const int64_t E = d_.num_local_experts;
  const int C = d_.d_model, F = d_.d_expert;
  MOE_CHECK(n_groups >= 0, "word experts: negative group count " << n_groups);
  MOE_CHECK(offsets[0] == 0, "word experts: offsets[0] must be 0, got " << offsets[0]);
  for (int64_t g = 0; g < n_groups; ++g) {
    MOE_CHECK(experts[g] >= 0 && experts[g] < E,
              "word experts: group " << g << " names expert " << experts[g] << ", outside [0, " << E << ")");
    const int64_t n = offsets[g + 1] - offsets[g];
    MOE_CHECK(n >= 0 && n <= INT_MAX,
              "word experts: group " << g << " has row range [" << offsets[g] << ", " << offsets[g + 1] << ")");
  }
  // distinct experts: backward lets different groups write gradient rows concurrently
  scratch_.assign(experts, experts + n_groups);
  std::sort(scratch_.begin(), scratch_.end());
  const auto dup = std::adjacent_find(scratch_.begin(), scratch_.end());
  MOE_CHECK(dup == scratch_.end(), "word experts: expert " << *dup << " appears in more than one group");

  x_ = x;
  experts_.assign(experts, experts + n_groups);
  offsets_.assign(offsets, offsets + n_groups + 1);
  const int64_t rows = offsets[n_groups];
  const int64_t FC = int64_t(F) * C;
  float* gate = w_gate_ ? gate_.get(rows * F) : nullptr;       // [rows,F]
  float* up = up_.get(rows * F);                               // [rows,F]
  float* act = act_.get(rows * F);                             // [rows,F]
  const float* wg = w_gate_ ? w_gate_->value.f32() : nullptr;  // [E,F,C]
  const float* wu = w_up_->value.f32();                        // [E,F,C]
  const float* wd = w_down_->value.f32();                      // [E,C,F]

  const bool par = n_groups > 1 && rows * FC > kParMin;
  const int64_t ahead = prefetch_ahead(par);
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t r0 = offsets[g];
    const int n = static_cast<int>(offsets[g + 1] - r0);
    if (n == 0) continue;
    const int64_t e = experts[g];
    // a later expert's row of each table is prefetched just before this expert's GEMM on that table, so the
    // prefetches spread over the group's work (rows scattered over the table: core/prefetch.h)
    const int64_t q = g + ahead < n_groups ? experts[g + ahead] * FC : -1;
    const float* xg = x + r0 * C;  // [n,C]
    float* upg = up + r0 * F;      // [n,F]
    float* actg = act + r0 * F;    // [n,F]
    // up = x Wu^T
    if (q >= 0) prefetch_read(wu + q, FC);
    cpu::matmul(upg, xg, wu + e * FC, n, F, C, false, /*trans_b=*/true);
    if (q >= 0) prefetch_read(wd + q, FC);
    if (gate) {
      // act = silu(x Wg^T) * up
      float* gateg = gate + r0 * F;  // [n,F]
      if (q >= 0) prefetch_read(wg + q, FC);
      cpu::matmul(gateg, xg, wg + e * FC, n, F, C, false, /*trans_b=*/true);
      cpu::swiglu_forward(actg, gateg, upg, int64_t(n) * F);
    } else {
      // act = gelu(up)
      cpu::gelu_forward(actg, upg, int64_t(n) * F);
    }
    // y = act Wd^T
    cpu::matmul(y + r0 * C, actg, wd + e * FC, n, C, F, false, /*trans_b=*/true);
  }
}

// dx[rows,C] written; dy[rows,C]
void WordExpertTable::backward(float* dx, const float* dy) {
  MOE_CHECK(x_ != nullptr, "word experts: backward without a forward");
  const int C = d_.d_model, F = d_.d_expert;
  const int64_t n_groups = static_cast<int64_t>(experts_.size());
  const int64_t rows = offsets_[n_groups];
  const int64_t FC = int64_t(F) * C;
  const float* x = x_;                                         // [rows,C]
  const float* gate = w_gate_ ? gate_.data() : nullptr;        // [rows,F]
  const float* up = up_.data();                                // [rows,F]
  const float* act = act_.data();                              // [rows,F]
  float* dact = dact_.get(rows * F);                           // [rows,F]
  float* dup = dup_.get(rows * F);                             // [rows,F]
  float* dgate = gate ? dgate_.get(rows * F) : nullptr;        // [rows,F]
  const float* wg = w_gate_ ? w_gate_->value.f32() : nullptr;  // [E,F,C]
  const float* wu = w_up_->value.f32();                        // [E,F,C]
  const float* wd = w_down_->value.f32();                      // [E,C,F]
  float* dwg = w_gate_ ? w_gate_->grad.f32() : nullptr;        // [E,F,C]
  float* dwu = w_up_->grad.f32();                              // [E,F,C]
  float* dwd = w_down_->grad.f32();                            // [E,C,F]
  const int64_t* offsets = offsets_.data();
  const int64_t* experts = experts_.data();

  // each group writes the gradient rows of its own expert (distinct, checked in forward) and its own dx rows
  const bool par = n_groups > 1 && rows * FC > kParMin;
  const int64_t ahead = prefetch_ahead(par);
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t r0 = offsets[g];
    const int n = static_cast<int>(offsets[g + 1] - r0);
    if (n == 0) continue;
    const int64_t e = experts[g];
    // a later expert's weight and gradient rows, each prefetched just before this expert's GEMM on that table
    const int64_t q = g + ahead < n_groups ? experts[g + ahead] * FC : -1;
    const float* xg = x + r0 * C;    // [n,C]
    const float* dyg = dy + r0 * C;  // [n,C]
    float* dxg = dx + r0 * C;        // [n,C]
    float* dactg = dact + r0 * F;    // [n,F]
    float* dupg = dup + r0 * F;      // [n,F]
    // dact = dy Wd;  dWd += dy^T act
    if (q >= 0) prefetch_read(wd + q, FC);
    cpu::matmul(dactg, dyg, wd + e * FC, n, F, C, false, false);
    if (q >= 0) prefetch_write(dwd + q, FC);
    cpu::matmul(dwd + e * FC, dyg, act + r0 * F, C, F, n, /*trans_a=*/true, false, 1.0f, 1.0f);
    if (gate) {
      // dgate, dup through silu(gate) * up;  dWg += dgate^T x;  dx = dgate Wg + dup Wu
      float* dgateg = dgate + r0 * F;  // [n,F]
      cpu::swiglu_backward(dgateg, dupg, dactg, gate + r0 * F, up + r0 * F, int64_t(n) * F);
      if (q >= 0) prefetch_write(dwg + q, FC);
      cpu::matmul(dwg + e * FC, dgateg, xg, F, C, n, /*trans_a=*/true, false, 1.0f, 1.0f);
      if (q >= 0) prefetch_read(wg + q, FC);
      cpu::matmul(dxg, dgateg, wg + e * FC, n, C, F, false, false);
      if (q >= 0) prefetch_read(wu + q, FC);
      cpu::matmul(dxg, dupg, wu + e * FC, n, C, F, false, false, 1.0f, 1.0f);
    } else {
      // dup through gelu(up);  dx = dup Wu
      cpu::gelu_backward(dupg, dactg, up + r0 * F, int64_t(n) * F);
      if (q >= 0) prefetch_read(wu + q, FC);
      cpu::matmul(dxg, dupg, wu + e * FC, n, C, F, false, false);
    }
    // dWu += dup^T x
    if (q >= 0) prefetch_write(dwu + q, FC);
    cpu::matmul(dwu + e * FC, dupg, xg, F, C, n, /*trans_a=*/true, false, 1.0f, 1.0f);
  }

  for (int64_t g = 0; g < n_groups; ++g) {
    if (offsets[g + 1] == offsets[g]) continue;  // an empty group leaves its expert's rows (and Adam state) alone
    if (w_gate_) w_gate_->touch_row(experts[g]);
    w_up_->touch_row(experts[g]);
    w_down_->touch_row(experts[g]);
  }
}

}  // namespace moe::experts
