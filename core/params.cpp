#include "core/params.h"

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
  for (auto* p : view_) p->grad.zero_();
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
