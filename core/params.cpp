#include "core/params.h"
#include "core/prefetch.h"

#include <algorithm>
#include <memory>

namespace moe {

Param* ParamStore::add(const std::string& name, const Shape& shape, bool decay) {
  MOE_CHECK(find(name) == nullptr, "parameter '" << name << "' registered twice");
  auto p = std::make_unique<Param>();
  p->name = name;
  p->value = Tensor::zeros(shape);
  p->grad = Tensor::zeros(shape);
  p->decay = decay;
  params_.push_back(std::move(p));
  view_.push_back(params_.back().get());
  return view_.back();
}

Param* ParamStore::add_row_sparse(const std::string& name, const Shape& shape, bool decay) {
  MOE_CHECK(!shape.empty(), "row-sparse parameter '" << name << "' needs at least one dimension");
  Param* p = add(name, shape, decay);
  p->row_sparse = true;
  p->touched_mask.assign(shape[0], 0);
  return p;
}

Param* ParamStore::find(const std::string& name) {
  for (auto* p : view_)
    if (p->name == name) return p;
  return nullptr;
}

const Param* ParamStore::find(const std::string& name) const {
  for (auto* p : view_)
    if (p->name == name) return p;
  return nullptr;
}

Param& ParamStore::get(const std::string& name) {
  Param* p = find(name);
  MOE_CHECK(p, "no parameter named '" << name << "'");
  return *p;
}

void ParamStore::zero_grad() {
  for (auto* p : view_) {
    if (!p->row_sparse) {
      p->grad.zero_();
      continue;
    }
    const int64_t rs = p->row_size();
    float* g = p->grad.f32();
    const auto& rows = p->touched;
    for (size_t k = 0; k < rows.size(); ++k) {
      if (k + 1 < rows.size()) prefetch_write(g + rows[k + 1] * rs, rs);
      const int64_t r = rows[k];
      std::fill(g + r * rs, g + (r + 1) * rs, 0.0f);
      p->touched_mask[r] = 0;
    }
    p->touched.clear();
  }
}

int64_t ParamStore::numel() const {
  int64_t n = 0;
  for (auto* p : view_) n += p->value.numel();
  return n;
}

void init_normal(Tensor& t, Rng& rng, float std) {
  float* d = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) d[i] = rng.normal() * std;
}

}  // namespace moe
