// The training loop: batches -> forward/backward -> (gradient hook) -> clip -> AdamW, with a progress line
// (step, loss, lr, tokens/s, elapsed/ETA) and periodic validation.
#pragma once
#include <functional>
#include <vector>

#include "core/config.h"
#include "core/data.h"
#include "core/model.h"
#include "core/optimizer.h"

namespace moe {

struct StepRecord {
  int step;
  float loss;  // cross-entropy, mean over the global batch
  float lr;
  double grad_norm;
  double router_loss = 0;  // sum of the router aux/z losses added to the objective (this rank)
};

// What a logged step reports (the progress line and the metrics stream): means over the steps since the last
// log, and per FFN layer the router statistics of the last step (scalars averaged over ranks, per-expert loads,
// kept and routed, summed over ranks when the hooks can reduce).
struct LogRecord {
  int step, total;
  double loss, router_loss, lr, grad_norm, tokens_per_s, elapsed_s, eta_s;
  std::vector<double> layer_router_loss;  // [n_layers] (0 for dense layers)
  std::vector<FfnStats> layers;           // [n_layers]
};
struct EvalRecord {
  int step;
  double val_loss;
};

// How a run ended, agreed by every rank: all steps done, or stopped early by a signal (after checkpointing).
struct RunOutcome {
  int last_step = 0;
  bool stopped = false;
  std::vector<StepRecord> records;
};

struct TrainHooks {
  // after backward, before clipping: e.g. the data-parallel gradient all-reduce
  std::function<void(ParamStore&)> reduce_grads;
  // called after step `step` (1-based) finished; `final` on the last step
  std::function<void(int step, bool final)> maybe_checkpoint;
  // called after every step with its record (e.g. an exact loss log)
  std::function<void(const StepRecord&)> on_step;
  // called on every logged step and evaluation (all ranks; the lead writes them: progress line, metrics stream)
  std::function<void(const LogRecord&)> on_log;
  std::function<void(const EvalRecord&)> on_eval;
  // returns true on EVERY rank when training should stop after step `step` (1-based): the stop decision is
  // agreed collectively (launcher StopControl), so all ranks leave the loop after the same step
  std::function<bool(int step)> should_stop;
  // Data parallelism: this rank trains on rows [shard_rank * B / shard_count, ...) of each global batch of B
  // sequences, and mean_over_ranks turns a rank-local mean (loss) into the global one (identity if unset).
  int shard_rank = 0;
  int shard_count = 1;
  std::function<double(double)> mean_over_ranks;
  // sums a value over the expert-parallel group (global gradient norm over expert shards)
  ShardSum sum_over_expert_group;
  // in-place sum over all ranks (router statistics of logged steps, and after every optimizer step the loads of
  // the routers' bias balancing: Model::after_optimizer_step; identity if unset)
  WorldSum sum_over_ranks;
};


// Rows [rank * B / count, (rank + 1) * B / count) of a batch of B sequences.
Batch shard_batch(const Batch& b, int rank, int count);

class Trainer {
 public:
  Trainer(const Config& cfg, Model& model, const Corpus& corpus);
  // Runs from `start_step` (0 for a fresh run) to train.steps or an agreed stop; returns the outcome.
  RunOutcome run(const TrainHooks& hooks, int start_step = 0);
  // One optimisation step on a batch; returns the training loss.
  StepRecord step(const Batch& batch, int step_index, const TrainHooks& hooks);
  // Mean validation loss over the fixed validation batches (this rank's shard of each, averaged over ranks).
  // Evaluation is dropless (FfnContext::training false): a token's loss does not depend on the tokens routed with
  // it, so the result is the same at any world size.
  float evaluate(const TrainHooks& hooks = {});

  AdamW& optimizer() { return opt_; }
  BatchLoader& loader() { return loader_; }
  const AdamW& optimizer() const { return opt_; }
  const BatchLoader& loader() const { return loader_; }
  float last_val_loss() const { return last_val_; }

 private:
  const Config& cfg_;
  Model& model_;
  const Corpus& corpus_;
  AdamW opt_;
  BatchLoader loader_;
  std::vector<Batch> val_;
  float last_val_ = 0;
  LogRecord log_record(int step, int start_step, const std::vector<StepRecord>& window, double window_s,
                       double elapsed_s, const TrainHooks& hooks);
};

// The progress line of a logged step ("step 20/300 | loss ... | router loss ... | expert load 10..90 |
// overload 1.31": the largest routed max/mean load of the learned MoE layers).
std::string progress_line(const LogRecord& r);

}  // namespace moe
