#include "core/optimizer.h"
#include "core/prefetch.h"

#include <algorithm>
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

double grad_norm(const ParamStore& ps, const ShardSum& sum_shards) {
  double replicated = 0, sharded = 0;
  for (const Param* p : ps.all()) {
    double& acc = p->expert_sharded ? sharded : replicated;
    if (!p->row_sparse) {
      acc += cpu::sum_squares(p->grad.f32(), p->grad.numel());
      continue;
    }
    const int64_t rs = p->row_size();
    const float* g = p->grad.f32();
    const auto& rows = p->touched;
    for (size_t k = 0; k < rows.size(); ++k) {
      if (k + 1 < rows.size()) prefetch_read(g + rows[k + 1] * rs, rs);
      acc += cpu::sum_squares(g + rows[k] * rs, rs);
    }
  }
  if (sum_shards) sharded = sum_shards(sharded);
  return std::sqrt(replicated + sharded);
}

double clip_grad_norm(ParamStore& ps, double max_norm, const ShardSum& sum_shards) {
  const double norm = grad_norm(ps, sum_shards);
  if (max_norm > 0 && norm > max_norm) {
    const float scale = static_cast<float>(max_norm / (norm + 1e-6));
    for (Param* p : ps.all()) {
      if (!p->row_sparse) {
        cpu::scale_inplace(p->grad.f32(), scale, p->grad.numel());
        continue;
      }
      const int64_t rs = p->row_size();
      for (int64_t r : p->touched) cpu::scale_inplace(p->grad.f32() + r * rs, scale, rs);
    }
  }
  return norm;
}

AdamW::AdamW(ParamStore& ps, const proto::OptimizerConfig& cfg) : ps_(ps), cfg_(cfg) {
  for (Param* p : ps.all()) {
    m_.push_back(Tensor::zeros(p->value.shape()));
    v_.push_back(Tensor::zeros(p->value.shape()));
    // row-sparse params keep a step count per row (lazy Adam: a row's moments advance only when it is used)
    row_t_.push_back(p->row_sparse ? Tensor::zeros({p->value.dim(0)}, DType::kI32) : Tensor());
  }
}

namespace {
// The AdamW update of n contiguous elements with bias corrections bc1, bc2 (vectorised, one thread).
inline void adamw_update(float* w, const float* g, float* m, float* v, int64_t n, float lr, float b1, float b2,
                         float eps, float decay, float bc1, float bc2) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    m[j] = b1 * m[j] + (1.0f - b1) * g[j];
    v[j] = b2 * v[j] + (1.0f - b2) * g[j] * g[j];
    const float mhat = m[j] / bc1;
    const float vhat = v[j] / bc2;
    w[j] -= lr * (mhat / (std::sqrt(vhat) + eps) + decay * w[j]);
  }
}
// The same update of one row of a row-sparse table, walking it one 64-byte line (16 floats) at a time and
// prefetching the matching line of the next row to update (offset `next` from w, g, m, v; 0: none) as it goes:
// spreading the prefetches over the row keeps the memory system busy without flooding it (core/prefetch.h).
inline void adamw_update_row(float* w, const float* g, float* m, float* v, int64_t n, int64_t next, float lr,
                             float b1, float b2, float eps, float decay, float bc1, float bc2) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    if (next) {
      __builtin_prefetch(w + next + j0, 1);
      __builtin_prefetch(g + next + j0, 0);
      __builtin_prefetch(m + next + j0, 1);
      __builtin_prefetch(v + next + j0, 1);
    }
    adamw_update(w + j0, g + j0, m + j0, v + j0, std::min<int64_t>(16, n - j0), lr, b1, b2, eps, decay, bc1, bc2);
  }
}
constexpr int64_t kChunk = 16384;  // elements per parallel work item of a dense update
}  // namespace

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
    if (!p->row_sparse) {
      const int64_t n = p->value.numel(), chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 4)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t o = c * kChunk;
        adamw_update(w + o, g + o, m + o, v + o, std::min(kChunk, n - o), lr, b1, b2, eps, decay, bc1, bc2);
      }
      continue;
    }
    // sparse rows: only the rows used this step move (their own step count drives the bias correction);
    // rows are disjoint, so they are updated in parallel (one parallel region per tensor, not per row)
    const int64_t rs = p->row_size();
    int32_t* rt = row_t_[i].i32();
    const int64_t nt = static_cast<int64_t>(p->touched.size());
    const int64_t* rows = p->touched.data();
#pragma omp parallel for schedule(static) if (nt * rs > 65536)
    for (int64_t k = 0; k < nt; ++k) {
      const int64_t r = rows[k];
      const int64_t next = k + 1 < nt ? (rows[k + 1] - r) * rs : 0;
      if (k + 1 < nt) __builtin_prefetch(rt + rows[k + 1], 1);
      const int32_t tr = ++rt[r];
      const float rb1 = 1.0f - std::pow(b1, static_cast<float>(tr));
      const float rb2 = 1.0f - std::pow(b2, static_cast<float>(tr));
      adamw_update_row(w + r * rs, g + r * rs, m + r * rs, v + r * rs, rs, next, lr, b1, b2, eps, decay, rb1, rb2);
    }
  }
}

}  // namespace moe
