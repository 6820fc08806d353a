// The communication layer: a small Communicator interface (rank, size, split, collectives, all-to-all with
// counts, barrier, deadlines) with an MPI backend for CPU buffers and an NCCL backend for GPU buffers
// (comm/nccl, CUDA builds), and the data-parallel x expert-parallel process groups.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace moe::comm {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual const char* name() const = 0;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Ranks with the same color form a new communicator, ordered by key (then by old rank).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // In-place sums over all ranks.
  virtual void all_reduce_sum(float* buf, size_t n) = 0;
  virtual void all_reduce_sum(double* buf, size_t n) = 0;
  // recv[r * bytes_per_rank ...] = rank r's send buffer.
  virtual void all_gather(const void* send, void* recv, size_t bytes_per_rank) = 0;
  virtual void broadcast(void* buf, size_t bytes, int root) = 0;
  // One count per peer: recv_counts[r] = what rank r put in its send_counts[my rank].
  virtual void all_to_all_counts(const int64_t* send_counts, int64_t* recv_counts) = 0;
  // Rows of row_elems floats: send holds send_counts[r] rows for each peer r in rank order, contiguous;
  // recv gets recv_counts[r] rows from each peer r in rank order.
  virtual void all_to_all_v(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts,
                            int64_t row_elems) = 0;
  virtual void barrier() = 0;
  // Aborts the whole job (every rank) with an exit code: one rank's fatal error must not leave the others waiting.
  [[noreturn]] virtual void abort(int code) = 0;

  // Every collective after this call fails with a moe::Error naming the operation if it has not completed
  // within `seconds` (0: wait forever).
  void set_deadline(double seconds) { deadline_s_ = seconds; }
  double deadline() const { return deadline_s_; }
  // A barrier that throws after `seconds` (the pending request is kept and completed by a later barrier call).
  virtual void barrier_with_deadline(double seconds) = 0;

  // The world communicator of the MPI job (MPI must be initialised).
  static std::unique_ptr<Communicator> world();

 protected:
  double deadline_s_ = 0;
};

// world = data_parallel x expert_parallel. Consecutive ranks form one expert-parallel group:
// ep_rank = rank % ep, dp_rank = rank / ep; the data-parallel group of a rank holds the ranks with its ep_rank
// (the replicas of the same expert shard).
struct ProcessGroups {
  std::unique_ptr<Communicator> world, data_parallel, expert_parallel;
  int dp_size = 1, ep_size = 1, dp_rank = 0, ep_rank = 0;
};

// Throws moe::Error naming parallel.expert_parallel when the world size is not divisible by it.
ProcessGroups make_process_groups(Communicator& world, int expert_parallel);

}  // namespace moe::comm
