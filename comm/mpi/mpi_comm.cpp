#include "comm/mpi/mpi_comm.h"

#include <chrono>
#include <climits>
#include <thread>

namespace moe::comm {

MpiCommunicator::MpiCommunicator(MPI_Comm comm, bool owns) : comm_(comm), owns_(owns) {
  int init = 0;
  MPI_Initialized(&init);
  MOE_CHECK(init, "MPI is not initialised (MPI_Init must run before creating a communicator)");
  MOE_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  MOE_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MOE_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  int fin = 0;
  MPI_Finalized(&fin);
  if (fin) return;
  if (pending_barrier_ != MPI_REQUEST_NULL) MPI_Wait(&pending_barrier_, MPI_STATUS_IGNORE);
  if (owns_) MPI_Comm_free(&comm_);
}

std::unique_ptr<Communicator> Communicator::world() {
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false);
}

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) {
  MPI_Comm out;
  MOE_MPI_CHECK(MPI_Comm_split(comm_, color, key, &out));
  auto c = std::make_unique<MpiCommunicator>(out, true);
  c->set_deadline(deadline_s_);
  return c;
}

void MpiCommunicator::wait(MPI_Request& req, const char* op, double seconds) {
  if (seconds <= 0) {
    MOE_MPI_CHECK(MPI_Wait(&req, MPI_STATUS_IGNORE));
    return;
  }
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  int done = 0;
  for (int spin = 0;; ++spin) {
    MOE_MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
    if (done) return;
    if (std::chrono::steady_clock::now() > end)
      MOE_THROW(op << " on rank " << rank_ << " of " << size_ << " did not complete within " << seconds
                   << " s (a peer rank is stuck or dead)");
    if (spin > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void MpiCommunicator::all_reduce_sum(float* buf, size_t n) {
  MOE_CHECK(n <= size_t(INT_MAX), "all_reduce_sum: " << n << " elements exceed one MPI call");
  MPI_Request req;
  MOE_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf, static_cast<int>(n), MPI_FLOAT, MPI_SUM, comm_, &req));
  wait(req, "all_reduce_sum", deadline_s_);
}

void MpiCommunicator::all_reduce_sum(double* buf, size_t n) {
  MOE_CHECK(n <= size_t(INT_MAX), "all_reduce_sum: " << n << " elements exceed one MPI call");
  MPI_Request req;
  MOE_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf, static_cast<int>(n), MPI_DOUBLE, MPI_SUM, comm_, &req));
  wait(req, "all_reduce_sum", deadline_s_);
}

void MpiCommunicator::all_gather(const void* send, void* recv, size_t bytes_per_rank) {
  MOE_CHECK(bytes_per_rank <= size_t(INT_MAX), "all_gather: " << bytes_per_rank << " bytes exceed one MPI call");
  MPI_Request req;
  MOE_MPI_CHECK(MPI_Iallgather(send, static_cast<int>(bytes_per_rank), MPI_BYTE, recv,
                               static_cast<int>(bytes_per_rank), MPI_BYTE, comm_, &req));
  wait(req, "all_gather", deadline_s_);
}

void MpiCommunicator::broadcast(void* buf, size_t bytes, int root) {
  MOE_CHECK(bytes <= size_t(INT_MAX), "broadcast: " << bytes << " bytes exceed one MPI call");
  MPI_Request req;
  MOE_MPI_CHECK(MPI_Ibcast(buf, static_cast<int>(bytes), MPI_BYTE, root, comm_, &req));
  wait(req, "broadcast", deadline_s_);
}

void MpiCommunicator::all_to_all_counts(const int64_t* send_counts, int64_t* recv_counts) {
  MPI_Request req;
  MOE_MPI_CHECK(MPI_Ialltoall(send_counts, 1, MPI_INT64_T, recv_counts, 1, MPI_INT64_T, comm_, &req));
  wait(req, "all_to_all_counts", deadline_s_);
}

void MpiCommunicator::all_to_all_v(const float* send, const int64_t* send_counts, float* recv,
                                   const int64_t* recv_counts, int64_t row_elems) {
  // counts and displacements in rows of a contiguous row datatype: no int overflow below 2^31 rows
  MPI_Datatype row;
  MOE_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(row_elems), MPI_FLOAT, &row));
  MOE_MPI_CHECK(MPI_Type_commit(&row));
  std::vector<int> sc(size_), rc(size_), sd(size_), rd(size_);
  int64_t so = 0, ro = 0;
  for (int r = 0; r < size_; ++r) {
    MOE_CHECK(send_counts[r] >= 0 && recv_counts[r] >= 0, "all_to_all_v: negative row count for peer " << r);
    sc[r] = static_cast<int>(send_counts[r]);
    rc[r] = static_cast<int>(recv_counts[r]);
    sd[r] = static_cast<int>(so);
    rd[r] = static_cast<int>(ro);
    so += send_counts[r];
    ro += recv_counts[r];
  }
  MOE_CHECK(so <= INT_MAX && ro <= INT_MAX, "all_to_all_v: more than 2^31 rows");
  MPI_Request req;
  const int rc_start = MPI_Ialltoallv(send, sc.data(), sd.data(), row, recv, rc.data(), rd.data(), row, comm_, &req);
  if (rc_start != MPI_SUCCESS) MPI_Type_free(&row);
  MOE_MPI_CHECK(rc_start);
  try {
    wait(req, "all_to_all_v", deadline_s_);
  } catch (...) {
    MPI_Type_free(&row);
    throw;
  }
  MPI_Type_free(&row);
}

void MpiCommunicator::barrier() {
  if (pending_barrier_ != MPI_REQUEST_NULL) {  // finish a barrier that timed out earlier first
    wait(pending_barrier_, "barrier", deadline_s_);
    return;
  }
  MPI_Request req;
  MOE_MPI_CHECK(MPI_Ibarrier(comm_, &req));
  wait(req, "barrier", deadline_s_);
}

void MpiCommunicator::barrier_with_deadline(double seconds) {
  if (pending_barrier_ == MPI_REQUEST_NULL) MOE_MPI_CHECK(MPI_Ibarrier(comm_, &pending_barrier_));
  wait(pending_barrier_, "barrier", seconds);
}

void MpiCommunicator::abort(int code) {
  MPI_Abort(comm_, code);
  std::abort();
}

}  // namespace moe::comm
