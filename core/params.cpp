#include "core/params.h"

#include <algorithm>
#include <memory>

#include "core/backend.h"

namespace moe {

Param* ParamStore::add(const std::string& name, const Shape& shape, bool decay, Init init) {
  MOE_CHECK(find(name) == nullptr, "parameter '" << name << "' registered twice");
  auto p = std::make_unique<Param>();
  p->name = name;
  p->value = sized_only_ ? Tensor::shape_only(shape) : Tensor::zeros(shape, DType::kF32, device_);
  p->grad = sized_only_ || !with_grads_ ? Tensor::shape_only(shape) : Tensor::zeros(shape, DType::kF32, device_);
  p->decay = decay;
  p->init = init;
  if (init == Init::kOnes && !sized_only_) p->value.fill_(1.0f);
  params_.push_back(std::move(p));
  view_.push_back(params_.back().get());
  return view_.back();
}

Param* ParamStore::add_expert(const std::string& name, const Shape& shape, bool decay, Init init, int64_t first_row,
                              bool row_sparse) {
  MOE_CHECK(!shape.empty(), "expert parameter '" << name << "' needs at least one dimension (experts)");
  Param* p = add(name, shape, decay, init);
  p->expert_sharded = true;
  p->first_row = first_row;
  p->row_sparse = row_sparse;
  if (row_sparse && !sized_only_) p->touched_mask.assign(shape[0], 0);
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
    backend_for(p->grad.device())
        .zero_rows(p->grad.f32(), p->touched.data(), static_cast<int64_t>(p->touched.size()), p->row_size());
    for (int64_t r : p->touched) p->touched_mask[r] = 0;
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

namespace {
// Rows of an expert-sharded parameter, global row g from Rng(seed ^ hash(name) ^ golden * (g + 1)).
void init_expert_rows(Tensor& t, const Param& p, uint64_t seed, float std) {
  const int64_t rows = t.dim(0), per = t.numel() / std::max<int64_t>(rows, 1);
  const uint64_t base = seed ^ hash_name(p.name);
  float* w = t.f32();
  // many small rows (a word-expert table) in chunks; few large ones (an MoE layer's experts) one per thread
  const int chunk = per >= 4096 ? 1 : 64;
#pragma omp parallel for schedule(dynamic, chunk) if (rows * per > (1 << 20))
  for (int64_t e = 0; e < rows; ++e) {
    Rng rng(base ^ (0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(p.first_row + e + 1)));
    for (int64_t i = 0; i < per; ++i) w[e * per + i] = rng.normal() * std;
  }
}
}  // namespace

void init_params(ParamStore& ps, uint64_t seed, float std, float out_std) {
  Rng rng(seed);
  for (Param* p : ps.all()) {
    const bool normal = p->init == Init::kNormal || p->init == Init::kNormalOut;
    const float s = p->init == Init::kNormalOut ? out_std : std;
    if (!normal) {
      p->init == Init::kOnes ? p->value.fill_(1.0f) : p->value.zero_();
      continue;
    }
    const bool host = p->value.device() == Device::kCPU;  // (a device's values are drawn on the host, then copied)
    Tensor t = host ? p->value : Tensor::empty(p->value.shape());
    if (p->expert_sharded) init_expert_rows(t, *p, seed, s);
    else init_normal(t, rng, s);
    if (!host) device_copy(p->value.raw(), p->value.device(), t.raw(), Device::kCPU, t.nbytes());
  }
}

}  // namespace moe
