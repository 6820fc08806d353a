#include "checkpoints/convert.h"

#include <cstring>
#include <filesystem>
#include <set>
#include <sstream>

#include "checkpoints/naming.h"
#include "core/bf16.h"
#include "core/error.h"
#include "core/params.h"
#include "core/rng.h"

namespace fs = std::filesystem;

namespace moe::ckpt {
namespace {

Shape entry_shape(const proto::TensorEntry& e) { return Shape(e.shape().begin(), e.shape().end()); }

Tensor* find_tensor(std::vector<NamedTensor>& ts, const std::string& name) {
  for (auto& t : ts)
    if (t.name == name) return &t.tensor;
  return nullptr;
}

Tensor take_f32(std::vector<NamedTensor>& ts, const std::string& name, const std::string& where) {
  Tensor* t = find_tensor(ts, name);
  MOE_CHECK(t, where << ": tensor '" << name << "' is missing");
  return t->dtype() == DType::kF32 ? *t : t->to_dtype(DType::kF32);
}

void erase_tensor(std::vector<NamedTensor>& ts, const std::string& name) {
  for (auto it = ts.begin(); it != ts.end(); ++it)
    if (it->name == name) {
      ts.erase(it);
      return;
    }
}

// wk/wv [Hkv*D, C] -> [G*D, C]: kv head g' = mean of source kv heads g'*r .. g'*r + r - 1 (r = Hkv / G). Query head
// h used source kv head h / (H / Hkv); after the conversion it uses h / (H / G) = (its source kv head) / r.
void gqa_inplace(Config& cfg, std::vector<NamedTensor>& ts, int G, const std::string& where) {
  auto* mc = cfg.mutable_model();
  const int H = mc->n_heads(), Hkv = mc->n_kv_heads() ? mc->n_kv_heads() : H;
  MOE_CHECK(G >= 1, "moe ckpt convert --to-gqa " << G << ": must be >= 1");
  MOE_CHECK(G != Hkv, "moe ckpt convert --to-gqa " << G << ": the checkpoint already has model.n_kv_heads = " << Hkv);
  MOE_CHECK(H % G == 0, "moe ckpt convert --to-gqa " << G << ": model.n_heads = " << H << " is not divisible by " << G);
  MOE_CHECK(G < Hkv && Hkv % G == 0, "moe ckpt convert --to-gqa " << G << ": the source model.n_kv_heads = " << Hkv
                                                                  << " must be a multiple of " << G
                                                                  << " (kv heads can only be pooled, not split)");
  const int r = Hkv / G;
  for (int l = 0; l < mc->n_layers(); ++l) {
    for (const char* w : {"wk", "wv"}) {
      const std::string name = param_key("layers." + std::to_string(l) + ".attn." + w);
      Tensor src = take_f32(ts, name, where);
      MOE_CHECK(src.ndim() == 2 && src.dim(0) % Hkv == 0,
                where << ": tensor '" << name << "' has shape " << shape_str(src.shape()) << ", expected ["
                      << Hkv << "*head_dim, d_model]");
      const int64_t D = src.dim(0) / Hkv, C = src.dim(1);
      Tensor dst = Tensor::empty({G * D, C});
      const float* s = src.f32();
      float* d = dst.f32();
      for (int g = 0; g < G; ++g)
        for (int64_t row = 0; row < D; ++row)
          for (int64_t c = 0; c < C; ++c) {
            double acc = 0;
            for (int j = 0; j < r; ++j) acc += s[((g * r + j) * D + row) * C + c];
            d[(g * D + row) * C + c] = static_cast<float>(acc / r);
          }
      *find_tensor(ts, name) = dst;
    }
  }
  mc->set_n_kv_heads(G);
}

void upcycle_inplace(Config& cfg, std::vector<NamedTensor>& ts, int E, uint64_t seed, const std::string& where,
                     std::vector<std::string>* notes) {
  auto* mc = cfg.mutable_model();
  MOE_CHECK(E >= 1, "moe ckpt convert --upcycle " << E << ": must be >= 1");
  bool any_dense = false, any_moe = false;
  for (int l = 0; l < mc->n_layers(); ++l) {
    any_dense |= layer_ffn_kind(*mc, l) == proto::FFN_DENSE;
    any_moe |= layer_ffn_kind(*mc, l) == proto::FFN_MOE;
  }
  MOE_CHECK(any_dense, "moe ckpt convert --upcycle: the model has no dense FFN layer to upcycle");
  auto* moe = mc->mutable_moe();
  const int d_expert = moe->d_expert() ? moe->d_expert() : mc->d_ff();
  if (any_moe) {
    MOE_CHECK(moe->num_experts() == E, "moe ckpt convert --upcycle " << E << ": the model already has MoE layers with "
                                                                    << "model.moe.num_experts = " << moe->num_experts());
    MOE_CHECK(d_expert == mc->d_ff(), "moe ckpt convert --upcycle: the model already has MoE layers with "
                                          << "model.moe.d_expert = " << d_expert << " != model.d_ff = " << mc->d_ff());
  }
  const bool swiglu = mc->activation() == proto::SWIGLU;
  const std::vector<std::string> names =
      swiglu ? std::vector<std::string>{"w_gate", "w_up", "w_down"}
             : std::vector<std::string>{"w_up", "b_up", "w_down", "b_down"};
  std::vector<proto::FfnKind> pattern;
  for (int l = 0; l < mc->n_layers(); ++l) {
    const proto::FfnKind kind = layer_ffn_kind(*mc, l);
    pattern.push_back(kind == proto::FFN_DENSE ? proto::FFN_MOE : kind);
    if (kind != proto::FFN_DENSE) continue;
    const std::string pre = "layers." + std::to_string(l) + ".ffn.";
    int64_t C = mc->d_model();
    for (const std::string& n : names) {
      Tensor src = take_f32(ts, param_key(pre + n), where);
      Shape shape{E};
      shape.insert(shape.end(), src.shape().begin(), src.shape().end());
      Tensor dst = Tensor::empty(shape);
      for (int e = 0; e < E; ++e)
        std::memcpy(dst.f32() + static_cast<size_t>(e) * src.numel(), src.f32(), src.nbytes());
      erase_tensor(ts, param_key(pre + n));
      ts.push_back({param_key(pre + "experts." + n), dst, true});
    }
    Tensor router = Tensor::empty({E, C});
    Rng rng(seed ^ (0x9E3779B97F4A7C15ull * static_cast<uint64_t>(l + 1)));
    init_normal(router, rng, 0.01f);
    ts.push_back({param_key(pre + "router.weight"), router});
  }
  mc->clear_ffn_pattern();
  for (proto::FfnKind k : pattern) mc->add_ffn_pattern(k);
  moe->set_num_experts(E);
  moe->set_d_expert(mc->d_ff());
  if (moe->top_k() == 0) moe->set_top_k(2);
  if (moe->top_k() > E) moe->set_top_k(E);
  moe->set_dropless(true);
  if (moe->capacity_factor() == 0) moe->set_capacity_factor(1.25f);
  if (moe->top_k() == 1 && E > 1 && notes)
    notes->push_back("note: model.moe.top_k = 1: the gate is the router probability, so the upcycled model does not "
                     "reproduce the dense one exactly");
  if (moe->no_normalize_topk() && E > 1 && notes)
    notes->push_back("note: model.moe.no_normalize_topk is set: gates do not sum to 1, so the upcycled model does "
                     "not reproduce the dense one exactly");
}

void cast_inplace(std::vector<NamedTensor>& ts, DType dt) {
  for (auto& t : ts) {
    if (!is_param_key(t.name) || t.tensor.dtype() == DType::kI32 || t.tensor.dtype() == dt) continue;
    if (dt == DType::kBF16) {
      Tensor f = t.tensor.dtype() == DType::kF32 ? t.tensor : t.tensor.to_dtype(DType::kF32);
      Tensor b = Tensor::empty(f.shape(), DType::kBF16);
      for (int64_t i = 0; i < f.numel(); ++i) b.bf()[i] = float_to_bf16(f.f32()[i]);
      t.tensor = b;
    } else {
      Tensor f = Tensor::empty(t.tensor.shape(), DType::kF32);
      for (int64_t i = 0; i < f.numel(); ++i) f.f32()[i] = bf16_to_float(t.tensor.bf()[i]);
      t.tensor = f;
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------- edges

CheckpointValue load_all(const std::string& path) {
  CheckpointValue c;
  c.source = resolve(path);
  c.manifest = read_manifest(c.source);
  Reader reader(c.source, c.manifest);
  for (const auto& e : c.manifest.tensors()) {
    Tensor t = Tensor::empty(entry_shape(e), dtype_from_name(e.dtype()));
    reader.read(e.name(), t);
    c.tensors.push_back({e.name(), t});
  }
  // sharding: format 2 from the shards; format 1 from the model (needs the routing tables just read)
  // (a format-1 config that does not build leaves them replicated; the consistency checks then report it)
  std::map<std::string, bool> sharded;
  try {
    sharded = manifest_sharding(c.manifest, c.manifest.format_version() < 2 ? routing_of(c.tensors) : RoutingTables{});
  } catch (const Error&) {
  }
  for (auto& t : c.tensors) t.sharded = sharded.count(t.name) && sharded.at(t.name);
  if (!c.manifest.tokenizer_file().empty()) {
    const std::string tp = c.source + "/" + c.manifest.tokenizer_file();
    MOE_CHECK(fs::is_regular_file(tp), "checkpoint " << c.source << ": tokenizer file " << tp << " is missing");
    c.tokenizer = read_file(tp);
    c.has_tokenizer = true;
  }
  c.manifest.clear_tensors();
  return c;
}

std::string write(const std::string& root, const CheckpointValue& c, int world_size) {
  const proto::Manifest& m = c.manifest;
  SaveRequest req;
  req.config = &m.config();
  req.step = m.step();
  req.optimizer_t = m.optimizer_t();
  MOE_CHECK(m.loader_rng_size() == 4 || m.loader_rng_size() == 0, "checkpoint " << c.source << ": bad loader state");
  for (int i = 0; i < m.loader_rng_size(); ++i) req.loader_rng[i] = m.loader_rng(i);
  req.router_rng.assign(m.router_rng().begin(), m.router_rng().end());
  req.world_size = world_size;
  req.tensors = c.tensors;
  if (c.has_tokenizer) req.tokenizer_blob = &c.tokenizer;
  return save(root, req);
}

// ---------------------------------------------------------------------------------------------- checks

RoutingTables routing_of(const std::vector<NamedTensor>& ts) {
  RoutingTables out;
  for (const auto& t : ts) {
    const ParsedKey k = parse_key(t.name);
    if (k.is_routing() && t.tensor.dtype() == DType::kI32)
      out[k.name].assign(t.tensor.i32(), t.tensor.i32() + t.tensor.numel());
  }
  return out;
}

std::vector<std::string> param_problems(const Config& cfg, const std::map<std::string, Shape>& have,
                                        const RoutingTables& routing, const std::string& where) {
  std::vector<std::string> problems;
  std::vector<ParamLayout> want;
  try {
    want = model_layout(cfg, routing);
  } catch (const Error& e) {
    problems.push_back(where + ": cannot build the model of its config: " + e.what());
    return problems;
  }
  std::set<std::string> wanted;
  for (const ParamLayout& p : want) {
    wanted.insert(p.name);
    auto it = have.find(p.name);
    if (it == have.end()) {
      problems.push_back(where + ": parameter tensor '" + param_key(p.name) + "' (shape " + shape_str(p.shape) +
                         ") required by the model config is missing");
    } else if (it->second != p.shape) {
      problems.push_back(where + ": tensor '" + param_key(p.name) + "' has shape " + shape_str(it->second) +
                         " but the model config expects " + shape_str(p.shape));
    }
  }
  for (const auto& [name, shape] : have)
    if (!wanted.count(name))
      problems.push_back(where + ": tensor '" + param_key(name) + "' is not a parameter of the model config");
  return problems;
}

std::vector<std::string> param_problems(const Config& cfg, const std::vector<NamedTensor>& tensors,
                                        const std::string& where) {
  std::map<std::string, Shape> have;
  for (const auto& t : tensors) {
    const ParsedKey k = parse_key(t.name);
    if (k.is_param()) have[k.name] = t.tensor.shape();
  }
  return param_problems(cfg, have, routing_of(tensors), where);
}

void require_consistent(const Config& cfg, const std::vector<NamedTensor>& tensors, const std::string& where) {
  const auto problems = param_problems(cfg, tensors, where);
  if (problems.empty()) return;
  std::ostringstream o;
  o << problems[0];
  if (problems.size() > 1) o << " (and " << problems.size() - 1 << " more problem(s))";
  MOE_THROW(o.str());
}

// ---------------------------------------------------------------------------------------------- transforms

CheckpointValue to_gqa(CheckpointValue c, int G, const std::string& where) {
  gqa_inplace(c.mutable_config(), c.tensors, G, where);
  return c;
}

CheckpointValue upcycle(CheckpointValue c, int E, uint64_t seed, const std::string& where,
                        std::vector<std::string>* notes) {
  upcycle_inplace(c.mutable_config(), c.tensors, E, seed, where, notes);
  return c;
}

CheckpointValue cast(CheckpointValue c, DType dt) {
  cast_inplace(c.tensors, dt);
  return c;
}

CheckpointValue drop_optimizer(CheckpointValue c) {
  std::vector<NamedTensor> kept;
  for (auto& t : c.tensors)
    if (!is_optim_key(t.name)) kept.push_back(t);
  c.tensors = std::move(kept);
  c.manifest.set_optimizer_t(0);
  return c;
}

CheckpointValue reshard(CheckpointValue c, int M) {
  Config& cfg = c.mutable_config();
  cfg.mutable_parallel()->set_expert_parallel(M);
  fill_defaults(cfg);
  validate_config(cfg, /*needs_data=*/false);  // names model.moe.num_experts / word_experts when M does not divide
  require_consistent(cfg, c.tensors, c.source);
  return c;
}

CheckpointValue finalize(CheckpointValue c, const std::string& where) {
  const Config& cfg = c.config();
  validate_config(cfg, false);
  require_consistent(cfg, c.tensors, where + " (converted)");
  // the tensors in the model's parameter order, then routing tables, then optimizer state; sharding from the
  // model's declarations
  const std::vector<ParamLayout> layout = model_layout(cfg, routing_of(c.tensors));
  const std::set<std::string> sharded = sharded_keys(layout);
  std::vector<NamedTensor> ordered;
  for (const ParamLayout& p : layout) ordered.push_back({param_key(p.name), *find_tensor(c.tensors, param_key(p.name))});
  for (const auto& t : c.tensors)
    if (!is_param_key(t.name)) ordered.push_back(t);
  for (auto& t : ordered) t.sharded = sharded.count(t.name) > 0;
  c.tensors = std::move(ordered);
  return c;
}

// ---------------------------------------------------------------------------------------------- safetensors

SafetensorsFile to_safetensors(const CheckpointValue& c) {
  SafetensorsFile st;
  for (const auto& t : c.tensors) {
    const ParsedKey k = parse_key(t.name);
    if (k.is_param()) st.tensors.push_back({k.name, t.tensor});
    else if (k.is_routing() || k.is_expert_bias()) st.tensors.push_back({t.name, t.tensor});
  }
  st.metadata = {{"format", "pt"},
                 {"moe.step", std::to_string(c.manifest.step())},
                 {"moe.config", config_to_text(c.config())}};
  return st;
}

CheckpointValue from_safetensors(const SafetensorsFile& st, Config cfg, const std::string& source) {
  const std::string where = "safetensors file " + source;
  CheckpointValue c;
  c.source = source;
  for (const auto& t : st.tensors) {
    if (is_routing_key(t.name)) {
      MOE_CHECK(t.tensor.dtype() == DType::kI32, where << ": routing table '" << t.name << "' must be I32");
      c.tensors.push_back({t.name, t.tensor});
    } else if (is_expert_bias_key(t.name)) {
      MOE_CHECK(t.tensor.dtype() == DType::kF32 && t.tensor.ndim() == 1,
                where << ": router bias '" << t.name << "' must be a 1-D F32 tensor");
      c.tensors.push_back({t.name, t.tensor});
    } else {
      MOE_CHECK(t.tensor.dtype() != DType::kI32, where << ": parameter tensor '" << t.name << "' is I32");
      c.tensors.push_back({param_key(t.name), t.tensor});
    }
  }
  if (cfg.model().vocab_size() == 0) {  // take it from the embedding, as train takes it from the tokenizer
    Tensor* emb = find_tensor(c.tensors, param_key("tok_emb.weight"));
    MOE_CHECK(emb && emb->ndim() == 2, where << ": tensor 'tok_emb.weight' is missing (model.vocab_size is 0)");
    cfg.mutable_model()->set_vocab_size(static_cast<int>(emb->dim(0)));
  }
  fill_defaults(cfg);
  validate_config(cfg, false);
  *c.manifest.mutable_config() = cfg;
  c.manifest.set_step(0);
  return c;
}

}  // namespace moe::ckpt
