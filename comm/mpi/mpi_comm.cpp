#include "comm/mpi/mpi_comm.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <sstream>
#include <thread>

#include "core/log.h"

namespace moe::comm {
namespace {

std::atomic<size_t> g_max_message_elems{static_cast<size_t>(INT_MAX)};

bool mpi_finalized() {
  int fin = 0;
  MPI_Finalized(&fin);
  return fin != 0;
}

}  // namespace

void MpiCommunicator::set_max_message_elems(size_t n) {
  g_max_message_elems = std::clamp<size_t>(n, 1, static_cast<size_t>(INT_MAX));
}
size_t MpiCommunicator::max_message_elems() { return g_max_message_elems; }

MpiCommunicator::MpiCommunicator(MPI_Comm comm, bool owns) : comm_(comm), owns_(owns) {
  int init = 0;
  MPI_Initialized(&init);
  MOE_CHECK(init && !mpi_finalized(), "MpiCommunicator: MPI is not initialised (MPI_Init must run first)");
  MOE_CHECK(comm != MPI_COMM_NULL, "MpiCommunicator: MPI_COMM_NULL");
  MOE_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  MOE_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MOE_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  if (mpi_finalized()) return;  // nothing can be released any more
  // Give work left behind by a timeout a bounded chance to finish (a late peer may still arrive): never a hang.
  std::vector<MPI_Request*> left;
  if (pending_barrier_ != MPI_REQUEST_NULL) left.push_back(&pending_barrier_);
  for (MPI_Request& r : abandoned_) left.push_back(&r);
  if (!left.empty()) {
    const auto end = Clock::now() + std::chrono::duration<double>(std::max(1.0, deadline_s_));
    bool all_done = false;
    while (!all_done && Clock::now() < end) {
      all_done = true;
      for (MPI_Request* r : left) {
        int done = 1;
        if (*r != MPI_REQUEST_NULL && MPI_Test(r, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) done = 1;
        all_done = all_done && done;
      }
      if (!all_done) std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    if (!all_done) {
      // MPI forbids freeing an active collective request: leak the communicator and the arrays it may still read
      MOE_WARN("communicator of rank " << rank_ << ": " << left.size()
                                       << " timed-out operation(s) never completed; leaving them behind");
      (void)a2a_.release();
      return;
    }
  }
  if (row_type_ != MPI_DATATYPE_NULL) MPI_Type_free(&row_type_);
  if (owns_) MPI_Comm_free(&comm_);
}

// ---- completion with deadlines ----

MpiCommunicator::Deadline MpiCommunicator::deadline_from(double seconds) const {
  Deadline dl;
  if (seconds > 0) {
    dl.seconds = seconds;
    dl.end = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  }
  return dl;
}

bool MpiCommunicator::wait_until(MPI_Request& req, const Deadline& dl) {
  if (dl.seconds <= 0) {
    MOE_MPI_CHECK(MPI_Wait(&req, MPI_STATUS_IGNORE));
    return true;
  }
  int done = 0;
  for (long spin = 0;; ++spin) {
    MOE_MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
    if (done) return true;
    if (Clock::now() >= dl.end) return false;
    // spin first (latency), then back off so oversubscribed ranks get the core
    if (spin > 2000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    else if (spin > 200) std::this_thread::yield();
  }
}

void MpiCommunicator::throw_timeout(const char* op, double seconds) const {
  MOE_THROW(op << " timed out on rank " << rank_ << " of " << size_ << " after the deadline of " << seconds
               << " s (timeout; a peer rank is late, stuck or dead)");
}

void MpiCommunicator::finish(MPI_Request& req, const char* op, const Deadline& dl) {
  if (wait_until(req, dl)) return;
  abandoned_.push_back(req);
  req = MPI_REQUEST_NULL;
  std::ostringstream why;
  why << op << " timed out after " << dl.seconds << " s";
  broken_ = why.str();
  throw_timeout(op, dl.seconds);
}

void MpiCommunicator::ready(const char* op, const Deadline& dl) {
  MOE_CHECK(broken_.empty(), op << " on rank " << rank_ << ": the communicator is unusable after an earlier failure ("
                                << broken_ << "); the job should abort");
  if (pending_barrier_ != MPI_REQUEST_NULL) {
    // a barrier that timed out earlier comes first: every rank posts its collectives in the same order
    if (!wait_until(pending_barrier_, dl)) throw_timeout("barrier (left pending by an earlier timeout)", dl.seconds);
  }
}

// ---- collectives ----

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) {
  const Deadline dl = deadline_from(deadline_s_);
  ready("split", dl);
  if (dl.seconds > 0) {
    // MPI_Comm_split has no non-blocking form: first make sure every rank has arrived, within the deadline
    MPI_Request req = MPI_REQUEST_NULL;
    MOE_MPI_CHECK(MPI_Ibarrier(comm_, &req));
    finish(req, "split", dl);
  }
  MPI_Comm out = MPI_COMM_NULL;
  MOE_MPI_CHECK(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &out));
  if (out == MPI_COMM_NULL) return nullptr;
  auto c = std::make_unique<MpiCommunicator>(out, /*owns=*/true);
  c->set_deadline(deadline_s_);
  return c;
}

void MpiCommunicator::all_reduce_impl(void* buf, size_t n, MPI_Datatype type, size_t elem_bytes) {
  const Deadline dl = deadline_from(deadline_s_);
  ready("all_reduce_sum", dl);
  const size_t chunk = max_message_elems();
  char* p = static_cast<char*>(buf);
  for (size_t off = 0; off < n; off += chunk) {
    const int len = static_cast<int>(std::min(chunk, n - off));
    MPI_Request req = MPI_REQUEST_NULL;
    MOE_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, p + off * elem_bytes, len, type, MPI_SUM, comm_, &req));
    finish(req, "all_reduce_sum", dl);
  }
}

void MpiCommunicator::all_reduce_sum(float* buf, size_t n) { all_reduce_impl(buf, n, MPI_FLOAT, sizeof(float)); }
void MpiCommunicator::all_reduce_sum(double* buf, size_t n) { all_reduce_impl(buf, n, MPI_DOUBLE, sizeof(double)); }

void MpiCommunicator::all_gather(const void* send, void* recv, size_t bytes_per_rank) {
  const Deadline dl = deadline_from(deadline_s_);
  ready("all_gather", dl);
  const size_t chunk = max_message_elems();
  if (bytes_per_rank <= chunk) {
    MPI_Request req = MPI_REQUEST_NULL;
    const int n = static_cast<int>(bytes_per_rank);
    MOE_MPI_CHECK(MPI_Iallgather(send, n, MPI_BYTE, recv, n, MPI_BYTE, comm_, &req));
    finish(req, "all_gather", dl);
    return;
  }
  // In pieces: piece [off, off + len) of every rank's block lands at recv + r * bytes_per_rank + off, i.e. one
  // element of a len-byte type whose extent is a whole block.
  for (size_t off = 0; off < bytes_per_rank; off += chunk) {
    const size_t len = std::min(chunk, bytes_per_rank - off);
    MPI_Datatype piece = MPI_DATATYPE_NULL, block = MPI_DATATYPE_NULL;
    MOE_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(len), MPI_BYTE, &piece));
    MOE_MPI_CHECK(MPI_Type_create_resized(piece, 0, static_cast<MPI_Aint>(bytes_per_rank), &block));
    MPI_Type_free(&piece);
    MOE_MPI_CHECK(MPI_Type_commit(&block));
    MPI_Request req = MPI_REQUEST_NULL;
    const int rc = MPI_Iallgather(static_cast<const char*>(send) + off, static_cast<int>(len), MPI_BYTE,
                                  static_cast<char*>(recv) + off, 1, block, comm_, &req);
    MPI_Type_free(&block);  // allowed while in use: pending operations finish normally
    MOE_MPI_CHECK(rc);
    finish(req, "all_gather", dl);
  }
}

void MpiCommunicator::broadcast(void* buf, size_t bytes, int root) {
  MOE_CHECK(root >= 0 && root < size_, "broadcast: root " << root << " out of range for " << size_ << " ranks");
  const Deadline dl = deadline_from(deadline_s_);
  ready("broadcast", dl);
  const size_t chunk = max_message_elems();
  char* p = static_cast<char*>(buf);
  for (size_t off = 0; off < bytes; off += chunk) {
    MPI_Request req = MPI_REQUEST_NULL;
    MOE_MPI_CHECK(MPI_Ibcast(p + off, static_cast<int>(std::min(chunk, bytes - off)), MPI_BYTE, root, comm_, &req));
    finish(req, "broadcast", dl);
  }
}

void MpiCommunicator::all_to_all_counts(const int64_t* send_counts, int64_t* recv_counts) {
  const Deadline dl = deadline_from(deadline_s_);
  ready("all_to_all_counts", dl);
  MPI_Request req = MPI_REQUEST_NULL;
  MOE_MPI_CHECK(MPI_Ialltoall(send_counts, 1, MPI_INT64_T, recv_counts, 1, MPI_INT64_T, comm_, &req));
  finish(req, "all_to_all_counts", dl);
}

MPI_Datatype MpiCommunicator::row_type(int64_t row_elems) {
  if (row_type_ != MPI_DATATYPE_NULL && row_type_elems_ == row_elems) return row_type_;
  if (row_type_ != MPI_DATATYPE_NULL) MPI_Type_free(&row_type_);
  row_type_elems_ = 0;
  MOE_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(row_elems), MPI_FLOAT, &row_type_));
  MOE_MPI_CHECK(MPI_Type_commit(&row_type_));
  row_type_elems_ = row_elems;
  return row_type_;
}

void MpiCommunicator::all_to_all_v(const float* send, const int64_t* send_counts, float* recv,
                                   const int64_t* recv_counts, int64_t row_elems) {
  MOE_CHECK(row_elems >= 1 && row_elems <= INT_MAX,
            "all_to_all_v: row_elems = " << row_elems << " must be in [1, " << INT_MAX << "]");
  const Deadline dl = deadline_from(deadline_s_);
  ready("all_to_all_v", dl);
  // Counts and displacements in rows of one contiguous row datatype: counts * row_elems may exceed INT_MAX;
  // only the row counts and row offsets must fit an int.
  AlltoallvArgs& a = *a2a_;
  a.send_counts.resize(size_);
  a.send_displs.resize(size_);
  a.recv_counts.resize(size_);
  a.recv_displs.resize(size_);
  int64_t so = 0, ro = 0;
  for (int r = 0; r < size_; ++r) {
    MOE_CHECK(send_counts[r] >= 0 && recv_counts[r] >= 0, "all_to_all_v: negative row count for peer "
                                                              << r << " (send " << send_counts[r] << ", recv "
                                                              << recv_counts[r] << ")");
    MOE_CHECK(so + send_counts[r] <= INT_MAX && ro + recv_counts[r] <= INT_MAX,
              "all_to_all_v: more than " << INT_MAX << " rows in one direction");
    a.send_counts[r] = static_cast<int>(send_counts[r]);
    a.recv_counts[r] = static_cast<int>(recv_counts[r]);
    a.send_displs[r] = static_cast<int>(so);
    a.recv_displs[r] = static_cast<int>(ro);
    so += send_counts[r];
    ro += recv_counts[r];
  }
  MOE_CHECK(send_counts[rank_] == recv_counts[rank_], "all_to_all_v: rank " << rank_ << " sends itself "
                                                                            << send_counts[rank_]
                                                                            << " rows but expects "
                                                                            << recv_counts[rank_]);
  const MPI_Datatype row = row_type(row_elems);
  MPI_Request req = MPI_REQUEST_NULL;
  MOE_MPI_CHECK(MPI_Ialltoallv(send, a.send_counts.data(), a.send_displs.data(), row, recv, a.recv_counts.data(),
                               a.recv_displs.data(), row, comm_, &req));
  finish(req, "all_to_all_v", dl);
}

void MpiCommunicator::barrier() {
  const Deadline dl = deadline_from(deadline_s_);
  MOE_CHECK(broken_.empty(), "barrier on rank " << rank_ << ": the communicator is unusable after an earlier failure ("
                                                << broken_ << "); the job should abort");
  if (pending_barrier_ != MPI_REQUEST_NULL) {  // finish the barrier that timed out earlier: it is this one
    if (!wait_until(pending_barrier_, dl)) throw_timeout("barrier (left pending by an earlier timeout)", dl.seconds);
    return;
  }
  MPI_Request req = MPI_REQUEST_NULL;
  MOE_MPI_CHECK(MPI_Ibarrier(comm_, &req));
  if (!wait_until(req, dl)) {
    pending_barrier_ = req;  // a barrier holds no buffers: keep it, the communicator stays usable
    throw_timeout("barrier", dl.seconds);
  }
}

void MpiCommunicator::barrier_with_deadline(double seconds) {
  MOE_CHECK(seconds > 0, "barrier_with_deadline: the deadline must be > 0 s (got " << seconds << ")");
  MOE_CHECK(broken_.empty(), "barrier on rank " << rank_ << ": the communicator is unusable after an earlier failure ("
                                                << broken_ << "); the job should abort");
  if (pending_barrier_ == MPI_REQUEST_NULL) MOE_MPI_CHECK(MPI_Ibarrier(comm_, &pending_barrier_));
  if (!wait_until(pending_barrier_, deadline_from(seconds))) throw_timeout("barrier", seconds);
}

void MpiCommunicator::abort(int code) {
  MOE_LOG(::moe::log::Level::kError, "rank " << rank_ << " aborts the whole job (exit code " << code << ")");
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();  // MPI_Abort does not return; if it did, still never leave this rank running
}

}  // namespace moe::comm
