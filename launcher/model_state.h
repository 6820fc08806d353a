// The model/optimizer state <-> checkpoint tensors mapping:
//   params/<name>, optim/m/<name>, optim/v/<name>, optim/row_t/<name> (row-sparse params), routing/<layer prefix>
// Expert-sharded tensors are stored with their global shape [E, ...] (gathered from the expert-parallel group by
// the caller's gather function) and read back as this rank's rows, so a checkpoint loads at any expert-parallel
// size that divides E.
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "core/optimizer.h"
#include "core/params.h"

namespace moe::launcher {

// Turns a local expert shard [El, ...] into the global tensor [E, ...] (identity on one rank).
using GatherFn = std::function<Tensor(const Tensor& local)>;

std::vector<ckpt::NamedTensor> collect_state(const ParamStore& ps, AdamW* opt,
                                             const std::map<std::string, std::vector<int32_t>>& routing,
                                             const GatherFn& gather);

// Loads params (and optimizer state if opt) from the reader; expert-sharded tensors read rows
// [ep_rank * El, (ep_rank + 1) * El).
void restore_state(ckpt::Reader& r, ParamStore& ps, AdamW* opt, int ep_rank);

// Routing tables stored in a checkpoint, by layer prefix.
std::map<std::string, std::vector<int32_t>> read_routing_tables(ckpt::Reader& r, const proto::Manifest& m);

}  // namespace moe::launcher
