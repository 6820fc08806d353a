// The state of a training run that a checkpoint captures besides the parameter and optimizer tensors: the step,
// the AdamW step counter, the data loader's position and the FFN units' extra state (learned routers' jitter
// RNGs and balancing biases, word-expert routing tables). One struct, captured from a live run, written into a
// save, read back from a checkpoint and restored: nothing else in the launcher handles these pieces one by one.
//
// The model/optimizer tensors map onto checkpoint datasets here too (keys from checkpoints/naming.h):
//   params/<name>, optim/m/<name>, optim/v/<name>, optim/row_t/<name> (row-sparse params), routing/<layer prefix>,
//   expert_bias/<layer prefix>
// Expert-sharded tensors are written by the expert-parallel rank that owns them and stored with their global shape
// [E, ...]; they are read back as this rank's rows (Param::first_row), so a checkpoint loads at any
// expert-parallel size that divides E.
#pragma once
#include <array>
#include <map>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "core/data.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "core/params.h"
#include "checkpoints/saver.h"
#include "comm/communicator.h"

namespace moe::launcher {

struct RunState {
  int64_t step = 0;
  int64_t optimizer_t = 0;
  std::array<uint64_t, 4> loader_rng{};
  UnitState units;  // by layer prefix: learned routers' jitter RNGs and biases, word-expert routing tables

  static RunState capture(int64_t step, const Model& model, const AdamW& opt, const BatchLoader& loader);
  // The manifest fields, routing tables and router biases of a checkpoint.
  static RunState read(ckpt::Reader& r, const proto::Manifest& m);
  // Restores the optimizer step, the loader position and the units' state; returns the number of FFN units that
  // found no state of theirs (e.g. router RNGs of a checkpoint older than them: they keep their seed's stream).
  int restore(Model& model, AdamW& opt, BatchLoader& loader) const;
  // Fills the manifest fields it owns (step, optimizer step, loader and router RNGs).
  void to_manifest(proto::Manifest& m) const;
  // The routing tables as tensors routing/<prefix> (replicated, i32) and the router biases as expert_bias/<prefix>
  // (replicated, f32).
  std::vector<ckpt::LocalTensor> tensors() const;
};

// This rank's parameters (and optimizer moments if opt) as checkpoint tensors; they alias the live state.
std::vector<ckpt::LocalTensor> collect_local_state(const ParamStore& ps, const AdamW* opt);
// The state of a one-rank model (which holds every expert) as global tensors, for ckpt::save (tools and tests),
// with the given routing tables by layer prefix.
std::vector<ckpt::NamedTensor> collect_state(const ParamStore& ps, const AdamW* opt,
                                             const std::map<std::string, std::vector<int32_t>>& tables = {});
// Loads params (and optimizer state if opt) from the reader; expert-sharded ones read rows [first_row, ...).
void restore_state(ckpt::Reader& r, ParamStore& ps, AdamW* opt);

// The communicator over the model's tensors that the config asks for (comm::Parallel's tensor groups): NCCL when
// parallel.communicator = "nccl" and model.device = DEVICE_CUDA, with parallel.collective_timeout_s as its deadline;
// else null (host groups; a device's tensors staged through host memory). Collective over the MPI job.
std::unique_ptr<comm::Communicator> tensor_world(const Config& cfg);

// A model loaded from a checkpoint for inference (eval, generate, serve): the checkpoint's config (its relative data
// paths resolved against data_dir when given) with `overrides` applied (validated), its tokenizer, weights and
// routing tables. With an expert-parallel group the experts are sharded over it and each rank reads only its rows
// of the expert tensors (any group size dividing the experts, whatever the checkpoint was saved with); without
// one this rank holds every expert.
struct LoadOptions {
  std::vector<std::string> overrides;  // --set path=value
  std::string data_dir;                // relative data paths of the checkpoint's config are relative to this
  comm::Communicator* ep = nullptr;    // the expert-parallel group (serve); null: one rank holds every expert
  comm::Communicator* ep_rows = nullptr;  // the same over the model's tensors (NCCL), or null
  bool inference = false;              // no gradient storage (generate, serve)
};
struct LoadedModel {
  Config cfg;
  std::string dir;
  proto::Manifest manifest;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<Model> model;
};
LoadedModel load_for_inference(const std::string& checkpoint, const LoadOptions& o = {});

}  // namespace moe::launcher
