#include "checkpoints/model_layout.h"

#include "checkpoints/naming.h"
#include "core/model.h"
#include "core/params.h"
#include "experts/build_model.h"

namespace moe::ckpt {

std::vector<ParamLayout> model_layout(const Config& cfg, const RoutingTables& routing) {
  UnitState state;
  state.tables = routing;
  Config one = cfg;  // one rank holding every expert: global shapes
  one.mutable_parallel()->set_expert_parallel(1);
  auto model = experts::build_model(one, {.state = &state, .init = false, .sized_only = true});
  std::vector<ParamLayout> out;
  for (const Param* p : model->params().all()) out.push_back({p->name, p->value.shape(), p->expert_sharded});
  return out;
}

std::set<std::string> sharded_keys(const std::vector<ParamLayout>& layout) {
  std::set<std::string> out;
  for (const ParamLayout& p : layout) {
    if (!p.expert_sharded) continue;
    for (TensorKind k : {TensorKind::kParam, TensorKind::kOptimM, TensorKind::kOptimV, TensorKind::kOptimRowT})
      out.insert(key_of(k, p.name));
  }
  return out;
}

std::map<std::string, bool> manifest_sharding(const proto::Manifest& m, const RoutingTables& routing) {
  std::map<std::string, bool> out;
  std::set<std::string> from_model;
  if (m.format_version() < 2) from_model = sharded_keys(model_layout(m.config(), routing));
  for (const auto& e : m.tensors())
    out[e.name()] = e.shards_size() > 0 || from_model.count(e.name()) > 0;
  return out;
}

}  // namespace moe::ckpt
