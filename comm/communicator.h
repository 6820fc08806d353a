// The communication layer: a small Communicator interface (rank, size, split, collectives, all-to-all with
// counts, barrier, deadlines) with an MPI backend for host buffers (comm/mpi) and an NCCL backend for GPU
// buffers (comm/nccl, CUDA builds only), and the data-parallel x expert-parallel process groups.
//
// Every call is collective over the communicator unless said otherwise: all ranks call it, in the same order.
// Every call is synchronous: when it returns, the receive buffers hold the result and the send buffers may be
// reused. Failures are moe::Error exceptions (core/error.h). A communicator is used by one thread at a time.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace moe {
class Backend;
}

namespace moe::comm {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual const char* name() const = 0;  // "mpi" or "nccl"
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Ranks with the same color form a new communicator, ordered by key (ties: by rank here). A negative color
  // puts the calling rank in no group: it gets nullptr. The child inherits the deadline.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // In-place sums over all ranks.
  virtual void all_reduce_sum(float* buf, size_t n) = 0;
  virtual void all_reduce_sum(double* buf, size_t n) = 0;
  // recv[r * bytes_per_rank ...] = rank r's send buffer (recv holds size() * bytes_per_rank bytes).
  virtual void all_gather(const void* send, void* recv, size_t bytes_per_rank) = 0;
  virtual void broadcast(void* buf, size_t bytes, int root) = 0;
  // One count per peer (host arrays of size() entries): recv_counts[r] = rank r's send_counts[rank()].
  virtual void all_to_all_counts(const int64_t* send_counts, int64_t* recv_counts) = 0;
  // Rows of row_elems floats: send holds send_counts[r] rows for each peer r in rank order, contiguous;
  // recv gets recv_counts[r] rows from each peer r in rank order. Counts are host arrays of size() entries
  // (recv_counts as returned by all_to_all_counts); a peer may have zero rows either way.
  virtual void all_to_all_v(const float* send, const int64_t* send_counts, float* recv, const int64_t* recv_counts,
                            int64_t row_elems) = 0;
  virtual void barrier() = 0;
  // Aborts the whole job (every rank of the world, not only this communicator) with an exit code: one rank's
  // fatal error must not leave the others waiting. Not collective.
  [[noreturn]] virtual void abort(int code) = 0;

  // Deadline of every later call on this communicator: one that has not completed within `seconds` throws a
  // moe::Error naming the operation, the rank and the timeout (0: wait forever). After such an expiry in a data
  // collective the communicator is unusable (its later calls throw): the caller is expected to abort the job.
  void set_deadline(double seconds) { deadline_s_ = seconds > 0 ? seconds : 0; }
  double deadline() const { return deadline_s_; }
  // A barrier that throws after `seconds` (> 0). With MPI the communicator stays usable: the pending barrier is
  // kept and completed by this rank's next call (so the late rank must still enter one barrier). With NCCL an
  // expiry aborts the communicator.
  virtual void barrier_with_deadline(double seconds) = 0;

  // The world communicator of the MPI job (a duplicate of MPI_COMM_WORLD; MPI must be initialised). Collective.
  static std::unique_ptr<Communicator> world();

 protected:
  double deadline_s_ = 0;
};

// Backend by name over the whole MPI job: "mpi" (host buffers) or "nccl" (GPU buffers; CUDA builds only, one
// GPU per rank, bootstrapped over MPI). deadline_s becomes the communicator's deadline (0: none); NCCL's setup
// waits at most deadline_s, or kNcclSetupDeadline seconds when it is 0. tensors: the backend whose memory the
// buffers are in (null or the CPU: host memory); "mpi" on device memory is host-staged (comm/staged_comm.h). An
// unknown or unavailable backend is a moe::Error. Collective.
inline constexpr double kNcclSetupDeadline = 300;
std::unique_ptr<Communicator> make_communicator(const std::string& backend, double deadline_s = 0,
                                                Backend* tensors = nullptr);
bool backend_available(const std::string& backend);

// world = data_parallel x expert_parallel. Consecutive ranks form one expert-parallel group:
// ep_rank = rank % ep, dp_rank = rank / ep; the data-parallel group of a rank holds the ranks with its ep_rank
// (the replicas of the same expert shard). `world` is a duplicate of the given communicator (the caller's may go).
struct ProcessGroups {
  std::unique_ptr<Communicator> world, data_parallel, expert_parallel;
  int dp_size = 1, ep_size = 1, dp_rank = 0, ep_rank = 0;
};

// Collective over `world`. Throws moe::Error naming parallel.expert_parallel when it is < 1 or the world size is
// not divisible by it (on every rank alike, before any communication).
ProcessGroups make_process_groups(Communicator& world, int expert_parallel);

}  // namespace moe::comm
