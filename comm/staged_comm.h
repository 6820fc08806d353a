// Host-staged collectives on device tensors: a Communicator whose buffers live on a Backend's device (GPU memory
// for "cuda"), over a host communicator (MPI). Each data call copies the device send data to host staging memory
// (page-locked on CUDA: Backend::alloc_host), runs the host communicator's call, and copies the result back.
// Counts stay host arrays, as in every Communicator. This is how ranks that share one GPU talk (NCCL refuses two
// ranks on one device) and the path for device tensors where NCCL cannot run; with NCCL available, one rank per
// GPU uses comm/nccl instead.
#pragma once
#include <memory>

#include "comm/communicator.h"
#include "core/backend.h"

namespace moe::comm {

class StagedCommunicator final : public Communicator {
 public:
  // host: the communicator that moves the staged bytes (its rank, size and groups are this one's); device: where
  // this communicator's buffers live. The deadline of this communicator applies to every host call.
  StagedCommunicator(std::unique_ptr<Communicator> host, Backend& device);
  ~StagedCommunicator() override;
  StagedCommunicator(const StagedCommunicator&) = delete;
  StagedCommunicator& operator=(const StagedCommunicator&) = delete;

  const char* name() const override { return "mpi-staged"; }
  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
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

  Communicator& host() { return *host_; }

 private:
  // Host staging memory of at least `bytes`, kept between calls (grown by doubling).
  struct Staging {
    void* p = nullptr;
    size_t bytes = 0;
  };
  void* stage(Staging& s, size_t bytes);
  Communicator& host_call();  // the host communicator, with this one's deadline
  template <class T>
  void all_reduce_staged(T* buf, size_t n);

  std::unique_ptr<Communicator> host_;
  Backend& dev_;
  Staging send_, recv_;
};

}  // namespace moe::comm
