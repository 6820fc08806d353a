// Vocabulary router (Mixture of Word Experts): a token id -> expert table built once from corpus frequencies.
// Experts [0, W) are word experts (one per frequent token, in descending frequency), experts [W, E) are shared by
// the remaining tokens through a fixed hash. The table is the router's whole state: the checkpoint stores it.
#include <algorithm>
#include <numeric>
#include <utility>

#include "core/error.h"
#include "router/router.h"

namespace moe::router {

VocabRouter VocabRouter::build(const std::vector<int64_t>& token_counts /*[V]*/, int num_experts,
                               int num_word_experts) {
  const int64_t V = static_cast<int64_t>(token_counts.size());
  const int E = num_experts, W = num_word_experts;
  MOE_CHECK(E >= 1, "VocabRouter: number of experts must be >= 1 (got " << E << ")");
  MOE_CHECK(W >= 0 && W <= E, "VocabRouter: num_word_experts " << W << " must lie in [0, number of experts " << E
                                                               << "]");
  MOE_CHECK(V >= 1 && V <= INT32_MAX, "VocabRouter: vocabulary size " << V << " must lie in [1, 2^31)");
  for (int64_t v = 0; v < V; ++v)
    MOE_CHECK(token_counts[v] >= 0, "VocabRouter: token " << v << " has negative count " << token_counts[v]);

  // the most frequent tokens (count > 0; ties: lower id first) get word experts 0, 1, ...
  std::vector<int32_t> ids(V);
  std::iota(ids.begin(), ids.end(), 0);
  const int64_t seen = std::count_if(token_counts.begin(), token_counts.end(), [](int64_t c) { return c > 0; });
  const int64_t n_word = std::min<int64_t>(W, seen);
  std::partial_sort(ids.begin(), ids.begin() + n_word, ids.end(), [&](int32_t a, int32_t b) {
    return token_counts[a] > token_counts[b] || (token_counts[a] == token_counts[b] && a < b);
  });
  std::vector<int32_t> table(V, -1);
  for (int64_t i = 0; i < n_word; ++i) table[ids[i]] = static_cast<int32_t>(i);

  // the rest share experts [W, E) by hash
  const int shared = E - W;
  MOE_CHECK(shared >= 1 || n_word == V,
            "VocabRouter: " << (V - n_word) << " tokens have no word expert but no shared expert is left (experts "
                            << E << ", word experts " << W << "): use num_word_experts < num_experts");
  for (int64_t v = 0; v < V; ++v)
    if (table[v] < 0) table[v] = W + static_cast<int32_t>(mix64(static_cast<uint64_t>(v)) % shared);
  return VocabRouter(std::move(table), E, W);
}

VocabRouter VocabRouter::load(std::vector<int32_t> table /*[V]*/, int num_experts, int num_word_experts) {
  MOE_CHECK(num_experts >= 1, "VocabRouter::load: number of experts must be >= 1 (got " << num_experts << ")");
  MOE_CHECK(num_word_experts >= 0 && num_word_experts <= num_experts,
            "VocabRouter::load: num_word_experts " << num_word_experts << " must lie in [0, " << num_experts << "]");
  MOE_CHECK(!table.empty(), "VocabRouter::load: empty routing table");
  for (size_t v = 0; v < table.size(); ++v)
    MOE_CHECK(table[v] >= 0 && table[v] < num_experts, "VocabRouter::load: table entry of token "
                                                           << v << " is expert " << table[v] << ", outside [0, "
                                                           << num_experts << ")");
  return VocabRouter(std::move(table), num_experts, num_word_experts);
}

int VocabRouter::expert_of(int32_t token_id) const {
  MOE_CHECK(token_id >= 0 && token_id < vocab_size(),
            "VocabRouter: token id " << token_id << " outside the vocabulary [0, " << vocab_size() << ")");
  return table_[token_id];
}

DispatchPlan VocabRouter::route(const int32_t* token_ids /*[N]*/, int N) const {
  MOE_CHECK(N >= 0 && (N == 0 || token_ids), "VocabRouter::route: bad input (N " << N << ")");
  std::vector<int32_t> expert(N);
  for (int n = 0; n < N; ++n) expert[n] = expert_of(token_ids[n]);
  return make_top1_plan(expert.data(), N, E_);
}

}  // namespace moe::router
