// Tests build models the way the system does: through experts::build_model (the one model constructor).
#pragma once
#include <memory>

#include "core/config.h"
#include "core/model.h"
#include "experts/build_model.h"

namespace moe::test {

// A model of `m` with weights drawn from `seed` (train.seed), built by experts::build_model.
inline std::unique_ptr<Model> make_model(const proto::ModelConfig& m, uint64_t seed,
                                         const experts::ModelInputs& in = {}) {
  Config cfg;
  *cfg.mutable_model() = m;
  cfg.mutable_train()->set_seed(seed);
  return experts::build_model(cfg, in);
}

}  // namespace moe::test
