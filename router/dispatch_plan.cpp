// DispatchPlan: validation, the permutation (slots sorted by expert), and the permute / unpermute-combine with their
// backward on host buffers, through the token dispatch kernels (core/kernels/cpu/kernels.h) that the MoE layer runs
// on its backend.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/kernels/cpu/kernels.h"
#include "router/router.h"

namespace moe::router {

uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

int expert_capacity(int N, int k, int E, double capacity_factor) {
  MOE_CHECK(N >= 0 && k >= 1 && E >= 1, "expert_capacity: need N >= 0, k >= 1, E >= 1 (got N " << N << ", k " << k
                                                                                              << ", E " << E << ")");
  MOE_CHECK(capacity_factor > 0 && std::isfinite(capacity_factor),
            "expert_capacity: capacity_factor must be > 0 (got " << capacity_factor << ")");
  const double v = static_cast<double>(k) * N * capacity_factor / E;
  const double c = std::ceil(v - 1e-6 * v);
  MOE_CHECK(c < 2147483647.0, "expert_capacity: capacity " << c << " overflows int");
  return static_cast<int>(c);
}

// ---------------------------------------------------------------- plan bookkeeping
void DispatchPlan::reset(int N, int k_, int E, int capacity_) {
  MOE_CHECK(N >= 0 && k_ >= 1 && E >= 1, "DispatchPlan: need N >= 0, k >= 1, E >= 1 (got N " << N << ", k " << k_
                                                                                             << ", E " << E << ")");
  num_tokens = N;
  k = k_;
  num_experts = E;
  capacity = capacity_;
  const size_t S = static_cast<size_t>(N) * k_;
  expert.assign(S, -1);
  gate.assign(S, 0.0f);
  position.assign(S, -1);
  counts.assign(E, 0);
  global_expert.clear();
  total_experts = 0;
  order.clear();
  expert_offsets.assign(E + 1, 0);
  row_of_slot.assign(S, -1);
}

void DispatchPlan::build_permutation() {
  const int E = num_experts;
  const int S = num_tokens * k;
  MOE_CHECK(E >= 1 && k >= 1 && num_tokens >= 0, "DispatchPlan: bad shape N " << num_tokens << ", k " << k
                                                                              << ", E " << E);
  MOE_CHECK(static_cast<int>(expert.size()) == S && static_cast<int>(gate.size()) == S &&
                static_cast<int>(position.size()) == S,
            "DispatchPlan: expert/gate/position must hold N*k = " << S << " entries (got " << expert.size() << ", "
                                                                  << gate.size() << ", " << position.size() << ")");
  counts.assign(E, 0);
  for (int s = 0; s < S; ++s) {
    const int e = expert[s];
    MOE_CHECK(e >= -1 && e < E, "DispatchPlan: slot " << s << " has expert " << e << " outside [-1, " << E << ")");
    if (e < 0) {
      MOE_CHECK(position[s] == -1 && gate[s] == 0.0f,
                "DispatchPlan: dropped slot " << s << " must have position -1 and gate 0 (got " << position[s]
                                              << ", " << gate[s] << ")");
      continue;
    }
    MOE_CHECK(std::isfinite(gate[s]), "DispatchPlan: slot " << s << " has a non-finite gate");
    ++counts[e];
  }
  // distinct experts per token
  for (int n = 0; n < num_tokens; ++n)
    for (int j = 0; j < k; ++j)
      for (int i = 0; i < j; ++i)
        MOE_CHECK(expert[n * k + j] < 0 || expert[n * k + j] != expert[n * k + i],
                  "DispatchPlan: token " << n << " sends two slots to expert " << expert[n * k + j]);
  if (capacity >= 0)
    for (int e = 0; e < E; ++e)
      MOE_CHECK(counts[e] <= capacity, "DispatchPlan: expert " << e << " holds " << counts[e]
                                                               << " slots, over its capacity " << capacity);
  // positions: per expert a permutation of 0..counts[e]-1
  expert_offsets.assign(E + 1, 0);
  for (int e = 0; e < E; ++e) expert_offsets[e + 1] = expert_offsets[e] + counts[e];
  std::vector<uint8_t> seen(static_cast<size_t>(expert_offsets[E]), 0);
  for (int s = 0; s < S; ++s) {
    const int e = expert[s];
    if (e < 0) continue;
    const int p = position[s];
    MOE_CHECK(p >= 0 && p < counts[e] && !seen[expert_offsets[e] + p],
              "DispatchPlan: slot " << s << " has position " << p << " in expert " << e << " (which keeps "
                                    << counts[e] << " slots): positions must be distinct in [0, count)");
    seen[expert_offsets[e] + p] = 1;
  }
  // counting sort of the kept slots by expert; slot ids ascend, so within an expert rows go by token index
  order.assign(static_cast<size_t>(expert_offsets[E]), -1);
  row_of_slot.assign(S, -1);
  std::vector<int32_t> next(expert_offsets.begin(), expert_offsets.end() - 1);
  for (int s = 0; s < S; ++s) {
    const int e = expert[s];
    if (e < 0) continue;
    const int r = next[e]++;
    order[r] = s;
    row_of_slot[s] = r;
  }
}

int DispatchPlan::num_dropped() const {
  return static_cast<int>(std::count(expert.begin(), expert.end(), -1));
}
double DispatchPlan::dropped_fraction() const {
  const int S = num_slots();
  return S == 0 ? 0.0 : static_cast<double>(num_dropped()) / S;
}
int DispatchPlan::load_min() const {
  if (counts.empty() || (!global_expert.empty() && num_experts < total_experts)) return 0;
  return *std::min_element(counts.begin(), counts.end());
}
int DispatchPlan::experts_used() const {
  return static_cast<int>(std::count_if(counts.begin(), counts.end(), [](int32_t c) { return c > 0; }));
}
int DispatchPlan::load_max() const { return counts.empty() ? 0 : *std::max_element(counts.begin(), counts.end()); }

// ---------------------------------------------------------------- permute, unpermute + combine (cpu:: kernels)
void DispatchPlan::permute(float* out /*[rows,C]*/, const float* x /*[N,C]*/, int C) const {
  cpu::gather_rows(out, x, order.data(), nullptr, rows(), k, C);
}

void DispatchPlan::permute_backward(float* dx /*[N,C] +=*/, const float* dout /*[rows,C]*/, int C) const {
  cpu::combine_rows(dx, dout, row_of_slot.data(), nullptr, num_tokens, k, C, /*accumulate=*/true);
}

void DispatchPlan::unpermute_combine(float* out /*[N,C]*/, const float* y /*[rows,C]*/, int C) const {
  cpu::combine_rows(out, y, row_of_slot.data(), gate.data(), num_tokens, k, C, /*accumulate=*/false);
}

void DispatchPlan::unpermute_combine_backward(float* dy /*[rows,C]*/, float* dgate /*[N*k]*/,
                                              const float* dout /*[N,C]*/, const float* y /*[rows,C]*/,
                                              int C) const {
  if (dy) cpu::gather_rows(dy, dout, order.data(), gate.data(), rows(), k, C);
  if (dgate) cpu::row_dots(dgate, dout, y, row_of_slot.data(), num_tokens, k, C);
}

// ---------------------------------------------------------------- table routers' plan
namespace {
// A dropless k=1 plan with gate 1 and positions in token order, expert ids checked against [0, E); -1 skips the
// token (a dropped slot: the layer's output for it is 0). Compact: the plan's experts are the distinct ids used
// (ascending, global_expert), else all E.
DispatchPlan top1_plan(const int32_t* expert /*[N]*/, int N, int E, bool compact) {
  MOE_CHECK(N >= 0 && E >= 1, "router: need N >= 0 and E >= 1 (got N " << N << ", E " << E << ")");
  for (int n = 0; n < N; ++n)
    MOE_CHECK(expert[n] >= -1 && expert[n] < E,
              "router: token " << n << " routed to expert " << expert[n] << " outside [0, " << E << ") (or -1: skip)");
  std::vector<int32_t> used;
  if (compact) {
    for (int n = 0; n < N; ++n)
      if (expert[n] >= 0) used.push_back(expert[n]);
    std::sort(used.begin(), used.end());
    used.erase(std::unique(used.begin(), used.end()), used.end());
  }
  DispatchPlan plan;
  // an empty compact plan keeps one (empty) plan expert, so the plan stays well formed
  plan.reset(N, 1, compact ? std::max<int>(1, static_cast<int>(used.size())) : E, -1);
  std::vector<int32_t> fill(plan.num_experts, 0);
  for (int n = 0; n < N; ++n) {
    if (expert[n] < 0) continue;  // skipped: stays a dropped slot (expert -1, gate 0, position -1)
    const int i = compact ? static_cast<int>(std::lower_bound(used.begin(), used.end(), expert[n]) - used.begin())
                          : expert[n];
    plan.expert[n] = i;
    plan.gate[n] = 1.0f;
    plan.position[n] = fill[i]++;
  }
  plan.build_permutation();
  if (compact) {
    if (used.empty()) used.push_back(0);  // the one empty plan expert names a real expert
    plan.global_expert = std::move(used);
    plan.total_experts = E;
  }
  return plan;
}
}  // namespace

DispatchPlan make_top1_plan(const int32_t* expert /*[N]*/, int N, int E) { return top1_plan(expert, N, E, false); }

DispatchPlan make_top1_plan_compact(const int32_t* expert /*[N]*/, int N, int E) {
  return top1_plan(expert, N, E, true);
}

}  // namespace moe::router
