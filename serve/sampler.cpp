#include "serve/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace moe::serve {
namespace {

// ids in descending order of logit, ties by lower id; only the first k are sorted (partial)
std::vector<int> top_ids(const float* logits, int V, int k) {
  std::vector<int> idx(V);
  std::iota(idx.begin(), idx.end(), 0);
  auto better = [logits](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  k = std::clamp(k, 0, V);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), better);
  idx.resize(k);
  return idx;
}

int32_t draw(const float* logits, int V, const SampleChoice& c, float mx) {
  const bool filter_k = c.top_k > 0 && c.top_k < V;
  const bool filter_p = c.top_p < 1.0f;
  std::vector<int> cand;  // the candidates in sampling order
  if (filter_k || filter_p) {
    cand = top_ids(logits, V, filter_k ? c.top_k : V);
  } else {
    cand.resize(V);
    std::iota(cand.begin(), cand.end(), 0);
  }
  std::vector<double> p(cand.size());
  double kept = 0;
  for (size_t i = 0; i < cand.size(); ++i) kept += (p[i] = std::exp((double(logits[cand[i]]) - mx) / c.temperature));
  size_t n = cand.size();
  if (filter_p) {  // descending order already: the shortest prefix reaching top_p of the mass
    double run = 0;
    for (size_t i = 0; i < cand.size(); ++i) {
      run += p[i];
      if (run >= c.top_p * kept) {
        n = i + 1;
        break;
      }
    }
    kept = std::accumulate(p.begin(), p.begin() + n, 0.0);
  }
  const double target = c.u * kept;
  double run = 0;
  for (size_t i = 0; i < n; ++i) {
    run += p[i];
    if (run > target) return cand[i];
  }
  return cand[n - 1];
}

}  // namespace

Sampled sample_token(const float* logits, int V, const SampleChoice& c) {
  MOE_CHECK(V > 0, "sample_token: empty vocabulary");
  float mx = -INFINITY;
  int arg = 0;
  for (int i = 0; i < V; ++i) {
    MOE_CHECK(std::isfinite(logits[i]), "sample_token: logit " << i << " is not finite (" << logits[i] << ")");
    if (logits[i] > mx) {
      mx = logits[i];
      arg = i;
    }
  }
  Sampled s;
  s.token = c.temperature <= 0 ? arg : draw(logits, V, c, mx);
  if (c.logprobs < 0) return s;  // (the log-sum-exp over the vocabulary only when asked for)
  double sum = 0;
  for (int i = 0; i < V; ++i) sum += std::exp(double(logits[i]) - mx);
  const double lse = mx + std::log(sum);
  s.logprob = double(logits[s.token]) - lse;
  if (c.logprobs > 0)
    for (int id : top_ids(logits, V, c.logprobs)) s.top.push_back({id, double(logits[id]) - lse});
  return s;
}

}  // namespace moe::serve
