// One token of the learned router (kernels.h "learned router"), written once for the CPU kernels
// (cpu/router.cpp) and the CUDA ones (cuda/router.cu): plain loops in double over the token's E logits, no
// allocation, no library call that the device lacks. A function here reads and writes that token's slices only.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/kernels/cpu/kernels.h"

#ifdef __CUDACC__
#define MOE_HD __host__ __device__ inline
#else
#define MOE_HD inline
#endif

namespace moe::router_token {

#ifdef __CUDA_ARCH__
MOE_HD double exp_d(double x) { return ::exp(x); }
MOE_HD double log_d(double x) { return ::log(x); }
MOE_HD bool finite_f(float x) { return ::isfinite(x); }
#else
MOE_HD double exp_d(double x) { return std::exp(x); }
MOE_HD double log_d(double x) { return std::log(x); }
MOE_HD bool finite_f(float x) { return std::isfinite(x); }
#endif
MOE_HD double sigmoid_d(double x) { return 1.0 / (1.0 + exp_d(-x)); }

// the j-th choice: the expert of largest key among those not chosen before (choice[0..j)), ties to the lower index
// (the scan is ascending and only a strictly larger key replaces the best)
template <class Key>
MOE_HD int32_t next_choice(const int32_t* choice, int j, int E, Key key) {
  int32_t best = -1;
  double best_key = 0.0;
  for (int e = 0; e < E; ++e) {
    bool taken = false;
    for (int i = 0; i < j; ++i) taken = taken || choice[i] == e;
    if (taken) continue;
    const double v = key(e);
    if (best < 0 || v > best_key) {
      best = e;
      best_key = v;
    }
  }
  return best;
}

// Forward of token l[E]: lse, the scores p[E] (float), choice[k], gate[k]. False (nothing written) when a logit is
// not finite.
MOE_HD bool route(const cpu::RouterDims& d, int32_t* choice, float* gate, float* p, double* lse, const float* l,
                  const float* bias) {
  const int E = d.E, k = d.k;
  double mx = -INFINITY;
  for (int e = 0; e < E; ++e) {
    if (!finite_f(l[e])) return false;
    mx = l[e] > mx ? l[e] : mx;
  }
  double sum = 0.0;
  for (int e = 0; e < E; ++e) sum += exp_d(l[e] - mx);
  *lse = mx + log_d(sum);
  for (int e = 0; e < E; ++e) p[e] = static_cast<float>(d.sigmoid ? sigmoid_d(l[e]) : exp_d(l[e] - mx) / sum);
  for (int j = 0; j < k; ++j)
    choice[j] = bias ? next_choice(choice, j, E, [&](int e) { return static_cast<double>(p[e]) + bias[e]; })
                     : next_choice(choice, j, E, [&](int e) { return static_cast<double>(l[e]); });
  double denom = 1.0;
  if (d.normalize) {
    denom = 0.0;
    for (int j = 0; j < k; ++j) denom += p[choice[j]];
  }
  for (int j = 0; j < k; ++j) gate[j] = static_cast<float>(p[choice[j]] / denom);
  return true;
}

// The normaliser t of the aux loss's distribution q = p / t of a token's scores p[E]: 1 for softmax, the sum of
// the scores for sigmoid
MOE_HD double q_norm(const cpu::RouterDims& d, const float* p) {
  if (!d.sigmoid) return 1.0;
  double t = 0.0;
  for (int e = 0; e < d.E; ++e) t += p[e];
  return t;
}

// Backward of token l[E] (kernels.h router_logits_grad): dl[E] written. row[k] / dgate[k]: the token's slots.
MOE_HD void logits_grad(const cpu::RouterDims& d, float* dl, const float* l, double lse, const int32_t* choice,
                        const int32_t* row, const float* dgate, const float* f, double aux_scale, double z_scale) {
  const int E = d.E, k = d.k;
  const double c_aux = aux_scale * E / d.N, zc = z_scale * 2.0 * lse / d.N;
  // scores recomputed in double from the logits (sigmoid'(l) = s(l) s(-l) stays accurate for large |l|)
  auto score = [&](int e) { return d.sigmoid ? sigmoid_d(l[e]) : exp_d(l[e] - lse); };
  // gates: g_j = p_j / S (normalised) or p_j; only kept slots carry dgate
  //   dp_m = (dg_m - sum_j dg_j g_j) / S   (normalised),   dp_m = dg_m   (raw)
  double S = 1.0, dot = 0.0;
  if (d.normalize) {
    S = 0.0;
    for (int j = 0; j < k; ++j) S += score(choice[j]);
    for (int j = 0; j < k; ++j)
      if (row[j] >= 0) dot += static_cast<double>(dgate[j]) * (score(choice[j]) / S);
  }
  // aux loss: dL/dP_e = c_aux * N * f_e, P_e = mean_n q_ne; for sigmoid q_e = s_e / T: ds_m = (a_m - sum a_e q_e) / T
  double T = 0.0, aq = 0.0;
  if (c_aux != 0.0 && d.sigmoid) {
    for (int e = 0; e < E; ++e) T += score(e);
    for (int e = 0; e < E; ++e) aq += c_aux * f[e] * (score(e) / T);
  }
  auto dp = [&](int e) {  // dL/dp_e
    double v = 0.0;
    for (int j = 0; j < k; ++j)
      if (choice[j] == e) v += d.normalize ? ((row[j] >= 0 ? static_cast<double>(dgate[j]) : 0.0) - dot) / S
                                           : (row[j] >= 0 ? static_cast<double>(dgate[j]) : 0.0);
    if (c_aux != 0.0) v += d.sigmoid ? (c_aux * f[e] - aq) / T : c_aux * f[e];
    return v;
  };
  // scores -> logits, plus the z-loss: d/dl_e of mean_n lse_n^2 = 2 lse_n softmax(l)_e / N
  if (!d.sigmoid) {
    double pdp = 0.0;
    for (int e = 0; e < E; ++e) pdp += score(e) * dp(e);
    for (int e = 0; e < E; ++e) {
      const double p = score(e);
      dl[e] = static_cast<float>(p * (dp(e) - pdp) + zc * p);
    }
    return;
  }
  for (int e = 0; e < E; ++e) {
    const double one_minus_s = sigmoid_d(-static_cast<double>(l[e]));
    dl[e] = static_cast<float>(dp(e) * score(e) * one_minus_s + zc * exp_d(l[e] - lse));
  }
}

}  // namespace moe::router_token
