// Checkpoints: a directory step_<N>/ with model.h5 (plain HDF5, one dataset per tensor: /params/<name>,
// /optim/m/<name>, /optim/v/<name>), the protobuf manifest (manifest.pb + manifest.txt) and the tokenizer model.
// Written into step_<N>.tmp/, fsynced, renamed; `latest` is replaced atomically; keep-last-K retention.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "proto/manifest.pb.h"

namespace moe::ckpt {

constexpr uint32_t kFormatVersion = 1;

// One tensor of a checkpoint: its dataset path (e.g. "params/layers.0.attn.wq") and its GLOBAL value (f32, bf16 or
// i32, CPU; bf16 is stored as a uint16 dataset with the HDF5 attribute dtype = "bf16").
// Expert-sharded tensors are saved with their global shape [E, ...]; readers slice rows.
struct NamedTensor {
  std::string name;
  Tensor tensor;
};

struct SaveRequest {
  const Config* config = nullptr;
  int64_t step = 0;
  std::vector<NamedTensor> tensors;
  int64_t optimizer_t = 0;                     // AdamW step counter
  std::array<uint64_t, 4> loader_rng{};        // data loader position
  const std::string* tokenizer_blob = nullptr; // optional: SentencePiece model bytes
  int keep_last = 0;                           // 0: keep all
  int world_size = 1;                          // parallel layout at save time
};

// The whole file as bytes; throws naming the path if it cannot be read.
std::string read_file(const std::string& path);

// Saves under `root` and returns the final directory path.
std::string save(const std::string& root, const SaveRequest& req);

// A checkpoint directory (containing manifest.pb), or a root whose `latest` names one. Throws if neither.
std::string resolve(const std::string& path);

proto::Manifest read_manifest(const std::string& step_dir);

// Reads tensors of one checkpoint. Every read verifies the dataset's checksum (the whole dataset is read).
class Reader {
 public:
  Reader(const std::string& step_dir, const proto::Manifest& manifest);
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;
  bool has(const std::string& name) const;
  Shape shape(const std::string& name) const;  // global shape from the manifest
  // Reads rows [row_offset, row_offset + dst.dim(0)) along dim 0 of the dataset into dst (same dtype; the other
  // dimensions must match). row_offset 0 with dst of the full shape reads the whole tensor. A bf16 dataset may be
  // read into an f32 dst (converted exactly).
  void read(const std::string& name, Tensor& dst, int64_t row_offset = 0);

 private:
  const proto::TensorEntry& entry(const std::string& name) const;
  std::string dir_;
  const proto::Manifest& m_;
  int64_t file_ = -1;
};

}  // namespace moe::ckpt
