// NCCL backend of the Communicator (CUDA builds only; this header needs neither nccl.h nor CUDA headers).
//
// Data buffers (all_reduce_sum, all_gather, broadcast, all_to_all_v) are DEVICE pointers on this rank's GPU;
// count arrays (all_to_all_counts, the counts of all_to_all_v) are HOST arrays. The communicator has its own CUDA
// stream; each call enqueues there and returns when the work is done, so inputs must be ready before the call
// (synchronise the stream that produced them) and outputs are ready after it.
//
// Bootstrap: collective over an MPI communicator: rank 0 makes the ncclUniqueId, MPI broadcasts it, every rank
// binds one GPU and joins. The NCCL communicator is non-blocking (ncclConfig_t::blocking = 0): every wait polls
// ncclCommGetAsyncError and cudaStreamQuery against the deadline, and on expiry (or an asynchronous NCCL error)
// calls ncclCommAbort: the communicator is then unusable and every later call throws.
// Host-side metadata (the unique id, counts, agreement on setup failures) goes over a duplicate of the MPI
// communicator with the same ranks.
#pragma once
#include <mpi.h>

#include <memory>

#include "comm/communicator.h"

namespace moe::comm {

class NcclCommunicator : public Communicator {
 public:
  // Collective over `bootstrap`. device: the CUDA device of this rank, -1 = (rank on this node) % (visible devices).
  // init_deadline_s: deadline of the setup itself (0: none). A setup failure on any rank throws on every rank.
  static std::unique_ptr<NcclCommunicator> create(MPI_Comm bootstrap, int device = -1, double init_deadline_s = 0);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  const char* name() const override { return "nccl"; }
  int rank() const override;
  int size() const override;
  std::unique_ptr<Communicator> split(int color, int key) override;
  void all_reduce_sum(float* buf, size_t n) override;
  void all_reduce_sum(double* buf, size_t n) override;
  void all_gather(const void* send, void* recv, size_t bytes_per_rank) override;
  void broadcast(void* buf, size_t bytes, int root) override;
  void all_to_all_counts(const int64_t* send_counts, int64_t* recv_counts) override;
  void all_to_all_v(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts,
                    int64_t row_elems) override;
  void barrier() override;
  void barrier_with_deadline(double seconds) override;
  [[noreturn]] void abort(int code) override;

  int device() const;
  void* stream() const;  // the communicator's cudaStream_t

 private:
  struct Impl;
  explicit NcclCommunicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe::comm
