#include "launcher/model_state.h"

#include <cstring>

#include "core/error.h"
#include "experts/moe_layer.h"

namespace moe::launcher {

std::vector<LocalTensor> collect_local_state(const ParamStore& ps, AdamW* opt,
                                             const std::map<std::string, std::vector<int32_t>>& routing) {
  std::vector<LocalTensor> out;
  const auto& all = ps.all();
  auto add = [&](const std::string& name, const Param* p, const Tensor& t) {
    out.push_back({name, t, p->expert_sharded});
  };
  for (const Param* p : all) add("params/" + p->name, p, p->value);
  if (opt) {
    for (size_t i = 0; i < all.size(); ++i) {
      add("optim/m/" + all[i]->name, all[i], opt->m()[i]);
      add("optim/v/" + all[i]->name, all[i], opt->v()[i]);
      if (all[i]->row_sparse) add("optim/row_t/" + all[i]->name, all[i], opt->row_t()[i]);
    }
  }
  for (const auto& [prefix, table] : routing) {
    if (table.empty()) continue;
    out.push_back({"routing/" + prefix, Tensor::from_vector(table, {static_cast<int64_t>(table.size())}), false});
  }
  return out;
}

std::vector<ckpt::NamedTensor> collect_state(const ParamStore& ps, AdamW* opt,
                                             const std::map<std::string, std::vector<int32_t>>& routing) {
  std::vector<ckpt::NamedTensor> out;
  for (auto& t : collect_local_state(ps, opt, routing)) out.push_back({t.name, t.tensor, t.sharded});
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

// ---- the learned routers' jitter RNG
namespace {
router::LearnedRouter* learned_router(Model& model, int layer) {
  auto* m = dynamic_cast<experts::MoeFfn*>(&model.ffn(layer));
  return m ? &m->router() : nullptr;
}
}  // namespace

std::vector<proto::RngState> router_rng_states(Model& model) {
  std::vector<proto::RngState> out;
  for (int l = 0; l < model.n_layers(); ++l) {
    router::LearnedRouter* r = learned_router(model, l);
    if (!r) continue;
    proto::RngState s;
    s.set_name("layers." + std::to_string(l) + ".ffn");
    for (uint64_t w : r->rng().state()) s.add_state(w);
    out.push_back(std::move(s));
  }
  return out;
}

int restore_router_rng(Model& model, const proto::Manifest& m) {
  int restored = 0;
  for (int l = 0; l < model.n_layers(); ++l) {
    router::LearnedRouter* r = learned_router(model, l);
    if (!r) continue;
    const std::string name = "layers." + std::to_string(l) + ".ffn";
    for (const auto& s : m.router_rng()) {
      if (s.name() != name) continue;
      MOE_CHECK(s.state_size() == 4, "checkpoint manifest: router RNG state '" << name << "' has " << s.state_size()
                                                                             << " words, expected 4");
      r->rng().set_state({s.state(0), s.state(1), s.state(2), s.state(3)});
      ++restored;
    }
  }
  return restored;
}

}  // namespace moe::launcher
