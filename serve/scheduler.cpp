#include "serve/scheduler.h"

#include <algorithm>

#include "core/error.h"

namespace moe::serve {

BlockPool::BlockPool(int num_blocks) : total_(num_blocks) {
  MOE_CHECK(num_blocks > 0, "KV block pool: " << num_blocks << " blocks");
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 handed out first
}

bool BlockPool::take(int n, std::vector<int32_t>& out) {
  if (n > free()) return false;
  for (int i = 0; i < n; ++i) {
    out.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void BlockPool::give(std::vector<int32_t>& blocks) {
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) free_.push_back(*it);
  blocks.clear();
}

Scheduler::Scheduler(const SchedulerOptions& o, int max_seq_len) : o_(o), running_on_(o.ranks, 0) {
  MOE_CHECK(o.ranks > 0 && o.block_size > 0 && o.max_batch_tokens > 0 && o.max_running > 0,
            "scheduler: ranks " << o.ranks << ", block size " << o.block_size << ", max_batch_tokens "
                                << o.max_batch_tokens << ", max_running " << o.max_running << " must be positive");
  MOE_CHECK(o.blocks_per_rank >= blocks_for(max_seq_len),
            "the KV cache of a rank holds "
                << o.blocks_per_rank << " blocks of " << o.block_size
                << " positions, fewer than one sequence of model.max_seq_len = " << max_seq_len << " needs ("
                << blocks_for(max_seq_len) << "): raise serving.kv_cache_bytes");
  for (int r = 0; r < o.ranks; ++r) pools_.emplace_back(o.blocks_per_rank);
}

void Scheduler::add(std::unique_ptr<Sequence> s) {
  MOE_CHECK(s && !s->tokens.empty(), "scheduler: a sequence needs at least one token");
  s->rank = -1;
  s->computed = 0;
  const int64_t id = s->id;
  MOE_CHECK(!running_.count(id) && waiting_.emplace(id, std::move(s)).second,
            "scheduler: sequence " << id << " added twice");
}

Sequence* Scheduler::find(int64_t id) {
  if (auto it = running_.find(id); it != running_.end()) return it->second.get();
  if (auto it = waiting_.find(id); it != waiting_.end()) return it->second.get();
  return nullptr;
}

std::vector<Sequence*> Scheduler::all() {
  std::vector<Sequence*> out;
  for (auto& [id, s] : running_) out.push_back(s.get());
  for (auto& [id, s] : waiting_) out.push_back(s.get());
  return out;
}

int Scheduler::blocks_total() const { return o_.ranks * o_.blocks_per_rank; }

int Scheduler::blocks_free() const {
  int n = 0;
  for (const BlockPool& p : pools_) n += p.free();
  return n;
}

void Scheduler::preempt(Sequence& v) {
  pools_[v.rank].give(v.blocks);
  --running_on_[v.rank];
  v.rank = -1;
  v.computed = 0;  // recomputed from its first token (prompt and generated) when admitted again
  ++v.preemptions;
  ++preemptions_;
  auto it = running_.find(v.id);
  waiting_.emplace(v.id, std::move(it->second));
  running_.erase(it);
}

bool Scheduler::reserve(Sequence& s, int upto) {
  const int need = blocks_for(upto) - static_cast<int>(s.blocks.size());
  if (need <= 0) return true;
  BlockPool& pool = pools_[s.rank];
  while (pool.free() < need) {
    Sequence* victim = nullptr;  // the newest running sequence on this rank (s itself at worst)
    for (auto it = running_.rbegin(); it != running_.rend() && !victim; ++it)
      if (it->second->rank == s.rank) victim = it->second.get();
    preempt(*victim);
    if (victim == &s) return false;
  }
  pool.take(need, s.blocks);
  return true;
}

int Scheduler::pick_rank(int blocks_needed) const {
  int best = -1;
  for (int r = 0; r < o_.ranks; ++r) {
    if (pools_[r].free() < blocks_needed) continue;
    if (best < 0 || pools_[r].free() > pools_[best].free() ||
        (pools_[r].free() == pools_[best].free() && running_on_[r] < running_on_[best]))
      best = r;
  }
  return best;
}

std::vector<ScheduledChunk> Scheduler::schedule() {
  std::vector<ScheduledChunk> out;
  int budget = o_.max_batch_tokens;
  std::vector<int64_t> ids;  // oldest first; preemption below moves newer ones out of running_
  for (auto& [id, s] : running_) ids.push_back(id);
  for (int64_t id : ids) {
    auto it = running_.find(id);
    if (it == running_.end()) continue;
    if (budget == 0) break;
    Sequence& s = *it->second;
    const int known = static_cast<int>(s.tokens.size());
    const int n = std::min(known - s.computed, budget);
    if (n <= 0 || !reserve(s, s.computed + n)) continue;
    out.push_back({&s, s.computed, n, s.computed + n == known});
    budget -= n;
  }
  while (budget > 0 && !waiting_.empty() && running() < o_.max_running) {
    auto it = waiting_.begin();
    Sequence& s = *it->second;
    const int known = static_cast<int>(s.tokens.size());
    const int n = std::min(known, budget);
    const int r = pick_rank(blocks_for(n));
    if (r < 0) break;  // no rank has room for its first chunk now
    s.rank = r;
    s.computed = 0;
    pools_[r].take(blocks_for(n), s.blocks);
    ++running_on_[r];
    running_.emplace(s.id, std::move(it->second));
    waiting_.erase(it);
    out.push_back({&s, 0, n, n == known});
    budget -= n;
  }
  return out;
}

void Scheduler::completed(const std::vector<ScheduledChunk>& chunks) {
  for (const ScheduledChunk& c : chunks) c.seq->computed = c.pos0 + c.n;
}

void Scheduler::finish(int64_t id) {
  if (auto it = running_.find(id); it != running_.end()) {
    pools_[it->second->rank].give(it->second->blocks);
    --running_on_[it->second->rank];
    running_.erase(it);
    return;
  }
  waiting_.erase(id);
}

}  // namespace moe::serve
