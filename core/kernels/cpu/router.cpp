// The learned router's kernels on the CPU (kernels.h "learned router"): the per-token math of
// core/kernels/router_token.h over the tokens in parallel; the sums over tokens in token order.
#include <algorithm>
#include <vector>

#include "core/kernels/cpu/kernels.h"
#include "core/kernels/router_token.h"

namespace moe::cpu {
namespace {
constexpr int kParTokens = 4096;  // fewer tokens: one thread
}  // namespace

void router_topk(const RouterDims& d, int32_t* choice, float* gate, float* score, double* lse, double* stats,
                 const float* logits, const float* bias) {
  const int N = d.N, E = d.E, k = d.k;
  std::vector<uint8_t> ok(static_cast<size_t>(N));
#pragma omp parallel for schedule(static) if (N > kParTokens)
  for (int n = 0; n < N; ++n)
    ok[n] = router_token::route(d, choice + int64_t(n) * k, gate + int64_t(n) * k, score + int64_t(n) * E, lse + n,
                                logits + int64_t(n) * E, bias);
  std::fill(stats, stats + E + 2, 0.0);
  stats[E + 1] = -1;
  for (int n = 0; n < N; ++n) {
    if (!ok[n]) {
      stats[E + 1] = n;
      return;
    }
    const float* p = score + int64_t(n) * E;
    const double t = router_token::q_norm(d, p);
    for (int e = 0; e < E; ++e) stats[e] += p[e] / t;
    stats[E] += lse[n] * lse[n];
  }
}

void router_logits_grad(const RouterDims& d, float* dlogits, const float* logits, const double* lse,
                        const int32_t* choice, const int32_t* row, const float* dgate, const float* f,
                        double aux_scale, double z_scale) {
  const int N = d.N, E = d.E, k = d.k;
#pragma omp parallel for schedule(static) if (N > kParTokens)
  for (int n = 0; n < N; ++n) {
    const int64_t s = int64_t(n) * k;
    router_token::logits_grad(d, dlogits + int64_t(n) * E, logits + int64_t(n) * E, lse[n], choice + s, row + s,
                              dgate + s, f, aux_scale, z_scale);
  }
}

}  // namespace moe::cpu
