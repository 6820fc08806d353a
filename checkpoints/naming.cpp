#include "checkpoints/naming.h"

namespace moe::ckpt {
namespace {
constexpr const char* kParams = "params/";
constexpr const char* kOptimM = "optim/m/";
constexpr const char* kOptimV = "optim/v/";
constexpr const char* kOptimRowT = "optim/row_t/";
constexpr const char* kRouting = "routing/";
constexpr const char* kExpertBias = "expert_bias/";

const char* prefix_of(TensorKind k) {
  switch (k) {
    case TensorKind::kParam: return kParams;
    case TensorKind::kOptimM: return kOptimM;
    case TensorKind::kOptimV: return kOptimV;
    case TensorKind::kOptimRowT: return kOptimRowT;
    case TensorKind::kRouting: return kRouting;
    case TensorKind::kExpertBias: return kExpertBias;
    default: return "";
  }
}
}  // namespace

std::string key_of(TensorKind kind, const std::string& name) { return prefix_of(kind) + name; }
std::string param_key(const std::string& param) { return key_of(TensorKind::kParam, param); }
std::string optim_m_key(const std::string& param) { return key_of(TensorKind::kOptimM, param); }
std::string optim_v_key(const std::string& param) { return key_of(TensorKind::kOptimV, param); }
std::string optim_row_t_key(const std::string& param) { return key_of(TensorKind::kOptimRowT, param); }
std::string routing_key(const std::string& layer_prefix) { return key_of(TensorKind::kRouting, layer_prefix); }
std::string expert_bias_key(const std::string& layer_prefix) { return key_of(TensorKind::kExpertBias, layer_prefix); }

ParsedKey parse_key(const std::string& key) {
  for (TensorKind k : {TensorKind::kParam, TensorKind::kOptimM, TensorKind::kOptimV, TensorKind::kOptimRowT,
                       TensorKind::kRouting, TensorKind::kExpertBias}) {
    const std::string pre = prefix_of(k);
    if (key.size() > pre.size() && key.compare(0, pre.size(), pre) == 0) return {k, key.substr(pre.size())};
  }
  return {TensorKind::kUnknown, key};
}

}  // namespace moe::ckpt
