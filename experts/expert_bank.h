// Expert FFN bank: the compute of step 4 of the MoE layer (DESIGN.md). The E local experts' weights are stacked
// along a leading expert dimension; the input rows arrive grouped by local expert (rows offsets[e]..offsets[e+1]
// belong to expert e, as the dispatcher lays them out), and every expert runs one BLAS call per weight matrix over
// its contiguous rows, never a per-token loop. Forward and backward sit side by side; each expert computes exactly
// what DenseFfn (core/layers.h) computes:
//   SwiGLU  y = (silu(x Wg^T) * (x Wu^T)) Wd^T        GELU  y = gelu(x Wu^T + bu) Wd^T + bd   (tanh approximation)
//
// Threads: with many small experts the per-expert GEMMs of different experts run in parallel under OpenMP (the
// OpenMP build of OpenBLAS then runs each call single-threaded); with few or large experts they run one after
// another and BLAS uses the threads. Per-expert results do not depend on which path ran beyond BLAS rounding.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/layers.h"
#include "core/params.h"
#include "core/rng.h"
#include "proto/config.pb.h"

namespace moe::experts {

struct ExpertBankDims {
  int num_local_experts;  // E: experts held by this rank
  int d_model;            // C
  int d_expert;           // F: hidden size of each expert
  proto::Activation activation;
};

class ExpertBank {
 public:
  // Registers, all expert_sharded (dim 0 = local expert):
  //   <prefix>.w_gate [E,F,C]   (SwiGLU only)
  //   <prefix>.w_up   [E,F,C]
  //   <prefix>.b_up   [E,F]     (GELU only, no weight decay)
  //   <prefix>.w_down [E,C,F]
  //   <prefix>.b_down [E,C]     (GELU only, no weight decay)
  ExpertBank(ParamStore& ps, const std::string& prefix, const ExpertBankDims& dims);

  // y[rows,C] written from x[rows,C] grouped by local expert: offsets[E+1], offsets[0] == 0, non-decreasing,
  // rows = offsets[E]. Keeps the x pointer (x must stay alive until backward), a copy of offsets and the
  // activations for backward. Experts with zero rows are skipped.
  void forward(float* y, const float* x, const int64_t* offsets);
  // dx[rows,C] written from dy[rows,C] (rows and grouping of the last forward); parameter grads accumulated (+=)
  // for the experts that got rows; the grads of experts with zero rows are not touched. Consumes the saved
  // activations: exactly one backward per forward (a second one throws).
  void backward(float* dx, const float* dy);

  // w_gate, w_up ~ N(0, std), w_down ~ N(0, down_std), biases 0. Draws one seed per local expert from rng (E draws,
  // in expert order) and fills expert e's matrices from its own Rng(seed): expert e's weights depend only on the
  // rng state and e (not on E or on the thread count). Exactly E values are drawn, so a rank holding global experts
  // g0..g0+E-1 gets the weights a single rank holding all experts would: skip g0 draws (rng.next_u64()) first.
  void init_weights(Rng& rng, float std, float down_std);

  const ExpertBankDims& dims() const { return d_; }

 private:
  ExpertBankDims d_;
  Param *w_gate_ = nullptr, *w_up_ = nullptr, *b_up_ = nullptr, *w_down_ = nullptr, *b_down_ = nullptr;
  // saved by forward for backward
  const float* x_ = nullptr;       // [rows,C]
  std::vector<int64_t> offsets_;   // [E+1]; empty before the first forward
  int64_t max_rows_ = 0;           // most rows of one expert
  std::vector<int> order_;         // experts with rows, largest first (the schedule of the parallel path)
  bool saved_ = false;             // forward ran and its activations are still intact
  bool expert_parallel_ = false;   // the threading decision of the last forward (backward reuses it)
  // Grown to the largest size seen and reused across steps. gate_, up_, act_out_ [rows,F] hold the forward
  // activations; backward overwrites act_out_ with d(act) once the w_down gradient has read it. dgate_, dup_ are
  // backward scratch, one slot of [max rows of one expert, F] per thread that may work on an expert at once.
  Buffer gate_, up_, act_out_, dgate_, dup_;
};

}  // namespace moe::experts
