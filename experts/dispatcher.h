// The token dispatcher of the MoE layer (DESIGN.md steps 2, 3, 5): from a DispatchPlan (rows sorted by global
// expert) to the rows of this rank's local experts and back, across the expert-parallel group.
//
// Experts are sharded in contiguous blocks: rank r of the EP group owns global experts [r*El, (r+1)*El).
// Forward:  plan-ordered rows --all_to_all_v--> source-major rows --regroup--> expert-major rows (local experts)
// Return:   expert-major results --ungroup--> source-major --all_to_all_v--> plan-ordered rows
// The backward pass uses the same two movements for the gradients (dispatch_grad mirrors combine_rows and
// combine_grad mirrors dispatch). One contiguous buffer per direction, grown once to the largest step.
#pragma once
#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "router/router.h"

namespace moe::experts {

struct DispatchTimings {
  double permute = 0, all_to_all = 0, regroup = 0;  // seconds, accumulated
  void reset() { *this = DispatchTimings(); }
};

class Dispatcher {
 public:
  // ep: the expert-parallel communicator (null = single rank). num_experts: global E, divisible by ep size.
  Dispatcher(comm::Communicator* ep, int num_experts);

  int ep_size() const { return P_; }
  int ep_rank() const { return rank_; }
  int num_local_experts() const { return El_; }
  int first_local_expert() const { return rank_ * El_; }

  // Sends the plan's rows x[N,C] (gathered by the plan) to their experts' ranks. Returns the rows of the local
  // experts, expert-major: local expert e owns rows [local_offsets()[e], local_offsets()[e+1]).
  const float* dispatch(const router::DispatchPlan& plan, const float* x /*[N,C]*/, int C);
  const std::vector<int64_t>& local_offsets() const { return local_offsets_; }
  int64_t local_rows() const { return local_offsets_.back(); }
  // Sends expert outputs y[local_rows,C] back; returns them in plan row order [plan.rows(), C].
  const float* combine_rows(const float* y /*[local_rows,C]*/, int C);

  // Backward: gradients of the plan-ordered rows dy[plan.rows(),C] -> expert-major [local_rows, C].
  const float* dispatch_grad(const float* dy /*[rows,C]*/, int C);
  // Backward: gradients of the expert inputs dx[local_rows,C] -> plan-ordered rows [plan.rows(), C].
  const float* combine_grad(const float* dx /*[local_rows,C]*/, int C);

  DispatchTimings& timings() { return t_; }

 private:
  // send plan-ordered rows, receive source-major rows, regroup expert-major into out
  void forward_move(const float* rows, float* out, int C);
  // ungroup expert-major rows, send back, receive plan-ordered rows into out
  void backward_move(const float* grouped, float* out, int C);

  comm::Communicator* ep_;
  int P_, rank_, E_, El_;
  std::vector<int64_t> send_counts_, recv_counts_;   // [P] rows
  std::vector<int32_t> all_counts_;                  // [P*E] per-expert counts of every source rank
  std::vector<int64_t> local_offsets_;               // [El+1]
  std::vector<int64_t> group_index_;                 // [local_rows] source-major row -> expert-major row
  int64_t plan_rows_ = 0;
  std::vector<float> permuted_, recv_, grouped_, ungrouped_, back_, grad_a_, grad_b_;
  DispatchTimings t_;
};

}  // namespace moe::experts
