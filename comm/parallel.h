// The parallel layout of a run (world = data-parallel x expert-parallel) and the collective steps the trainer
// needs: mean of a scalar over ranks, gradient reduction, gathering expert shards (tests and checks; checkpoints
// are written per rank, checkpoints/saver.h). On one process without MPI, give it a SelfCommunicator
// (comm/self_comm.h).
#pragma once
#include <memory>

#include "comm/communicator.h"
#include "core/params.h"
#include "core/tensor.h"

namespace moe::comm {

class Parallel {
 public:
  // expert_parallel: parallel.expert_parallel (must divide the world size).
  Parallel(std::unique_ptr<Communicator> world, int expert_parallel);
  int rank() const { return groups_.world->rank(); }
  int size() const { return groups_.world->size(); }
  int ep_rank() const { return groups_.ep_rank; }
  int dp_rank() const { return groups_.dp_rank; }  // data-parallel replica index (0 .. dp_size - 1)
  int ep_size() const { return groups_.ep_size; }
  int dp_size() const { return groups_.dp_size; }
  Communicator& world() { return *groups_.world; }
  Communicator* expert_group() { return groups_.ep_size > 1 ? groups_.expert_parallel.get() : nullptr; }

  double mean(double v);   // over the world
  double sum_expert_group(double v);  // over the expert-parallel group
  bool any(bool flag);     // logical or over the world

  // Averages gradients over the global batch: non-expert gradients are summed over the world, expert-sharded ones
  // over their data-parallel replicas only (row-sparse ones over the union of the replicas' touched rows), then
  // divided by the world size (each rank's loss is the mean over its own equal share of the batch).
  void reduce_grads(ParamStore& ps);

  // Local expert shard [El, ...] -> global tensor [E, ...] in expert order (all-gather over the EP group).
  Tensor gather_experts(const Tensor& local);

 private:
  ProcessGroups groups_;
  std::vector<float> flat_;
};

}  // namespace moe::comm
