// Learned top-k router: forward (GEMM, scores, top-k, capacity, aux losses) and backward side by side.
// The per-token math is core/kernels/cpu/router.cpp (in double, stored in float); the two GEMMs go through
// moe::cpu::matmul (OpenBLAS).
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/kernels/cpu/kernels.h"
#include "router/router.h"

namespace moe::router {

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

cpu::RouterDims LearnedRouter::dims(int N) const {
  return {N, E_, k_, opts_.score == ScoreFn::kSigmoid, opts_.normalize_topk && k_ > 1};
}

RouterOutput LearnedRouter::route(const float* logits /*[N,E]*/, int N, bool training) {
  const int E = E_, k = k_;
  MOE_CHECK(N >= 0 && (N == 0 || logits), "LearnedRouter::route: " << N << " tokens, null logits");
  have_forward_ = false;  // set again once the whole forward succeeded
  logits_.assign(logits, logits + static_cast<size_t>(N) * E);
  // 3. scores, logsumexp, top-k (descending logit or biased score, ties: lower expert index first), gates
  probs_.resize(static_cast<size_t>(N) * E);
  lse_.resize(N);
  std::vector<int32_t> choice(static_cast<size_t>(N) * k);
  std::vector<float> gate(choice.size());
  std::vector<double> stats(E + 2);
  cpu::router_topk(dims(N), choice.data(), gate.data(), probs_.data(), lse_.data(), stats.data(),
                   logits_.data(), opts_.bias_balancing ? bias_.data() : nullptr);
  if (stats[E + 1] >= 0) {  // name the first non-finite logit
    const int n = static_cast<int>(stats[E + 1]);
    const float* l = logits_.data() + static_cast<size_t>(n) * E;
    const int e = static_cast<int>(std::find_if(l, l + E, [](float v) { return !std::isfinite(v); }) - l);
    MOE_THROW("LearnedRouter: router logit of token " << n << ", expert " << e << " is not finite (" << l[e] << ")");
  }
  RouterOutput out = assign(choice.data(), gate.data(), stats.data(), N, training);
  host_logits_ = true;
  return out;
}

RouterOutput LearnedRouter::assign(const int32_t* choice /*[N*k]*/, const float* gate /*[N*k]*/,
                                   const double* stats /*[E+2]*/, int N, bool training) {
  const int E = E_, k = k_;
  have_forward_ = host_logits_ = false;
  N_ = N;
  MOE_CHECK(stats[E + 1] < 0, "LearnedRouter: a router logit of token " << static_cast<int64_t>(stats[E + 1])
                                                                        << " is not finite");
  choice_.assign(choice, choice + static_cast<size_t>(N) * k);
  // 4. capacity assignment, slot-major (all 1st choices before any 2nd choice), tokens by index within a slot;
  // 5. gates: normalised before dropping, 0 for dropped slots
  RouterOutput out;
  DispatchPlan& plan = out.plan;
  const int cap = opts_.dropless || !training ? -1 : expert_capacity(N, k, E, opts_.capacity_factor);
  plan.reset(N, k, E, cap);
  kept_.assign(static_cast<size_t>(N) * k, -1);
  std::vector<int32_t> fill(E, 0);
  for (int j = 0; j < k; ++j)
    for (int n = 0; n < N; ++n) {
      const int s = n * k + j;
      const int e = choice_[s];
      MOE_CHECK(e >= 0 && e < E, "LearnedRouter: choice " << e << " of slot " << s << " is not an expert");
      if (cap >= 0 && fill[e] >= cap) continue;
      kept_[s] = 0;
      plan.expert[s] = e;
      plan.position[s] = fill[e]++;
      plan.gate[s] = gate[s];
    }
  plan.build_permutation();

  // 6. aux losses: f_e (pre-drop routing fraction), P_e (mean probability), z-loss
  f_.assign(E, 0.0f);
  if (N > 0) {
    std::vector<int64_t> routed(E, 0);
    for (int32_t e : choice_) ++routed[e];
    for (int e = 0; e < E; ++e) f_[e] = static_cast<float>(static_cast<double>(routed[e]) / (double(N) * k));
    double aux = 0.0;
    for (int e = 0; e < E; ++e) aux += static_cast<double>(f_[e]) * (stats[e] / N);
    out.aux_loss = static_cast<float>(E * aux);
    out.z_loss = static_cast<float>(stats[E] / N);
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
  MOE_CHECK(host_logits_, "LearnedRouter::backward: the last forward routed on a device (assign): take the logits' gradient there");
  dlogits_.assign(static_cast<size_t>(N_) * E_, 0.0f);
  if (N_ == 0) return dlogits_;
  MOE_CHECK(dgate, "LearnedRouter::backward: null dgate");
  cpu::router_logits_grad(dims(N_), dlogits_.data(), logits_.data(), lse_.data(), choice_.data(),
                          kept_.data(), dgate, f_.data(), static_cast<double>(loss_scale) * opts_.aux_loss_coef,
                          static_cast<double>(loss_scale) * opts_.z_loss_coef);
  return dlogits_;
}

}  // namespace moe::router
