#include "core/packed.h"

#include "core/error.h"

namespace moe {

void PackedWeight::pack(const Param& p) {
  const Tensor& v = p.value;
  MOE_CHECK(v.ndim() == 2 || v.ndim() == 3,
            "packing '" << p.name << "': a matrix or a stack of matrices, not " << v.ndim() << " dimensions");
  MOE_CHECK(v.defined(), "packing '" << p.name << "': the parameter has no values");
  const int64_t S = v.ndim() == 3 ? v.dim(0) : 1;
  const int OC = static_cast<int>(v.dim(v.ndim() - 2)), IC = static_cast<int>(v.dim(v.ndim() - 1));
  per_ = be_.packed_rows_floats(IC, OC);
  float* dst = buf_.get(per_ * S);
  for (int64_t s = 0; s < S; ++s) be_.pack_rows(dst + s * per_, v.f32() + s * int64_t(OC) * IC, IC, OC);
  slots_ = S;
}

const float* PackedWeight::slot(int64_t s) const {
  MOE_CHECK(s >= 0 && s < slots_,
            "packed weight: slot " << s << " of " << slots_ << " (prepare the model for inference first)");
  return buf_.data() + s * per_;
}

}  // namespace moe
