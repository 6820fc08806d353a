// MPI backend of the Communicator (host buffers). Every MPI return code goes through MOE_MPI_CHECK; the
// communicators made here use MPI_ERRORS_RETURN so errors come back as codes instead of aborting inside MPI.
// Collectives are non-blocking MPI calls completed by MPI_Wait, or, with a deadline, by an MPI_Test polling loop
// that throws when the deadline passes.
#pragma once
#include <mpi.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/error.h"

// Checks an MPI return code; the moe::Error names the call and carries MPI_Error_string.
#define MOE_MPI_CHECK(expr)                                                                      \
  do {                                                                                           \
    const int moe_mpi_rc_ = (expr);                                                              \
    if (moe_mpi_rc_ != MPI_SUCCESS) {                                                            \
      char moe_mpi_msg_[MPI_MAX_ERROR_STRING];                                                   \
      int moe_mpi_len_ = 0;                                                                      \
      if (MPI_Error_string(moe_mpi_rc_, moe_mpi_msg_, &moe_mpi_len_) != MPI_SUCCESS) moe_mpi_len_ = 0; \
      MOE_THROW("MPI error " << moe_mpi_rc_ << " in " << #expr << ": "                           \
                             << std::string(moe_mpi_msg_, static_cast<size_t>(moe_mpi_len_)));  \
    }                                                                                            \
  } while (0)

namespace moe::comm {

class MpiCommunicator : public Communicator {
 public:
  // owns: free the communicator on destruction (never pass true for MPI_COMM_WORLD). Sets MPI_ERRORS_RETURN on it.
  MpiCommunicator(MPI_Comm comm, bool owns);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  const char* name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
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
  MPI_Comm handle() const { return comm_; }

  // Largest element count of one MPI call (default INT_MAX): larger all-reduces, broadcasts and all-gathers go in
  // pieces. Process-wide; tests lower it to run the chunked paths on small buffers.
  static void set_max_message_elems(size_t n);
  static size_t max_message_elems();

 private:
  using Clock = std::chrono::steady_clock;
  struct Deadline {
    double seconds = 0;  // 0: none
    Clock::time_point end{};
  };
  struct AlltoallvArgs {  // int counts/displacements in rows; must stay alive while a request uses them
    std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
  };

  Deadline deadline_from(double seconds) const;
  // Polls req until done (true) or the deadline passes (false, req still active). No deadline: MPI_Wait.
  bool wait_until(MPI_Request& req, const Deadline& dl);
  // Completes a data collective; on expiry the request is abandoned (collectives cannot be cancelled), the
  // communicator marked unusable and a moe::Error thrown naming op, rank and timeout.
  void finish(MPI_Request& req, const char* op, const Deadline& dl);
  [[noreturn]] void throw_timeout(const char* op, double seconds) const;
  // Throws if the communicator is unusable; completes a barrier left pending by barrier_with_deadline.
  void ready(const char* op, const Deadline& dl);
  MPI_Datatype row_type(int64_t row_elems);
  void all_reduce_impl(void* buf, size_t n, MPI_Datatype type, size_t elem_bytes);

  MPI_Comm comm_;
  bool owns_;
  int rank_ = 0, size_ = 1;
  MPI_Request pending_barrier_ = MPI_REQUEST_NULL;
  std::string broken_;                  // why the communicator is unusable; empty while it is fine
  std::vector<MPI_Request> abandoned_;  // timed-out collectives (MPI cannot cancel them)
  MPI_Datatype row_type_ = MPI_DATATYPE_NULL;
  int64_t row_type_elems_ = 0;
  std::unique_ptr<AlltoallvArgs> a2a_ = std::make_unique<AlltoallvArgs>();
};

}  // namespace moe::comm
