// `moe eval`: the validation loss of a checkpoint on its data split, and with by_frequency the loss over the whole
// validation split by the training-split frequency rank of the target token (ranks 1-16, 17-256, 257-4096, rarer),
// with a JSON line for scripts (bench/quality.py).
#pragma once
#include <string>
#include <vector>

namespace moe::launcher {

struct EvalOptions {
  std::string checkpoint;
  std::vector<std::string> overrides;
  std::string data_dir;
  int threads = -1;  // -1: the checkpoint's train.threads
  bool by_frequency = false;
};
int run_eval(const EvalOptions& o);

}  // namespace moe::launcher
