// The model/optimizer state <-> checkpoint tensors mapping:
//   params/<name>, optim/m/<name>, optim/v/<name>, optim/row_t/<name> (row-sparse params), routing/<layer prefix>
// Expert-sharded tensors are written by the expert-parallel rank that owns them (checkpoints/saver.h) and stored
// with their global shape [E, ...] (shard files + a virtual dataset, checkpoints/checkpoint.h); they are read back
// as this rank's rows, so a checkpoint loads at any expert-parallel size that divides E.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "checkpoints/saver.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "core/params.h"

namespace moe::launcher {

using ckpt::LocalTensor;  // checkpoints/saver.h
std::vector<LocalTensor> collect_local_state(const ParamStore& ps, AdamW* opt,
                                             const std::map<std::string, std::vector<int32_t>>& routing);

// The state of a one-rank model (which holds every expert) as global tensors, for ckpt::save.
std::vector<ckpt::NamedTensor> collect_state(const ParamStore& ps, AdamW* opt,
                                             const std::map<std::string, std::vector<int32_t>>& routing);

// Loads params (and optimizer state if opt) from the reader; expert-sharded tensors read rows
// [ep_rank * El, (ep_rank + 1) * El).
void restore_state(ckpt::Reader& r, ParamStore& ps, AdamW* opt, int ep_rank);

// Routing tables stored in a checkpoint, by layer prefix.
std::map<std::string, std::vector<int32_t>> read_routing_tables(ckpt::Reader& r, const proto::Manifest& m);

// The jitter-noise RNG of every learned router (a stateful xoshiro stream advanced by each training forward, the
// same on every rank: each draws N_local * C numbers per step), by layer prefix "layers.<l>.ffn".
std::vector<proto::RngState> router_rng_states(Model& model);
// Restores them from a manifest; returns the number of routers whose state was found (routers without one keep
// the stream of their seed, as a fresh run has).
int restore_router_rng(Model& model, const proto::Manifest& m);

}  // namespace moe::launcher
