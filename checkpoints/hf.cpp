// Export to the transformers llama / mixtral layout (see hf.h).
#include "checkpoints/hf.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "checkpoints/naming.h"
#include "core/data.h"
#include "core/error.h"
#include "core/json.h"

namespace fs = std::filesystem;

namespace moe::ckpt {
namespace {

const Tensor& param(const CheckpointValue& c, const std::string& name) {
  const std::string key = param_key(name);
  for (const NamedTensor& t : c.tensors)
    if (t.name == key) return t.tensor;
  MOE_THROW(c.source << ": tensor '" << key << "' is missing");
}

// Rows of w [heads*D, C] reordered within each head between our interleaved rotary pairs and transformers' halves:
// half-layout row j is interleaved row 2j, half-layout row D/2 + j is interleaved row 2j + 1. to_halves picks the
// direction (export: true; import: false).
Tensor permute_rotary_rows(const Tensor& w, int heads, int D, bool to_halves, const std::string& name) {
  MOE_CHECK(w.ndim() == 2 && w.dim(0) == int64_t(heads) * D,
            "tensor '" << name << "' has shape " << shape_str(w.shape()) << ", expected [" << heads * D << ", C]");
  Tensor out = Tensor::empty(w.shape(), w.dtype());
  const size_t row = w.nbytes() / w.dim(0);
  const auto* src = static_cast<const uint8_t*>(w.raw());
  auto* dst = static_cast<uint8_t*>(out.raw());
  for (int h = 0; h < heads; ++h)
    for (int j = 0; j < D; ++j) {
      const size_t half = size_t(h) * D + (j % 2 ? D / 2 : 0) + j / 2, inter = size_t(h) * D + j;
      std::memcpy(dst + (to_halves ? half : inter) * row, src + (to_halves ? inter : half) * row, row);
    }
  return out;
}

// t[e] (dim 0 removed), a copy
Tensor slice0(const Tensor& t, int64_t e) {
  Shape s(t.shape().begin() + 1, t.shape().end());
  Tensor out = Tensor::empty(s, t.dtype());
  std::memcpy(out.raw(), static_cast<const uint8_t*>(t.raw()) + e * out.nbytes(), out.nbytes());
  return out;
}

// The model must be expressible as llama (dense) or mixtral (every layer MoE): throws naming layer and reason.
bool check_expressible(const proto::ModelConfig& m, const std::string& where) {
  const std::string why = where + ": cannot export to transformers: ";
  MOE_CHECK(m.norm() == proto::RMSNORM, why << "model.norm is LAYERNORM; llama and mixtral use RMSNorm");
  MOE_CHECK(m.activation() == proto::SWIGLU,
            why << "model.activation is GELU (with biases); llama and mixtral use SwiGLU without biases");
  int first_dense = -1, first_moe = -1;
  for (int l = 0; l < std::min(m.n_layers(), std::max(1, m.ffn_pattern_size())); ++l) {
    const proto::FfnKind k = layer_ffn_kind(m, l);
    MOE_CHECK(k != proto::FFN_WORD_EXPERT,
              why << "layer " << l << " is a word-expert layer (MoWE), which transformers has no model for");
    if (k == proto::FFN_MOE && first_moe < 0) first_moe = l;
    if (k == proto::FFN_DENSE && first_dense < 0) first_dense = l;
  }
  MOE_CHECK(first_moe < 0 || first_dense < 0,
            why << "layer " << first_dense << " is dense while layer " << first_moe
                << " is MoE; mixtral has an MoE FFN in every layer");
  if (first_moe < 0) return false;
  MOE_CHECK(m.moe().score() == proto::SOFTMAX, why << "model.moe.score is SIGMOID; mixtral's router is a softmax");
  MOE_CHECK(!m.moe().no_normalize_topk(),
            why << "model.moe.no_normalize_topk is set; mixtral renormalises the top-k gates");
  MOE_CHECK(!m.moe().bias_balancing(),
            why << "model.moe.bias_balancing is set; mixtral's router has no selection bias, so it would choose other "
                   "experts (--set model.moe.bias_balancing=false exports without the bias)");
  return true;
}

std::string config_json(const proto::ModelConfig& m, bool mixtral) {
  JsonObject o;
  o.strs("architectures", {mixtral ? "MixtralForCausalLM" : "LlamaForCausalLM"});
  o.str("model_type", mixtral ? "mixtral" : "llama");
  o.num("vocab_size", int64_t(m.vocab_size())).num("hidden_size", int64_t(m.d_model()));
  o.num("intermediate_size", int64_t(mixtral ? m.moe().d_expert() : m.d_ff()));
  o.num("num_hidden_layers", int64_t(m.n_layers())).num("num_attention_heads", int64_t(m.n_heads()));
  o.num("num_key_value_heads", int64_t(m.n_kv_heads())).num("max_position_embeddings", int64_t(m.max_seq_len()));
  o.num("rms_norm_eps", double(m.norm_eps())).num("rope_theta", double(m.rope_theta()));
  o.boolean("tie_word_embeddings", m.tie_embeddings()).str("hidden_act", "silu");
  o.num("initializer_range", double(m.init_std())).boolean("attention_bias", false);
  o.num("attention_dropout", 0.0);
  if (mixtral) {
    o.num("num_local_experts", int64_t(m.moe().num_experts()));
    o.num("num_experts_per_tok", int64_t(m.moe().top_k()));
    o.num("router_aux_loss_coef", double(m.moe().aux_loss_coef())).boolean("output_router_logits", false);
    o.null("sliding_window");
  }
  // our SentencePiece models have no BOS/EOS pieces: generation never stops early on an id
  o.null("bos_token_id").null("eos_token_id").null("pad_token_id");
  o.str("torch_dtype", "float32").str("transformers_version", "4.38.2");
  return o.text();
}

}  // namespace

HfModel to_hf(const CheckpointValue& c) {
  const proto::ModelConfig& m = c.config().model();
  const bool mixtral = check_expressible(m, c.source);
  const int H = m.n_heads(), Hkv = m.n_kv_heads(), D = m.d_model() / m.n_heads();
  HfModel out;
  out.config_json = config_json(m, mixtral);
  auto add = [&](const std::string& name, Tensor t) { out.tensors.push_back({name, std::move(t), false}); };
  add("model.embed_tokens.weight", param(c, "tok_emb.weight"));
  for (int l = 0; l < m.n_layers(); ++l) {
    const std::string ours = "layers." + std::to_string(l) + ".", hf = "model.layers." + std::to_string(l) + ".";
    add(hf + "input_layernorm.weight", param(c, ours + "attn_norm.weight"));
    add(hf + "self_attn.q_proj.weight",
        permute_rotary_rows(param(c, ours + "attn.wq"), H, D, /*to_halves=*/true, ours + "attn.wq"));
    add(hf + "self_attn.k_proj.weight",
        permute_rotary_rows(param(c, ours + "attn.wk"), Hkv, D, /*to_halves=*/true, ours + "attn.wk"));
    add(hf + "self_attn.v_proj.weight", param(c, ours + "attn.wv"));
    add(hf + "self_attn.o_proj.weight", param(c, ours + "attn.wo"));
    add(hf + "post_attention_layernorm.weight", param(c, ours + "ffn_norm.weight"));
    if (!mixtral) {
      add(hf + "mlp.gate_proj.weight", param(c, ours + "ffn.w_gate"));
      add(hf + "mlp.up_proj.weight", param(c, ours + "ffn.w_up"));
      add(hf + "mlp.down_proj.weight", param(c, ours + "ffn.w_down"));
      continue;
    }
    add(hf + "block_sparse_moe.gate.weight", param(c, ours + "ffn.router.weight"));
    const Tensor &wg = param(c, ours + "ffn.experts.w_gate"), &wu = param(c, ours + "ffn.experts.w_up"),
                 &wd = param(c, ours + "ffn.experts.w_down");
    for (int64_t e = 0; e < wg.dim(0); ++e) {
      const std::string pre = hf + "block_sparse_moe.experts." + std::to_string(e) + ".";
      add(pre + "w1.weight", slice0(wg, e));
      add(pre + "w2.weight", slice0(wd, e));
      add(pre + "w3.weight", slice0(wu, e));
    }
  }
  add("model.norm.weight", param(c, "final_norm.weight"));
  if (!m.tie_embeddings()) add("lm_head.weight", param(c, "lm_head.weight"));
  MOE_CHECK(c.has_tokenizer, c.source << ": cannot export to transformers: the checkpoint has no tokenizer");
  out.tokenizer = c.tokenizer;
  JsonObject tc;
  tc.str("tokenizer_class", "LlamaTokenizer").boolean("add_bos_token", false).boolean("add_eos_token", false);
  tc.boolean("legacy", true).num("model_max_length", int64_t(m.max_seq_len()));
  out.tokenizer_config_json = tc.text();
  return out;
}

void write_hf(const std::string& dir, const HfModel& m, int64_t shard_bytes) {
  MOE_CHECK(!fs::exists(dir) || (fs::is_directory(dir) && fs::is_empty(dir)),
            "--to-hf: '" << dir << "' exists and is not an empty directory; refusing to overwrite it");
  const std::string tmp = dir + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  std::vector<std::vector<NamedTensor>> shards(1);
  int64_t bytes = 0;
  for (const NamedTensor& t : m.tensors) {
    if (bytes > 0 && bytes + int64_t(t.tensor.nbytes()) > shard_bytes) {
      shards.emplace_back();
      bytes = 0;
    }
    shards.back().push_back(t);
    bytes += t.tensor.nbytes();
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  if (shards.size() == 1) {
    write_safetensors(tmp + "/model.safetensors", shards[0], meta);
  } else {
    JsonObject map;
    for (size_t s = 0; s < shards.size(); ++s) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
      write_safetensors(tmp + "/" + name, shards[s], meta);
      for (const NamedTensor& t : shards[s]) map.str(t.name, name);
    }
    JsonObject index, md;
    int64_t total = 0;
    for (const NamedTensor& t : m.tensors) total += t.tensor.nbytes();
    md.num("total_size", total);
    index.obj("metadata", md).obj("weight_map", map);
    write_file(tmp + "/model.safetensors.index.json", index.text());
  }
  write_file(tmp + "/config.json", m.config_json);
  write_file(tmp + "/tokenizer.model", m.tokenizer);
  write_file(tmp + "/tokenizer_config.json", m.tokenizer_config_json);
  if (fs::exists(dir)) fs::remove(dir);  // the empty directory
  fs::rename(tmp, dir);
}

}  // namespace moe::ckpt

// ------------------------------------------------------------------------------------------------ import
namespace moe::ckpt {
namespace {

// [E, ...] from E tensors of the same shape and dtype
Tensor stack(const std::vector<Tensor>& parts, const std::string& name) {
  Shape s = parts.at(0).shape();
  for (const Tensor& p : parts)
    MOE_CHECK(p.shape() == s && p.dtype() == parts[0].dtype(),
              "expert tensors of '" << name << "' differ in shape or dtype (" << shape_str(p.shape()) << " vs "
                                    << shape_str(s) << ")");
  s.insert(s.begin(), static_cast<int64_t>(parts.size()));
  Tensor out = Tensor::empty(s, parts[0].dtype());
  for (size_t e = 0; e < parts.size(); ++e)
    std::memcpy(static_cast<uint8_t*>(out.raw()) + e * parts[e].nbytes(), parts[e].raw(), parts[e].nbytes());
  return out;
}

int64_t int_field(const JsonValue& cfg, const char* key, const std::string& where, int64_t dflt = -1) {
  const JsonValue* v = cfg.field(key);
  if (!v || v->kind == JsonValue::kNull) {
    MOE_CHECK(dflt >= 0, where << ": config.json has no \"" << key << "\"");
    return dflt;
  }
  MOE_CHECK(v->kind == JsonValue::kInt && v->num < (uint64_t(1) << 31),
            where << ": config.json \"" << key << "\" must be a non-negative integer");
  return static_cast<int64_t>(v->num);
}

double num_field(const JsonValue& cfg, const char* key, double dflt) {
  const JsonValue* v = cfg.field(key);
  return v && v->is_number() ? v->dbl : dflt;
}

// config.json -> our Config (model from the file, placeholders elsewhere); returns whether it is mixtral
bool config_of(const JsonValue& j, Config& cfg, const std::string& where) {
  MOE_CHECK(j.kind == JsonValue::kObject, where << ": config.json is not a JSON object");
  const JsonValue* type = j.field("model_type");
  const std::string mt = type && type->kind == JsonValue::kString ? type->str : "";
  MOE_CHECK(mt == "llama" || mt == "mixtral",
            where << ": unknown model_type '" << mt << "' in config.json (supported: llama, mixtral)");
  const JsonValue* act = j.field("hidden_act");
  MOE_CHECK(!act || (act->kind == JsonValue::kString && act->str == "silu"),
            where << ": hidden_act must be silu (SwiGLU)");
  const JsonValue* bias = j.field("attention_bias");
  MOE_CHECK(!bias || bias->kind != JsonValue::kBool || !bias->b, where << ": attention_bias is not supported");
  const JsonValue* scaling = j.field("rope_scaling");
  MOE_CHECK(!scaling || scaling->kind == JsonValue::kNull, where << ": rope_scaling is not supported");
  auto* m = cfg.mutable_model();
  m->set_vocab_size(static_cast<int>(int_field(j, "vocab_size", where)));
  m->set_d_model(static_cast<int>(int_field(j, "hidden_size", where)));
  m->set_n_layers(static_cast<int>(int_field(j, "num_hidden_layers", where)));
  m->set_n_heads(static_cast<int>(int_field(j, "num_attention_heads", where)));
  m->set_n_kv_heads(static_cast<int>(int_field(j, "num_key_value_heads", where, m->n_heads())));
  m->set_d_ff(static_cast<int>(int_field(j, "intermediate_size", where)));
  m->set_max_seq_len(static_cast<int>(int_field(j, "max_position_embeddings", where)));
  m->set_norm_eps(static_cast<float>(num_field(j, "rms_norm_eps", 1e-6)));
  m->set_rope_theta(static_cast<float>(num_field(j, "rope_theta", 10000.0)));
  m->set_init_std(static_cast<float>(num_field(j, "initializer_range", 0.02)));
  const JsonValue* tie = j.field("tie_word_embeddings");
  m->set_tie_embeddings(tie && tie->kind == JsonValue::kBool && tie->b);
  m->set_activation(proto::SWIGLU);
  m->set_norm(proto::RMSNORM);
  const bool mixtral = mt == "mixtral";
  if (mixtral) {
    m->add_ffn_pattern(proto::FFN_MOE);
    m->mutable_moe()->set_num_experts(static_cast<int>(int_field(j, "num_local_experts", where)));
    m->mutable_moe()->set_top_k(static_cast<int>(int_field(j, "num_experts_per_tok", where, 2)));
    m->mutable_moe()->set_d_expert(m->d_ff());
    m->mutable_moe()->set_dropless(true);  // transformers' MoE layers are dropless
    m->mutable_moe()->set_aux_loss_coef(static_cast<float>(num_field(j, "router_aux_loss_coef", 0.0)));
  }
  cfg.mutable_data()->set_seq_len(m->max_seq_len());
  cfg.mutable_data()->set_batch_size(8);
  cfg.mutable_optimizer()->set_lr(3e-4f);
  cfg.mutable_train()->set_steps(1000);
  return mixtral;
}

}  // namespace

CheckpointValue from_hf(const HfModel& hf, const std::string& source) {
  const std::string where = "transformers model " + source;
  Config cfg;
  const bool mixtral = config_of(parse_json(hf.config_json, where + ": config.json"), cfg, where);
  const proto::ModelConfig& m = cfg.model();
  std::map<std::string, Tensor> by_name;
  for (const NamedTensor& t : hf.tensors) {
    MOE_CHECK(t.tensor.dtype() != DType::kI32, where << ": tensor '" << t.name << "' is I32");
    by_name[t.name] = t.tensor;
  }
  std::set<std::string> used;
  auto take = [&](const std::string& name) -> const Tensor& {
    auto it = by_name.find(name);
    MOE_CHECK(it != by_name.end(), where << ": tensor '" << name << "' is missing");
    used.insert(name);
    return it->second;
  };
  CheckpointValue c;
  c.source = source;
  auto add = [&](const std::string& ours, const Tensor& t) { c.tensors.push_back({param_key(ours), t, false}); };
  const int H = m.n_heads(), Hkv = m.n_kv_heads(), D = m.d_model() / std::max(1, m.n_heads());
  add("tok_emb.weight", take("model.embed_tokens.weight"));
  for (int l = 0; l < m.n_layers(); ++l) {
    const std::string ours = "layers." + std::to_string(l) + ".", hfp = "model.layers." + std::to_string(l) + ".";
    add(ours + "attn_norm.weight", take(hfp + "input_layernorm.weight"));
    add(ours + "attn.wq", permute_rotary_rows(take(hfp + "self_attn.q_proj.weight"), H, D, false, hfp + "q_proj"));
    add(ours + "attn.wk", permute_rotary_rows(take(hfp + "self_attn.k_proj.weight"), Hkv, D, false, hfp + "k_proj"));
    add(ours + "attn.wv", take(hfp + "self_attn.v_proj.weight"));
    add(ours + "attn.wo", take(hfp + "self_attn.o_proj.weight"));
    add(ours + "ffn_norm.weight", take(hfp + "post_attention_layernorm.weight"));
    if (!mixtral) {
      add(ours + "ffn.w_gate", take(hfp + "mlp.gate_proj.weight"));
      add(ours + "ffn.w_up", take(hfp + "mlp.up_proj.weight"));
      add(ours + "ffn.w_down", take(hfp + "mlp.down_proj.weight"));
      continue;
    }
    add(ours + "ffn.router.weight", take(hfp + "block_sparse_moe.gate.weight"));
    std::vector<Tensor> w1, w2, w3;
    for (int e = 0; e < m.moe().num_experts(); ++e) {
      const std::string pre = hfp + "block_sparse_moe.experts." + std::to_string(e) + ".";
      w1.push_back(take(pre + "w1.weight"));
      w2.push_back(take(pre + "w2.weight"));
      w3.push_back(take(pre + "w3.weight"));
    }
    add(ours + "ffn.experts.w_gate", stack(w1, hfp + "experts.w1"));
    add(ours + "ffn.experts.w_up", stack(w3, hfp + "experts.w3"));
    add(ours + "ffn.experts.w_down", stack(w2, hfp + "experts.w2"));
  }
  add("final_norm.weight", take("model.norm.weight"));
  if (!m.tie_embeddings()) add("lm_head.weight", take("lm_head.weight"));
  for (const auto& [name, t] : by_name)
    MOE_CHECK(used.count(name) || name.find("rotary_emb.inv_freq") != std::string::npos,
              where << ": tensor '" << name << "' is not part of a " << (mixtral ? "mixtral" : "llama")
                    << " model of this config.json");
  fill_defaults(cfg);
  validate_config(cfg, false);
  *c.manifest.mutable_config() = cfg;
  c.manifest.set_step(0);
  c.tokenizer = hf.tokenizer;
  c.has_tokenizer = true;
  require_consistent(cfg, c.tensors, where);  // every shape as the model of the config expects
  return c;
}

HfModel read_hf(const std::string& dir) {
  MOE_CHECK(fs::is_directory(dir), "--from-hf: '" << dir << "' is not a directory");
  const std::string cfg_path = dir + "/config.json";
  MOE_CHECK(fs::is_regular_file(cfg_path), "--from-hf: '" << dir << "' has no config.json");
  HfModel m;
  m.config_json = read_file(cfg_path);
  const std::string tok = dir + "/tokenizer.model";
  MOE_CHECK(fs::is_regular_file(tok), "--from-hf: '" << dir << "' has no tokenizer.model: only SentencePiece "
                                         "tokenizers are supported (a tokenizer.json alone is not)");
  Tokenizer probe(tok);  // throws naming the file when it is not a SentencePiece model
  m.tokenizer = probe.serialized();
  std::vector<std::string> files;
  const std::string index = dir + "/model.safetensors.index.json";
  if (fs::is_regular_file(index)) {
    const JsonValue j = parse_json(read_file(index), index);
    const JsonValue* map = j.field("weight_map");
    MOE_CHECK(map && map->kind == JsonValue::kObject, index << ": no \"weight_map\" object");
    std::set<std::string> seen;
    for (const auto& [name, file] : map->object) {
      MOE_CHECK(file.kind == JsonValue::kString, index << ": the shard of '" << name << "' is not a string");
      if (seen.insert(file.str).second) files.push_back(file.str);
    }
  } else {
    files.push_back("model.safetensors");
  }
  for (const std::string& f : files) {
    const std::string path = dir + "/" + f;
    MOE_CHECK(f.find('/') == std::string::npos && fs::is_regular_file(path),
              "--from-hf: weight file '" << path << "' is missing");
    for (NamedTensor& t : read_safetensors(path).tensors) m.tensors.push_back(std::move(t));
  }
  return m;
}

}  // namespace moe::ckpt
