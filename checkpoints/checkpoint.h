// Checkpoints, format version 2: a directory step_<N>/ holding
//   model.h5        the replicated tensors, one plain dataset each (/params/<name>, /optim/m/<name>,
//                   /optim/v/<name>, /optim/row_t/<name>, /routing/<layer prefix>), and for every expert-sharded
//                   tensor an HDF5 virtual dataset with its GLOBAL shape that maps row blocks onto the shard files
//                   by relative file name: h5py (or any HDF5 reader) sees one dataset per global tensor. HDF5
//                   resolves a relative source file next to model.h5 first (then in the working directory), so
//                   the directory can be renamed (step_<N>.tmp -> step_<N>) or moved; an HDF5_VDS_PREFIX
//                   environment variable overrides that. A missing source file reads as fill values (NaN for
//                   f32) in HDF5, so our Reader never reads through the virtual datasets: it reads the shards.
//   experts_<r>.h5  rows [r * E/S, (r + 1) * E/S) of every expert-sharded tensor (S = the expert-parallel size at
//                   save time), a dataset of the same name with the shard's shape, written by expert-parallel
//                   rank r itself (its data-parallel replica 0), so no rank ever holds the whole expert table
//                   (the one-process save below writes all S itself); none when no tensor is sharded
//   manifest.pb + manifest.txt (protobuf: config, layout, step, optimizer step, RNG and data-loader state, every
//                   tensor with its global shape, dtype, CRC-32C and, for a sharded tensor, each shard's file,
//                   rows and CRC-32C), tokenizer.model.
// Written into step_<N>.tmp/, fsynced, renamed; `latest` is replaced atomically; keep-last-K retention.
// Version 1 (before per-rank writes) stored every tensor, experts with their global shape, as a plain dataset in
// model.h5; such checkpoints still load (a version-1 entry has no shards, which version 2 also allows).
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "proto/manifest.pb.h"

namespace moe::ckpt {

constexpr uint32_t kFormatVersion = 2;

// "experts_<shard>.h5"
std::string shard_file_name(int shard);

// One tensor of a checkpoint: its dataset path (e.g. "params/layers.0.attn.wq", checkpoints/naming.h) and its
// value (f32, bf16 or i32, CPU; bf16 is stored as a uint16 dataset with the HDF5 attribute dtype = "bf16"), GLOBAL
// shape. `sharded`: an expert tensor, split by rows into the expert-parallel shard files (a property of the data:
// from the parameter's declaration, Param::expert_sharded, or from a manifest entry having shards).
struct NamedTensor {
  std::string name;
  Tensor tensor;
  bool sharded = false;
};

// Throws unless t can be written to a checkpoint (f32, bf16 or i32, on the CPU); `name` is its dataset.
void check_writable(const Tensor& t, const std::string& name);

// ------------------------------------------------------------------------------------------------ writing blocks
// The building blocks of a save, used by the one save path, checkpoints/saver.h (every rank writes its own files,
// then rank 0 commits; ckpt::save below runs it on one process).

// Rows [row_offset, row_offset + rows) along dim 0 of `tensor`, written as the dataset `name` (rows < 0: all).
struct DatasetWrite {
  std::string name;
  Tensor tensor;
  int64_t row_offset = 0;
  int64_t rows = -1;
};

// An expert-sharded tensor's virtual dataset in model.h5: global shape and dtype; the rows are split into
// `shards` equal blocks, block s being the dataset `name` of shard_file_name(s).
struct VirtualDataset {
  std::string name;
  Shape shape;
  DType dtype = DType::kF32;
  int shards = 1;
};

// Called before each dataset is written, with the number this writer has written so far and the file's path
// (fault injection for tests of interrupted saves).
using BeforeDataset = std::function<void(int written, const std::string& file)>;

// Creates (truncates) the HDF5 file `path`, writes `datasets` then `virtuals` and flushes it; fsyncs it unless
// `sync` is false (the caller then fsyncs it with fsync_file). Returns the CRC-32C of each written dataset's
// bytes, in order. Errors name the file and the dataset.
std::vector<uint32_t> write_h5(const std::string& path, const std::vector<DatasetWrite>& datasets,
                               const std::vector<VirtualDataset>& virtuals = {}, const BeforeDataset& before = {},
                               bool sync = true);

// Writes `bytes` to `path`; fsyncs it unless `sync` is false.
void write_file(const std::string& path, const std::string& bytes, bool sync = true);
// fsync of a file. A writer of several files writes them all first, then fsyncs them: on this VM's disk an fsync
// between large writes made the next writes up to 3x slower (tests with plain write(): 3 files fsynced one by one
// 0.75-3.1 s, fsynced at the end 0.75-0.83 s, one file 0.75-0.80 s, per GiB).
void fsync_file(const std::string& path);

// Manifest entries: a plain dataset in model.h5, or an expert-sharded tensor of shard_crcs.size() equal row
// blocks (global crc32c = the shard checksums combined).
proto::TensorEntry plain_entry(const std::string& name, const Shape& shape, DType dtype, uint32_t crc);
proto::TensorEntry sharded_entry(const std::string& name, const Shape& shape, DType dtype,
                                 const std::vector<uint32_t>& shard_crcs);

// step_<N>.tmp under root: removed if present (a stale interrupted save) and created empty. Returns its path.
std::string begin_save(const std::string& root, int64_t step);
// Writes manifest.txt and manifest.pb (last: its presence marks a complete directory) into step_<N>.tmp, fsyncs
// it, renames it to step_<N>, fsyncs the root, replaces `latest` atomically (temp file + rename + fsync) and
// removes all but the newest keep_last step directories (0: keep all). Returns the final directory.
std::string commit_save(const std::string& root, int64_t step, const proto::Manifest& m, int keep_last);
// Removes step_<N>.tmp (a failed save); never throws.
void abandon_save(const std::string& root, int64_t step) noexcept;
// Removes every step_<N>.tmp directory (and latest.tmp) under root, leftovers of an interrupted save; returns
// their names.
std::vector<std::string> remove_stale_saves(const std::string& root);

// ------------------------------------------------------------------------------------------------ one-process save
struct SaveRequest {
  const Config* config = nullptr;
  int64_t step = 0;
  // GLOBAL tensors; the sharded ones (NamedTensor::sharded) are split into config->parallel().expert_parallel()
  // shard files (the layout an expert-parallel run of that size writes), the others go to model.h5
  std::vector<NamedTensor> tensors;
  int64_t optimizer_t = 0;                     // AdamW step counter
  std::array<uint64_t, 4> loader_rng{};        // data loader position
  std::vector<proto::RngState> router_rng;     // learned routers' jitter streams
  const std::string* tokenizer_blob = nullptr; // optional: SentencePiece model bytes
  int keep_last = 0;                           // 0: keep all
  int world_size = 1;                          // parallel layout at save time
};

// The whole file as bytes; throws naming the path if it cannot be read.
std::string read_file(const std::string& path);

// The manifest fields of a save that do not describe tensors (version, config, step, layout, states, tokenizer).
proto::Manifest base_manifest(const SaveRequest& req);

// Saves under `root` (one process writes every file) and returns the final directory path. It runs the collective
// saver (checkpoints/saver.h) on a single-process communicator: the same writes and commit as a training run.
std::string save(const std::string& root, const SaveRequest& req);

// A checkpoint directory (containing manifest.pb), or a root whose `latest` names one. Throws if neither.
std::string resolve(const std::string& path);

proto::Manifest read_manifest(const std::string& step_dir);

// Reads tensors of one checkpoint. Every read verifies checksums: a plain dataset is read whole, a sharded tensor
// reads (whole) only the shards that overlap the requested rows, each checked against its own checksum.
class Reader {
 public:
  Reader(const std::string& step_dir, const proto::Manifest& manifest);
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;
  bool has(const std::string& name) const;
  Shape shape(const std::string& name) const;  // global shape from the manifest
  // Reads rows [row_offset, row_offset + dst.dim(0)) along dim 0 of the global tensor into dst (same dtype; the
  // other dimensions must match). row_offset 0 with dst of the full shape reads the whole tensor. A bf16 dataset
  // may be read into an f32 dst (converted exactly).
  void read(const std::string& name, Tensor& dst, int64_t row_offset = 0);
  // Number of shards of a tensor (0: a plain dataset), and shard s alone into dst (its stored dtype and shape),
  // checksum-verified; errors name the shard and its file.
  int num_shards(const std::string& name) const;
  void read_shard(const std::string& name, int shard, Tensor& dst);
  // Reads a sharded tensor through its virtual dataset in model.h5 (what h5py sees) and checks it against the
  // global checksum (a broken mapping or a missing shard file reads fill values and fails here).
  void check_virtual(const std::string& name);

 private:
  const proto::TensorEntry& entry(const std::string& name) const;
  int64_t open_file(const std::string& file);  // cached HDF5 handle of a file of the checkpoint
  // reads the dataset `name` of `file` (shape checked) whole into out (shape x stored dtype), verifies crc;
  // `what` is added to error messages (e.g. the shard)
  void read_dataset(const std::string& file, const std::string& name, const Shape& shape, DType stored, void* out,
                    uint32_t crc, const std::string& what);
  std::string dir_;
  const proto::Manifest& m_;
  std::map<std::string, int64_t> files_;
};

}  // namespace moe::ckpt
