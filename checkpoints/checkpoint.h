// Checkpoints: a directory step_<N>/ with model.h5 (plain HDF5, one dataset per tensor: /params/<name>,
// /optim/m/<name>, /optim/v/<name>), the protobuf manifest (manifest.pb + manifest.txt) and the tokenizer model.
// Written into step_<N>.tmp/, fsynced, renamed; `latest` is replaced atomically; keep-last-K retention.
#pragma once
#include <array>
#include <cstdint>
#include <string>

#include "core/config.h"
#include "core/optimizer.h"
#include "core/params.h"
#include "proto/manifest.pb.h"

namespace moe::ckpt {

constexpr uint32_t kFormatVersion = 1;

struct SaveRequest {
  const Config* config = nullptr;
  int64_t step = 0;
  const ParamStore* params = nullptr;
  AdamW* optimizer = nullptr;                  // optional: moments and step counter
  std::array<uint64_t, 4> loader_rng{};        // data loader position
  const std::string* tokenizer_blob = nullptr; // optional: SentencePiece model bytes
  int keep_last = 0;                           // 0: keep all
};

// Saves under `root` and returns the final directory path.
std::string save(const std::string& root, const SaveRequest& req);

// A checkpoint directory (containing manifest.pb), or a root whose `latest` names one. Throws if neither.
std::string resolve(const std::string& path);

proto::Manifest read_manifest(const std::string& step_dir);

// Loads every parameter of `params` from the checkpoint (shapes must match; checksums verified) and, if
// `optimizer` is given, the moments and step counter.
void load(const std::string& step_dir, const proto::Manifest& manifest, ParamStore& params, AdamW* optimizer);

}  // namespace moe::ckpt
