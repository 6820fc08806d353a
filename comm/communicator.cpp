// Process groups: world = data parallel x expert parallel (see communicator.h). Backend-independent.
#include "comm/communicator.h"

#include "core/error.h"
#include "core/log.h"

namespace moe::comm {

ProcessGroups make_process_groups(Communicator& world, int expert_parallel) {
  const int W = world.size();
  MOE_CHECK(expert_parallel >= 1, "config field parallel.expert_parallel = " << expert_parallel << ": must be >= 1");
  MOE_CHECK(W % expert_parallel == 0, "config field parallel.expert_parallel = "
                                          << expert_parallel << " does not divide the world size " << W
                                          << " (world = data parallel x expert parallel)");
  ProcessGroups g;
  g.ep_size = expert_parallel;
  g.dp_size = W / expert_parallel;
  g.ep_rank = world.rank() % expert_parallel;
  g.dp_rank = world.rank() / expert_parallel;
  // three splits, same order on every rank (they are collective over `world`)
  g.world = world.split(0, world.rank());
  g.expert_parallel = world.split(g.dp_rank, g.ep_rank);  // consecutive ranks
  g.data_parallel = world.split(g.ep_rank, g.dp_rank);    // same expert shard, one per EP group
  MOE_CHECK(g.expert_parallel->size() == g.ep_size && g.expert_parallel->rank() == g.ep_rank &&
                g.data_parallel->size() == g.dp_size && g.data_parallel->rank() == g.dp_rank,
            "process groups: split gave EP " << g.expert_parallel->rank() << "/" << g.expert_parallel->size()
                                             << " and DP " << g.data_parallel->rank() << "/"
                                             << g.data_parallel->size() << ", expected EP " << g.ep_rank << "/"
                                             << g.ep_size << " and DP " << g.dp_rank << "/" << g.dp_size);
  MOE_DEBUG("process groups: world " << W << " = data parallel " << g.dp_size << " x expert parallel " << g.ep_size
                                     << "; this rank: dp_rank " << g.dp_rank << ", ep_rank " << g.ep_rank);
  return g;
}

}  // namespace moe::comm
