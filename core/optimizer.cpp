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

namespace {
constexpr int64_t kParRows = 65536;  // elements of touched rows below which a row pass stays on one thread

// sum of squares of a param's gradient (row-sparse: its touched rows, in parallel; double accumulation)
double grad_sum_squares(const Param& p) {
  if (!p.row_sparse) return cpu::sum_squares(p.grad.f32(), p.grad.numel());
  const int64_t rs = p.row_size(), nt = static_cast<int64_t>(p.touched.size());
  const float* g = p.grad.f32();           // [rows, rs]
  const int64_t* rows = p.touched.data();  // [nt]
  double acc = 0;
#pragma omp parallel for schedule(static) reduction(+ : acc) if (nt * rs > kParRows)
  for (int64_t k = 0; k < nt; ++k) {
    const int64_t next = k + 1 < nt ? (rows[k + 1] - rows[k]) * rs : 0;
    walk_row<false>(g + rows[k] * rs, rs, next, [&](const float* x, int64_t n) { acc += cpu::sum_squares(x, n); });
  }
  return acc;
}

// g *= scale over a param's gradient (row-sparse: its touched rows)
void scale_grad(Param& p, float scale) {
  if (!p.row_sparse) return cpu::scale_inplace(p.grad.f32(), scale, p.grad.numel());
  const int64_t rs = p.row_size(), nt = static_cast<int64_t>(p.touched.size());
  float* g = p.grad.f32();
  const int64_t* rows = p.touched.data();
#pragma omp parallel for schedule(static) if (nt * rs > kParRows)
  for (int64_t k = 0; k < nt; ++k) cpu::scale_inplace(g + rows[k] * rs, scale, rs);
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

AdamW::AdamW(ParamStore& ps, const proto::OptimizerConfig& cfg) : ps_(ps), cfg_(cfg) {
  for (Param* p : ps.all()) {
    m_.push_back(Tensor::zeros(p->value.shape()));
    v_.push_back(Tensor::zeros(p->value.shape()));
    // row-sparse params keep a step count per row (lazy Adam: a row's moments advance only when it is used)
    row_t_.push_back(p->row_sparse ? Tensor::zeros({p->value.dim(0)}, DType::kI32) : Tensor());
  }
}

namespace {
struct Hyper {
  float lr, b1, b2, eps, decay, gscale;
};

// The AdamW update of n contiguous elements with bias corrections bc1, bc2 (vectorised: optimizer.cpp is built
// with -fno-math-errno, else GCC keeps the sqrt, and so the loop, scalar). The gradient is read as gscale * g,
// exactly as if it had been scaled in memory first (clip_grad_norm).
inline void adamw_update(float* w, const float* g, float* m, float* v, int64_t n, const Hyper& h, float bc1,
                         float bc2) {
  const float lr = h.lr, b1 = h.b1, b2 = h.b2, eps = h.eps, decay = h.decay, gs = h.gscale;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float gj = g[j] * gs;
    m[j] = b1 * m[j] + (1.0f - b1) * gj;
    v[j] = b2 * v[j] + (1.0f - b2) * gj * gj;
    const float mhat = m[j] / bc1;
    const float vhat = v[j] / bc2;
    w[j] -= lr * (mhat / (std::sqrt(vhat) + eps) + decay * w[j]);
  }
}
// The same update of one row of a row-sparse table, walking it 64 lines (1024 floats) at a time and prefetching
// the matching lines of the next row to update (offset `next` from w, g, m, v; 0: none) as it goes: spreading the
// prefetches over the row keeps the memory system busy without flooding it (core/prefetch.h). Long rows
// (> kPrefetchRowMax floats) get none: the hardware prefetchers follow them, and the next row would be evicted
// before its turn.
inline void adamw_update_row(float* w, const float* g, float* m, float* v, int64_t n, int64_t next, const Hyper& h,
                             float bc1, float bc2) {
  constexpr int64_t kBlock = 1024;
  if (n > kPrefetchRowMax) next = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n - j0);
    if (next)
      for (int64_t j = j0; j < j0 + len; j += 16) {
        __builtin_prefetch(w + next + j, 1);
        __builtin_prefetch(g + next + j, 0);
        __builtin_prefetch(m + next + j, 1);
        __builtin_prefetch(v + next + j, 1);
      }
    adamw_update(w + j0, g + j0, m + j0, v + j0, len, h, bc1, bc2);
  }
}
constexpr int64_t kChunk = 16384;  // elements per parallel work item of a dense update

void adamw_dense(Param& p, float* m, float* v, const Hyper& h, float bc1, float bc2) {
  float* w = p.value.f32();
  const float* g = p.grad.f32();
  const int64_t n = p.value.numel(), chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 4)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t o = c * kChunk;
    adamw_update(w + o, g + o, m + o, v + o, std::min(kChunk, n - o), h, bc1, bc2);
  }
}

// sparse rows: only the rows used this step move (their own step count rt[row] drives the bias correction);
// rows are disjoint, so they are updated in parallel (one parallel region per tensor, not per row)
void adamw_rows(Param& p, float* m, float* v, int32_t* rt, const Hyper& h) {
  float* w = p.value.f32();
  const float* g = p.grad.f32();
  const int64_t rs = p.row_size(), nt = static_cast<int64_t>(p.touched.size());
  const int64_t* rows = p.touched.data();
#pragma omp parallel for schedule(static) if (nt * rs > kParRows)
  for (int64_t k = 0; k < nt; ++k) {
    const int64_t r = rows[k];
    const int64_t next = k + 1 < nt ? (rows[k + 1] - r) * rs : 0;
    if (k + 1 < nt) __builtin_prefetch(rt + rows[k + 1], 1);
    const int32_t tr = ++rt[r];
    const float rb1 = 1.0f - std::pow(h.b1, static_cast<float>(tr));
    const float rb2 = 1.0f - std::pow(h.b2, static_cast<float>(tr));
    adamw_update_row(w + r * rs, g + r * rs, m + r * rs, v + r * rs, rs, next, h, rb1, rb2);
  }
}
}  // namespace

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
    const Hyper h{lr, b1, b2, cfg_.eps(), p->decay ? cfg_.weight_decay() : 0.0f, grad_scale};
    if (p->row_sparse)
      adamw_rows(*p, m_[i].f32(), v_[i].f32(), row_t_[i].i32(), h);
    else
      adamw_dense(*p, m_[i].f32(), v_[i].f32(), h, bc1, bc2);
  }
}

}  // namespace moe
