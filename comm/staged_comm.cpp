#include "comm/staged_comm.h"

#include <algorithm>
#include <cstdlib>
#include <numeric>

#include "core/error.h"

namespace moe::comm {

StagedCommunicator::StagedCommunicator(std::unique_ptr<Communicator> host, Backend& device)
    : host_(std::move(host)), dev_(device) {
  MOE_CHECK(host_, "StagedCommunicator: no host communicator");
  set_deadline(host_->deadline());
}

StagedCommunicator::~StagedCommunicator() {
  dev_.free_host(send_.p);
  dev_.free_host(recv_.p);
}

void* StagedCommunicator::stage(Staging& s, size_t bytes) {
  if (bytes > s.bytes) {
    const size_t grown = std::max(bytes, 2 * s.bytes);
    void* p = dev_.alloc_host(grown);  // first: on failure the old buffer stays
    dev_.free_host(s.p);
    s = {p, grown};
  }
  return s.p;
}

Communicator& StagedCommunicator::host_call() {
  host_->set_deadline(deadline());
  return *host_;
}

std::unique_ptr<Communicator> StagedCommunicator::split(int color, int key) {
  auto child = host_call().split(color, key);  // inherits this deadline, and the staged child takes the host's
  if (!child) return nullptr;
  return std::make_unique<StagedCommunicator>(std::move(child), dev_);
}

template <class T>
void StagedCommunicator::all_reduce_staged(T* buf, size_t n) {
  T* h = static_cast<T*>(stage(send_, n * sizeof(T)));
  dev_.to_host(h, buf, n * sizeof(T));
  host_call().all_reduce_sum(h, n);
  dev_.from_host(buf, h, n * sizeof(T));
}

void StagedCommunicator::all_reduce_sum(float* buf, size_t n) { all_reduce_staged(buf, n); }
void StagedCommunicator::all_reduce_sum(double* buf, size_t n) { all_reduce_staged(buf, n); }

void StagedCommunicator::all_gather(const void* send, void* recv, size_t bytes_per_rank) {
  const size_t total = bytes_per_rank * static_cast<size_t>(size());
  void* hs = stage(send_, bytes_per_rank);
  void* hr = stage(recv_, total);
  dev_.to_host(hs, send, bytes_per_rank);
  host_call().all_gather(hs, hr, bytes_per_rank);
  dev_.from_host(recv, hr, total);
}

void StagedCommunicator::broadcast(void* buf, size_t bytes, int root) {
  void* h = stage(send_, bytes);
  if (rank() == root) dev_.to_host(h, buf, bytes);
  host_call().broadcast(h, bytes, root);
  if (rank() != root) dev_.from_host(buf, h, bytes);
}

void StagedCommunicator::all_to_all_counts(const int64_t* send_counts, int64_t* recv_counts) {
  host_call().all_to_all_counts(send_counts, recv_counts);  // host arrays already
}

void StagedCommunicator::all_to_all_v(const float* send, const int64_t* send_counts, float* recv,
                                      const int64_t* recv_counts, int64_t row_elems) {
  const int P = size();
  const size_t row_bytes = sizeof(float) * static_cast<size_t>(row_elems);
  const size_t send_bytes = row_bytes * static_cast<size_t>(std::accumulate(send_counts, send_counts + P, int64_t(0)));
  const size_t recv_bytes = row_bytes * static_cast<size_t>(std::accumulate(recv_counts, recv_counts + P, int64_t(0)));
  auto* hs = static_cast<float*>(stage(send_, send_bytes));
  auto* hr = static_cast<float*>(stage(recv_, recv_bytes));
  dev_.to_host(hs, send, send_bytes);
  host_call().all_to_all_v(hs, send_counts, hr, recv_counts, row_elems);
  dev_.from_host(recv, hr, recv_bytes);
}

void StagedCommunicator::barrier() { host_call().barrier(); }
void StagedCommunicator::barrier_with_deadline(double seconds) { host_->barrier_with_deadline(seconds); }
void StagedCommunicator::abort(int code) {
  host_->abort(code);
  std::abort();  // not reached: the host communicator's abort does not return
}

}  // namespace moe::comm
