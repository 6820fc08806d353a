// Checkpoint tensor naming: the dataset key of every tensor of a checkpoint, in one place.
//   params/<param>        a parameter (core/params.h name, e.g. layers.0.attn.wq)
//   optim/m/<param>       AdamW first moment of <param>
//   optim/v/<param>       AdamW second moment of <param>
//   optim/row_t/<param>   per-row step counts of a row-sparse <param>
//   routing/<prefix>      a word-expert routing table, by layer prefix (e.g. layers.1.ffn)
//   expert_bias/<prefix>  a learned router's load-balancing bias [E] (F32, replicated; bias balancing), by layer
//                         prefix (e.g. layers.0.ffn): state, not a parameter
// Every piece of checkpoint code makes and parses keys through these functions, never with string literals.
#pragma once
#include <string>

namespace moe::ckpt {

enum class TensorKind { kParam, kOptimM, kOptimV, kOptimRowT, kRouting, kExpertBias, kUnknown };

// A key taken apart: its kind and the parameter name (or, for kRouting and kExpertBias, the layer prefix).
// kUnknown: name = key.
struct ParsedKey {
  TensorKind kind = TensorKind::kUnknown;
  std::string name;
  bool is_param() const { return kind == TensorKind::kParam; }
  bool is_optim() const { return kind == TensorKind::kOptimM || kind == TensorKind::kOptimV || kind == TensorKind::kOptimRowT; }
  bool is_routing() const { return kind == TensorKind::kRouting; }
  bool is_expert_bias() const { return kind == TensorKind::kExpertBias; }
  // the parameter a params/ or optim/ key belongs to ("" otherwise)
  std::string param() const { return is_param() || is_optim() ? name : std::string(); }
};

std::string param_key(const std::string& param);
std::string optim_m_key(const std::string& param);
std::string optim_v_key(const std::string& param);
std::string optim_row_t_key(const std::string& param);
std::string routing_key(const std::string& layer_prefix);
std::string expert_bias_key(const std::string& layer_prefix);
// key_of(kind, name) == the function of that kind above; kUnknown returns name unchanged
std::string key_of(TensorKind kind, const std::string& name);

ParsedKey parse_key(const std::string& key);
inline bool is_param_key(const std::string& key) { return parse_key(key).is_param(); }
inline bool is_optim_key(const std::string& key) { return parse_key(key).is_optim(); }
inline bool is_routing_key(const std::string& key) { return parse_key(key).is_routing(); }
inline bool is_expert_bias_key(const std::string& key) { return parse_key(key).is_expert_bias(); }

}  // namespace moe::ckpt
