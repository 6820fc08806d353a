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
//
// Rows live on the workspace's device and move with its backend's token dispatch ops (core/backend.h); the plan's
// index arrays are copied there once per dispatch. The bookkeeping (which experts receive how many rows) stays on the
// host: the exchange's counts are host values anyway. On a device the rows cross ranks over a communicator of device
// buffers (NCCL) when one is given, else through host-staged MPI (comm/staged_comm.h: ranks may share one GPU); the
// (expert, rows) pairs go over the host communicator.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "core/workspace.h"
#include "router/router.h"

namespace moe::experts {

struct DispatchTimings {
  double permute = 0, all_to_all = 0, regroup = 0, combine = 0;  // seconds, accumulated
  void reset() { *this = DispatchTimings(); }
};

// The expert-parallel group of a layer. ep: over host buffers, for the (expert, rows) pairs (null: this rank holds
// every expert). rows: the same ranks over the backend's memory, for the token rows (NCCL between GPUs; its calls
// run on their own stream: the dispatcher synchronises the backend before each); null: ep itself on the CPU, on a
// device a host-staged duplicate of ep (made collectively by the dispatcher).
struct ExpertComm {
  ExpertComm(comm::Communicator* ep = nullptr, comm::Communicator* rows = nullptr)  // NOLINT: a host group alone
      : ep(ep), rows(rows) {}
  comm::Communicator* ep;
  comm::Communicator* rows;
};

class Dispatcher {
 public:
  // ws: where the rows live (its backend moves them). num_experts: global E, divisible by the ep size.
  Dispatcher(Workspace& ws, ExpertComm ep, int num_experts);

  int ep_size() const { return P_; }
  int ep_rank() const { return rank_; }
  int num_local_experts() const { return El_; }
  int first_local_expert() const { return rank_ * El_; }

  // One step's movement of tokens, valid until the next dispatch. The plan and x must stay alive until
  // dispatch_backward (the unit keeps them: its router output and the block's activations).
  class Step {
   public:
    // The rows of the local experts, expert-major: group g is local expert experts()[g] (ascending, ids in
    // [0, num_local_experts)) on rows [offsets()[g], offsets()[g+1]) of rows() [local_rows, C] (on the device; the
    // experts and offsets are host arrays). Only the experts
    // that received rows are listed ((expert, rows) pairs are exchanged, not E counts), so the cost grows with the
    // experts used, not with E: a compact plan (router.h) over 10^5 word experts costs the same as one over the
    // few thousand it uses.
    const float* rows() const { return d_->grouped_.data(); }
    const int32_t* plan_rows() const;  // [N*k] the plan's row_of_slot on the device
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

  Backend& backend() const { return be_; }
  DispatchTimings& timings() { return t_; }
  const DispatchTimings& timings() const { return t_; }

 private:
  int64_t local_rows() const { return group_offsets_.back(); }
  // send plan-ordered rows, receive source-major rows, regroup expert-major into out
  void forward_move(const float* rows, float* out, int C);
  // ungroup expert-major rows, send back, receive plan-ordered rows into out
  void backward_move(const float* grouped, float* out, int C);

  Backend& be_;
  comm::Communicator* ep_;                  // host buffers: the pairs, and the rows on the CPU
  std::unique_ptr<comm::Communicator> rows_ep_;  // device rows with more than one rank: staged over a duplicate of ep
  comm::Communicator* row_comm_ = nullptr;  // the one moving rows: ep_, the given rows' one, or rows_ep_
  bool rows_sync_ = false;  // row_comm_ runs on its own stream: the backend's work is synchronised before each call
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
  std::vector<int32_t> group_index_;                    // [local_rows] source-major row -> expert-major row
  std::vector<int32_t> group_source_;                   // [local_rows] its inverse
  int64_t plan_rows_ = 0;
  // on the device: the plan's order [rows], row_of_slot and gate [N*k] packed; group_index and group_source
  // [local_rows] packed; the row buffers
  Workspace::Buffer &plan_dev_, &group_dev_;
  Workspace::Buffer &permuted_, &recv_, &grouped_, &ungrouped_, &back_, &grad_a_, &grad_b_, &drows_;
  const int32_t* order_dev_ = nullptr;        // the current plan's arrays where the backend reads them
  const int32_t* row_of_slot_dev_ = nullptr;
  const float* gate_dev_ = nullptr;
  const int32_t* group_index_on_ = nullptr;
  const int32_t* group_source_on_ = nullptr;
  DispatchTimings t_;
  Step step_;
};

}  // namespace moe::experts
