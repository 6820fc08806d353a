// Word-expert table (MoWE, Mixture of Word Experts): a token's vocabulary id picks its expert, so a table holds
// very many small FFN experts (E up to ~100k per rank, hidden size F of 8..64) of which a batch touches few.
//
// Each expert e is a bias-free FFN on rows x[n,C]:
//   SwiGLU: y = (silu(x Wg[e]^T) * (x Wu[e]^T)) Wd[e]^T      Wg[e], Wu[e] [F,C], Wd[e] [C,F]
//   GELU:   y = gelu(x Wu[e]^T) Wd[e]^T                         (tanh approximation, as the dense FFN)
// The tables are row-sparse, expert-sharded parameters (core/params.h): row e of every table is expert e. Work per
// step grows with the rows and experts used, never with E: one small GEMM per used expert (OpenBLAS via
// cpu::matmul), OpenMP across experts, gradients accumulated only into the used rows, which are registered with
// Param::touch_row so zero_grad, gradient norms and AdamW cost O(rows used).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/layers.h"
#include "core/params.h"
#include "core/rng.h"
#include "proto/config.pb.h"

namespace moe::experts {

struct WordExpertDims {
  int64_t num_local_experts;     // E: experts held by this rank (rows of each table)
  int d_model;                   // C
  int d_expert;                  // F: hidden size of one word expert
  proto::Activation activation;  // SWIGLU (w_gate, w_up, w_down) or GELU (w_up, w_down)
};

class WordExpertTable {
 public:
  // Registers row-sparse, expert_sharded params (with weight decay): <prefix>.w_gate [E,F,C] (SwiGLU only),
  // <prefix>.w_up [E,F,C], <prefix>.w_down [E,C,F], in that order.
  WordExpertTable(ParamStore& ps, const std::string& prefix, const WordExpertDims& dims);

  // Dense N(0, std^2) init of w_gate then w_up, N(0, down_std^2) of w_down, drawn in that order from rng. Touches
  // the whole table: for construction time only, never per step.
  void init_weights(Rng& rng, float std, float down_std);

  // y[rows,C] = expert_{experts[g]}(x[rows,C]) row range by row range, rows = offsets[n_groups].
  // experts[n_groups]: distinct local expert ids in [0, E), any order; offsets[n_groups+1]: offsets[0] = 0,
  // non-decreasing (an empty group is allowed and does nothing). Keeps the group layout and the activations for
  // backward; x must stay alive (and unchanged) until backward.
  void forward(float* y, const float* x, const int64_t* experts, const int64_t* offsets, int64_t n_groups);

  // dx[rows,C] written from dy[rows,C] of the last forward; parameter gradients accumulated (+=) only into the
  // rows of the experts of non-empty groups, which are registered with touch_row on every table.
  void backward(float* dx, const float* dy);

  const WordExpertDims& dims() const { return d_; }
  Param* w_gate() const { return w_gate_; }  // null for GELU
  Param* w_up() const { return w_up_; }
  Param* w_down() const { return w_down_; }

 private:
  WordExpertDims d_;
  Param* w_gate_ = nullptr;  // [E,F,C]
  Param* w_up_ = nullptr;    // [E,F,C]
  Param* w_down_ = nullptr;  // [E,C,F]
  // saved by forward
  const float* x_ = nullptr;      // [rows,C]
  std::vector<int64_t> experts_;  // [G]
  std::vector<int64_t> offsets_;  // [G+1]
  std::vector<int64_t> scratch_;  // [G] sorted copy of experts (distinctness check)
  Buffer gate_, up_, act_;        // [rows,F] gate pre-activation (SwiGLU), up pre-activation, activation output
  Buffer dact_, dgate_, dup_;     // [rows,F] backward scratch
};

}  // namespace moe::experts
