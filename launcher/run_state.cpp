#include "launcher/run_state.h"

#include "checkpoints/naming.h"
#include "core/config.h"
#include "core/error.h"
#include "experts/build_model.h"

namespace moe::launcher {

RunState RunState::capture(int64_t step, const Model& model, const AdamW& opt, const BatchLoader& loader) {
  RunState s;
  s.step = step;
  s.optimizer_t = opt.t();
  s.loader_rng = loader.state();
  s.units = model.unit_state();
  return s;
}

RunState RunState::read(ckpt::Reader& r, const proto::Manifest& m) {
  RunState s;
  s.step = m.step();
  s.optimizer_t = m.optimizer_t();
  MOE_CHECK(m.loader_rng_size() == 4 || m.loader_rng_size() == 0,
            "checkpoint manifest: data-loader state has " << m.loader_rng_size() << " words, expected 4");
  for (int i = 0; i < m.loader_rng_size(); ++i) s.loader_rng[i] = m.loader_rng(i);
  for (const auto& rs : m.router_rng()) {
    MOE_CHECK(rs.state_size() == 4, "checkpoint manifest: router RNG state '" << rs.name() << "' has "
                                                                            << rs.state_size() << " words, expected 4");
    s.units.rngs[rs.name()] = {rs.state(0), rs.state(1), rs.state(2), rs.state(3)};
  }
  for (const auto& e : m.tensors()) {
    const ckpt::ParsedKey key = ckpt::parse_key(e.name());
    if (key.is_routing()) {
      Tensor t = Tensor::empty(r.shape(e.name()), DType::kI32);
      r.read(e.name(), t);
      s.units.tables[key.name].assign(t.i32(), t.i32() + t.numel());
    } else if (key.is_expert_bias()) {
      Tensor t = Tensor::empty(r.shape(e.name()), DType::kF32);
      r.read(e.name(), t);
      s.units.biases[key.name].assign(t.f32(), t.f32() + t.numel());
    }
  }
  return s;
}

int RunState::restore(Model& model, AdamW& opt, BatchLoader& loader) const {
  opt.set_t(optimizer_t);
  loader.set_state(loader_rng);
  return model.restore_unit_state(units);
}

void RunState::to_manifest(proto::Manifest& m) const {
  m.set_step(step);
  m.set_optimizer_t(optimizer_t);
  m.clear_loader_rng();
  for (uint64_t w : loader_rng) m.add_loader_rng(w);
  m.clear_router_rng();
  for (const auto& [name, state] : units.rngs) {
    proto::RngState* r = m.add_router_rng();
    r->set_name(name);
    for (uint64_t w : state) r->add_state(w);
  }
}

std::vector<ckpt::LocalTensor> RunState::tensors() const {
  std::vector<ckpt::LocalTensor> out;
  for (const auto& [prefix, table] : units.tables)
    if (!table.empty())
      out.push_back({ckpt::routing_key(prefix), Tensor::from_vector(table, {static_cast<int64_t>(table.size())}), false});
  for (const auto& [prefix, bias] : units.biases)
    if (!bias.empty())
      out.push_back(
          {ckpt::expert_bias_key(prefix), Tensor::from_vector(bias, {static_cast<int64_t>(bias.size())}), false});
  return out;
}

namespace {
// t itself on the CPU, else a host copy (checkpoints read and write host memory)
Tensor on_host(const Tensor& t) { return t.device() == Device::kCPU ? t : t.to(Device::kCPU); }

// reads `name` into t (through a host copy for a device's tensor)
void read_into(ckpt::Reader& r, const std::string& name, Tensor& t, int64_t row_offset) {
  if (t.device() == Device::kCPU) return r.read(name, t, row_offset);
  Tensor h = Tensor::empty(t.shape(), t.dtype());
  r.read(name, h, row_offset);
  device_copy(t.raw(), t.device(), h.raw(), Device::kCPU, t.nbytes());
}
}  // namespace

std::vector<ckpt::LocalTensor> collect_local_state(const ParamStore& ps, const AdamW* opt) {
  std::vector<ckpt::LocalTensor> out;
  const auto& all = ps.all();
  for (const Param* p : all) out.push_back({ckpt::param_key(p->name), on_host(p->value), p->expert_sharded});
  if (!opt) return out;
  auto& o = const_cast<AdamW&>(*opt);  // the moments alias the live optimizer state (read only here)
  for (size_t i = 0; i < all.size(); ++i) {
    const bool sh = all[i]->expert_sharded;
    out.push_back({ckpt::optim_m_key(all[i]->name), on_host(o.m()[i]), sh});
    out.push_back({ckpt::optim_v_key(all[i]->name), on_host(o.v()[i]), sh});
    if (all[i]->row_sparse) out.push_back({ckpt::optim_row_t_key(all[i]->name), on_host(o.row_t()[i]), sh});
  }
  return out;
}

std::vector<ckpt::NamedTensor> collect_state(const ParamStore& ps, const AdamW* opt,
                                             const std::map<std::string, std::vector<int32_t>>& tables) {
  RunState rs;
  rs.units.tables = tables;
  std::vector<ckpt::NamedTensor> out;
  for (auto& t : collect_local_state(ps, opt)) out.push_back({t.name, t.tensor, t.sharded});
  for (auto& t : rs.tensors()) out.push_back({t.name, t.tensor, t.sharded});
  return out;
}

void restore_state(ckpt::Reader& r, ParamStore& ps, AdamW* opt) {
  const auto& all = ps.all();
  auto offset = [](const Param* p) { return p->expert_sharded ? p->first_row : 0; };
  for (Param* p : all) read_into(r, ckpt::param_key(p->name), p->value, offset(p));
  if (!opt) return;
  for (size_t i = 0; i < all.size(); ++i) {
    read_into(r, ckpt::optim_m_key(all[i]->name), opt->m()[i], offset(all[i]));
    read_into(r, ckpt::optim_v_key(all[i]->name), opt->v()[i], offset(all[i]));
    if (all[i]->row_sparse) read_into(r, ckpt::optim_row_t_key(all[i]->name), opt->row_t()[i], offset(all[i]));
  }
}

std::unique_ptr<comm::Communicator> tensor_world(const Config& cfg) {
  if (cfg.parallel().communicator() != "nccl" || cfg.model().device() != proto::DEVICE_CUDA) return nullptr;
  return comm::make_communicator("nccl", cfg.parallel().collective_timeout_s());
}

LoadedModel load_for_inference(const std::string& checkpoint, const LoadOptions& o) {
  MOE_CHECK(!checkpoint.empty(), "needs --checkpoint DIR");
  LoadedModel lm;
  lm.dir = ckpt::resolve(checkpoint);
  lm.manifest = ckpt::read_manifest(lm.dir);
  lm.cfg = lm.manifest.config();
  if (!o.data_dir.empty()) resolve_data_paths(lm.cfg.mutable_data(), o.data_dir);
  for (const auto& a : o.overrides) apply_override(lm.cfg, a);
  fill_defaults(lm.cfg);
  // the checkpoint stores expert tensors with their global shapes: any group dividing the experts reads its rows
  lm.cfg.mutable_parallel()->set_expert_parallel(o.ep ? o.ep->size() : 1);
  validate_config(lm.cfg, false);
  MOE_CHECK(!lm.manifest.tokenizer_file().empty(), "checkpoint " << lm.dir << " has no tokenizer");
  lm.tok = std::make_unique<Tokenizer>(lm.dir + "/" + lm.manifest.tokenizer_file());
  ckpt::Reader reader(lm.dir, lm.manifest);
  const RunState rs = RunState::read(reader, lm.manifest);
  lm.model = experts::build_model(lm.cfg, {.ep = o.ep, .ep_rows = o.ep_rows, .state = &rs.units, .init = false, .inference = o.inference});
  restore_state(reader, lm.model->params(), nullptr);
  return lm;
}

}  // namespace moe::launcher
