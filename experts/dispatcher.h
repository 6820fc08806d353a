// The token dispatcher of the MoE layer (DESIGN.md steps 2 and 4): from a DispatchPlan to the rows of this rank's
// local experts and back, across the expert-parallel group. It owns the whole movement: permute (token copies
// sorted by global expert), the exchange, the regrouping by local expert, and on the way back the reverse
// exchange, unpermute and the gate-weighted combine; each step hands out a Step (dispatch / combine and their
// backwards).
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
  double permute = 0, all_to_all = 0, regroup = 0, combine = 0;  // seconds, accumulated
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

  // One step's movement of tokens, valid until the next dispatch. The plan and x must stay alive until
  // dispatch_backward (the unit keeps them: its router output and the block's activations).
  class Step {
   public:
    // The rows of the local experts, expert-major: group g is local expert experts()[g] (ascending, ids in
    // [0, num_local_experts)) on rows [offsets()[g], offsets()[g+1]) of rows() [local_rows, C]. Only the experts
    // that received rows are listed ((expert, rows) pairs are exchanged, not E counts), so the cost grows with the
    // experts used, not with E: a compact plan (router.h) over 10^5 word experts costs the same as one over the
    // few thousand it uses.
    const float* rows() const { return d_->grouped_.data(); }
    const std::vector<int64_t>& experts() const { return d_->local_experts_; }
    const std::vector<int64_t>& offsets() const { return d_->group_offsets_; }
    int64_t local_rows() const { return d_->group_offsets_.back(); }
    // y[N,C] = sum over each token's kept slots of gate * its expert's output (reverse exchange, unpermute,
    // combine), from the expert outputs [local_rows, C] in rows() order (kept for combine_backward).
    void combine(float* y, const float* expert_out);
    // Backward of combine: returns d(expert outputs) [local_rows, C]; dgate[N*k] written if non-null (needs the
    // expert outputs of combine).
    const float* combine_backward(const float* dy /*[N,C]*/, float* dgate);
    // Backward of dispatch: dx[N,C] += the gradients of the expert inputs dexpert_in [local_rows, C], routed back
    // to their tokens.
    void dispatch_backward(float* dx, const float* dexpert_in);

   private:
    friend class Dispatcher;
    Dispatcher* d_ = nullptr;
    const router::DispatchPlan* plan_ = nullptr;
    int C_ = 0;
    const float* y_rows_ = nullptr;  // expert outputs in plan row order (combine)
  };

  // Sends the plan's rows x[N,C] (gathered by the plan) to their experts' ranks; the returned Step holds them.
  Step& dispatch(const router::DispatchPlan& plan, const float* x /*[N,C]*/, int C);

  DispatchTimings& timings() { return t_; }
  const DispatchTimings& timings() const { return t_; }

 private:
  int64_t local_rows() const { return group_offsets_.back(); }
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
  std::vector<int64_t> group_index_;                    // [local_rows] source-major row -> expert-major row
  int64_t plan_rows_ = 0;
  std::vector<float> permuted_, recv_, grouped_, ungrouped_, back_, grad_a_, grad_b_, drows_;
  DispatchTimings t_;
  Step step_;
};

}  // namespace moe::experts
