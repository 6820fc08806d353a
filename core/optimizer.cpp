#include "core/optimizer.h"

#include <algorithm>
#include <cmath>

#include "core/backend.h"
#include "core/kernels/cpu/kernels.h"

namespace moe {

float lr_at(const proto::OptimizerConfig& cfg, int step, int total) {
  const float lr = cfg.lr();
  const int warm = cfg.warmup_steps();
  if (warm > 0 && step < warm) return lr * static_cast<float>(step + 1) / static_cast<float>(warm);
  switch (cfg.schedule()) {
    case proto::CONSTANT:
      return lr;
    case proto::INVERSE_SQRT:
      return lr * std::sqrt(static_cast<float>(std::max(warm, 1)) / static_cast<float>(std::max(step, 1)));
    case proto::COSINE:
    default: {
      const int span = std::max(total - warm, 1);
      const float progress = std::min(1.0f, static_cast<float>(step - warm) / static_cast<float>(span));
      return cfg.min_lr() + 0.5f * (lr - cfg.min_lr()) * (1.0f + std::cos(3.14159265358979f * progress));
    }
  }
}

namespace {

// sum of squares of a param's gradient (row-sparse: its touched rows)
double grad_sum_squares(const Param& p) {
  Backend& be = backend_for(p.grad.device());
  if (!p.row_sparse) return be.sum_squares(p.grad.f32(), p.grad.numel());
  return be.sum_squares_rows(p.grad.f32(), p.touched.data(), static_cast<int64_t>(p.touched.size()), p.row_size());
}

// g *= scale over a param's gradient (row-sparse: its touched rows)
void scale_grad(Param& p, float scale) {
  Backend& be = backend_for(p.grad.device());
  if (!p.row_sparse) return be.scale_inplace(p.grad.f32(), scale, p.grad.numel());
  be.scale_rows(p.grad.f32(), scale, p.touched.data(), static_cast<int64_t>(p.touched.size()), p.row_size());
}
}  // namespace

double grad_norm(const ParamStore& ps, const ShardSum& sum_shards) {
  double replicated = 0, sharded = 0;
  for (const Param* p : ps.all())
    if (!p->frozen) (p->expert_sharded ? sharded : replicated) += grad_sum_squares(*p);
  if (sum_shards) sharded = sum_shards(sharded);
  return std::sqrt(replicated + sharded);
}

float clip_scale(double norm, double max_norm) {
  return max_norm > 0 && norm > max_norm ? static_cast<float>(max_norm / (norm + 1e-6)) : 1.0f;
}

double clip_grad_norm(ParamStore& ps, double max_norm, const ShardSum& sum_shards) {
  const double norm = grad_norm(ps, sum_shards);
  const float scale = clip_scale(norm, max_norm);
  if (scale != 1.0f)
    for (Param* p : ps.all())
      if (!p->frozen) scale_grad(*p, scale);
  return norm;
}

AdamW::AdamW(ParamStore& ps, const proto::OptimizerConfig& cfg)
    : ps_(ps), cfg_(cfg), be_(backend_for(ps.device())) {
  const Device dev = ps.device();
  for (Param* p : ps.all()) {
    m_.push_back(Tensor::zeros(p->value.shape(), DType::kF32, dev));
    v_.push_back(Tensor::zeros(p->value.shape(), DType::kF32, dev));
    // row-sparse params keep a step count per row (lazy Adam: a row's moments advance only when it is used)
    row_t_.push_back(p->row_sparse ? Tensor::zeros({p->value.dim(0)}, DType::kI32, dev) : Tensor());
  }
}

void AdamW::step(float lr) { step(lr, 1.0f); }

void AdamW::step(float lr, float grad_scale) {
  ++t_;
  const float b1 = cfg_.beta1(), b2 = cfg_.beta2();
  const float bc1 = 1.0f - std::pow(b1, static_cast<float>(t_));
  const float bc2 = 1.0f - std::pow(b2, static_cast<float>(t_));
  auto& params = ps_.all();
  for (size_t i = 0; i < params.size(); ++i) {
    Param* p = params[i];
    if (p->frozen) continue;  // no moments, no decay, no row step counts
    const cpu::AdamWHyper h{lr, b1, b2, cfg_.eps(), p->decay ? cfg_.weight_decay() : 0.0f, grad_scale};
    float *w = p->value.f32(), *m = m_[i].f32(), *v = v_[i].f32();
    if (p->row_sparse)
      be_.adamw_rows(w, p->grad.f32(), m, v, row_t_[i].i32(), p->touched.data(),
                     static_cast<int64_t>(p->touched.size()), p->row_size(), h);
    else
      be_.adamw(w, p->grad.f32(), m, v, p->value.numel(), h, bc1, bc2);
  }
}

}  // namespace moe
