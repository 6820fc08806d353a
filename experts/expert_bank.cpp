// Expert FFN bank: parameter registration; the compute is the grouped FFN's.
#include "experts/expert_bank.h"

#include <vector>

#include "core/error.h"

namespace moe::experts {

ExpertBank::ExpertBank(ParamStore& ps, Workspace& ws, const std::string& prefix, const ExpertBankDims& dims)
    : d_(dims) {
  const int64_t E = dims.num_local_experts, C = dims.d_model, F = dims.d_expert, g0 = dims.first_expert;
  MOE_CHECK(E >= 1 && C >= 1 && F >= 1,
            "ExpertBank " << prefix << ": need num_local_experts, d_model, d_expert >= 1, got E=" << E << " C=" << C
                          << " F=" << F);
  MOE_CHECK(dims.activation == proto::SWIGLU || dims.activation == proto::GELU,
            "ExpertBank " << prefix << ": unsupported activation " << int(dims.activation));
  const bool swiglu = dims.activation == proto::SWIGLU;
  FfnWeights w;
  if (swiglu) w.w_gate = ps.add_expert(prefix + ".w_gate", {E, F, C}, true, Init::kNormal, g0);
  w.w_up = ps.add_expert(prefix + ".w_up", {E, F, C}, true, Init::kNormal, g0);
  if (!swiglu) w.b_up = ps.add_expert(prefix + ".b_up", {E, F}, false, Init::kZeros, g0);
  w.w_down = ps.add_expert(prefix + ".w_down", {E, C, F}, true, Init::kNormalOut, g0);
  if (!swiglu) w.b_down = ps.add_expert(prefix + ".b_down", {E, C}, false, Init::kZeros, g0);
  ffn_ = std::make_unique<GroupedFfn>(ws, static_cast<int>(C), static_cast<int>(F), dims.activation, w);
}

void ExpertBank::forward(float* y, const float* x, const int64_t* offsets) {
  std::vector<int64_t> experts(d_.num_local_experts);
  for (int e = 0; e < d_.num_local_experts; ++e) experts[e] = e;
  ffn_->forward(y, x, experts.data(), offsets, d_.num_local_experts);
}

}  // namespace moe::experts
