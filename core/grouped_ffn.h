// The grouped FFN: the one feed-forward compute of the system. The dense FFN (one group), the MoE expert bank
// (one group per local expert that received rows) and the word-expert table (one group per used row of a huge,
// row-sparse table) all run it. Group g applies weight slot slots[g] to rows [offsets[g], offsets[g+1]) of x:
//   SwiGLU  y = (silu(x Wg^T) * (x Wu^T)) Wd^T        GELU  y = gelu(x Wu^T + bu) Wd^T + bd   (tanh approximation)
// with Wg, Wu [S,F,C], Wd [S,C,F], bu [S,F], bd [S,C] stacked along a leading slot dimension (a dense FFN's
// [F,C] weights are one slot). One GEMM per group and weight matrix, never a per-token loop. Backward is split:
// backward_data (dx) and backward_weights (dW, db), so the weight gradients can be scheduled apart from the
// critical path of dx.
//
// Threads: with many small groups the groups run in parallel under OpenMP (each BLAS call single-threaded in the
// OpenMP build of OpenBLAS); with few or large groups they run one after another and BLAS uses the threads. A
// group's result does not depend on which path ran beyond BLAS rounding.
//
// On a GPU each weight matrix of all groups runs as ONE grouped GEMM (Backend::matmul_grouped), each activation over
// all rows at once, the biases as one row gather-add (Backend::combine_rows) forward and one grouped GEMM of a row of
// ones backward: a handful of launches per layer whatever the number of groups. The batch-invariant inference
// forward runs group by group (set_schedule forces either schedule: the tests run the grouped one on the CPU).
//
// Row-sparse weights (word-expert tables, Param::row_sparse): the weight gradients touch only the slots used,
// registered with Param::touch_row; the next slots' rows are prefetched (they are scattered over a large table).
// Frozen weights (Param::frozen) get no gradient and no touched rows; dx still flows through them.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/packed.h"
#include "core/params.h"
#include "core/workspace.h"
#include "proto/config.pb.h"

namespace moe {

// The parameters of a grouped FFN. SwiGLU: w_gate, w_up, w_down; GELU: w_up, b_up, w_down, b_down (the biases
// may be null: word experts have none).
struct FfnWeights {
  Param* w_gate = nullptr;  // [S,F,C] (SwiGLU)
  Param* w_up = nullptr;    // [S,F,C]
  Param* b_up = nullptr;    // [S,F]   (GELU, optional)
  Param* w_down = nullptr;  // [S,C,F]
  Param* b_down = nullptr;  // [S,C]   (GELU, optional)
};

// A grouped FFN's weights in the inference layout (GroupedFfn::prepare_inference). The grouped FFNs over the same
// weights (the layers of one shared word-expert table) share one, so the table is packed into one copy.
struct PackedFfn {
  explicit PackedFfn(Workspace& ws) : gate(ws), up(ws), down(ws) {}
  PackedWeight gate, up, down;
};

class GroupedFfn {
 public:
  // C: model width, F: hidden width of one slot. Activation buffers come from the workspace.
  // packed: the inference layout shared with the other grouped FFNs over `w` (null: its own).
  GroupedFfn(Workspace& ws, int C, int F, proto::Activation act, const FfnWeights& w,
             std::shared_ptr<PackedFfn> packed = nullptr);

  // y[rows,C] written from x[rows,C], rows = offsets[n_groups]. slots[n_groups]: distinct weight slots in
  // [0, S); offsets[n_groups+1]: offsets[0] = 0, non-decreasing (empty groups allowed, they do nothing). Keeps the
  // layout, the x pointer (x must stay alive and unchanged until backward) and the activations.
  // batch_invariant: the GEMMs run Backend::linear_rows on the packed weights (each row's result independent of the
  // other rows: the inference path; needs prepare_inference) instead of linear_forward.
  void forward(float* y, const float* x, const int64_t* slots, const int64_t* offsets, int64_t n_groups,
               bool batch_invariant = false);
  // dx[rows,C] written from dy[rows,C] of the last forward (keeps the dy pointer and the activation gradients
  // for backward_weights: dy must stay alive until then).
  void backward_data(float* dx, const float* dy);
  // Weight (and bias) gradients accumulated (+=) into the slots of non-empty groups; the other slots are not
  // touched. Row-sparse weights register the slots with touch_row. Frozen params are skipped (nothing written,
  // nothing touched). Exactly once after backward_data.
  void backward_weights();
  void backward(float* dx, const float* dy) {
    backward_data(dx, dy);
    backward_weights();
  }

  // Packs every slot's matrices for the batch-invariant forward, from their current values.
  void prepare_inference();

  // Which GEMM schedule forward (and the backward after it) runs: kAuto = grouped GEMMs on a device, group by group
  // on the CPU; the batch-invariant forward is always group by group.
  enum class Schedule { kAuto, kGrouped, kPerGroup };
  void set_schedule(Schedule s) { schedule_ = s; }

  int d_model() const { return C_; }
  int d_hidden() const { return F_; }
  int64_t num_slots() const { return w_.w_up->value.dim(0); }

 private:
  template <class Fn>
  void for_each_group(const Fn& fn);  // fn(group index, prefetch-ahead group or -1), largest groups first
  // the grouped-GEMM schedule of a device (see above), and its three passes
  bool grouped_gemms(bool batch_invariant) const;
  // One Backend::matmul_grouped call over the non-empty groups g (rows r0.. of n rows, slot s):
  //   grouped_rows     c[r0.., c_width] = a[r0.., a_width] @ op(w[s]) + beta c   (w[s] [c_width,a_width] if trans_b,
  //                    else [a_width,c_width]: the forward's x W^T and the backward's dy W)
  //   grouped_weights  dw[s] [out_width,in_width] += dout[r0.., out_width]^T @ inp[r0.., in_width]
  void grouped_rows(float* c, int c_width, const float* a, int a_width, const float* w, bool trans_b, float beta);
  void grouped_weights(float* dw, const float* dout, int out_width, const float* inp, int in_width);
  // out[r, width] += b[slot of row r's group] over all rows (a null b: nothing)
  void add_group_bias(float* out, const float* b, int width);
  // db[s] [width] += the column sums of dout[r0.., width] over each group's rows (a null db: nothing)
  void grouped_bias_sums(float* db, const float* dout, int width);
  void forward_grouped(float* y, const float* x, float* gate, float* up, float* act);
  void backward_data_grouped(float* dx, const float* dy, float* dact, float* dgate, float* dup);
  void backward_weights_grouped(float* dwg, float* dwu, float* dwd, float* dbu, float* dbd);
  void touch_used_rows();  // row-sparse weights: registers the used slots with touch_row
  bool sparse() const { return w_.w_up->row_sparse; }
  // The matmul of the groups: a row-sparse table's (a word expert's few rows) may sum in another order where that is
  // faster (Backend::matmul_few_rows); the dense FFN's and the expert bank's stay bit for bit sgemm's.
  using Matmul = void (Backend::*)(float*, const float*, const float*, int, int, int, bool, bool, float, float);
  Matmul matmul_of() const { return sparse() ? &Backend::matmul_few_rows : &Backend::matmul; }
  Backend& be_;
  int C_, F_;
  proto::Activation act_;
  FfnWeights w_;
  // saved by forward
  const float* x_ = nullptr;      // [rows,C]
  const float* dy_ = nullptr;     // [rows,C] (backward_data)
  std::vector<int64_t> slots_;    // [G]
  std::vector<int64_t> offsets_;  // [G+1]
  std::vector<int> order_;        // non-empty groups, largest first (the schedule)
  int64_t max_rows_ = 0;          // most rows of one group
  bool parallel_ = false;         // the threading decision of the last forward (backward reuses it)
  bool grouped_ = false;          // the last forward ran the grouped-GEMM schedule (backward follows it)
  Schedule schedule_ = Schedule::kAuto;
  const int32_t* row_slot_ = nullptr;  // grouped schedule with biases: [rows] the slot of each row, on the device
  const float* ones_ = nullptr;        // grouped schedule with biases: [max_rows] ones, on the device
  std::vector<int32_t> slot_of_;       // row_slot_ made on the host
  std::vector<float> ones_host_;       // ones_ made on the host
  std::vector<Backend::GemmGroup> gemms_;  // grouped(): one per non-empty group
  int stage_ = 0;                 // 1: forward done, 2: backward_data done
  // [rows,F]: gate and up pre-activations, activation output; their gradients
  Workspace::Buffer &gate_, &up_, &aout_, &dact_, &dgate_, &dup_;
  Workspace::Buffer& bias_rows_;  // row_slot_ (int32 in float slots) and ones_, packed
  std::shared_ptr<PackedFfn> packed_;  // w_gate, w_up, w_down in the inference layout
};

}  // namespace moe
