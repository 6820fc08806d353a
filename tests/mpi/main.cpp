// GoogleTest main for the MPI tests (run by ctest under mpiexec at 1, 2 and 4 ranks). Rank 0 prints the usual
// gtest output; the other ranks print only their failures (with the rank). The exit code is the maximum over all
// ranks, so every rank exits non-zero when any rank failed.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

#include "core/log.h"

namespace {

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed())
      std::fprintf(stderr, "[rank %d] FAILED %s:%d\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result() && info.result()->Failed())
      std::fprintf(stderr, "[rank %d] FAILED TEST %s.%s\n", rank_, info.test_suite_name(), info.name());
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  moe::log::set_rank(rank, size);
  if (rank != 0 && GTEST_FLAG_GET(list_tests)) {
    if (!std::freopen("/dev/null", "w", stdout)) std::fprintf(stderr, "[rank %d] cannot silence stdout\n", rank);
  }
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  const int rc = RUN_ALL_TESTS();
  int any = 0, failed_ranks = 0, failed = rc != 0 ? 1 : 0;
  MPI_Allreduce(&rc, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(&failed, &failed_ranks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0 && failed_ranks > 0)  // rank 0's own summary may say PASSED while another rank failed
    std::fprintf(stderr, "MPI TESTS FAILED on %d of %d rank(s) (see the [rank N] FAILED lines)\n", failed_ranks, size);
  MPI_Finalize();
  return any;
}
