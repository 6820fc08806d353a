// `moe train`: the orchestration of a training run over the process groups (tokenizer, corpus, the model from
// build_model, resume from `latest`, the trainer, checkpoints, the progress line, the exact loss log and the
// metrics stream). Returns the process exit code: 0 when train.steps were done, 3 when a stop signal ended the
// run early after its checkpoint (the requeue code of deploy/slurm/train.sbatch).
#pragma once
#include <string>
#include <vector>

#include "core/config.h"
#include "comm/parallel.h"

namespace moe::launcher {

struct TrainOptions {
  bool resume = false;    // continue from train.out_dir/checkpoints/latest if there is one (else train.init_from)
  int threads = 1;        // OpenMP/OpenBLAS threads of this rank (already set)
  int ranks_on_node = 1;  // ranks sharing this node's memory (the memory check)
  std::string loss_log;   // append "step hexfloat-loss" per step (rank 0)
  std::string metrics;    // append one JSON line per logged step and evaluation (rank 0)
  std::string tensorboard;  // write TensorBoard event files of the same records into this directory (rank 0)
};

// train.init_from (config resolution, before fill_defaults): the model section of `cfg` becomes the one of that
// checkpoint's config (after `moe ckpt convert --to-gqa` its n_kv_heads, ...; the config file's model section is
// replaced), then the `model.*` assignments of `overrides` are applied again on top. Returns the fields in which
// the resulting model differs from the config file's, one "field: file -> checkpoint" line each (for the log);
// "" when init_from is empty or nothing differs.
std::string take_init_model(Config& cfg, const std::vector<std::string>& overrides);

// cfg: resolved (overrides applied, defaults filled), not yet validated.
int run_training(Config cfg, const TrainOptions& opt, comm::Parallel& par);

}  // namespace moe::launcher
