// Expert FFN bank: one GEMM per local expert and weight matrix over the expert's contiguous rows, forward and
// backward side by side (see expert_bank.h).
#include "experts/expert_bank.h"

#include <omp.h>

#include <algorithm>
#include <climits>

#include "core/error.h"
#include "core/kernels/cpu/kernels.h"

namespace moe::experts {
namespace {

// Multiply-adds below which one expert's GEMM gains little from BLAS threads (OpenBLAS itself stays on one
// thread below 65536 * 4 = 262144): there, running different experts on different threads is the only
// parallelism to be had.
constexpr double kSmallGemm = double(1 << 21);

// The threading decision: experts in parallel (each BLAS call single-threaded), or one after another with
// threaded BLAS. Expert-level parallelism wins when the experts are small, or when there are at least as many
// busy experts as threads and none dominates (dynamic scheduling, largest first, then balances the load).
bool choose_expert_parallel(int active, int64_t max_rows, int64_t rows, int C, int F) {
  const int nth = omp_get_max_threads();
  if (nth <= 1 || active < 2 || omp_in_parallel()) return false;
  if (double(max_rows) * C * F <= kSmallGemm) return true;
  return active >= nth && max_rows * nth <= 2 * rows;
}

// Runs fn(e, slot) for every expert in `order` (experts with rows, largest first). slot in [0, threads) names
// the thread, for per-thread scratch; it is 0 on the serial path.
template <class Fn>
void for_each_expert(const std::vector<int>& order, bool parallel, const Fn& fn) {
  const int n = static_cast<int>(order.size());
  if (parallel) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; ++i) fn(order[i], omp_get_thread_num());
  } else {
    for (int i = 0; i < n; ++i) fn(order[i], 0);
  }
}

}  // namespace

ExpertBank::ExpertBank(ParamStore& ps, const std::string& prefix, const ExpertBankDims& dims) : d_(dims) {
  const int64_t E = dims.num_local_experts, C = dims.d_model, F = dims.d_expert;
  MOE_CHECK(E >= 1 && C >= 1 && F >= 1,
            "ExpertBank " << prefix << ": need num_local_experts, d_model, d_expert >= 1, got E=" << E << " C=" << C
                          << " F=" << F);
  MOE_CHECK(dims.activation == proto::SWIGLU || dims.activation == proto::GELU,
            "ExpertBank " << prefix << ": unsupported activation " << int(dims.activation));
  const bool swiglu = dims.activation == proto::SWIGLU;
  if (swiglu) w_gate_ = ps.add(prefix + ".w_gate", {E, F, C}, true);
  w_up_ = ps.add(prefix + ".w_up", {E, F, C}, true);
  if (!swiglu) b_up_ = ps.add(prefix + ".b_up", {E, F}, false);
  w_down_ = ps.add(prefix + ".w_down", {E, C, F}, true);
  if (!swiglu) b_down_ = ps.add(prefix + ".b_down", {E, C}, false);
  for (Param* p : {w_gate_, w_up_, b_up_, w_down_, b_down_})
    if (p) p->expert_sharded = true;
}

void ExpertBank::init_weights(Rng& rng, float std, float down_std) {
  const int E = d_.num_local_experts;
  const int64_t FC = int64_t(d_.d_expert) * d_.d_model;
  std::vector<uint64_t> seeds(E);
  for (auto& s : seeds) s = rng.next_u64();
  // w_gate, w_up, w_down of expert e from its own stream, in that order (w_gate skipped under GELU)
#pragma omp parallel for schedule(dynamic, 1)
  for (int e = 0; e < E; ++e) {
    Rng r(seeds[e]);
    if (w_gate_)
      for (float *w = w_gate_->value.f32() + e * FC, *end = w + FC; w < end; ++w) *w = r.normal() * std;
    for (float *w = w_up_->value.f32() + e * FC, *end = w + FC; w < end; ++w) *w = r.normal() * std;
    for (float *w = w_down_->value.f32() + e * FC, *end = w + FC; w < end; ++w) *w = r.normal() * down_std;
  }
  if (b_up_) b_up_->value.zero_();
  if (b_down_) b_down_->value.zero_();
}

// y[rows,C] = expert_e(x[rows,C]) on each expert's rows offsets[e]..offsets[e+1]
void ExpertBank::forward(float* y, const float* x, const int64_t* offsets) {
  const int E = d_.num_local_experts, C = d_.d_model, F = d_.d_expert;
  MOE_CHECK(offsets[0] == 0, "ExpertBank::forward: offsets[0] must be 0, got " << offsets[0]);
  offsets_.assign(offsets, offsets + E + 1);
  order_.clear();
  max_rows_ = 0;
  for (int e = 0; e < E; ++e) {
    const int64_t n = offsets_[e + 1] - offsets_[e];
    MOE_CHECK(n >= 0 && n <= INT_MAX, "ExpertBank::forward: expert " << e << " has rows " << offsets_[e] << ".."
                                                                      << offsets_[e + 1]);
    if (n > 0) order_.push_back(e);
    max_rows_ = std::max(max_rows_, n);
  }
  std::stable_sort(order_.begin(), order_.end(), [&](int a, int b) {
    return offsets_[a + 1] - offsets_[a] > offsets_[b + 1] - offsets_[b];
  });
  const int64_t rows = offsets_[E];
  x_ = x;
  saved_ = true;
  expert_parallel_ = choose_expert_parallel(static_cast<int>(order_.size()), max_rows_, rows, C, F);

  const int64_t FC = int64_t(F) * C;
  float* gate = d_.activation == proto::SWIGLU ? gate_.get(rows * F) : nullptr;  // [rows,F]
  float* up = up_.get(rows * F);                                                  // [rows,F]
  float* act = act_out_.get(rows * F);                                            // [rows,F]
  for_each_expert(order_, expert_parallel_, [&](int e, int) {
    const int64_t r0 = offsets_[e];
    const int n = static_cast<int>(offsets_[e + 1] - r0);
    const float* xe = x + r0 * C;  // [n,C]
    float* ue = up + r0 * F;       // [n,F]
    float* ae = act + r0 * F;      // [n,F]
    float* ye = y + r0 * C;        // [n,C]
    if (d_.activation == proto::SWIGLU) {
      float* ge = gate + r0 * F;  // [n,F]
      cpu::linear_forward(ge, xe, w_gate_->value.f32() + e * FC, nullptr, n, C, F);
      cpu::linear_forward(ue, xe, w_up_->value.f32() + e * FC, nullptr, n, C, F);
      cpu::swiglu_forward(ae, ge, ue, int64_t(n) * F);
      cpu::linear_forward(ye, ae, w_down_->value.f32() + e * FC, nullptr, n, F, C);
    } else {
      cpu::linear_forward(ue, xe, w_up_->value.f32() + e * FC, b_up_->value.f32() + int64_t(e) * F, n, C, F);
      cpu::gelu_forward(ae, ue, int64_t(n) * F);
      cpu::linear_forward(ye, ae, w_down_->value.f32() + e * FC, b_down_->value.f32() + int64_t(e) * C, n, F, C);
    }
  });
}

// dx[rows,C] written; the grads of experts with rows accumulated
void ExpertBank::backward(float* dx, const float* dy) {
  MOE_CHECK(saved_, "ExpertBank::backward: no forward activations (backward must follow exactly one forward)");
  saved_ = false;
  const int C = d_.d_model, F = d_.d_expert;
  const int64_t FC = int64_t(F) * C;
  const int slots = expert_parallel_ ? omp_get_max_threads() : 1;
  const int64_t slot_size = max_rows_ * F;
  float* dgate = d_.activation == proto::SWIGLU ? dgate_.get(slots * slot_size) : nullptr;  // [slots][max_rows,F]
  float* dup = dup_.get(slots * slot_size);                                                 // [slots][max_rows,F]
  const float* up = up_.data();  // [rows,F]
  float* act = act_out_.data();   // [rows,F], becomes d(act)
  for_each_expert(order_, expert_parallel_, [&](int e, int slot) {
    const int64_t r0 = offsets_[e];
    const int n = static_cast<int>(offsets_[e + 1] - r0);
    const float* xe = x_ + r0 * C;         // [n,C]
    const float* dye = dy + r0 * C;        // [n,C]
    float* dxe = dx + r0 * C;              // [n,C]
    const float* ue = up + r0 * F;         // [n,F]
    float* ae = act + r0 * F;              // [n,F]
    float* dupe = dup + slot * slot_size;  // [n,F]
    const float* wd = w_down_->value.f32() + e * FC;
    // w_down: its grads read act first, then d(act) = dy Wd overwrites act in place
    float* dbd = b_down_ ? b_down_->grad.f32() + int64_t(e) * C : nullptr;
    cpu::linear_backward(nullptr, w_down_->grad.f32() + e * FC, dbd, dye, ae, wd, n, F, C);
    cpu::matmul(ae, dye, wd, n, F, C, false, false);
    const float* dae = ae;  // [n,F] d(act)
    if (d_.activation == proto::SWIGLU) {
      const float* ge = gate_.data() + r0 * F;  // [n,F]
      float* dge = dgate + slot * slot_size;    // [n,F]
      const float* wg = w_gate_->value.f32() + e * FC;
      const float* wu = w_up_->value.f32() + e * FC;
      cpu::swiglu_backward(dge, dupe, dae, ge, ue, int64_t(n) * F);
      // dx = dgate Wg + dup Wu
      cpu::linear_backward(dxe, w_gate_->grad.f32() + e * FC, nullptr, dge, xe, wg, n, C, F);
      cpu::linear_backward(nullptr, w_up_->grad.f32() + e * FC, nullptr, dupe, xe, wu, n, C, F);
      cpu::matmul(dxe, dupe, wu, n, C, F, false, false, 1.0f, 1.0f);
    } else {
      cpu::gelu_backward(dupe, dae, ue, int64_t(n) * F);
      cpu::linear_backward(dxe, w_up_->grad.f32() + e * FC, b_up_->grad.f32() + int64_t(e) * F, dupe, xe,
                           w_up_->value.f32() + e * FC, n, C, F);
    }
  });
}

}  // namespace moe::experts
