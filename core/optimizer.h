// AdamW (decoupled weight decay) over a ParamStore, global-norm gradient clipping, and learning-rate schedules.
#pragma once
#include <functional>
#include <vector>

#include "core/backend.h"
#include "core/params.h"
#include "proto/config.pb.h"

namespace moe {

// Learning rate at `step` (0-based) of `total` steps: linear warmup, then cosine to min_lr, inverse-sqrt, or
// constant.
float lr_at(const proto::OptimizerConfig& cfg, int step, int total);

// Sums a rank-local value over the expert-parallel group (expert-sharded gradients live on different ranks).
using ShardSum = std::function<double(double)>;

// Global L2 norm of all gradients (double accumulation). With expert parallelism pass `sum_shards`: the squares of
// the expert-sharded gradients are summed over the expert-parallel group, so every rank gets the same norm.
// Frozen params (Param::frozen) are left out, here and in clip_grad_norm.
double grad_norm(const ParamStore& ps, const ShardSum& sum_shards = {});
// The factor clipping multiplies the gradients by: max_norm / (norm + 1e-6) when max_norm > 0 and norm exceeds
// it, else 1.
float clip_scale(double norm, double max_norm);
// Scales all gradients by clip_scale(norm, max_norm), so their global norm is at most max_norm. Returns the norm
// before clipping. Every rank must compute the same norm (see grad_norm), or replicated parameters drift apart.
// (The trainer folds the scale into AdamW::step instead: one pass less over the gradients, the same result.)
double clip_grad_norm(ParamStore& ps, double max_norm, const ShardSum& sum_shards = {});

class AdamW {
 public:
  // The moments live, and the update runs (Backend::adamw, adamw_rows), on the parameters' device.
  AdamW(ParamStore& ps, const proto::OptimizerConfig& cfg);
  // One update with learning rate lr. Step counter t is per optimizer (bias correction); row-sparse params
  // update only their touched rows, each row with its own step count (lazy Adam), so the cost of a step grows
  // with the rows used, not the table size. Frozen params (Param::frozen) are skipped: no moments, no weight
  // decay, no row step counts.
  void step(float lr);
  // The same update with every gradient read as grad_scale * grad: bit for bit what scaling the gradients in
  // memory by grad_scale (clip_grad_norm) and then step(lr) gives, without the pass over them.
  void step(float lr, float grad_scale);
  int64_t t() const { return t_; }
  void set_t(int64_t t) { t_ = t; }
  // first and second moments, in ParamStore order (for checkpoints)
  std::vector<Tensor>& m() { return m_; }
  std::vector<Tensor>& v() { return v_; }
  // per-row step counts of row-sparse params (undefined Tensor for dense ones)
  std::vector<Tensor>& row_t() { return row_t_; }

 private:
  ParamStore& ps_;
  proto::OptimizerConfig cfg_;
  Backend& be_;
  std::vector<Tensor> m_, v_, row_t_;
  int64_t t_ = 0;
};

}  // namespace moe
