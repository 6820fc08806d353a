// How this process was launched (mpirun, srun, or alone), read from the launchers' environment variables, and
// checks that turn known launch mistakes into clear errors instead of MPI's own aborts or silent duplicate runs.
#pragma once
#include <string>
#include <vector>

namespace moe::launcher {

struct LaunchInfo {
  int rank = 0;             // MPI world rank
  int size = 1;             // MPI world size
  int local_rank = 0;       // rank among the processes on this node (picks the GPU)
  int local_size = 1;       // processes on this node
  std::string launcher;     // "mpirun", "slurm" (srun direct launch), "singleton"; "unknown": another launcher
                            // started several ranks (local rank = world rank % local size, local size = world size)
};

// Call after MPI_Init with the world rank and size. Sources:
//   mpirun (Open MPI): OMPI_COMM_WORLD_SIZE set -> OMPI_COMM_WORLD_LOCAL_RANK / OMPI_COMM_WORLD_LOCAL_SIZE
//   srun:  SLURM_STEP_ID and SLURM_PROCID set -> SLURM_LOCALID, and the tasks on this node from
//          SLURM_STEP_TASKS_PER_NODE[SLURM_NODEID] (else SLURM_NTASKS_PER_NODE, else SLURM_STEP_NUM_TASKS /
//          SLURM_STEP_NUM_NODES rounded up)
//   else:  "singleton" when the world has one rank, "unknown" otherwise (PMIX_RANK etc. give no node layout).
// Throws moe::Error when a variable the launcher always sets is missing or not an integer.
LaunchInfo detect_launch(int mpi_rank, int mpi_size);

// The GPU a rank uses when CUDA is on: local_rank % device_count. Under Slurm with --gpus-per-task=1 each task
// sees one device (CUDA_VISIBLE_DEVICES), so this is 0. Throws moe::Error when device_count <= 0 (a GPU was
// requested but none is visible).
int select_device(const LaunchInfo& info, int device_count);

// Call BEFORE MPI_Init: a task started by srun without PMIx (--mpi=none, --mpi=pmi2, MpiDefault=none) makes Debian's
// Open MPI abort inside MPI_Init with a long message about rebuilding Open MPI. Throws moe::Error naming the fix
// (srun --mpi=pmix) instead.
void check_launch_before_mpi();

// Call after detect_launch: throws moe::Error for launch mistakes visible from inside:
//   srun started N > 1 tasks but MPI sees a world of 1 (each task is its own singleton: N duplicate runs);
//   srun's task count differs from the MPI world size;
//   local_rank outside [0, local_size).
void check_launch_environment(const LaunchInfo& info);

// "2(x3),1" (SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE) -> {2, 2, 2, 1}. Throws moe::Error if malformed.
std::vector<int> parse_tasks_per_node(const std::string& spec);

}  // namespace moe::launcher
