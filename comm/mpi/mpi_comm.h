// MPI backend of the Communicator (host buffers). Every MPI return code goes through MOE_MPI_CHECK; the
// communicators use MPI_ERRORS_RETURN so errors come back as codes instead of aborting inside MPI.
#pragma once
#include <mpi.h>

#include <vector>

#include "comm/communicator.h"
#include "core/error.h"

#define MOE_MPI_CHECK(expr)                                                          \
  do {                                                                               \
    int moe_mpi_rc_ = (expr);                                                        \
    if (moe_mpi_rc_ != MPI_SUCCESS) {                                                \
      char moe_mpi_msg_[MPI_MAX_ERROR_STRING];                                       \
      int moe_mpi_len_ = 0;                                                          \
      MPI_Error_string(moe_mpi_rc_, moe_mpi_msg_, &moe_mpi_len_);                    \
      MOE_THROW("MPI error in " << #expr << ": " << std::string(moe_mpi_msg_, moe_mpi_len_)); \
    }                                                                                \
  } while (0)

namespace moe::comm {

class MpiCommunicator : public Communicator {
 public:
  // owns: free the communicator on destruction (not for MPI_COMM_WORLD)
  MpiCommunicator(MPI_Comm comm, bool owns);
  ~MpiCommunicator() override;
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

 private:
  // Completes a request, polling with MPI_Test against the deadline (blocking MPI_Wait when there is none).
  void wait(MPI_Request& req, const char* op, double seconds);
  MPI_Comm comm_;
  bool owns_;
  int rank_ = 0, size_ = 1;
  MPI_Request pending_barrier_ = MPI_REQUEST_NULL;
  std::vector<int64_t> sdispl_, rdispl_;
};

}  // namespace moe::comm
