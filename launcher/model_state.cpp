#include "launcher/model_state.h"

#include <cstring>

namespace moe::launcher {

std::vector<ckpt::NamedTensor> collect_state(const ParamStore& ps, AdamW* opt,
                                             const std::map<std::string, std::vector<int32_t>>& routing,
                                             const GatherFn& gather) {
  std::vector<ckpt::NamedTensor> out;
  const auto& all = ps.all();
  auto global = [&](const Param* p, const Tensor& t) { return p->expert_sharded ? gather(t) : t; };
  for (const Param* p : all) out.push_back({"params/" + p->name, global(p, p->value)});
  if (opt) {
    for (size_t i = 0; i < all.size(); ++i) {
      out.push_back({"optim/m/" + all[i]->name, global(all[i], opt->m()[i])});
      out.push_back({"optim/v/" + all[i]->name, global(all[i], opt->v()[i])});
      if (all[i]->row_sparse) out.push_back({"optim/row_t/" + all[i]->name, global(all[i], opt->row_t()[i])});
    }
  }
  for (const auto& [prefix, table] : routing) {
    if (table.empty()) continue;
    out.push_back({"routing/" + prefix, Tensor::from_vector(table, {static_cast<int64_t>(table.size())})});
  }
  return out;
}

void restore_state(ckpt::Reader& r, ParamStore& ps, AdamW* opt, int ep_rank) {
  const auto& all = ps.all();
  auto offset = [&](const Param* p) { return p->expert_sharded ? int64_t(ep_rank) * p->value.dim(0) : 0; };
  for (Param* p : all) r.read("params/" + p->name, p->value, offset(p));
  if (!opt) return;
  for (size_t i = 0; i < all.size(); ++i) {
    r.read("optim/m/" + all[i]->name, opt->m()[i], offset(all[i]));
    r.read("optim/v/" + all[i]->name, opt->v()[i], offset(all[i]));
    if (all[i]->row_sparse) r.read("optim/row_t/" + all[i]->name, opt->row_t()[i], offset(all[i]));
  }
}

std::map<std::string, std::vector<int32_t>> read_routing_tables(ckpt::Reader& r, const proto::Manifest& m) {
  std::map<std::string, std::vector<int32_t>> out;
  const std::string pre = "routing/";
  for (const auto& e : m.tensors()) {
    if (e.name().rfind(pre, 0) != 0) continue;
    Tensor t = Tensor::empty(r.shape(e.name()), DType::kI32);
    r.read(e.name(), t);
    out[e.name().substr(pre.size())].assign(t.i32(), t.i32() + t.numel());
  }
  return out;
}

}  // namespace moe::launcher
