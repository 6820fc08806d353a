// NCCL backend (see nccl_comm.h). The only file that includes nccl.h.
#include "comm/nccl/nccl_comm.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>

#include "comm/mpi/mpi_comm.h"
#include "core/error.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/log.h"

// Checks an NCCL return code. The communicators here are non-blocking, so ncclInProgress means "enqueued, not yet
// done" and passes: completion and asynchronous errors are checked by the polling waits below.
#define MOE_NCCL_CHECK(expr)                                                                             \
  do {                                                                                                   \
    const ncclResult_t moe_nccl_rc_ = (expr);                                                            \
    MOE_CHECK(moe_nccl_rc_ == ncclSuccess || moe_nccl_rc_ == ncclInProgress,                             \
              "NCCL error " << static_cast<int>(moe_nccl_rc_) << " (" << ncclGetErrorString(moe_nccl_rc_) \
                            << ") in " << #expr << "; last NCCL error: " << ncclGetLastError(nullptr));  \
  } while (0)

namespace moe::comm {
namespace {

using Clock = std::chrono::steady_clock;

struct Deadline {
  double seconds = 0;  // 0: none
  Clock::time_point end{};
  explicit Deadline(double s) : seconds(s > 0 ? s : 0) {
    if (seconds > 0) end = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
  }
  bool expired() const { return seconds > 0 && Clock::now() >= end; }
};

void backoff(long spin) {
  if (spin > 2000) std::this_thread::sleep_for(std::chrono::microseconds(50));
  else if (spin > 200) std::this_thread::yield();
}

// Every rank learns whether a setup step failed anywhere (so no rank walks into a collective the others left):
// the failing rank rethrows its own error, the others a summary.
void agree(MpiCommunicator& host, const std::string& local_error, const char* step) {
  double failed = local_error.empty() ? 0.0 : 1.0;
  host.all_reduce_sum(&failed, 1);
  if (!local_error.empty()) MOE_THROW("NCCL setup (" << step << ") on rank " << host.rank() << ": " << local_error);
  MOE_CHECK(failed == 0, "NCCL setup (" << step << ") failed on " << failed << " other rank(s) of " << host.size());
}

}  // namespace

struct NcclCommunicator::Impl {
  std::unique_ptr<MpiCommunicator> host;  // same ranks: unique id, counts, setup agreement
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  float* token = nullptr;  // [1] device scratch for barriers
  int device = 0, rank = 0, size = 1;
  bool aborted = false;
  std::string broken;  // why the communicator is unusable; empty while it is fine

  void use_device() { MOE_CUDA_CHECK(cudaSetDevice(device)); }

  void ready(const char* op) {
    MOE_CHECK(broken.empty(), op << " on rank " << rank << ": the NCCL communicator is unusable after an earlier "
                                 << "failure (" << broken << "); the job should abort");
  }

  void abort_comm() {
    if (comm && !aborted) {
      cudaSetDevice(device);
      ncclCommAbort(comm);  // frees the communicator; its handle is invalid afterwards
    }
    comm = nullptr;
    aborted = true;
  }

  [[noreturn]] void fail(const std::string& why) {
    abort_comm();
    broken = why;
    MOE_THROW(why);
  }

  std::string timeout_message(const char* op, double seconds) const {
    std::ostringstream os;
    os << op << " timed out on rank " << rank << " of " << size << " after the deadline of " << seconds
       << " s (timeout; a peer rank is late, stuck or dead; NCCL communicator aborted)";
    return os.str();
  }

  // Waits until a non-blocking NCCL call on `c` (init, split, group end) has left ncclInProgress.
  void wait_comm(ncclComm_t c, const char* op, const Deadline& dl) {
    for (long spin = 0;; ++spin) {
      ncclResult_t st = ncclSuccess;
      MOE_NCCL_CHECK(ncclCommGetAsyncError(c, &st));
      if (st == ncclSuccess) return;
      if (st != ncclInProgress) {
        if (c != comm) ncclCommAbort(c);
        fail(std::string(op) + " failed on rank " + std::to_string(rank) + ": NCCL " + ncclGetErrorString(st) +
             " (" + ncclGetLastError(c) + ")");
      }
      if (dl.expired()) {
        if (c != comm) ncclCommAbort(c);
        fail(timeout_message(op, dl.seconds));
      }
      backoff(spin);
    }
  }

  // Waits until everything enqueued on the stream is done, watching NCCL's asynchronous errors and the deadline.
  void complete(const char* op, double seconds) {
    const Deadline dl(seconds);
    for (long spin = 0;; ++spin) {
      ncclResult_t st = ncclSuccess;
      MOE_NCCL_CHECK(ncclCommGetAsyncError(comm, &st));
      if (st != ncclSuccess && st != ncclInProgress)
        fail(std::string(op) + " failed on rank " + std::to_string(rank) + ": NCCL asynchronous error " +
             ncclGetErrorString(st) + " (" + ncclGetLastError(comm) + ")");
      if (st == ncclSuccess) {  // everything is enqueued: now the stream
        const cudaError_t q = cudaStreamQuery(stream);
        if (q == cudaSuccess) return;
        if (q != cudaErrorNotReady)
          fail(std::string(op) + " failed on rank " + std::to_string(rank) + ": CUDA error " + cudaGetErrorName(q) +
               " (" + cudaGetErrorString(q) + ")");
      }
      if (dl.expired()) fail(timeout_message(op, dl.seconds));
      backoff(spin);
    }
  }

  // Host-side call on the MPI twin; a failure there leaves the pair out of step, so it breaks this one too.
  template <class F>
  void on_host(double seconds, F&& f) {
    host->set_deadline(seconds);
    try {
      f(*host);
    } catch (const Error& e) {
      broken = e.what();
      throw;
    }
  }

  // NCCL has no barrier: a one-element all-reduce completes only when every rank has entered it.
  void barrier(double seconds) {
    ready("barrier");
    use_device();
    MOE_NCCL_CHECK(ncclAllReduce(token, token, 1, ncclFloat, ncclSum, comm, stream));
    complete("barrier", seconds);
  }

  // Creates the stream and the barrier token on `device` (already current).
  void make_device_state() {
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&token), sizeof(float)));
    MOE_CUDA_CHECK(cudaMemsetAsync(token, 0, sizeof(float), stream));
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  ~Impl() { close(1.0); }  // after a failed setup; a finished communicator was closed already

  // Flushes and frees everything; never throws, never waits longer than `grace` seconds. Idempotent.
  void close(double grace) noexcept {
    if (comm || token || stream) cudaSetDevice(device);
    if (comm && !aborted) {
      bool clean = false;
      const ncclResult_t r = ncclCommFinalize(comm);  // flushes outstanding work
      if (r == ncclSuccess || r == ncclInProgress) {
        const Deadline dl(std::max(grace, 0.1));
        for (long spin = 0;; ++spin) {
          ncclResult_t st = ncclSuccess;
          if (ncclCommGetAsyncError(comm, &st) != ncclSuccess) break;
          if (st == ncclSuccess) {
            clean = true;
            break;
          }
          if (st != ncclInProgress || dl.expired()) break;
          backoff(spin);
        }
      }
      if (clean) {
        ncclCommDestroy(comm);
        comm = nullptr;
      } else {
        MOE_WARN("rank " << rank << ": NCCL communicator did not finalise within " << grace << " s; aborting it");
        abort_comm();
      }
    }
    if (token) cudaFree(token);
    if (stream) cudaStreamDestroy(stream);
    token = nullptr;
    stream = nullptr;
  }
};

NcclCommunicator::NcclCommunicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

NcclCommunicator::~NcclCommunicator() {
  if (impl_) impl_->close(std::max(1.0, deadline_s_));
}

int NcclCommunicator::rank() const { return impl_->rank; }
int NcclCommunicator::size() const { return impl_->size; }
int NcclCommunicator::device() const { return impl_->device; }
void* NcclCommunicator::stream() const { return impl_->stream; }

std::unique_ptr<NcclCommunicator> NcclCommunicator::create(MPI_Comm bootstrap, int device, double init_deadline_s) {
  auto m = std::make_unique<Impl>();
  MPI_Comm dup = MPI_COMM_NULL;
  MOE_MPI_CHECK(MPI_Comm_dup(bootstrap, &dup));
  m->host = std::make_unique<MpiCommunicator>(dup, /*owns=*/true);
  m->host->set_deadline(init_deadline_s);
  m->rank = m->host->rank();
  m->size = m->host->size();

  // 1. one GPU per rank: by default the rank's index on its node
  MPI_Comm node = MPI_COMM_NULL;
  MOE_MPI_CHECK(MPI_Comm_split_type(m->host->handle(), MPI_COMM_TYPE_SHARED, m->rank, MPI_INFO_NULL, &node));
  int local_rank = 0;
  const int rc_rank = MPI_Comm_rank(node, &local_rank);
  MPI_Comm_free(&node);
  MOE_MPI_CHECK(rc_rank);
  std::string err;
  try {
    int count = 0;
    MOE_CUDA_CHECK(cudaGetDeviceCount(&count));
    MOE_CHECK(count > 0, "no CUDA device visible");
    m->device = device >= 0 ? device : local_rank % count;
    MOE_CHECK(m->device < count, "CUDA device " << m->device << " requested but only " << count << " visible");
    MOE_CUDA_CHECK(cudaSetDevice(m->device));
    m->make_device_state();
  } catch (const Error& e) {
    err = e.what();
  }
  agree(*m->host, err, "CUDA device");

  // 2. the unique id, made by rank 0 and broadcast over MPI
  struct {
    int ok;
    ncclUniqueId id;
  } msg;
  std::memset(&msg, 0, sizeof(msg));
  if (m->rank == 0) msg.ok = ncclGetUniqueId(&msg.id) == ncclSuccess;
  m->host->broadcast(&msg, sizeof(msg), 0);
  MOE_CHECK(msg.ok, "NCCL setup: ncclGetUniqueId failed on rank 0 (" << ncclGetLastError(nullptr) << ")");

  // 3. join (non-blocking communicator: poll until it is ready, within the setup deadline)
  try {
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    MOE_NCCL_CHECK(ncclCommInitRankConfig(&m->comm, m->size, msg.id, m->rank, &cfg));
    m->wait_comm(m->comm, "ncclCommInitRankConfig", Deadline(init_deadline_s));
    int nr = -1, nn = -1;
    MOE_NCCL_CHECK(ncclCommUserRank(m->comm, &nr));
    MOE_NCCL_CHECK(ncclCommCount(m->comm, &nn));
    MOE_CHECK(nr == m->rank && nn == m->size,
              "NCCL rank/size " << nr << "/" << nn << " differ from MPI's " << m->rank << "/" << m->size);
    err.clear();
  } catch (const Error& e) {
    err = e.what();
  }
  agree(*m->host, err, "ncclCommInitRankConfig");
  if (m->rank == 0) {
    int version = 0;
    ncclGetVersion(&version);
    MOE_INFO("NCCL communicator: " << m->size << " rank(s), NCCL " << version);
  }
  auto c = std::unique_ptr<NcclCommunicator>(new NcclCommunicator(std::move(m)));
  return c;
}

std::unique_ptr<Communicator> NcclCommunicator::split(int color, int key) {
  Impl& m = *impl_;
  m.ready("split");
  // the MPI twin first (collective over the same ranks, same color and key: same membership and order)
  std::unique_ptr<Communicator> host_child;
  m.on_host(deadline_s_, [&](MpiCommunicator& h) { host_child = h.split(color, key); });
  m.use_device();
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = 0;
  ncclComm_t child = nullptr;
  MOE_NCCL_CHECK(ncclCommSplit(m.comm, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &child, &cfg));
  const Deadline dl(deadline_s_);
  m.wait_comm(m.comm, "split", dl);
  if (child == nullptr) {
    MOE_CHECK(color < 0 && !host_child, "split: NCCL returned no communicator for color " << color);
    return nullptr;
  }
  m.wait_comm(child, "split", dl);
  auto k = std::make_unique<Impl>();
  k->comm = child;
  k->device = m.device;
  k->host.reset(static_cast<MpiCommunicator*>(host_child.release()));
  try {
    MOE_CHECK(k->host, "split: MPI gave no communicator for color " << color << " but NCCL did");
    MOE_NCCL_CHECK(ncclCommUserRank(child, &k->rank));
    MOE_NCCL_CHECK(ncclCommCount(child, &k->size));
    MOE_CHECK(k->rank == k->host->rank() && k->size == k->host->size(),
              "split: NCCL rank/size " << k->rank << "/" << k->size << " differ from MPI's " << k->host->rank()
                                       << "/" << k->host->size());
    k->make_device_state();
  } catch (...) {
    k->close(1.0);
    throw;
  }
  auto c = std::unique_ptr<NcclCommunicator>(new NcclCommunicator(std::move(k)));
  c->set_deadline(deadline_s_);
  return c;
}

void NcclCommunicator::all_reduce_sum(float* buf, size_t n) {
  Impl& m = *impl_;
  m.ready("all_reduce_sum");
  if (n == 0) return;
  m.use_device();
  MOE_NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, m.comm, m.stream));
  m.complete("all_reduce_sum", deadline_s_);
}

void NcclCommunicator::all_reduce_sum(double* buf, size_t n) {
  Impl& m = *impl_;
  m.ready("all_reduce_sum");
  if (n == 0) return;
  m.use_device();
  MOE_NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclDouble, ncclSum, m.comm, m.stream));
  m.complete("all_reduce_sum", deadline_s_);
}

void NcclCommunicator::all_gather(const void* send, void* recv, size_t bytes_per_rank) {
  Impl& m = *impl_;
  m.ready("all_gather");
  if (bytes_per_rank == 0) return;
  m.use_device();
  MOE_NCCL_CHECK(ncclAllGather(send, recv, bytes_per_rank, ncclChar, m.comm, m.stream));
  m.complete("all_gather", deadline_s_);
}

void NcclCommunicator::broadcast(void* buf, size_t bytes, int root) {
  Impl& m = *impl_;
  MOE_CHECK(root >= 0 && root < m.size, "broadcast: root " << root << " out of range for " << m.size << " ranks");
  m.ready("broadcast");
  if (bytes == 0) return;
  m.use_device();
  MOE_NCCL_CHECK(ncclBroadcast(buf, buf, bytes, ncclChar, root, m.comm, m.stream));
  m.complete("broadcast", deadline_s_);
}

void NcclCommunicator::all_to_all_counts(const int64_t* send_counts, int64_t* recv_counts) {
  Impl& m = *impl_;
  m.ready("all_to_all_counts");
  m.on_host(deadline_s_, [&](MpiCommunicator& h) { h.all_to_all_counts(send_counts, recv_counts); });
}

void NcclCommunicator::all_to_all_v(const float* send, const int64_t* send_counts, float* recv,
                                    const int64_t* recv_counts, int64_t row_elems) {
  Impl& m = *impl_;
  m.ready("all_to_all_v");
  MOE_CHECK(row_elems >= 1, "all_to_all_v: row_elems = " << row_elems << " must be >= 1");
  for (int p = 0; p < m.size; ++p)
    MOE_CHECK(send_counts[p] >= 0 && recv_counts[p] >= 0, "all_to_all_v: negative row count for peer "
                                                              << p << " (send " << send_counts[p] << ", recv "
                                                              << recv_counts[p] << ")");
  MOE_CHECK(send_counts[m.rank] == recv_counts[m.rank], "all_to_all_v: rank " << m.rank << " sends itself "
                                                                              << send_counts[m.rank]
                                                                              << " rows but expects "
                                                                              << recv_counts[m.rank]);
  m.use_device();
  const size_t row = static_cast<size_t>(row_elems);
  // own rows: a device copy; the peers: one grouped send/recv per peer with rows either way
  size_t so = 0, ro = 0;
  for (int p = 0; p < m.rank; ++p) {
    so += static_cast<size_t>(send_counts[p]);
    ro += static_cast<size_t>(recv_counts[p]);
  }
  if (send_counts[m.rank] > 0)
    MOE_CUDA_CHECK(cudaMemcpyAsync(recv + ro * row, send + so * row,
                                   static_cast<size_t>(send_counts[m.rank]) * row * sizeof(float),
                                   cudaMemcpyDeviceToDevice, m.stream));
  MOE_NCCL_CHECK(ncclGroupStart());
  try {
    so = ro = 0;
    for (int p = 0; p < m.size; ++p) {
      const size_t sc = static_cast<size_t>(send_counts[p]), rc = static_cast<size_t>(recv_counts[p]);
      if (p != m.rank) {
        if (sc) MOE_NCCL_CHECK(ncclSend(send + so * row, sc * row, ncclFloat, p, m.comm, m.stream));
        if (rc) MOE_NCCL_CHECK(ncclRecv(recv + ro * row, rc * row, ncclFloat, p, m.comm, m.stream));
      }
      so += sc;
      ro += rc;
    }
  } catch (const Error& e) {
    ncclGroupEnd();  // close the group before leaving; the communicator is out of step with its peers now
    m.fail(e.what());
  }
  MOE_NCCL_CHECK(ncclGroupEnd());
  m.complete("all_to_all_v", deadline_s_);
}

void NcclCommunicator::barrier() { impl_->barrier(deadline_s_); }

void NcclCommunicator::barrier_with_deadline(double seconds) {
  MOE_CHECK(seconds > 0, "barrier_with_deadline: the deadline must be > 0 s (got " << seconds << ")");
  impl_->barrier(seconds);
}


void NcclCommunicator::abort(int code) {
  MOE_LOG(::moe::log::Level::kError, "rank " << impl_->rank << " aborts the whole job (exit code " << code << ")");
  impl_->abort_comm();
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();
}

}  // namespace moe::comm
