// Hash router: expert = mix64(token id) % E, k = 1, gate 1, dropless. No parameters, no state.
#include <vector>

#include "core/error.h"
#include "router/router.h"

namespace moe::router {

HashRouter::HashRouter(int num_experts) : E_(num_experts) {
  MOE_CHECK(num_experts >= 1, "HashRouter: number of experts must be >= 1 (got " << num_experts << ")");
}

DispatchPlan HashRouter::route(const int32_t* token_ids /*[N]*/, int N) const {
  MOE_CHECK(N >= 0 && (N == 0 || token_ids), "HashRouter::route: bad input (N " << N << ")");
  std::vector<int32_t> expert(N);
  for (int n = 0; n < N; ++n) {
    MOE_CHECK(token_ids[n] >= 0, "HashRouter::route: token " << n << " has negative id " << token_ids[n]);
    expert[n] = expert_of(token_ids[n]);
  }
  return make_top1_plan(expert.data(), N, E_);
}

}  // namespace moe::router
