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

struct TrainHooks {
  // after backward, before clipping: e.g. the data-parallel gradient all-reduce
  std::function<void(ParamStore&)> reduce_grads;
  // called after step `step` (1-based) finished; `final` on the last step
  std::function<void(int step, bool final)> maybe_checkpoint;
  // returns true when training should stop after the current step (signals)
  std::function<bool()> should_stop;
  bool print = true;  // print progress lines (rank 0)
};

struct StepRecord {
  int step;
  float loss;
  float lr;
  double grad_norm;
};

class Trainer {
 public:
  Trainer(const Config& cfg, Model& model, const Corpus& corpus);
  // Runs from `start_step` (0 for a fresh run) to train.steps; returns the per-step records.
  std::vector<StepRecord> run(const TrainHooks& hooks, int start_step = 0);
  // One optimisation step on a batch; returns the training loss.
  StepRecord step(const Batch& batch, int step_index, const TrainHooks& hooks);
  // Mean validation loss over the fixed validation batches.
  float evaluate();

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
