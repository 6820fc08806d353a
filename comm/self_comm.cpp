#include "comm/self_comm.h"

#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace moe::comm {

std::unique_ptr<Communicator> SelfCommunicator::split(int color, int key) {
  if (color < 0) return nullptr;
  auto c = std::make_unique<SelfCommunicator>();
  c->set_deadline(deadline());
  return c;
}

void SelfCommunicator::all_gather(const void* send, void* recv, size_t bytes_per_rank) {
  if (bytes_per_rank && send != recv) std::memmove(recv, send, bytes_per_rank);
}

void SelfCommunicator::broadcast(void* buf, size_t bytes, int root) {
  MOE_CHECK(root == 0, "self communicator: broadcast from root " << root << " (the only rank is 0)");
}

void SelfCommunicator::all_to_all_counts(const int64_t* send_counts, int64_t* recv_counts) {
  recv_counts[0] = send_counts[0];
}

void SelfCommunicator::all_to_all_v(const float* send, const int64_t* send_counts, float* recv,
                                    const int64_t* recv_counts, int64_t row_elems) {
  MOE_CHECK(send_counts[0] == recv_counts[0], "self communicator: all_to_all_v sends " << send_counts[0]
                                                  << " rows to itself but expects " << recv_counts[0]);
  const size_t n = static_cast<size_t>(send_counts[0] * row_elems);
  if (n && send != recv) std::memmove(recv, send, n * sizeof(float));
}

void SelfCommunicator::abort(int code) { std::_Exit(code); }

}  // namespace moe::comm
