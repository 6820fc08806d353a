// Expert FFN bank: the compute of step 3 of the MoE layer (DESIGN.md), on the grouped FFN (core/grouped_ffn.h).
// The E local experts' weights are stacked along a leading expert dimension (expert-sharded parameters: local
// expert e is global expert first_expert + e); the input rows arrive grouped by local expert (the dispatcher's
// layout) and every expert runs one GEMM per weight matrix over its contiguous rows. Each expert computes exactly
// what DenseFfn (core/layers.h) computes:
//   SwiGLU  y = (silu(x Wg^T) * (x Wu^T)) Wd^T        GELU  y = gelu(x Wu^T + bu) Wd^T + bd   (tanh approximation)
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "core/grouped_ffn.h"
#include "core/params.h"
#include "proto/config.pb.h"

namespace moe::experts {

struct ExpertBankDims {
  int num_local_experts;  // E: experts held by this rank
  int d_model;            // C
  int d_expert;           // F: hidden size of each expert
  proto::Activation activation;
  int64_t first_expert = 0;  // global id of local expert 0
};

class ExpertBank {
 public:
  // Registers, all expert-sharded (dim 0 = local expert):
  //   <prefix>.w_gate [E,F,C]   (SwiGLU only)
  //   <prefix>.w_up   [E,F,C]
  //   <prefix>.b_up   [E,F]     (GELU only, no weight decay)
  //   <prefix>.w_down [E,C,F]
  //   <prefix>.b_down [E,C]     (GELU only, no weight decay)
  ExpertBank(ParamStore& ps, Workspace& ws, const std::string& prefix, const ExpertBankDims& dims);

  // y[rows,C] from x[rows,C] grouped by local expert: group g is local expert experts[g] on rows
  // [offsets[g], offsets[g+1]) (the dispatcher's local_experts / group_offsets). See GroupedFfn::forward.
  void forward(float* y, const float* x, const int64_t* experts, const int64_t* offsets, int64_t n_groups,
               bool batch_invariant = false) {
    ffn_->forward(y, x, experts, offsets, n_groups, batch_invariant);
  }
  // The same with every local expert as a group: offsets[E+1] (offsets[0] == 0, non-decreasing).
  void forward(float* y, const float* x, const int64_t* offsets);
  // dx[rows,C] written from dy[rows,C]; the grads of experts with rows accumulated (+=).
  void backward(float* dx, const float* dy) { ffn_->backward(dx, dy); }
  void prepare_inference() { ffn_->prepare_inference(); }  // GroupedFfn::prepare_inference

  const ExpertBankDims& dims() const { return d_; }

 private:
  ExpertBankDims d_;
  std::unique_ptr<GroupedFfn> ffn_;
};

}  // namespace moe::experts
