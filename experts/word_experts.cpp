// Word-expert table: parameter registration; the compute is the grouped FFN's (row-sparse weights).
#include "experts/word_experts.h"

#include "core/error.h"

namespace moe::experts {

WordExpertTable::WordExpertTable(ParamStore& ps, Workspace& ws, const std::string& prefix, const WordExpertDims& dims,
                                 SharedTable* shared)
    : d_(dims) {
  MOE_CHECK(dims.num_local_experts > 0,
            "word experts '" << prefix << "': num_local_experts must be positive, got " << dims.num_local_experts);
  MOE_CHECK(dims.d_model > 0 && dims.d_expert > 0, "word experts '" << prefix
                                                                    << "': d_model and d_expert must be positive, got "
                                                                    << dims.d_model << ", " << dims.d_expert);
  MOE_CHECK(dims.activation == proto::SWIGLU || dims.activation == proto::GELU,
            "word experts '" << prefix << "': unsupported activation " << int(dims.activation));
  const int64_t E = dims.num_local_experts, C = dims.d_model, F = dims.d_expert, g0 = dims.first_expert;
  if (shared && shared->weights.w_up) {
    w_ = shared->weights;
    MOE_CHECK(w_.w_up->value.shape() == Shape({E, F, C}) && (w_.w_gate != nullptr) == (dims.activation == proto::SWIGLU),
              "word experts '" << prefix << "': the shared table " << w_.w_up->name << " has another shape");
  } else {
    auto add = [&](const char* name, const Shape& shape, Init init) {
      return ps.add_expert(prefix + name, shape, /*decay=*/true, init, g0, /*row_sparse=*/true);
    };
    if (dims.activation == proto::SWIGLU) w_.w_gate = add(".w_gate", {E, F, C}, Init::kNormal);
    w_.w_up = add(".w_up", {E, F, C}, Init::kNormal);
    w_.w_down = add(".w_down", {E, C, F}, Init::kNormalOut);
    if (shared) shared->weights = w_;
  }
  if (shared && !shared->packed) shared->packed = std::make_shared<PackedFfn>(ws);
  ffn_ = std::make_unique<GroupedFfn>(ws, dims.d_model, dims.d_expert, dims.activation, w_,
                                      shared ? shared->packed : nullptr);
}

}  // namespace moe::experts
