// Process groups: world = data parallel x expert parallel (see communicator.h). Backend-independent.
#include "comm/communicator.h"
#include "core/error.h"

namespace moe::comm {

ProcessGroups make_process_groups(Communicator& world, int expert_parallel) {
  const int W = world.size();
  MOE_CHECK(expert_parallel >= 1, "config field parallel.expert_parallel = " << expert_parallel << ": must be >= 1");
  MOE_CHECK(W % expert_parallel == 0, "config field parallel.expert_parallel = "
                                          << expert_parallel << ": the world size " << W
                                          << " must be divisible by it (world = data parallel x expert parallel)");
  ProcessGroups g;
  g.ep_size = expert_parallel;
  g.dp_size = W / expert_parallel;
  g.ep_rank = world.rank() % expert_parallel;
  g.dp_rank = world.rank() / expert_parallel;
  g.world = world.split(0, world.rank());
  g.expert_parallel = world.split(g.dp_rank, g.ep_rank);
  g.data_parallel = world.split(g.ep_rank, g.dp_rank);
  return g;
}

}  // namespace moe::comm
