// Word-expert table (MoWE, Mixture of Word Experts): a token's vocabulary id picks its expert, so a table holds
// very many small FFN experts (E up to ~10^5 per rank, hidden size F of 8..64) of which a batch touches few.
//
// Each expert e is a bias-free FFN on rows x[n,C]:
//   SwiGLU: y = (silu(x Wg[e]^T) * (x Wu[e]^T)) Wd[e]^T      Wg[e], Wu[e] [F,C], Wd[e] [C,F]
//   GELU:   y = gelu(x Wu[e]^T) Wd[e]^T                         (tanh approximation, as the dense FFN)
// The tables are row-sparse, expert-sharded parameters (core/params.h): row e of every table is expert e. The
// compute is the grouped FFN's (core/grouped_ffn.h) with row touching: work per step grows with the rows and
// experts used, never with E, and zero_grad, gradient norms and AdamW cost O(rows used).
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "core/grouped_ffn.h"
#include "core/params.h"
#include "proto/config.pb.h"

namespace moe::experts {

struct WordExpertDims {
  int64_t num_local_experts;     // E: experts held by this rank (rows of each table)
  int d_model;                   // C
  int d_expert;                  // F: hidden size of one word expert
  proto::Activation activation;  // SWIGLU (w_gate, w_up, w_down) or GELU (w_up, w_down)
  int64_t first_expert = 0;      // global row of local row 0
};

// A word-expert table shared by several layers: its parameters (registered by the first layer) and their one
// inference layout.
struct SharedTable {
  FfnWeights weights;
  std::shared_ptr<PackedFfn> packed;
};

class WordExpertTable {
 public:
  // Registers row-sparse, expert-sharded params (with weight decay): <prefix>.w_gate [E,F,C] (SwiGLU only),
  // <prefix>.w_up [E,F,C], <prefix>.w_down [E,C,F], in that order. With `shared` (a table shared by several
  // layers): the first table registers them and stores them in *shared, the next ones compute with the same
  // parameters (gradients accumulate into the same rows) and register nothing; all pack them for inference into
  // the same copy.
  WordExpertTable(ParamStore& ps, Workspace& ws, const std::string& prefix, const WordExpertDims& dims,
                  SharedTable* shared = nullptr);

  // y[rows,C] = expert_{experts[g]}(x[rows,C]) row range by row range (GroupedFfn::forward): experts[n_groups]
  // distinct local expert ids in [0, E), any order; offsets[n_groups+1].
  void forward(float* y, const float* x, const int64_t* experts, const int64_t* offsets, int64_t n_groups,
               bool batch_invariant = false) {
    ffn_->forward(y, x, experts, offsets, n_groups, batch_invariant);
  }
  // dx[rows,C] written; gradients accumulated only into the rows of the experts of non-empty groups, which are
  // registered with touch_row on every table.
  void backward(float* dx, const float* dy) { ffn_->backward(dx, dy); }
  void prepare_inference() { ffn_->prepare_inference(); }  // GroupedFfn::prepare_inference (every row)

  const WordExpertDims& dims() const { return d_; }
  Param* w_gate() const { return w_.w_gate; }  // null for GELU
  Param* w_up() const { return w_.w_up; }
  Param* w_down() const { return w_.w_down; }

 private:
  WordExpertDims d_;
  FfnWeights w_;
  std::unique_ptr<GroupedFfn> ffn_;
};

}  // namespace moe::experts
