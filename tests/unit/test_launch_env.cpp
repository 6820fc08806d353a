// detect_launch / select_device / launch checks against the environments mpirun and srun set up (variables as
// observed with Open MPI 4.1.4 and Slurm 22.05). Every test saves and restores the variables it touches.
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <map>
#include <optional>
#include <string>

#include "core/error.h"
#include "launcher/launch_env.h"
#include "tests/unit/oracle.h"

namespace moe::launcher {
namespace {

using test::error_of;

const char* kVars[] = {"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                       "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID",
                       "SLURM_NODEID", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_NUM_TASKS",
                       "SLURM_STEP_NUM_NODES", "SLURM_MPI_TYPE", "PMIX_RANK", "PMIX_NAMESPACE"};

// Clears every launcher variable for the test and puts the original values back afterwards.
class LaunchEnvTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* v : kVars) {
      const char* s = std::getenv(v);
      saved_[v] = s ? std::optional<std::string>(s) : std::nullopt;
      unsetenv(v);
    }
  }
  void TearDown() override {
    for (const auto& [k, v] : saved_) {
      if (v) setenv(k.c_str(), v->c_str(), 1);
      else unsetenv(k.c_str());
    }
  }
  static void set(const std::map<std::string, std::string>& vars) {
    for (const auto& [k, v] : vars) setenv(k.c_str(), v.c_str(), 1);
  }
  // what `srun -n <tasks> --mpi=pmix` sets for task <procid> on node 0 (one node)
  static void srun_env(int tasks, int procid, bool pmix = true) {
    set({{"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", std::to_string(procid)}, {"SLURM_LOCALID", std::to_string(procid)},
         {"SLURM_NODEID", "0"}, {"SLURM_STEP_NUM_TASKS", std::to_string(tasks)}, {"SLURM_STEP_NUM_NODES", "1"},
         {"SLURM_STEP_TASKS_PER_NODE", std::to_string(tasks)}});
    if (pmix) set({{"SLURM_MPI_TYPE", "pmix"}, {"PMIX_RANK", std::to_string(procid)}, {"PMIX_NAMESPACE", "slurm.pmix.4.0"}});
  }

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

TEST_F(LaunchEnvTest, SingletonWithoutLauncherVariables) {
  LaunchInfo i = detect_launch(0, 1);
  EXPECT_EQ(i.launcher, "singleton");
  EXPECT_EQ(i.rank, 0);
  EXPECT_EQ(i.size, 1);
  EXPECT_EQ(i.local_rank, 0);
  EXPECT_EQ(i.local_size, 1);
  EXPECT_NO_THROW(check_launch_before_mpi());
  EXPECT_NO_THROW(check_launch_environment(i));
}

TEST_F(LaunchEnvTest, Mpirun) {
  set({{"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
       {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}, {"PMIX_RANK", "3"}});
  LaunchInfo i = detect_launch(3, 4);
  EXPECT_EQ(i.launcher, "mpirun");
  EXPECT_EQ(i.local_rank, 1);
  EXPECT_EQ(i.local_size, 2);
  EXPECT_NO_THROW(check_launch_before_mpi());
  EXPECT_NO_THROW(check_launch_environment(i));
}

TEST_F(LaunchEnvTest, MpirunInsideSlurmAllocationIsMpirun) {
  // ranks started by mpirun within sbatch/salloc inherit SLURM_* (remote ones from orted's srun step)
  srun_env(1, 0, /*pmix=*/false);
  set({{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
  LaunchInfo i = detect_launch(0, 2);
  EXPECT_EQ(i.launcher, "mpirun");
  EXPECT_EQ(i.local_size, 2);
  EXPECT_NO_THROW(check_launch_before_mpi());
  EXPECT_NO_THROW(check_launch_environment(i));
}

TEST_F(LaunchEnvTest, MpirunMissingLocalRankIsAnError) {
  set({{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
  EXPECT_NE(error_of([] { detect_launch(0, 2); }).find("OMPI_COMM_WORLD_LOCAL_RANK is not set"), std::string::npos);
}

TEST_F(LaunchEnvTest, MalformedVariableIsAnError) {
  set({{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "x1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
  EXPECT_NE(error_of([] { detect_launch(0, 2); }).find("OMPI_COMM_WORLD_LOCAL_RANK = 'x1' is not an integer"),
            std::string::npos);
}

TEST_F(LaunchEnvTest, SrunPmix) {
  srun_env(2, 1);
  LaunchInfo i = detect_launch(1, 2);
  EXPECT_EQ(i.launcher, "slurm");
  EXPECT_EQ(i.local_rank, 1);
  EXPECT_EQ(i.local_size, 2);
  EXPECT_NO_THROW(check_launch_before_mpi());
  EXPECT_NO_THROW(check_launch_environment(i));
}

TEST_F(LaunchEnvTest, SrunMultiNodeLocalSizeFromTasksPerNode) {
  // srun -N 3 -n 7: tasks per node "3(x2),1"; procid 6 is the only task of node 2
  set({{"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", "6"}, {"SLURM_LOCALID", "0"}, {"SLURM_NODEID", "2"},
       {"SLURM_STEP_NUM_TASKS", "7"}, {"SLURM_STEP_NUM_NODES", "3"}, {"SLURM_STEP_TASKS_PER_NODE", "3(x2),1"},
       {"PMIX_RANK", "6"}});
  LaunchInfo i = detect_launch(6, 7);
  EXPECT_EQ(i.local_rank, 0);
  EXPECT_EQ(i.local_size, 1);
  setenv("SLURM_NODEID", "1", 1);
  setenv("SLURM_LOCALID", "2", 1);
  i = detect_launch(5, 7);
  EXPECT_EQ(i.local_rank, 2);
  EXPECT_EQ(i.local_size, 3);
  EXPECT_NO_THROW(check_launch_environment(i));
}

TEST_F(LaunchEnvTest, SrunLocalSizeFallbacks) {
  set({{"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", "0"}, {"SLURM_LOCALID", "0"}, {"SLURM_NTASKS_PER_NODE", "4"}});
  EXPECT_EQ(detect_launch(0, 8).local_size, 4);
  unsetenv("SLURM_NTASKS_PER_NODE");
  set({{"SLURM_STEP_NUM_TASKS", "8"}, {"SLURM_STEP_NUM_NODES", "3"}});
  EXPECT_EQ(detect_launch(0, 8).local_size, 3);  // rounded up
}

TEST_F(LaunchEnvTest, ParseTasksPerNode) {
  EXPECT_EQ(parse_tasks_per_node("2"), (std::vector<int>{2}));
  EXPECT_EQ(parse_tasks_per_node("2(x3),1"), (std::vector<int>{2, 2, 2, 1}));
  EXPECT_EQ(parse_tasks_per_node("1,4(x2)"), (std::vector<int>{1, 4, 4}));
  EXPECT_THROW(parse_tasks_per_node(""), Error);
  EXPECT_THROW(parse_tasks_per_node("2(3)"), Error);
  EXPECT_THROW(parse_tasks_per_node("2(x)"), Error);
  EXPECT_THROW(parse_tasks_per_node("2,,1"), Error);
  EXPECT_THROW(parse_tasks_per_node("a"), Error);
}

TEST_F(LaunchEnvTest, SrunWithoutPmixFailsBeforeMpiInit) {
  srun_env(2, 0, /*pmix=*/false);  // srun --mpi=none: no PMIx server for Open MPI to talk to
  std::string e = error_of([] { check_launch_before_mpi(); });
  EXPECT_NE(e.find("srun started 2 task(s) without PMIx (MPI plugin 'none')"), std::string::npos) << e;
  EXPECT_NE(e.find("srun --mpi=pmix"), std::string::npos) << e;
  setenv("SLURM_MPI_TYPE", "pmi2", 1);
  e = error_of([] { check_launch_before_mpi(); });
  EXPECT_NE(e.find("MPI plugin 'pmi2'"), std::string::npos) << e;
  EXPECT_NE(e.find("no PMI2 support"), std::string::npos) << e;
}

TEST_F(LaunchEnvTest, SrunTasksButWorldOfOne) {
  srun_env(2, 1);
  LaunchInfo i = detect_launch(0, 1);  // each task initialised MPI alone
  EXPECT_EQ(i.launcher, "slurm");
  std::string e = error_of([&] { check_launch_environment(i); });
  EXPECT_EQ(e, "srun started 2 tasks but MPI sees a world of 1: launch with srun --mpi=pmix (Debian's Open MPI has "
               "no PMI2 support)");
  i = detect_launch(1, 3);
  e = error_of([&] { check_launch_environment(i); });
  EXPECT_NE(e.find("srun started 2 tasks but MPI sees a world of 3"), std::string::npos) << e;
}

TEST_F(LaunchEnvTest, SingleTaskSrunIsFine) {
  srun_env(1, 0);
  LaunchInfo i = detect_launch(0, 1);
  EXPECT_EQ(i.launcher, "slurm");
  EXPECT_NO_THROW(check_launch_environment(i));
}

TEST_F(LaunchEnvTest, UnknownLauncherWithSeveralRanks) {
  LaunchInfo i = detect_launch(2, 4);
  EXPECT_EQ(i.launcher, "unknown");
  EXPECT_EQ(i.local_rank, 2);
  EXPECT_EQ(i.local_size, 4);
  EXPECT_NO_THROW(check_launch_environment(i));
}

TEST_F(LaunchEnvTest, LocalRankOutOfRangeIsAnError) {
  set({{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "2"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
  LaunchInfo i = detect_launch(0, 2);
  EXPECT_NE(error_of([&] { check_launch_environment(i); }).find("local rank 2 is outside the 2"), std::string::npos);
}

TEST_F(LaunchEnvTest, InvalidMpiRankIsAnError) {
  EXPECT_THROW(detect_launch(2, 2), Error);
  EXPECT_THROW(detect_launch(0, 0), Error);
}

TEST(LaunchEnvDevice, SelectDevice) {
  LaunchInfo i;
  i.launcher = "slurm";
  i.local_size = 4;
  for (int lr = 0; lr < 4; ++lr) {
    i.local_rank = lr;
    EXPECT_EQ(select_device(i, 4), lr);
    EXPECT_EQ(select_device(i, 2), lr % 2);
    EXPECT_EQ(select_device(i, 1), 0);  // --gpus-per-task=1: each task sees one device
  }
  try {
    select_device(i, 0);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("a GPU was requested but no CUDA device is visible"), std::string::npos);
  }
}

}  // namespace
}  // namespace moe::launcher
