#include "experts/dispatcher.h"

#include <algorithm>
#include <chrono>
#include <tuple>

#include "comm/staged_comm.h"
#include "core/error.h"

namespace moe::experts {
namespace {
using clk = std::chrono::steady_clock;
double since(clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); }
// Never null, even for zero rows: the expert units use a non-null input pointer as "a forward happened".
float* grow(Workspace::Buffer& b, int64_t n) { return b.get(std::max<int64_t>(n, 1)); }
}  // namespace

Dispatcher::Dispatcher(Workspace& ws, ExpertComm ep, int num_experts)
    : be_(ws.backend()),
      ep_(ep.ep),
      P_(ep.ep ? ep.ep->size() : 1),
      rank_(ep.ep ? ep.ep->rank() : 0),
      E_(num_experts),
      plan_dev_(ws.buffer()),
      group_dev_(ws.buffer()),
      permuted_(ws.buffer()),
      recv_(ws.buffer()),
      grouped_(ws.buffer()),
      ungrouped_(ws.buffer()),
      back_(ws.buffer()),
      grad_a_(ws.buffer()),
      grad_b_(ws.buffer()),
      drows_(ws.buffer()) {
  MOE_CHECK(E_ > 0 && E_ % P_ == 0, "number of experts " << E_ << " must be divisible by the expert-parallel size "
                                                           << P_);
  El_ = E_ / P_;
  send_counts_.assign(P_, 0);
  recv_counts_.assign(P_, 0);
  pair_send_counts_.assign(P_, 0);
  pair_recv_counts_.assign(P_, 0);
  group_offsets_.assign(1, 0);
  row_comm_ = ep.rows ? ep.rows : ep_;
  if (ep.rows) {
    MOE_CHECK(ep.rows->size() == P_ && ep.rows->rank() == rank_,
              "dispatcher: the rows' communicator has rank " << ep.rows->rank() << " of " << ep.rows->size()
                                                             << ", the expert-parallel group " << rank_ << " of "
                                                             << P_);
    rows_sync_ = be_.device() != Device::kCPU;
  } else if (P_ > 1 && be_.device() != Device::kCPU) {  // device rows: host-staged over a duplicate of ep
    rows_ep_ = std::make_unique<comm::StagedCommunicator>(ep_->split(0, ep_->rank()), be_);
    row_comm_ = rows_ep_.get();
  }
}

const int32_t* Dispatcher::Step::plan_rows() const { return d_->row_of_slot_dev_; }

Dispatcher::Step& Dispatcher::dispatch(const router::DispatchPlan& plan, const float* x, int C) {
  MOE_CHECK(plan.global_num_experts() == E_,
            "dispatch plan has " << plan.global_num_experts() << " experts, the layer " << E_);
  auto t0 = clk::now();
  plan_rows_ = plan.rows();
  std::tie(order_dev_, row_of_slot_dev_, gate_dev_) = plan_dev_.upload_all(plan.order, plan.row_of_slot, plan.gate);
  float* perm = grow(permuted_, plan_rows_ * C);
  be_.gather_rows(perm, x, order_dev_, nullptr, static_cast<int>(plan_rows_), plan.k, C);
  // (local expert, rows) of every non-empty plan expert, by destination rank: global ids ascend, so the pairs, and
  // the plan rows, of one destination are contiguous and in ascending expert order
  std::fill(send_counts_.begin(), send_counts_.end(), 0);
  std::fill(pair_send_counts_.begin(), pair_send_counts_.end(), 0);
  send_pairs_.clear();
  for (int i = 0; i < plan.num_experts; ++i) {
    const int32_t c = plan.counts[i];
    if (c == 0) continue;
    const int g = plan.global_id(i), r = g / El_;
    send_pairs_.push_back({g - r * El_, c});
    ++pair_send_counts_[r];
    send_counts_[r] += c;
  }
  t_.permute += since(t0);
  // every rank learns which of its experts each source sends rows to, and how many (pairs, not E counts)
  t0 = clk::now();
  if (P_ > 1) {
    ep_->all_to_all_counts(pair_send_counts_.data(), pair_recv_counts_.data());
    int64_t n = 0;
    for (int r = 0; r < P_; ++r) n += pair_recv_counts_[r];
    recv_pairs_.resize(n);
    ep_->all_to_all_v(reinterpret_cast<const float*>(send_pairs_.data()), pair_send_counts_.data(),
                      reinterpret_cast<float*>(recv_pairs_.data()), pair_recv_counts_.data(), 2);
  } else {
    recv_pairs_ = send_pairs_;
    pair_recv_counts_[0] = static_cast<int64_t>(send_pairs_.size());
  }
  t_.all_to_all += since(t0);
  // groups: the distinct local experts over all sources, ascending
  local_experts_.clear();
  for (const ExpertRows& p : recv_pairs_) {
    MOE_CHECK(p.expert >= 0 && p.expert < El_ && p.rows > 0,
              "dispatcher: a peer sent " << p.rows << " rows for local expert " << p.expert << " (this rank holds "
                                         << El_ << ")");
    local_experts_.push_back(p.expert);
  }
  std::sort(local_experts_.begin(), local_experts_.end());
  local_experts_.erase(std::unique(local_experts_.begin(), local_experts_.end()), local_experts_.end());
  const size_t G = local_experts_.size();
  group_offsets_.assign(G + 1, 0);
  pair_group_.resize(recv_pairs_.size());
  size_t pi = 0;
  for (int src = 0; src < P_; ++src) {
    int64_t n = 0;
    for (int64_t j = 0; j < pair_recv_counts_[src]; ++j, ++pi) {
      const ExpertRows& p = recv_pairs_[pi];
      const size_t g = std::lower_bound(local_experts_.begin(), local_experts_.end(), p.expert) -
                       local_experts_.begin();
      pair_group_[pi] = static_cast<int64_t>(g);
      group_offsets_[g + 1] += p.rows;
      n += p.rows;
    }
    recv_counts_[src] = n;
  }
  for (size_t g = 0; g < G; ++g) group_offsets_[g + 1] += group_offsets_[g];
  // group_index: source-major row i -> expert-major row (each source's rows come in its pairs' order)
  if (P_ > 1) {
    group_index_.resize(local_rows());
    std::vector<int64_t> cursor(group_offsets_.begin(), group_offsets_.end() - 1);
    int64_t i = 0;
    for (size_t q = 0; q < recv_pairs_.size(); ++q)
      for (int32_t j = 0; j < recv_pairs_[q].rows; ++j)
        group_index_[i++] = static_cast<int32_t>(cursor[pair_group_[q]]++);
    group_source_.resize(local_rows());  // the inverse: expert-major row -> source-major row
    for (int64_t r = 0; r < local_rows(); ++r) group_source_[group_index_[r]] = static_cast<int32_t>(r);
    std::tie(group_index_on_, group_source_on_) = group_dev_.upload_all(group_index_, group_source_);
  }
  forward_move(perm, grow(grouped_, local_rows() * C), C);
  step_.d_ = this;
  step_.plan_ = &plan;
  step_.C_ = C;
  step_.y_rows_ = nullptr;
  return step_;
}

void Dispatcher::forward_move(const float* rows, float* out, int C) {
  if (P_ == 1) {  // one source: the plan order is already expert-major
    be_.copy(out, rows, sizeof(float) * plan_rows_ * C);
    return;
  }
  auto t0 = clk::now();
  float* recv = grow(recv_, local_rows() * C);
  if (rows_sync_) be_.sync();
  row_comm_->all_to_all_v(rows, send_counts_.data(), recv, recv_counts_.data(), C);
  t_.all_to_all += since(t0);
  t0 = clk::now();
  be_.gather_rows(out, recv, group_source_on_, nullptr, static_cast<int>(local_rows()), 1, C);
  t_.regroup += since(t0);
}

void Dispatcher::backward_move(const float* grouped, float* out, int C) {
  if (P_ == 1) {
    be_.copy(out, grouped, sizeof(float) * plan_rows_ * C);
    return;
  }
  auto t0 = clk::now();
  float* ung = grow(ungrouped_, local_rows() * C);
  be_.gather_rows(ung, grouped, group_index_on_, nullptr, static_cast<int>(local_rows()), 1, C);
  t_.regroup += since(t0);
  t0 = clk::now();
  if (rows_sync_) be_.sync();
  row_comm_->all_to_all_v(ung, recv_counts_.data(), out, send_counts_.data(), C);
  t_.all_to_all += since(t0);
}

void Dispatcher::Step::combine(float* y, const float* expert_out) {
  float* back = grow(d_->back_, plan_->rows() * C_);
  d_->backward_move(expert_out, back, C_);
  y_rows_ = back;
  const auto t0 = clk::now();
  d_->be_.combine_rows(y, back, d_->row_of_slot_dev_, d_->gate_dev_, plan_->num_tokens, plan_->k, C_, false);
  d_->t_.combine += since(t0);
}

const float* Dispatcher::Step::combine_backward(const float* dy, float* dgate) {
  MOE_CHECK(!dgate || y_rows_, "dispatcher: combine_backward with gate gradients needs combine first");
  const auto t0 = clk::now();
  float* drows = grow(d_->drows_, plan_->rows() * C_);
  Backend& be = d_->be_;
  be.gather_rows(drows, dy, d_->order_dev_, d_->gate_dev_, plan_->rows(), plan_->k, C_);
  if (dgate) be.row_dots(dgate, dy, y_rows_, d_->row_of_slot_dev_, plan_->num_tokens, plan_->k, C_);
  d_->t_.combine += since(t0);
  float* out = grow(d_->grad_a_, local_rows() * C_);
  d_->forward_move(drows, out, C_);
  return out;
}

void Dispatcher::Step::dispatch_backward(float* dx, const float* dexpert_in) {
  float* back = grow(d_->grad_b_, plan_->rows() * C_);
  d_->backward_move(dexpert_in, back, C_);
  const auto t0 = clk::now();
  d_->be_.combine_rows(dx, back, d_->row_of_slot_dev_, nullptr, plan_->num_tokens, plan_->k, C_, true);
  d_->t_.combine += since(t0);
}

}  // namespace moe::experts
