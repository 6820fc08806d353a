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
  // experts, expert-major: the local experts that received rows are local_experts() (ascending, ids in
  // [0, num_local_experts)), group g owning rows [group_offsets()[g], group_offsets()[g+1]). Only the non-empty
  // experts are exchanged and listed ((expert, rows) pairs), so the cost grows with the experts used, not with E:
  // a compact plan (router.h) over 10^5 word experts costs the same as one over the few thousand it uses.
  const float* dispatch(const router::DispatchPlan& plan, const float* x /*[N,C]*/, int C);
  const std::vector<int64_t>& local_experts() const { return local_experts_; }
  const std::vector<int64_t>& group_offsets() const { return group_offsets_; }
  // The same layout with every local expert (empty ones included): local expert e owns rows
  // [offsets[e], offsets[e+1]) of num_local_experts()+1 offsets. O(num_local_experts): for the MoE expert bank.
  const std::vector<int64_t>& local_offsets();
  int64_t local_rows() const { return group_offsets_.back(); }
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
  struct ExpertRows {  // exchanged as two 32-bit words, sent bit for bit as a 2-"float" row
    int32_t expert;    // local expert id on the receiving rank
    int32_t rows;
  };
  static_assert(sizeof(ExpertRows) == 2 * sizeof(float));
  std::vector<int64_t> send_counts_, recv_counts_;       // [P] rows
  std::vector<int64_t> pair_send_counts_, pair_recv_counts_;  // [P] (expert, rows) pairs
  std::vector<ExpertRows> send_pairs_, recv_pairs_;     // by destination / source, experts ascending within each
  std::vector<int64_t> local_experts_;                  // [G] distinct local experts that received rows, ascending
  std::vector<int64_t> group_offsets_;                  // [G+1]
  std::vector<int64_t> pair_group_;                     // [received pairs] group of each received pair
  std::vector<int64_t> local_offsets_;                  // [El+1] dense view, built on demand
  std::vector<int64_t> group_index_;                    // [local_rows] source-major row -> expert-major row
  int64_t plan_rows_ = 0;
  std::vector<float> permuted_, recv_, grouped_, ungrouped_, back_, grad_a_, grad_b_;
  DispatchTimings t_;
};

}  // namespace moe::experts
