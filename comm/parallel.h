// The parallel layout of a run (world = data-parallel x expert-parallel) and the collective steps the trainer
// needs: mean of a scalar over ranks, gradient reduction, gathering expert shards (tests and checks; checkpoints
// are written per rank, checkpoints/saver.h). On one process without MPI, give it a SelfCommunicator
// (comm/self_comm.h).
//
// Two sets of process groups: the host ones (MPI: scalars, counts, the checks) and, when given, the same layout over
// a communicator for tensors in the model's memory (NCCL between GPUs, parallel.communicator = "nccl"): the
// gradients and the token rows of the expert all-to-all then go there, device to device. Without one, a device's
// tensors are staged through host memory over the host groups.
#pragma once
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "core/params.h"
#include "core/tensor.h"

namespace moe::comm {

class Parallel {
 public:
  // expert_parallel: parallel.expert_parallel (must divide the world size). tensors: null, or a communicator with
  // the same ranks as `world` that works on the model's tensors (NCCL; collective: its groups are split here too).
  Parallel(std::unique_ptr<Communicator> world, int expert_parallel, std::unique_ptr<Communicator> tensors = nullptr);
  int rank() const { return groups_.world->rank(); }
  int size() const { return groups_.world->size(); }
  int ep_rank() const { return groups_.ep_rank; }
  int dp_rank() const { return groups_.dp_rank; }  // data-parallel replica index (0 .. dp_size - 1)
  int ep_size() const { return groups_.ep_size; }
  int dp_size() const { return groups_.dp_size; }
  Communicator& world() { return *groups_.world; }
  Communicator* expert_group() { return groups_.ep_size > 1 ? groups_.expert_parallel.get() : nullptr; }
  // The expert-parallel group over the model's tensors (the token rows of the all-to-all): null without a tensor
  // communicator or with one expert-parallel rank.
  Communicator* expert_rows_group() {
    return tensors_.world && tensors_.ep_size > 1 ? tensors_.expert_parallel.get() : nullptr;
  }
  bool has_tensor_groups() const { return tensors_.world != nullptr; }

  double mean(double v);   // over the world
  double sum_expert_group(double v);  // over the expert-parallel group
  bool any(bool flag);     // logical or over the world

  // Averages gradients over the global batch: non-expert gradients are summed over the world, expert-sharded ones
  // over their data-parallel replicas only (row-sparse ones over the union of the replicas' touched rows), then
  // divided by the world size (each rank's loss is the mean over its own equal share of the batch). The gradients
  // go over the tensor groups when there are some (the row lists of row-sparse ones over the host groups).
  void reduce_grads(ParamStore& ps);

  // Local expert shard [El, ...] -> global tensor [E, ...] in expert order (all-gather over the EP group).
  Tensor gather_experts(const Tensor& local);

 private:
  // buf[n] in be's memory summed over c (null: unchanged): in place when c reaches that memory (tensor_comm: c is
  // a tensor group; or host memory), else staged through a host buffer
  void all_reduce_on(Communicator* c, bool tensor_comm, Backend& be, float* buf, int64_t n);
  // grads (in be's memory) summed over c and scaled by s: one in place, several packed into one buffer
  void sum_scaled(Communicator* c, bool tensor_comm, Backend& be, const std::vector<Param*>& grads, float s);
  // a row-sparse gradient: the union of the replicas' touched rows summed over the data-parallel group, then the
  // touched rows scaled by s
  void reduce_rows(Param& p, float s);
  // t grown to n floats in be's memory (a Tensor, not a workspace buffer: the Parallel outlives the model's backend)
  static float* grown(Tensor& t, Backend& be, int64_t n);

  ProcessGroups groups_, tensors_;  // host groups; tensor groups (world null when there are none)
  std::vector<float> flat_;         // staging of a device buffer for host groups
  Tensor packed_, index_;           // packed gradients / row indices (int32 in float slots) in the params' memory
};

}  // namespace moe::comm
