// A communicator of one process (size 1, rank 0) that needs no MPI: every collective is the identity (in-place
// sums, broadcast, barrier) or a copy (all_gather, all_to_all_counts, all_to_all_v). One-process tools and tests
// use it to run the same collective code (comm::Parallel, ckpt::CheckpointSaver) without MPI_Init.
#pragma once
#include "comm/communicator.h"

namespace moe::comm {

class SelfCommunicator final : public Communicator {
 public:
  SelfCommunicator() = default;
  const char* name() const override { return "self"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  // A new self communicator (inheriting the deadline), or nullptr for a negative color.
  std::unique_ptr<Communicator> split(int color, int key) override;
  void all_reduce_sum(float* buf, size_t n) override {}
  void all_reduce_sum(double* buf, size_t n) override {}
  void all_gather(const void* send, void* recv, size_t bytes_per_rank) override;
  void broadcast(void* buf, size_t bytes, int root) override;  // root must be 0
  void all_to_all_counts(const int64_t* send_counts, int64_t* recv_counts) override;
  void all_to_all_v(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts,
                    int64_t row_elems) override;
  void barrier() override {}
  [[noreturn]] void abort(int code) override;  // std::_Exit(code)
  void barrier_with_deadline(double seconds) override {}
};

}  // namespace moe::comm
