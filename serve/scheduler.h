// The scheduler of the serving engine (rank 0): iteration-level batching over a paged KV cache spread over the
// ranks. Each engine step it picks, under a token budget (serving.max_batch_tokens), one chunk per sequence to
// run: the next token of each decoding sequence, or the next piece of a prompt (chunked prefill), oldest sequences
// first, then admits waiting ones while the budget, serving.max_running and free KV blocks allow. A sequence lives
// on one rank (attention is data parallel: its KV cache is that rank's); new ones go to the rank with the most
// free blocks. When a sequence needs a block and its rank has none, the newest sequence on that rank is
// preempted: its blocks are freed and it waits to be recomputed (prompt and generated tokens) later: running out
// of KV blocks is never an error. Pure bookkeeping: no model, no communication (serve/engine.h runs the plan).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "serve/sampler.h"

namespace moe::serve {

// The free KV blocks of one rank's cache.
class BlockPool {
 public:
  explicit BlockPool(int num_blocks);
  int total() const { return total_; }
  int free() const { return static_cast<int>(free_.size()); }
  // Appends n blocks to `out` and returns true, or takes none and returns false.
  bool take(int n, std::vector<int32_t>& out);
  void give(std::vector<int32_t>& blocks);  // returns them to the pool; clears `blocks`

 private:
  int total_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
};

struct Sequence {
  int64_t id = 0;               // arrival order: lower is older
  std::vector<int32_t> tokens;  // the prompt, then the generated tokens
  int n_prompt = 0;
  SampleChoice sampling;  // u is drawn per sampled token from rng
  SparqParams sparq;      // the attention of its generated tokens
  Rng rng;
  int computed = 0;             // tokens whose keys and values are in the cache
  int rank = -1;                // the rank holding its cache (-1: not placed)
  std::vector<int32_t> blocks;  // its block table
  int preemptions = 0;
  int generated() const { return static_cast<int>(tokens.size()) - n_prompt; }
};

struct ScheduledChunk {
  Sequence* seq = nullptr;
  int pos0 = 0;         // = seq->computed when scheduled
  int n = 0;            // tokens seq->tokens[pos0, pos0 + n)
  bool sample = false;  // the chunk reaches the last known token: the step samples the next one
};

struct SchedulerOptions {
  int ranks = 1;
  int blocks_per_rank = 0;
  int block_size = 16;
  int max_batch_tokens = 512;
  int max_running = 64;
};

class Scheduler {
 public:
  // Throws when a rank cannot hold even one sequence of max_seq_len positions.
  Scheduler(const SchedulerOptions& o, int max_seq_len);
  void add(std::unique_ptr<Sequence> s);  // waits for admission (in id order)
  // The chunks of the next step (ranks in their chunks' sequences), preempting as needed; empty when there is
  // nothing to run. The sequences stay owned here.
  std::vector<ScheduledChunk> schedule();
  // After a step ran: every chunk's sequence has pos0 + n tokens in the cache.
  void completed(const std::vector<ScheduledChunk>& chunks);
  // Removes a sequence (running or waiting) and frees its blocks.
  void finish(int64_t id);
  Sequence* find(int64_t id);

  int64_t waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t running() const { return static_cast<int64_t>(running_.size()); }
  int64_t preemptions() const { return preemptions_; }
  int blocks_total() const;
  int blocks_free() const;
  const BlockPool& pool(int rank) const { return pools_.at(rank); }
  // every sequence, running then waiting, by id
  std::vector<Sequence*> all();

 private:
  // blocks so that seq holds positions [0, upto); false when its rank ran out (after preempting newer ones) and
  // seq itself was preempted
  bool reserve(Sequence& seq, int upto);
  void preempt(Sequence& victim);
  int pick_rank(int blocks_needed) const;
  int blocks_for(int positions) const { return (positions + o_.block_size - 1) / o_.block_size; }
  SchedulerOptions o_;
  std::vector<BlockPool> pools_;
  std::vector<int> running_on_;  // running sequences per rank
  std::map<int64_t, std::unique_ptr<Sequence>> running_, waiting_;
  int64_t preemptions_ = 0;
};

}  // namespace moe::serve
