// `moe ckpt` conversions as pure functions over an in-memory checkpoint value; file I/O only at the edges
// (load_all reads a checkpoint, write saves one through ckpt::save; safetensors bytes/files are read and written
// by checkpoints/safetensors.h). launcher/ckpt_tool.cpp is the command line around them.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "checkpoints/model_layout.h"
#include "checkpoints/safetensors.h"
#include "core/config.h"

namespace moe::ckpt {

// A whole checkpoint in memory: the manifest's non-tensor fields (config, step, optimizer step, loader and router
// RNG, world size; its tensor entries are not used), every tensor (GLOBAL shape, with its sharding) and the
// tokenizer bytes.
struct CheckpointValue {
  std::string source;  // where it came from (a checkpoint directory or a safetensors file), for messages
  proto::Manifest manifest;
  std::vector<NamedTensor> tensors;
  std::string tokenizer;
  bool has_tokenizer = false;
  const Config& config() const { return manifest.config(); }
  Config& mutable_config() { return *manifest.mutable_config(); }
};

// Reads (and checksum-verifies) every tensor of the checkpoint at `path` (a step directory or a root with
// `latest`) and its tokenizer. Sharding: format 2 from the entries' shards, format 1 from the model's declarations.
CheckpointValue load_all(const std::string& path);
// Saves `c` under `root` (ckpt::save: S = config.parallel.expert_parallel shard files) recording `world_size`;
// returns the step directory.
std::string write(const std::string& root, const CheckpointValue& c, int world_size);

// ---- checks against the model of a config
// The routing tables (routing/<prefix>, I32) among tensors.
RoutingTables routing_of(const std::vector<NamedTensor>& tensors);
// The problems (empty: none) of parameter shapes `have` (name without params/) against the model of cfg; `where`
// names the source in the messages.
std::vector<std::string> param_problems(const Config& cfg, const std::map<std::string, Shape>& have,
                                        const RoutingTables& routing, const std::string& where);
std::vector<std::string> param_problems(const Config& cfg, const std::vector<NamedTensor>& tensors,
                                        const std::string& where);
// Throws the first problem (and how many more) if any.
void require_consistent(const Config& cfg, const std::vector<NamedTensor>& tensors, const std::string& where);

// ---- pure transforms (each returns the converted value; `where` names the source in errors)
// Multi-head (or n_kv_heads divisible by G) attention -> G kv heads, each the mean of n_kv_heads/G source heads.
CheckpointValue to_gqa(CheckpointValue c, int G, const std::string& where);
// Every dense FFN layer -> an MoE layer of E copies of it, router ~ N(0, 0.01^2) seeded by `seed`. `notes` gets
// the remarks for the user (the upcycled model not reproducing the dense one exactly).
CheckpointValue upcycle(CheckpointValue c, int E, uint64_t seed, const std::string& where,
                        std::vector<std::string>* notes = nullptr);
// The parameters (params/*, not I32) in dtype dt (bf16: round to nearest even); optimizer state unchanged.
CheckpointValue cast(CheckpointValue c, DType dt);
// Without optimizer state (optim/*) and with optimizer step 0.
CheckpointValue drop_optimizer(CheckpointValue c);
// Records parallel.expert_parallel = M (validated: M must divide every expert count) and checks the tensors
// against the config; write() then splits the expert tensors into M shard files.
CheckpointValue reshard(CheckpointValue c, int M);
// Validates the config and the tensors against its model (`where` + " (converted)"), orders the tensors as the
// model registers its parameters (then routing tables, then optimizer state) and sets every tensor's sharding
// from the model's declarations.
CheckpointValue finalize(CheckpointValue c, const std::string& where);

// ---- safetensors
// The parameters as safetensors tensors: params/<name> -> <name>, routing/<prefix> and expert_bias/<prefix> kept
// (the inverse restores them); __metadata__ format=pt,
// moe.step, moe.config (protobuf text of the config).
SafetensorsFile to_safetensors(const CheckpointValue& c);
// The inverse: a step-0 checkpoint value (no optimizer state, no tokenizer) of `st` with config `cfg` (overrides
// already applied; vocab_size 0 is taken from tok_emb.weight; defaults filled and validated). `source` names it.
CheckpointValue from_safetensors(const SafetensorsFile& st, Config cfg, const std::string& source);

}  // namespace moe::ckpt
