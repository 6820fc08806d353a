// WorkerGroup's stop: it never blocks the coordinator's loop (begin_stop returns at once; stopped() moves it on),
// SIGKILL follows the grace for a process that ignores SIGTERM, and a rank outside the launcher's session is
// stopped too. The "launchers" are shell commands standing in for mpirun.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "launcher/worker_group.h"

namespace moe::launcher {
namespace {

using Clock = std::chrono::steady_clock;

double secs_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string log_path() { return ::testing::TempDir() + "worker_group_" + std::to_string(::getpid()) + ".log"; }

WorkerGroup start(const std::string& script) { return WorkerGroup({"sh", "-c", script}, {}, log_path()); }

// polls stopped() as the coordinator's tick does (reaping `child` meanwhile, as mpirun reaps its ranks); the
// seconds it took
double wait_stopped(WorkerGroup& g, double limit_s, WorkerGroup* child = nullptr) {
  const auto t0 = Clock::now();
  while (!g.stopped() && secs_since(t0) < limit_s) {
    if (child) child->poll();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return secs_since(t0);
}

// time for the shell to start and set its trap
void settle() { std::this_thread::sleep_for(std::chrono::milliseconds(200)); }

TEST(WorkerGroup, StopOfAGroupThatObeysSigtermIsQuick) {
  WorkerGroup g = start("sleep 30");
  settle();
  const auto t0 = Clock::now();
  g.begin_stop({}, 5.0);
  EXPECT_LT(secs_since(t0), 0.1);
  EXPECT_TRUE(g.stopping());
  EXPECT_LT(wait_stopped(g, 10), 2.0);
  EXPECT_TRUE(g.stopped());
  EXPECT_EQ(g.exit_code(), 128 + SIGTERM);
}

TEST(WorkerGroup, BeginStopDoesNotBlockAndKillsAfterTheGrace) {
  WorkerGroup g = start("trap '' TERM; while :; do sleep 0.05; done");
  settle();
  const auto t0 = Clock::now();
  g.begin_stop({}, 1.0);
  EXPECT_LT(secs_since(t0), 0.1);  // (WorkerGroup::stop would wait the grace out here)
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_FALSE(g.stopped());  // SIGTERM ignored, the grace not over
  const double took = secs_since(t0) + wait_stopped(g, 10);
  EXPECT_GE(took, 1.0);
  EXPECT_LT(took, 4.0);
  EXPECT_EQ(g.exit_code(), 128 + SIGKILL);
}

TEST(WorkerGroup, StopsARankOutsideTheLaunchersSession) {
  WorkerGroup rank = start("trap '' TERM; while :; do sleep 0.05; done");  // its own session, as a remote-ish rank
  WorkerGroup g = start("sleep 30");
  settle();
  g.begin_stop({rank.pid()}, 0.5);
  EXPECT_LT(wait_stopped(g, 10, &rank), 3.0);
  EXPECT_TRUE(g.stopped());
  EXPECT_TRUE(rank.poll());  // reaped: SIGKILL reached it after the grace
  EXPECT_EQ(rank.exit_code(), 128 + SIGKILL);
}

TEST(WorkerGroup, StopIsIdempotent) {
  WorkerGroup g = start("sleep 30");
  g.stop();
  g.stop();
  g.begin_stop();
  EXPECT_TRUE(g.stopped());
}

}  // namespace
}  // namespace moe::launcher
