#include "experts/dispatcher.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/error.h"

namespace moe::experts {
namespace {
using clk = std::chrono::steady_clock;
double since(clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); }
// Never null, even for zero rows: the expert units use a non-null input pointer as "a forward happened".
float* grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < std::max<int64_t>(n, 1)) v.resize(std::max<int64_t>(n, 1));
  return v.data();
}
}  // namespace

Dispatcher::Dispatcher(comm::Communicator* ep, int num_experts)
    : ep_(ep), P_(ep ? ep->size() : 1), rank_(ep ? ep->rank() : 0), E_(num_experts) {
  MOE_CHECK(E_ > 0 && E_ % P_ == 0, "number of experts " << E_ << " must be divisible by the expert-parallel size "
                                                           << P_);
  El_ = E_ / P_;
  send_counts_.assign(P_, 0);
  recv_counts_.assign(P_, 0);
  all_counts_.assign(static_cast<size_t>(P_) * E_, 0);
  local_offsets_.assign(El_ + 1, 0);
}

const float* Dispatcher::dispatch(const router::DispatchPlan& plan, const float* x, int C) {
  MOE_CHECK(plan.num_experts == E_, "dispatch plan has " << plan.num_experts << " experts, the layer " << E_);
  auto t0 = clk::now();
  plan_rows_ = plan.rows();
  float* perm = grow(permuted_, plan_rows_ * C);
  plan.permute(perm, x, C);
  t_.permute += since(t0);
  for (int r = 0; r < P_; ++r)
    send_counts_[r] = plan.expert_offsets[(r + 1) * El_] - plan.expert_offsets[r * El_];
  // every rank learns how many rows each source sends to each expert (P*E ints: small next to the rows)
  t0 = clk::now();
  if (P_ > 1) {
    ep_->all_gather(plan.counts.data(), all_counts_.data(), sizeof(int32_t) * E_);
  } else {
    std::memcpy(all_counts_.data(), plan.counts.data(), sizeof(int32_t) * E_);
  }
  t_.all_to_all += since(t0);
  // source-major layout of the received rows: for src, for local expert e: all_counts[src][first + e] rows
  std::fill(local_offsets_.begin(), local_offsets_.end(), 0);
  for (int src = 0; src < P_; ++src) {
    int64_t n = 0;
    for (int e = 0; e < El_; ++e) {
      const int32_t c = all_counts_[size_t(src) * E_ + first_local_expert() + e];
      local_offsets_[e + 1] += c;
      n += c;
    }
    recv_counts_[src] = n;
  }
  for (int e = 0; e < El_; ++e) local_offsets_[e + 1] += local_offsets_[e];
  // group_index: source-major row i -> expert-major row
  group_index_.resize(local_offsets_.back());
  std::vector<int64_t> cursor(local_offsets_.begin(), local_offsets_.end() - 1);
  int64_t i = 0;
  for (int src = 0; src < P_; ++src)
    for (int e = 0; e < El_; ++e) {
      const int32_t c = all_counts_[size_t(src) * E_ + first_local_expert() + e];
      for (int32_t j = 0; j < c; ++j) group_index_[i++] = cursor[e]++;
    }
  float* out = grow(grouped_, local_rows() * C);
  forward_move(perm, out, C);
  return out;
}

void Dispatcher::forward_move(const float* rows, float* out, int C) {
  if (P_ == 1) {  // one source: the plan order is already expert-major
    std::memcpy(out, rows, sizeof(float) * plan_rows_ * C);
    return;
  }
  auto t0 = clk::now();
  float* recv = grow(recv_, local_rows() * C);
  ep_->all_to_all_v(rows, send_counts_.data(), recv, recv_counts_.data(), C);
  t_.all_to_all += since(t0);
  t0 = clk::now();
  const int64_t n = local_rows();
#pragma omp parallel for if (n * C > 65536)
  for (int64_t r = 0; r < n; ++r) std::memcpy(out + group_index_[r] * C, recv + r * C, sizeof(float) * C);
  t_.regroup += since(t0);
}

void Dispatcher::backward_move(const float* grouped, float* out, int C) {
  if (P_ == 1) {
    std::memcpy(out, grouped, sizeof(float) * plan_rows_ * C);
    return;
  }
  auto t0 = clk::now();
  const int64_t n = local_rows();
  float* ung = grow(ungrouped_, n * C);
#pragma omp parallel for if (n * C > 65536)
  for (int64_t r = 0; r < n; ++r) std::memcpy(ung + r * C, grouped + group_index_[r] * C, sizeof(float) * C);
  t_.regroup += since(t0);
  t0 = clk::now();
  ep_->all_to_all_v(ung, recv_counts_.data(), out, send_counts_.data(), C);
  t_.all_to_all += since(t0);
}

const float* Dispatcher::combine_rows(const float* y, int C) {
  float* out = grow(back_, plan_rows_ * C);
  backward_move(y, out, C);
  return out;
}

const float* Dispatcher::dispatch_grad(const float* dy, int C) {
  float* out = grow(grad_a_, local_rows() * C);
  forward_move(dy, out, C);
  return out;
}

const float* Dispatcher::combine_grad(const float* dx, int C) {
  float* out = grow(grad_b_, plan_rows_ * C);
  backward_move(dx, out, C);
  return out;
}

}  // namespace moe::experts
