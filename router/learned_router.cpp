// Learned top-k router: forward (GEMM, scores, top-k, capacity, aux losses) and backward side by side.
// Per-token math is done in double and stored in float; the two GEMMs go through moe::cpu::matmul (OpenBLAS).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "core/kernels/cpu/kernels.h"
#include "router/router.h"

namespace moe::router {
namespace {
// choice[k] = the k experts of one token by descending key, ties to the lower expert index: the logits l[E], or
// with a selection bias the scores plus the bias p[e] + b[e] (in double). idx[E] and key[E] are scratch.
void select_topk(int32_t* choice /*[k]*/, const float* l /*[E]*/, const float* p /*[E]*/, const float* b /*[E]*/, int E,
                 int k, std::vector<int32_t>& idx, std::vector<double>& key /*[E] scratch*/) {
  for (int e = 0; e < E; ++e) key[e] = b ? static_cast<double>(p[e]) + b[e] : static_cast<double>(l[e]);
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&key](int32_t a, int32_t c) { return key[a] > key[c] || (key[a] == key[c] && a < c); });
  std::copy(idx.begin(), idx.begin() + k, choice);
}
}  // namespace

LearnedRouter::LearnedRouter(int num_experts, int k, int channels, const LearnedRouterOptions& opts)
    : E_(num_experts), k_(k), C_(channels), opts_(opts), rng_(opts.seed), bias_(std::max(num_experts, 0), 0.0f) {
  MOE_CHECK(num_experts >= 1, "LearnedRouter: number of experts must be >= 1 (got " << num_experts << ")");
  MOE_CHECK(k >= 1 && k <= num_experts, "LearnedRouter: top-k " << k << " must lie in [1, number of experts "
                                                                << num_experts << "]");
  MOE_CHECK(channels >= 1, "LearnedRouter: channels must be >= 1 (got " << channels << ")");
  MOE_CHECK(opts.dropless || (opts.capacity_factor > 0 && std::isfinite(opts.capacity_factor)),
            "LearnedRouter: capacity_factor must be > 0 unless dropless (got " << opts.capacity_factor << ")");
  MOE_CHECK(opts.aux_loss_coef >= 0 && std::isfinite(opts.aux_loss_coef),
            "LearnedRouter: aux_loss_coef must be >= 0 (got " << opts.aux_loss_coef << ")");
  MOE_CHECK(opts.z_loss_coef >= 0 && std::isfinite(opts.z_loss_coef),
            "LearnedRouter: z_loss_coef must be >= 0 (got " << opts.z_loss_coef << ")");
  MOE_CHECK(opts.jitter_eps >= 0 && opts.jitter_eps < 1,
            "LearnedRouter: jitter_eps must lie in [0, 1) (got " << opts.jitter_eps << ")");
  MOE_CHECK(opts.bias_update_rate >= 0 && std::isfinite(opts.bias_update_rate),
            "LearnedRouter: bias_update_rate must be >= 0 (got " << opts.bias_update_rate << ")");
}

// ---------------------------------------------------------------- selection bias
void LearnedRouter::set_bias(const std::vector<float>& b) {
  MOE_CHECK(static_cast<int>(b.size()) == E_,
            "LearnedRouter::set_bias: " << b.size() << " values for " << E_ << " experts");
  for (int e = 0; e < E_; ++e)
    MOE_CHECK(std::isfinite(b[e]),
              "LearnedRouter::set_bias: bias of expert " << e << " is not finite (" << b[e] << ")");
  bias_ = b;
}

void LearnedRouter::update_bias(const double* load /*[E]*/) {
  MOE_CHECK(opts_.bias_balancing, "LearnedRouter::update_bias: bias balancing is off");
  double total = 0;
  for (int e = 0; e < E_; ++e) {
    MOE_CHECK(std::isfinite(load[e]) && load[e] >= 0,
              "LearnedRouter::update_bias: load of expert " << e << " is " << load[e] << " (must be finite, >= 0)");
    total += load[e];
  }
  const double mean = total / E_;
  for (int e = 0; e < E_; ++e) {
    const float sign = load[e] < mean ? 1.0f : (load[e] > mean ? -1.0f : 0.0f);
    bias_[e] += opts_.bias_update_rate * sign;
  }
}

// ---------------------------------------------------------------- forward
const std::vector<float>& LearnedRouter::draw_noise(int N, bool training) {
  noise_.clear();
  if (!training || opts_.jitter_eps <= 0) return noise_;
  const int64_t NC = static_cast<int64_t>(N) * C_;
  noise_.resize(NC);
  const float lo = 1.0f - opts_.jitter_eps, span = 2.0f * opts_.jitter_eps;
  for (int64_t i = 0; i < NC; ++i) noise_[i] = lo + span * rng_.uniform();
  return noise_;
}

RouterOutput LearnedRouter::forward(const float* x /*[N,C]*/, const float* w_router /*[E,C]*/, int N,
                                    bool training, const float* w_packed) {
  const int E = E_, C = C_;
  MOE_CHECK(N >= 0, "LearnedRouter::forward: negative token count " << N);
  MOE_CHECK(N == 0 || (x && (w_router || w_packed)), "LearnedRouter::forward: null x or w_router");
  const int64_t NC = static_cast<int64_t>(N) * C;
  // 1. x' = x * noise (jitter, training only)
  xin_.assign(x, x + NC);
  if (!draw_noise(N, training).empty()) cpu::mul(xin_.data(), xin_.data(), noise_.data(), NC);
  // 2. logits[N,E] = x'[N,C] @ W[E,C]^T
  std::vector<float> logits(static_cast<size_t>(N) * E, 0.0f);
  if (N > 0 && w_packed) cpu::linear_rows(logits.data(), xin_.data(), w_packed, nullptr, N, C, E);
  else if (N > 0) cpu::matmul(logits.data(), xin_.data(), w_router, N, E, C, false, true);
  return route(logits.data(), N, training);
}

RouterOutput LearnedRouter::route(const float* logits /*[N,E]*/, int N, bool training) {
  const int E = E_, k = k_;
  MOE_CHECK(N >= 0 && (N == 0 || logits), "LearnedRouter::route: " << N << " tokens, null logits");
  have_forward_ = false;  // set again once the whole forward succeeded
  N_ = N;
  logits_.assign(logits, logits + static_cast<size_t>(N) * E);

  // 3. scores, logsumexp, top-k (descending logit or biased score, ties: lower expert index first)
  probs_.assign(static_cast<size_t>(N) * E, 0.0f);
  lse_.assign(N, 0.0f);
  choice_.assign(static_cast<size_t>(N) * k, -1);
  std::vector<int32_t> idx(E);
  std::vector<double> key(E);
  const float* bias = opts_.bias_balancing ? bias_.data() : nullptr;
  for (int n = 0; n < N; ++n) {
    const float* l = logits_.data() + static_cast<size_t>(n) * E;
    float* p = probs_.data() + static_cast<size_t>(n) * E;
    double mx = -INFINITY;
    for (int e = 0; e < E; ++e) {
      MOE_CHECK(std::isfinite(l[e]), "LearnedRouter: router logit of token " << n << ", expert " << e
                                                                             << " is not finite (" << l[e] << ")");
      mx = std::max(mx, static_cast<double>(l[e]));
    }
    double sum = 0.0;
    for (int e = 0; e < E; ++e) sum += std::exp(l[e] - mx);
    lse_[n] = mx + std::log(sum);
    for (int e = 0; e < E; ++e)
      p[e] = static_cast<float>(opts_.score == ScoreFn::kSoftmax ? std::exp(l[e] - mx) / sum
                                                                 : 1.0 / (1.0 + std::exp(-static_cast<double>(l[e]))));
    select_topk(choice_.data() + static_cast<size_t>(n) * k, l, p, bias, E, k, idx, key);
  }

  // 4. capacity assignment, slot-major (all 1st choices before any 2nd choice), tokens by index within a slot
  RouterOutput out;
  DispatchPlan& plan = out.plan;
  const int cap = opts_.dropless || !training ? -1 : expert_capacity(N, k, E, opts_.capacity_factor);
  plan.reset(N, k, E, cap);
  kept_.assign(static_cast<size_t>(N) * k, 0);
  std::vector<int32_t> fill(E, 0);
  for (int j = 0; j < k; ++j)
    for (int n = 0; n < N; ++n) {
      const int s = n * k + j;
      const int e = choice_[s];
      if (cap >= 0 && fill[e] >= cap) continue;
      kept_[s] = 1;
      plan.expert[s] = e;
      plan.position[s] = fill[e]++;
    }

  // 5. gates: selected scores, normalised over the k choices (k > 1) before dropping; 0 for dropped slots
  const bool normalize = opts_.normalize_topk && k > 1;
  for (int n = 0; n < N; ++n) {
    const float* p = probs_.data() + static_cast<size_t>(n) * E;
    double denom = 1.0;
    if (normalize) {
      denom = 0.0;
      for (int j = 0; j < k; ++j) denom += p[choice_[n * k + j]];
    }
    for (int j = 0; j < k; ++j) {
      const int s = n * k + j;
      if (kept_[s]) plan.gate[s] = static_cast<float>(p[choice_[s]] / denom);
    }
  }
  plan.build_permutation();

  // 6. aux losses: f_e (pre-drop routing fraction), P_e (mean probability), z-loss
  f_.assign(E, 0.0f);
  std::vector<double> P(E, 0.0);
  double z = 0.0;
  if (N > 0) {
    std::vector<int64_t> routed(E, 0);
    for (int32_t e : choice_) ++routed[e];
    for (int e = 0; e < E; ++e) f_[e] = static_cast<float>(static_cast<double>(routed[e]) / (double(N) * k));
    for (int n = 0; n < N; ++n) {
      const float* p = probs_.data() + static_cast<size_t>(n) * E;
      double t = 1.0;  // P_e: softmax probs, or sigmoid scores normalised over the experts
      if (opts_.score == ScoreFn::kSigmoid) t = std::accumulate(p, p + E, 0.0);
      for (int e = 0; e < E; ++e) P[e] += p[e] / t;
      z += lse_[n] * lse_[n];
    }
    double aux = 0.0;
    for (int e = 0; e < E; ++e) aux += static_cast<double>(f_[e]) * (P[e] / N);
    out.aux_loss = static_cast<float>(E * aux);
    out.z_loss = static_cast<float>(z / N);
  }
  out.loss = opts_.aux_loss_coef * out.aux_loss + opts_.z_loss_coef * out.z_loss;
  have_forward_ = true;
  return out;
}

// ---------------------------------------------------------------- backward
void LearnedRouter::backward(float* dx /*[N,C] +=*/, float* dw /*[E,C] +=*/, const float* dgate /*[N*k]*/,
                             const float* w_router /*[E,C]*/, float loss_scale) {
  MOE_CHECK(!dx || w_router, "LearnedRouter::backward: null w_router");
  const std::vector<float>& dlogits = logits_grad(dgate, loss_scale);
  const int N = N_, E = E_, C = C_;
  if (N == 0) return;
  // dW[E,C] += dlogits[N,E]^T @ x'[N,C]
  if (dw) cpu::matmul(dw, dlogits.data(), xin_.data(), E, C, N, true, false, 1.0f, 1.0f);
  // dx[N,C] += (dlogits[N,E] @ W[E,C]) * noise
  if (!dx) return;
  if (noise_.empty()) {
    cpu::matmul(dx, dlogits.data(), w_router, N, C, E, false, false, 1.0f, 1.0f);
    return;
  }
  std::vector<float> dxin(static_cast<size_t>(N) * C);
  cpu::matmul(dxin.data(), dlogits.data(), w_router, N, C, E, false, false);
  cpu::mul(dxin.data(), dxin.data(), noise_.data(), static_cast<int64_t>(dxin.size()));
  cpu::add_inplace(dx, dxin.data(), static_cast<int64_t>(dxin.size()));
}

const std::vector<float>& LearnedRouter::logits_grad(const float* dgate /*[N*k]*/, float loss_scale) {
  MOE_CHECK(have_forward_, "LearnedRouter::backward called before forward");
  const int N = N_, E = E_, k = k_;
  dlogits_.assign(static_cast<size_t>(N) * E, 0.0f);
  if (N == 0) return dlogits_;
  MOE_CHECK(dgate, "LearnedRouter::backward: null dgate");
  const bool normalize = opts_.normalize_topk && k > 1;
  const double aux_scale = static_cast<double>(loss_scale) * opts_.aux_loss_coef;  // dL/d(aux)
  const double z_scale = static_cast<double>(loss_scale) * opts_.z_loss_coef;      // dL/d(z)

  std::vector<double> p(E), dp(E);
  for (int n = 0; n < N; ++n) {
    // scores recomputed in double from the logits (sigmoid'(l) = s(l) s(-l) stays accurate for large |l|)
    const float* l = logits_.data() + static_cast<size_t>(n) * E;
    for (int e = 0; e < E; ++e)
      p[e] = opts_.score == ScoreFn::kSoftmax ? std::exp(l[e] - lse_[n])
                                              : 1.0 / (1.0 + std::exp(-static_cast<double>(l[e])));
    std::fill(dp.begin(), dp.end(), 0.0);

    // gates: g_j = p_j / S (normalised) or p_j; only kept slots carry dgate
    //   dp_m = (dg_m - sum_j dg_j g_j) / S   (normalised),   dp_m = dg_m   (raw)
    double S = 1.0, dot = 0.0;
    if (normalize) {
      S = 0.0;
      for (int j = 0; j < k; ++j) S += p[choice_[n * k + j]];
      for (int j = 0; j < k; ++j) {
        const int s = n * k + j;
        if (kept_[s]) dot += static_cast<double>(dgate[s]) * (p[choice_[s]] / S);
      }
    }
    for (int j = 0; j < k; ++j) {
      const int s = n * k + j;
      const double dg = kept_[s] ? static_cast<double>(dgate[s]) : 0.0;
      dp[choice_[s]] += normalize ? (dg - dot) / S : dg;
    }

    // aux loss: dL/dP_e = aux_scale * E * f_e, P_e = mean_n q_ne
    if (aux_scale != 0.0) {
      const double c = aux_scale * E / N;
      if (opts_.score == ScoreFn::kSoftmax) {
        for (int e = 0; e < E; ++e) dp[e] += c * f_[e];
      } else {  // q_e = s_e / T, T = sum s: ds_m = (a_m - sum_e a_e q_e) / T
        double T = 0.0, aq = 0.0;
        for (int e = 0; e < E; ++e) T += p[e];
        for (int e = 0; e < E; ++e) aq += c * f_[e] * (p[e] / T);
        for (int e = 0; e < E; ++e) dp[e] += (c * f_[e] - aq) / T;
      }
    }

    // scores -> logits, plus the z-loss: d/dl_e of mean_n lse_n^2 = 2 lse_n softmax(l)_e / N
    float* dl = dlogits_.data() + static_cast<size_t>(n) * E;
    const double zc = z_scale * 2.0 * lse_[n] / N;
    if (opts_.score == ScoreFn::kSoftmax) {
      double pdp = 0.0;
      for (int e = 0; e < E; ++e) pdp += p[e] * dp[e];
      for (int e = 0; e < E; ++e) dl[e] = static_cast<float>(p[e] * (dp[e] - pdp) + zc * p[e]);
    } else {
      for (int e = 0; e < E; ++e) {
        const double one_minus_s = 1.0 / (1.0 + std::exp(static_cast<double>(l[e])));
        dl[e] = static_cast<float>(dp[e] * p[e] * one_minus_s + zc * std::exp(l[e] - lse_[n]));
      }
    }
  }

  return dlogits_;
}

}  // namespace moe::router
