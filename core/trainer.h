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

struct TrainHooks {
  // after backward, before clipping: e.g. the data-parallel gradient all-reduce
  std::function<void(ParamStore&)> reduce_grads;
  // called after step `step` (1-based) finished; `final` on the last step
  std::function<void(int step, bool final)> maybe_checkpoint;
  // called after every step with its record (e.g. an exact loss log)
  std::function<void(const StepRecord&)> on_step;
  // returns true when training should stop after the current step (signals)
  std::function<bool()> should_stop;
  bool print = true;  // print progress lines (rank 0)
  // Data parallelism: this rank trains on rows [shard_rank * B / shard_count, ...) of each global batch of B
  // sequences, and mean_over_ranks turns a rank-local mean (loss) into the global one (identity if unset).
  int shard_rank = 0;
  int shard_count = 1;
  std::function<double(double)> mean_over_ranks;
  // sums a value over the expert-parallel group (global gradient norm over expert shards)
  ShardSum sum_over_expert_group;
};


// Rows [rank * B / count, (rank + 1) * B / count) of a batch of B sequences.
Batch shard_batch(const Batch& b, int rank, int count);

class Trainer {
 public:
  Trainer(const Config& cfg, Model& model, const Corpus& corpus);
  // Runs from `start_step` (0 for a fresh run) to train.steps; returns the per-step records.
  std::vector<StepRecord> run(const TrainHooks& hooks, int start_step = 0);
  // One optimisation step on a batch; returns the training loss.
  StepRecord step(const Batch& batch, int step_index, const TrainHooks& hooks);
  // Mean validation loss over the fixed validation batches (this rank's shard of each, averaged over ranks).
  float evaluate(const TrainHooks& hooks = {});

  AdamW& optimizer() { return opt_; }
  BatchLoader& loader() { return loader_; }
  float last_val_loss() const { return last_val_; }

 private:
  const Config& cfg_;
  Model& model_;
  const Corpus& corpus_;
  AdamW opt_;
  BatchLoader loader_;
  std::vector<Batch> val_;
  float last_val_ = 0;
};

// Samples up to max_new_tokens after `prompt` with temperature / top-k (greedy when temperature == 0),
// using the model's KV cache. Stops at model.max_seq_len.
std::vector<int32_t> generate(Model& model, const std::vector<int32_t>& prompt, const proto::GenerateConfig& g);

}  // namespace moe
