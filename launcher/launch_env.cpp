#include "launcher/launch_env.h"

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>

#include "core/error.h"

namespace moe::launcher {
namespace {

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (!v) return std::nullopt;
  return std::string(v);
}

int parse_int(const std::string& s, const std::string& what) {
  size_t pos = 0;
  long v = 0;
  try {
    v = std::stol(s, &pos);
  } catch (...) {
    MOE_THROW(what << " = '" << s << "' is not an integer");
  }
  MOE_CHECK(pos == s.size(), what << " = '" << s << "' is not an integer");
  MOE_CHECK(v >= 0 && v <= (1L << 30), what << " = " << s << " is out of range");
  return static_cast<int>(v);
}

// An integer environment variable, or nullopt when unset; throws when set but malformed.
std::optional<int> env_int(const char* name) {
  auto v = env(name);
  if (!v) return std::nullopt;
  return parse_int(*v, std::string("environment variable ") + name);
}

int require_env_int(const char* name, const char* launcher) {
  auto v = env_int(name);
  MOE_CHECK(v.has_value(), "launched by " << launcher << " but environment variable " << name << " is not set");
  return *v;
}

bool srun_task() { return env("SLURM_STEP_ID") && env("SLURM_PROCID"); }
bool mpirun_task() { return env("OMPI_COMM_WORLD_SIZE").has_value(); }

}  // namespace

std::vector<int> parse_tasks_per_node(const std::string& spec) {
  std::vector<int> out;
  MOE_CHECK(!spec.empty(), "empty tasks-per-node list");
  size_t i = 0;
  while (i <= spec.size()) {
    const size_t comma = spec.find(',', i);
    const std::string item = spec.substr(i, comma == std::string::npos ? std::string::npos : comma - i);
    MOE_CHECK(!item.empty(), "tasks-per-node list '" << spec << "': empty item");
    const size_t paren = item.find('(');
    int count = 0, repeat = 1;
    if (paren == std::string::npos) {
      count = parse_int(item, "tasks-per-node list '" + spec + "' item");
    } else {
      MOE_CHECK(item.size() > paren + 3 && item.compare(paren, 2, "(x") == 0 && item.back() == ')',
                "tasks-per-node list '" << spec << "': malformed item '" << item << "' (expected N or N(xR))");
      count = parse_int(item.substr(0, paren), "tasks-per-node list '" + spec + "' item");
      repeat = parse_int(item.substr(paren + 2, item.size() - paren - 3), "tasks-per-node list '" + spec + "' repeat");
    }
    out.insert(out.end(), repeat, count);
    if (comma == std::string::npos) break;
    i = comma + 1;
  }
  return out;
}

LaunchInfo detect_launch(int mpi_rank, int mpi_size) {
  MOE_CHECK(mpi_size >= 1 && mpi_rank >= 0 && mpi_rank < mpi_size,
            "MPI rank " << mpi_rank << " of world size " << mpi_size << " is invalid");
  LaunchInfo info;
  info.rank = mpi_rank;
  info.size = mpi_size;
  if (mpirun_task()) {  // mpirun/mpiexec (also inside a Slurm allocation, where SLURM_* are inherited)
    info.launcher = "mpirun";
    info.local_rank = require_env_int("OMPI_COMM_WORLD_LOCAL_RANK", "mpirun");
    info.local_size = require_env_int("OMPI_COMM_WORLD_LOCAL_SIZE", "mpirun");
  } else if (srun_task()) {  // srun direct launch (PMIx)
    info.launcher = "slurm";
    info.local_rank = require_env_int("SLURM_LOCALID", "srun");
    std::optional<int> local;
    if (auto per_node = env("SLURM_STEP_TASKS_PER_NODE")) {
      const std::vector<int> counts = parse_tasks_per_node(*per_node);
      const int node = env_int("SLURM_NODEID").value_or(0);
      MOE_CHECK(node < static_cast<int>(counts.size()),
                "SLURM_NODEID = " << node << " but SLURM_STEP_TASKS_PER_NODE = '" << *per_node << "' lists "
                                  << counts.size() << " node(s)");
      local = counts[node];
    }
    if (!local) local = env_int("SLURM_NTASKS_PER_NODE");
    if (!local) {
      const int tasks = env_int("SLURM_STEP_NUM_TASKS").value_or(mpi_size);
      const int nodes = std::max(env_int("SLURM_STEP_NUM_NODES").value_or(1), 1);
      local = (tasks + nodes - 1) / nodes;
    }
    info.local_size = std::max(*local, 1);
  } else if (mpi_size == 1) {
    info.launcher = "singleton";
    info.local_rank = 0;
    info.local_size = 1;
  } else {  // another launcher (prterun, hydra, ...): assume one node
    info.launcher = "unknown";
    info.local_rank = mpi_rank;
    info.local_size = mpi_size;
  }
  return info;
}

int select_device(const LaunchInfo& info, int device_count) {
  MOE_CHECK(device_count > 0,
            "a GPU was requested but no CUDA device is visible to rank "
                << info.rank << " (local rank " << info.local_rank << ", launched by " << info.launcher
                << "; check CUDA_VISIBLE_DEVICES and, under Slurm, --gpus-per-task)");
  return info.local_rank % device_count;
}

void check_launch_before_mpi() {
  if (mpirun_task() || !srun_task()) return;
  if (env("PMIX_RANK") || env("PMIX_NAMESPACE")) return;  // srun --mpi=pmix (or MpiDefault=pmix)
  const std::string tasks = env("SLURM_STEP_NUM_TASKS").value_or("?");
  const std::string type = env("SLURM_MPI_TYPE").value_or("none");
  MOE_THROW("srun started " << tasks << " task(s) without PMIx (MPI plugin '" << type
                            << "'): Open MPI cannot initialise; launch with srun --mpi=pmix "
                               "(Debian's Open MPI has no PMI2 support)");
}

void check_launch_environment(const LaunchInfo& info) {
  if (info.launcher == "slurm") {
    if (auto tasks = env_int("SLURM_STEP_NUM_TASKS"); tasks && *tasks != info.size) {
      if (info.size == 1)
        MOE_THROW("srun started " << *tasks << " tasks but MPI sees a world of 1: launch with srun --mpi=pmix "
                                     "(Debian's Open MPI has no PMI2 support)");
      MOE_THROW("srun started " << *tasks << " tasks but MPI sees a world of " << info.size
                                << ": every task must be one MPI rank of the same job (srun --mpi=pmix)");
    }
  }
  if (info.launcher == "mpirun") {
    if (auto size = env_int("OMPI_COMM_WORLD_SIZE"); size && *size != info.size)
      MOE_THROW("mpirun started " << *size << " ranks but MPI sees a world of " << info.size);
  }
  MOE_CHECK(info.local_size >= 1 && info.local_rank >= 0 && info.local_rank < info.local_size,
            "launched by " << info.launcher << ": local rank " << info.local_rank << " is outside the "
                           << info.local_size << " process(es) on this node");
}

}  // namespace moe::launcher
