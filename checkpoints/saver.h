// The collective checkpoint saver: every rank writes its own part, rank 0 commits. It is the ONE save path: a
// training run uses it over its world, the one-process ckpt::save (tools, tests) over a comm::SelfCommunicator.
//
//   rank 0                              writes model.h5 (replicated tensors + one virtual dataset per expert tensor)
//                                       and tokenizer.model
//   expert-parallel rank r, replica 0   writes experts_<r>.h5 (its rows of every expert-sharded tensor: parameters,
//   (ranks 0 .. ep-1)                   AdamW moments, per-row step counts); other data-parallel replicas of the
//                                       same shard write nothing (no duplicate writes)
// With SaveState::shard_split = k > 1 each writing rank splits its rows into k equal blocks and writes k shard
// files, experts_<r*k> .. experts_<r*k + k - 1>.h5 (S = ep * k shard files in all): the one-process save writes
// the S = parallel.expert_parallel shards of GLOBAL tensors this way (ep = 1, k = S). A save without sharded
// tensors (a dense model) writes no shard file at all.
//
// Protocol (every call is collective over the world, in the same order on every rank; MPI stays on the calling
// thread, the background writer only does file I/O):
//   1. rank 0 creates step_<N>.tmp/ (removing a stale one); all ranks agree it exists (or all fail)
//   2. each rank writes its files into it (inline, or in a background thread for asynchronous saves)
//   3. all ranks exchange their outcome (error or shard checksums) in one all-gather under the communicator's
//      deadline (parallel.collective_timeout_s); if any rank failed, rank 0 removes step_<N>.tmp and EVERY rank
//      throws an error naming the failed rank(s) and file(s): `latest` still names the previous checkpoint
//   4. rank 0 writes the manifest (with every shard's checksum), fsyncs, renames step_<N>.tmp -> step_<N>,
//      replaces `latest`, applies keep_last; all ranks agree that the commit succeeded (or all fail).
// A rank that dies mid-write (SIGKILL) takes the job down (mpirun ends it); what it leaves is a step_<N>.tmp that
// no reader looks at (`latest` and the step list ignore it) and the next run removes.
//
// Asynchronous saves (checkpoint.async): save() snapshots what this rank writes (a copy into host buffers that are
// reused from save to save, on the training thread) and starts the writer thread; poll(), called once per step,
// does one all-reduce of a "still writing" flag while a save is pending and commits (steps 3-4) as soon as every
// rank's writer is done.
// A new save first commits the pending one (never two in flight); finish() (the final save, the signal/requeue
// path, the end of training) waits for it, so a pending save is always committed before the process exits
// normally. On an error exit the pending save is abandoned (the writer stops at its next dataset, nothing is
// committed).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/parallel.h"
#include "core/tensor.h"
#include "proto/manifest.pb.h"

namespace moe::ckpt {

// One tensor of this rank's state. A replicated tensor is the same on every rank; an expert-sharded one holds
// this rank's rows [ep_rank * El, (ep_rank + 1) * El) of the global [E, ...] tensor. Tensors alias the live
// state (no copy).
struct LocalTensor {
  std::string name;
  Tensor tensor;
  bool sharded = false;
};

// Fault injection for tests of interrupted saves (read from the environment by from_env):
//   MOE_CKPT_FAULT=kill|error|slow
//                               kill: the writer raises SIGKILL on its own process (a crash mid-write);
//                               error: the writer fails as on a disk error (the save must fail on every rank);
//                               slow: the writer sleeps 20 ms before each dataset (keeps an asynchronous save
//                               pending over several steps, e.g. when a stop signal arrives)
//   MOE_CKPT_FAULT_RANK=r       the rank whose writer fails (default 0)
//   MOE_CKPT_FAULT_STEP=s       only the save of step s (default: every save)
//   MOE_CKPT_FAULT_AFTER=k      after that rank has written k datasets of the save (default 0: before the first)
struct SaveFault {
  enum Mode { kNone, kKill, kError, kSlow };
  Mode mode = kNone;
  int rank = 0;
  int64_t step = -1;
  int after = 0;
  static SaveFault from_env();
};

struct SaverOptions {
  std::string root;  // the checkpoint root (train.out_dir/checkpoints)
  bool async = false;
  int keep_last = 0;
  SaveFault fault;
  // called (on the writer's thread) with the path of each file this rank has written and fsynced (tests)
  std::function<void(const std::string& path)> on_file_written;
};

// One save: this rank's state and the manifest fields that do not describe tensors.
struct SaveState {
  int64_t step = 0;
  std::vector<LocalTensor> tensors;           // collect_local_state (same names and order on every rank)
  proto::Manifest manifest;                   // ckpt::base_manifest fields (rank 0 writes it)
  const std::string* tokenizer_blob = nullptr;
  // Shard files per writing rank: its sharded tensors' rows are split into this many equal blocks, block j
  // written as experts_<ep_rank * shard_split + j>.h5 (checked before anything is written)
  int shard_split = 1;
};

class CheckpointSaver {
 public:
  CheckpointSaver(comm::Parallel& par, SaverOptions opt);
  ~CheckpointSaver();  // abandons a pending save (cancels and joins its writer; commits nothing)
  CheckpointSaver(const CheckpointSaver&) = delete;
  CheckpointSaver& operator=(const CheckpointSaver&) = delete;

  // Starts the save of `state`, first committing a pending one. Synchronous (options.async false or wait true):
  // returns after the commit with the checkpoint directory. Asynchronous: returns "" once the snapshot is taken.
  std::string save(SaveState state, bool wait);
  // Commits a pending asynchronous save if every rank's writer has finished; returns its directory or "".
  // Costs one scalar all-reduce while a save is pending, nothing otherwise.
  std::string poll();
  // Waits for a pending save (this rank's writer at most the world deadline) and commits it; "" if none.
  std::string finish();
  bool pending() const { return job_ != nullptr; }
  // Asynchronous saves copy into host buffers kept from one save to the next (fresh pages cost far more than the
  // copy: ~1 s vs 0.02 s for 324 MiB on this VM). prepare() allocates and fills them ahead of the first save
  // (e.g. before training starts); without it the first asynchronous save pays for the allocation. Not
  // collective.
  void prepare(const std::vector<LocalTensor>& tensors);

  struct Job;  // a save in progress (saver.cpp)

 private:
  std::string commit();
  void agree(const std::string& local_error, const std::string& what);
  bool writes(const LocalTensor& t) const;  // does this rank write t (replicated: rank 0; sharded: replica 0)
  Tensor snapshot(const LocalTensor& t);   // a copy of t in its reusable buffer
  comm::Parallel& par_;
  SaverOptions opt_;
  std::shared_ptr<Job> job_;
  std::map<std::string, Tensor> buffers_;  // asynchronous snapshots, by tensor name
};

}  // namespace moe::ckpt
