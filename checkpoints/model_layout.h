// What a checkpoint's tensors are, from the model's parameter declarations: the ONE place where checkpoint code
// builds a model (from its config). A tensor's sharding otherwise comes from data: NamedTensor::sharded /
// LocalTensor::sharded, or a format-2 manifest entry having shards; a format-1 checkpoint (no shard info) takes it
// from here.
#pragma once
#include <map>
#include <set>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "proto/manifest.pb.h"

namespace moe::ckpt {

// Word-expert routing tables by layer prefix (routing/<prefix> tensors); the model needs them to be built.
using RoutingTables = std::map<std::string, std::vector<int32_t>>;

struct ParamLayout {
  std::string name;     // parameter name (without params/)
  Shape shape;          // global shape (one rank holding every expert)
  bool expert_sharded;  // Param::expert_sharded
};

// The parameters of the model of cfg.model() on one rank holding every expert, in registration order.
std::vector<ParamLayout> model_layout(const Config& cfg, const RoutingTables& routing);

// The checkpoint keys (params/<p>, optim/m|v|row_t/<p>) of the expert-sharded parameters of a layout.
std::set<std::string> sharded_keys(const std::vector<ParamLayout>& layout);

// Whether each tensor of a manifest is sharded: format 2 (and later) by its entry having shards; format 1 (no
// shard info) by the model's declarations (model_layout of the manifest's config and these routing tables).
std::map<std::string, bool> manifest_sharding(const proto::Manifest& m, const RoutingTables& routing);

}  // namespace moe::ckpt
