// A weight parameter in its backend's inference layout (Backend::pack_rows), read by the batch-invariant linear
// layer of the inference path (Backend::linear_rows): a [OC,IC] matrix, or [S,OC,IC] slots (an expert bank, a
// word-expert table) each packed on its own. Packed from the parameter's values when the model is prepared for
// inference (Model::prepare_inference); later changes of the parameter need a new pack. On the CPU the packed copy
// is another copy of the weights (the serving memory of a matrix doubles); on the GPU the layout is the plain one.
#pragma once
#include <cstdint>

#include "core/params.h"
#include "core/workspace.h"

namespace moe {

class PackedWeight {
 public:
  explicit PackedWeight(Workspace& ws) : be_(ws.backend()), buf_(ws.buffer()) {}
  // p->value [OC,IC] (one slot) or [S,OC,IC] (S slots)
  void pack(const Param& p);
  bool ready() const { return slots_ > 0; }
  const float* slot(int64_t s = 0) const;  // the packed matrix of slot s (packed first)
  int64_t slots() const { return slots_; }

 private:
  Backend& be_;
  Workspace::Buffer& buf_;
  int64_t per_ = 0, slots_ = 0;
};

}  // namespace moe
