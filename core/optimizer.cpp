#include "core/optimizer.h"

#include <cmath>

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

double grad_norm(const ParamStore& ps) {
  double s = 0;
  for (const Param* p : ps.all()) s += cpu::sum_squares(p->grad.f32(), p->grad.numel());
  return std::sqrt(s);
}

double clip_grad_norm(ParamStore& ps, double max_norm) {
  const double norm = grad_norm(ps);
  if (max_norm > 0 && norm > max_norm) {
    const float scale = static_cast<float>(max_norm / (norm + 1e-6));
    for (Param* p : ps.all()) cpu::scale_inplace(p->grad.f32(), scale, p->grad.numel());
  }
  return norm;
}

AdamW::AdamW(ParamStore& ps, const proto::OptimizerConfig& cfg) : ps_(ps), cfg_(cfg) {
  for (Param* p : ps.all()) {
    m_.push_back(Tensor::zeros(p->value.shape()));
    v_.push_back(Tensor::zeros(p->value.shape()));
  }
}

void AdamW::step(float lr) {
  ++t_;
  const float b1 = cfg_.beta1(), b2 = cfg_.beta2(), eps = cfg_.eps(), wd = cfg_.weight_decay();
  const float bc1 = 1.0f - std::pow(b1, static_cast<float>(t_));
  const float bc2 = 1.0f - std::pow(b2, static_cast<float>(t_));
  auto& params = ps_.all();
  for (size_t i = 0; i < params.size(); ++i) {
    Param* p = params[i];
    float* w = p->value.f32();
    const float* g = p->grad.f32();
    float* m = m_[i].f32();
    float* v = v_[i].f32();
    const float decay = p->decay ? wd : 0.0f;
    const int64_t n = p->value.numel();
#pragma omp parallel for simd if (n > 65536) schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      m[j] = b1 * m[j] + (1.0f - b1) * g[j];
      v[j] = b2 * v[j] + (1.0f - b2) * g[j] * g[j];
      const float mhat = m[j] / bc1;
      const float vhat = v[j] / bc2;
      w[j] -= lr * (mhat / (std::sqrt(vhat) + eps) + decay * w[j]);
    }
  }
}

}  // namespace moe
