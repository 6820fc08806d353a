// The communication layer at 1, 2 and 4 ranks (every test works at any world size): every collective checked
// value by value against a locally computed expectation, sub-groups, process groups, the backend factory, and
// deadlines (a missing peer gives an error naming the operation and the timeout, not a hang).
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi/mpi_comm.h"
#include "core/error.h"

namespace moe::comm {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

MPI_Comm handle_of(Communicator& c) {
  auto* m = dynamic_cast<MpiCommunicator*>(&c);
  EXPECT_NE(m, nullptr) << "expected the MPI backend";
  return m ? m->handle() : MPI_COMM_NULL;
}

// Value of element e of row j sent from rank s to rank d: exact in float for s, d < 10, j < 100, e < 100.
float a2a_value(int s, int d, int j, int e) { return static_cast<float>(s * 1000000 + d * 100000 + j * 100 + e); }

// Row counts from s to d: uneven, zero for some pairs (and for every pair into rank 1 from odd ranks).
int64_t a2a_rows(int s, int d) { return (s % 2 == 1 && d == 1) ? 0 : (3 * s + 5 * d + 1) % 4; }

// Runs count exchange + all_to_all_v for the given count function and checks every received value.
void check_all_to_all(Communicator& c, int64_t (*rows)(int, int), int64_t row_elems) {
  const int P = c.size(), r = c.rank();
  std::vector<int64_t> sc(P), rc(P, -1);
  for (int d = 0; d < P; ++d) sc[d] = rows(r, d);
  c.all_to_all_counts(sc.data(), rc.data());
  for (int s = 0; s < P; ++s) ASSERT_EQ(rc[s], rows(s, r)) << "count from rank " << s;
  std::vector<float> send;
  for (int d = 0; d < P; ++d)
    for (int64_t j = 0; j < sc[d]; ++j)
      for (int64_t e = 0; e < row_elems; ++e) send.push_back(a2a_value(r, d, static_cast<int>(j), static_cast<int>(e)));
  const int64_t total = std::accumulate(rc.begin(), rc.end(), int64_t(0));
  std::vector<float> recv(static_cast<size_t>(total * row_elems) + 1, -7.0f);  // +1: a guard that must stay
  c.all_to_all_v(send.data(), sc.data(), recv.data(), rc.data(), row_elems);
  size_t i = 0, bad = 0;
  for (int s = 0; s < P; ++s)
    for (int64_t j = 0; j < rc[s]; ++j)
      for (int64_t e = 0; e < row_elems; ++e, ++i)
        if (recv[i] != a2a_value(s, r, static_cast<int>(j), static_cast<int>(e)) && bad++ < 5)
          ADD_FAILURE() << "row " << j << " elem " << e << " from rank " << s << ": got " << recv[i];
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(recv.back(), -7.0f) << "wrote past the received rows";
}

TEST(Comm, WorldMatchesMpi) {
  auto w = Communicator::world();
  int r = -1, p = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  EXPECT_EQ(w->rank(), r);
  EXPECT_EQ(w->size(), p);
  EXPECT_STREQ(w->name(), "mpi");
  EXPECT_EQ(w->deadline(), 0.0);
  w->barrier();
}

TEST(Comm, AllReduceSum) {
  auto w = Communicator::world();
  const int P = w->size(), r = w->rank();
  const size_t n = 1001;
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = static_cast<float>(r * 7 + static_cast<int>(i % 13)) - 3.0f;
  w->all_reduce_sum(f.data(), n);
  for (size_t i = 0; i < n; ++i) {
    float expect = 0;
    for (int q = 0; q < P; ++q) expect += static_cast<float>(q * 7 + static_cast<int>(i % 13)) - 3.0f;
    ASSERT_EQ(f[i], expect) << "element " << i;
  }
  std::vector<double> d(3);
  for (int i = 0; i < 3; ++i) d[i] = 0.1 * (r + 1) + i;
  w->all_reduce_sum(d.data(), d.size());
  for (int i = 0; i < 3; ++i) {
    double expect = 0;
    for (int q = 0; q < P; ++q) expect += 0.1 * (q + 1) + i;
    EXPECT_NEAR(d[i], expect, 1e-12);
  }
  w->all_reduce_sum(static_cast<float*>(nullptr), 0);  // empty: a no-op on every rank
}

TEST(Comm, AllGather) {
  auto w = Communicator::world();
  const int P = w->size(), r = w->rank();
  const int32_t mine[3] = {r, -10 * r, 12345};
  std::vector<int32_t> all(3 * P, -1);
  w->all_gather(mine, all.data(), sizeof mine);
  for (int q = 0; q < P; ++q) {
    EXPECT_EQ(all[3 * q], q);
    EXPECT_EQ(all[3 * q + 1], -10 * q);
    EXPECT_EQ(all[3 * q + 2], 12345);
  }
}

TEST(Comm, BroadcastFromEveryRoot) {
  auto w = Communicator::world();
  const int P = w->size(), r = w->rank();
  for (int root = 0; root < P; ++root) {
    std::vector<uint8_t> buf(37, 0);
    if (r == root)
      for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<uint8_t>(root * 31 + i);
    w->broadcast(buf.data(), buf.size(), root);
    for (size_t i = 0; i < buf.size(); ++i) ASSERT_EQ(buf[i], static_cast<uint8_t>(root * 31 + i)) << "root " << root;
  }
  uint64_t x = 0;
  EXPECT_THROW(w->broadcast(&x, sizeof x, P), Error);  // root out of range: rejected before any communication
}

// Messages larger than one MPI call are sent in pieces; a tiny piece limit runs those paths on small buffers.
TEST(Comm, LargeMessagesGoInPieces) {
  auto w = Communicator::world();
  const int P = w->size(), r = w->rank();
  const size_t saved = MpiCommunicator::max_message_elems();
  MpiCommunicator::set_max_message_elems(7);
  std::vector<float> f(50);
  for (size_t i = 0; i < f.size(); ++i) f[i] = static_cast<float>(r + i);
  w->all_reduce_sum(f.data(), f.size());
  for (size_t i = 0; i < f.size(); ++i) EXPECT_EQ(f[i], static_cast<float>(P * i + P * (P - 1) / 2));
  std::vector<uint8_t> mine(30), all(30 * P, 0);
  for (size_t i = 0; i < mine.size(); ++i) mine[i] = static_cast<uint8_t>(r * 50 + i);
  w->all_gather(mine.data(), all.data(), mine.size());
  for (int q = 0; q < P; ++q)
    for (size_t i = 0; i < mine.size(); ++i) ASSERT_EQ(all[q * mine.size() + i], static_cast<uint8_t>(q * 50 + i));
  std::vector<uint8_t> b(23, 0);
  if (r == P - 1)
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(200 - i);
  w->broadcast(b.data(), b.size(), P - 1);
  for (size_t i = 0; i < b.size(); ++i) ASSERT_EQ(b[i], static_cast<uint8_t>(200 - i));
  MpiCommunicator::set_max_message_elems(saved);
  EXPECT_EQ(MpiCommunicator::max_message_elems(), saved);
}

TEST(Comm, AllToAllUnevenRows) {
  auto w = Communicator::world();
  for (int64_t row_elems : {1, 3, 17}) {
    SCOPED_TRACE("row_elems " + std::to_string(row_elems));
    check_all_to_all(*w, a2a_rows, row_elems);
  }
}

int64_t rows_none(int, int) { return 0; }
int64_t rows_to_rank0(int s, int d) { return d == 0 ? 40 + s : 0; }  // everyone sends only to rank 0
int64_t rows_to_self(int s, int d) { return s == d ? 5 : 0; }

TEST(Comm, AllToAllEdgeLayouts) {
  auto w = Communicator::world();
  {
    SCOPED_TRACE("no rows at all");
    check_all_to_all(*w, rows_none, 4);
  }
  {
    SCOPED_TRACE("all rows to rank 0");
    check_all_to_all(*w, rows_to_rank0, 64);
  }
  {
    SCOPED_TRACE("only to itself");
    check_all_to_all(*w, rows_to_self, 2);
  }
}

// Bad arguments are rejected on every rank alike, before any communication (so nothing is left pending).
TEST(Comm, AllToAllRejectsBadArguments) {
  auto w = Communicator::world();
  const int P = w->size();
  std::vector<int64_t> sc(P, 0), rc(P, 0);
  float dummy = 0;
  try {
    w->all_to_all_v(&dummy, sc.data(), &dummy, rc.data(), 0);
    ADD_FAILURE() << "row_elems 0 accepted";
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "row_elems")) << e.what();
  }
  sc[P - 1] = -1;
  try {
    w->all_to_all_v(&dummy, sc.data(), &dummy, rc.data(), 1);
    ADD_FAILURE() << "negative count accepted";
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "negative row count")) << e.what();
  }
  w->barrier();  // still in step
}

TEST(Comm, SplitIntoSubGroups) {
  auto w = Communicator::world();
  const int P = w->size(), r = w->rank();
  // parity groups, reversed order inside each
  auto g = w->split(r % 2, -r);
  ASSERT_NE(g, nullptr);
  std::vector<int> members;
  for (int q = P - 1; q >= 0; --q)
    if (q % 2 == r % 2) members.push_back(q);
  ASSERT_EQ(g->size(), static_cast<int>(members.size()));
  EXPECT_EQ(members[g->rank()], r);
  EXPECT_STREQ(g->name(), "mpi");
  // collectives inside the group see only its members, in the group's order
  double sum = r;
  g->all_reduce_sum(&sum, 1);
  EXPECT_EQ(sum, std::accumulate(members.begin(), members.end(), 0.0));
  std::vector<int32_t> gathered(g->size());
  const int32_t me = r;
  g->all_gather(&me, gathered.data(), sizeof me);
  for (int i = 0; i < g->size(); ++i) EXPECT_EQ(gathered[i], members[i]);
  check_all_to_all(*g, a2a_rows, 5);
  // a deadline is inherited by children
  g->set_deadline(30);
  auto gg = g->split(0, g->rank());
  EXPECT_EQ(gg->deadline(), 30.0);
  EXPECT_EQ(gg->size(), g->size());
  // a negative color leaves a rank out
  auto some = w->split(r == 0 ? -1 : 1, r);
  if (r == 0) {
    EXPECT_EQ(some, nullptr);
  } else {
    ASSERT_NE(some, nullptr);
    EXPECT_EQ(some->size(), P - 1);
    EXPECT_EQ(some->rank(), r - 1);
    some->barrier();
  }
  w->barrier();
}

TEST(Comm, ProcessGroupsLayouts) {
  auto w = Communicator::world();
  const int P = w->size(), r = w->rank();
  for (int ep : {1, 2, P}) {
    SCOPED_TRACE("expert_parallel " + std::to_string(ep));
    if (P % ep != 0) {  // e.g. 2 at one rank
      EXPECT_THROW(make_process_groups(*w, ep), Error);
      continue;
    }
    ProcessGroups g = make_process_groups(*w, ep);
    EXPECT_EQ(g.ep_size, ep);
    EXPECT_EQ(g.dp_size, P / ep);
    EXPECT_EQ(g.ep_rank, r % ep);
    EXPECT_EQ(g.dp_rank, r / ep);
    ASSERT_TRUE(g.world && g.expert_parallel && g.data_parallel);
    EXPECT_EQ(g.world->size(), P);
    EXPECT_EQ(g.world->rank(), r);
    EXPECT_EQ(g.expert_parallel->size(), ep);
    EXPECT_EQ(g.expert_parallel->rank(), g.ep_rank);
    EXPECT_EQ(g.data_parallel->size(), P / ep);
    EXPECT_EQ(g.data_parallel->rank(), g.dp_rank);
    const int32_t me = r;
    std::vector<int32_t> ep_members(ep), dp_members(P / ep);
    g.expert_parallel->all_gather(&me, ep_members.data(), sizeof me);
    for (int q = 0; q < ep; ++q) EXPECT_EQ(ep_members[q], (r / ep) * ep + q) << "EP group: consecutive ranks";
    g.data_parallel->all_gather(&me, dp_members.data(), sizeof me);
    for (int q = 0; q < P / ep; ++q) EXPECT_EQ(dp_members[q], q * ep + r % ep) << "DP group: same ep_rank";
    float one = 1;
    g.expert_parallel->all_reduce_sum(&one, 1);
    EXPECT_EQ(one, static_cast<float>(ep));
    check_all_to_all(*g.expert_parallel, a2a_rows, 3);
    g.world->barrier();
  }
}

TEST(Comm, ProcessGroupsDivisibilityError) {
  auto w = Communicator::world();
  const int P = w->size();
  for (int ep : {P + 1, 3 * P}) {
    if (P % ep == 0) continue;
    try {
      make_process_groups(*w, ep);
      ADD_FAILURE() << "expert_parallel " << ep << " accepted at world size " << P;
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_TRUE(contains(m, "parallel.expert_parallel")) << m;
      EXPECT_TRUE(contains(m, std::to_string(ep))) << m;
      EXPECT_TRUE(contains(m, "world size " + std::to_string(P))) << m;
    }
  }
  try {
    make_process_groups(*w, 0);
    ADD_FAILURE() << "expert_parallel 0 accepted";
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "parallel.expert_parallel")) << e.what();
  }
  w->barrier();  // nothing was left half-done
}

TEST(Comm, BackendFactory) {
  auto mpi = make_communicator("mpi");
  EXPECT_STREQ(mpi->name(), "mpi");
  EXPECT_TRUE(backend_available("mpi"));
  EXPECT_FALSE(backend_available("gloo"));
  try {
    make_communicator("gloo");
    ADD_FAILURE() << "unknown backend accepted";
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "gloo")) << e.what();
  }
  // NCCL: unavailable without CUDA; in CUDA builds it needs one GPU per rank. Either way every rank must come to
  // the same outcome (a setup failure on one rank is an error on all), never a hang.
  int ok = 0;
  try {
    auto nccl = make_communicator("nccl", 30);
    EXPECT_STREQ(nccl->name(), "nccl");
    EXPECT_EQ(nccl->size(), mpi->size());
    nccl->barrier_with_deadline(30);
    ok = 1;
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "nccl") || contains(e.what(), "NCCL")) << e.what();
  }
  double oks = ok;
  mpi->all_reduce_sum(&oks, 1);
  EXPECT_TRUE(oks == 0 || oks == mpi->size()) << oks << " of " << mpi->size() << " ranks created an NCCL communicator";
}

// Rank 0 is late for a barrier: the others get an error naming the operation and the timeout within the deadline
// instead of hanging; then rank 0 enters, the pending barrier completes everywhere and the communicator still works.
TEST(Comm, BarrierDeadline) {
  auto w = Communicator::world();
  const int P = w->size(), r = w->rank();
  EXPECT_THROW(w->barrier_with_deadline(0), Error);  // a deadline is required (local check)
  if (P == 1) {
    const auto t0 = Clock::now();
    w->barrier_with_deadline(0.5);  // nobody to wait for
    EXPECT_LT(seconds_since(t0), 0.5);
    return;
  }
  const MPI_Comm h = handle_of(*w);
  if (r != 0) {
    const auto t0 = Clock::now();
    try {
      w->barrier_with_deadline(0.5);
      ADD_FAILURE() << "the barrier completed without rank 0";
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_TRUE(contains(m, "barrier") && contains(m, "timed out") && contains(m, "0.5") &&
                  contains(m, "rank " + std::to_string(r)))
          << m;
    }
    const double dt = seconds_since(t0);
    EXPECT_GE(dt, 0.49);
    EXPECT_LT(dt, 1.5);
    int timed_out = 1;  // tell rank 0 (point to point: independent of the pending collective)
    MPI_Send(&timed_out, 1, MPI_INT, 0, 17, h);
    w->barrier();  // completes the pending barrier once rank 0 has entered it
  } else {
    for (int q = 1; q < P; ++q) {
      int timed_out = 0;
      MPI_Recv(&timed_out, 1, MPI_INT, q, 17, h, MPI_STATUS_IGNORE);
    }
    const auto t0 = Clock::now();
    w->barrier_with_deadline(5);  // late, but the others are still in it
    EXPECT_LT(seconds_since(t0), 2.0);
  }
  w->set_deadline(10);
  double x = 1;
  w->all_reduce_sum(&x, 1);
  EXPECT_EQ(x, static_cast<double>(P));
  check_all_to_all(*w, a2a_rows, 2);
}

// A data collective past its deadline: an error naming it, and the communicator refuses further work (the job is
// expected to abort). When the late rank does arrive, the abandoned operation completes before the communicator
// is freed, so nothing is left pending at MPI_Finalize.
TEST(Comm, CollectiveDeadlineBreaksCommunicator) {
  auto w = Communicator::world();
  const int P = w->size(), r = w->rank();
  std::vector<float> buf(4, 1.0f);  // outlives the communicator: a timed-out all-reduce may complete later
  if (P == 1) {
    auto c = w->split(0, 0);
    c->set_deadline(0.5);
    c->all_reduce_sum(buf.data(), buf.size());
    EXPECT_EQ(buf[0], 1.0f);
    return;
  }
  const MPI_Comm h = handle_of(*w);
  {
    auto c = w->split(0, r);
    c->set_deadline(0.5);
    if (r != 0) {
      const auto t0 = Clock::now();
      try {
        c->all_reduce_sum(buf.data(), buf.size());
        ADD_FAILURE() << "the all-reduce completed without rank 0";
      } catch (const Error& e) {
        const std::string m = e.what();
        EXPECT_TRUE(contains(m, "all_reduce_sum") && contains(m, "timed out") && contains(m, "0.5")) << m;
      }
      const double dt = seconds_since(t0);
      EXPECT_GE(dt, 0.49);
      EXPECT_LT(dt, 1.5);
      try {
        c->barrier();
        ADD_FAILURE() << "a timed-out communicator accepted more work";
      } catch (const Error& e) {
        EXPECT_TRUE(contains(e.what(), "unusable")) << e.what();
      }
      int timed_out = 1;
      MPI_Send(&timed_out, 1, MPI_INT, 0, 18, h);
    } else {
      for (int q = 1; q < P; ++q) {
        int timed_out = 0;
        MPI_Recv(&timed_out, 1, MPI_INT, q, 18, h, MPI_STATUS_IGNORE);
      }
      c->set_deadline(10);
      c->all_reduce_sum(buf.data(), buf.size());  // the late rank: the others' abandoned all-reduce is this one
    }
  }  // the others' destructors complete their abandoned request (bounded wait) before freeing the communicator
  for (float v : buf) EXPECT_EQ(v, static_cast<float>(P));
  w->barrier();
}

}  // namespace
}  // namespace moe::comm
