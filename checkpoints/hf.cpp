// Export to the transformers llama / mixtral layout (see hf.h).
#include "checkpoints/hf.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "checkpoints/naming.h"
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

// Rows of w [heads*D, C] reordered within each head from interleaved rotary pairs to halves: out row j <- 2j,
// out row D/2 + j <- 2j + 1.
Tensor interleaved_to_halves(const Tensor& w, int heads, int D) {
  MOE_CHECK(w.ndim() == 2 && w.dim(0) == int64_t(heads) * D, "rotary permutation: shape " << shape_str(w.shape())
                                                                                           << " is not [" << heads
                                                                                           << "*" << D << ", C]");
  Tensor out = Tensor::empty(w.shape(), w.dtype());
  const size_t row = w.nbytes() / w.dim(0);
  const auto* src = static_cast<const uint8_t*>(w.raw());
  auto* dst = static_cast<uint8_t*>(out.raw());
  for (int h = 0; h < heads; ++h)
    for (int j = 0; j < D / 2; ++j) {
      std::memcpy(dst + (size_t(h) * D + j) * row, src + (size_t(h) * D + 2 * j) * row, row);
      std::memcpy(dst + (size_t(h) * D + D / 2 + j) * row, src + (size_t(h) * D + 2 * j + 1) * row, row);
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
    add(hf + "self_attn.q_proj.weight", interleaved_to_halves(param(c, ours + "attn.wq"), H, D));
    add(hf + "self_attn.k_proj.weight", interleaved_to_halves(param(c, ours + "attn.wk"), Hkv, D));
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
