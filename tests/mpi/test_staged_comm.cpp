// Host-staged collectives (comm/staged_comm.h) at 1, 2 and 4 ranks: every call on buffers in a backend's memory
// gives what the host communicator gives on the same data, bit for bit, for the CPU backend (its "device" memory is
// host memory: this checks the staging itself, sizes, offsets and growth of the buffers) and, where a GPU is
// visible, for the CUDA backend (ranks sharing one GPU: the case NCCL refuses); skipped without one.
#include <gtest/gtest.h>

#include <numeric>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/staged_comm.h"
#include "core/backend.h"
#include "core/error.h"
#include "tests/unit/backend_ops.h"

namespace moe::comm {
namespace {

using test::DeviceArena;

class StagedComm : public ::testing::TestWithParam<Device> {
 protected:
  void SetUp() override {
    try {
      be_ = &backend_for(GetParam());
    } catch (const Error& e) {
      GTEST_SKIP() << "no " << (GetParam() == Device::kCUDA ? "CUDA" : "CPU") << " backend here: " << e.what();
    }
    host_ = Communicator::world();
    // the factory stages only device memory: host tensors get the plain MPI communicator
    staged_ = GetParam() == Device::kCPU ? std::make_unique<StagedCommunicator>(Communicator::world(), *be_)
                                         : make_communicator("mpi", 0, be_);
  }
  Backend* be_ = nullptr;
  std::unique_ptr<Communicator> host_, staged_;
};

std::vector<float> ramp(size_t n, int rank) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = 0.37f * static_cast<float>(rank + 1) + 0.001f * static_cast<float>(i % 97);
  return v;
}

TEST_P(StagedComm, AllReduceEqualsTheHostOne) {
  EXPECT_STREQ(staged_->name(), "mpi-staged");
  EXPECT_STREQ(make_communicator("mpi", 0, &cpu_backend())->name(), "mpi");
  EXPECT_EQ(staged_->rank(), host_->rank());
  EXPECT_EQ(staged_->size(), host_->size());
  for (size_t n : {size_t(3), size_t(1001), size_t(70000)}) {  // the staging buffers grow between calls
    std::vector<float> want = ramp(n, host_->rank());
    DeviceArena mem(*be_);
    float* dp = mem.put(want);
    host_->all_reduce_sum(want.data(), n);
    staged_->all_reduce_sum(dp, n);
    EXPECT_EQ(mem.get(dp, int64_t(n)), want) << n << " floats";
  }
  std::vector<double> want = {0.1 * (host_->rank() + 1), -2.5, 1e-9 * host_->rank()};
  DeviceArena mem(*be_);
  double* dp = mem.put(want);
  host_->all_reduce_sum(want.data(), want.size());
  staged_->all_reduce_sum(dp, want.size());
  EXPECT_EQ(mem.get(dp, int64_t(want.size())), want);
}

TEST_P(StagedComm, AllGatherAndBroadcastFromEveryRoot) {
  const int P = host_->size(), r = host_->rank();
  const std::vector<int32_t> mine = {r, -10 * r, 12345, 7};
  DeviceArena mem(*be_);
  int32_t* recv = mem.put(std::vector<int32_t>(mine.size() * P, -1));
  staged_->all_gather(mem.put(mine), recv, sizeof(int32_t) * mine.size());
  std::vector<int32_t> want(mine.size() * P);
  host_->all_gather(mine.data(), want.data(), sizeof(int32_t) * mine.size());
  EXPECT_EQ(mem.get(recv, int64_t(want.size())), want);
  for (int root = 0; root < P; ++root) {
    std::vector<uint8_t> buf(37, 0);
    if (r == root)
      for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<uint8_t>(root * 31 + i);
    uint8_t* db = mem.put(buf);
    staged_->broadcast(db, buf.size(), root);
    const std::vector<uint8_t> got = mem.get(db, int64_t(buf.size()));
    for (size_t i = 0; i < buf.size(); ++i) ASSERT_EQ(got[i], static_cast<uint8_t>(root * 31 + i)) << "root " << root;
  }
}

// Uneven rows, zero rows for some pairs: every received row is the one its sender put there, and nothing is
// written past the received rows.
TEST_P(StagedComm, AllToAllUnevenRows) {
  const int P = host_->size(), r = host_->rank();
  auto rows = [](int s, int d) { return int64_t((s % 2 == 1 && d == 1) ? 0 : (3 * s + 5 * d + 1) % 4); };
  auto value = [](int s, int d, int64_t j, int64_t e) {
    return static_cast<float>(s * 100000 + d * 10000 + j * 1000 + e);
  };
  for (int64_t E : {int64_t(1), int64_t(5), int64_t(300)}) {
    std::vector<int64_t> sc(P), rc(P, -1);
    for (int d = 0; d < P; ++d) sc[d] = rows(r, d);
    staged_->all_to_all_counts(sc.data(), rc.data());
    for (int s = 0; s < P; ++s) ASSERT_EQ(rc[s], rows(s, r));
    std::vector<float> send;
    for (int d = 0; d < P; ++d)
      for (int64_t j = 0; j < sc[d]; ++j)
        for (int64_t e = 0; e < E; ++e) send.push_back(value(r, d, j, e));
    const int64_t total = std::accumulate(rc.begin(), rc.end(), int64_t(0));
    std::vector<float> guard(static_cast<size_t>(total * E) + 1, -7.0f);
    DeviceArena mem(*be_);
    float* rp = mem.put(guard);
    staged_->all_to_all_v(mem.put(send), sc.data(), rp, rc.data(), E);
    const std::vector<float> got = mem.get(rp, int64_t(guard.size()));
    size_t i = 0;
    for (int s = 0; s < P; ++s)
      for (int64_t j = 0; j < rc[s]; ++j)
        for (int64_t e = 0; e < E; ++e, ++i) ASSERT_EQ(got[i], value(s, r, j, e)) << "from " << s << " row " << j;
    EXPECT_EQ(got.back(), -7.0f) << "wrote past the received rows";
  }
}

// Sub-groups stay staged and keep the deadline; the deadline reaches the host communicator.
TEST_P(StagedComm, SplitAndDeadline) {
  const int r = host_->rank();
  staged_->set_deadline(30);
  auto g = staged_->split(r % 2, r);
  ASSERT_NE(g, nullptr);
  EXPECT_STREQ(g->name(), "mpi-staged");
  EXPECT_EQ(g->deadline(), 30.0);
  EXPECT_EQ(g->size(), (host_->size() + 1 - r % 2) / 2);
  std::vector<float> one = {1.0f};
  DeviceArena mem(*be_);
  float* dp = mem.put(one);
  g->all_reduce_sum(dp, 1);
  EXPECT_EQ(mem.get(dp, 1)[0], static_cast<float>(g->size()));
  EXPECT_EQ(dynamic_cast<StagedCommunicator&>(*g).host().deadline(), 30.0);
  EXPECT_EQ(staged_->split(-1, r), nullptr);  // no group for a negative color
  staged_->barrier_with_deadline(30);
}

INSTANTIATE_TEST_SUITE_P(Backends, StagedComm, ::testing::Values(Device::kCPU, Device::kCUDA),
                         [](const auto& info) { return std::string(info.param == Device::kCPU ? "cpu" : "cuda"); });

}  // namespace
}  // namespace moe::comm
