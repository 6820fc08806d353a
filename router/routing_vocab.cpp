// The MoWE routing vocabulary: word-prefix keys of tokens, the corpus's most frequent keys kept exactly, the rest
// hashed (router/routing_vocab.h).
#include "router/routing_vocab.h"

#include <algorithm>
#include <utility>

#include "core/error.h"
#include "router/router.h"

namespace moe::router {
namespace {
constexpr int kContext = kMaxWordTokens - 1;
constexpr int32_t kContinue = 0, kWordStart = 1, kSymbol = 2;
constexpr uint64_t kKeySeed = 0x6d6f77652d6b6579ULL;  // "mowe-key": the fold's start (never change: checkpoints)

uint64_t fold(uint64_t h, int32_t tok) { return mix64(h ^ (static_cast<uint64_t>(tok) + 1) * 0x9e3779b97f4a7c15ULL); }

const std::vector<int32_t>& table_of(const std::map<std::string, std::vector<int32_t>>& in, const std::string& name) {
  auto it = in.find(name);
  MOE_CHECK(it != in.end(), "routing vocabulary: the checkpoint has no table '" << name << "'");
  return it->second;
}
}  // namespace

RoutingVocabulary::RoutingVocabulary(std::vector<int32_t> word_class, Sizes sizes, std::vector<uint64_t> exact_keys,
                                     std::vector<int64_t> id_counts)
    : word_class_(std::move(word_class)),
      sizes_(sizes),
      exact_keys_(std::move(exact_keys)),
      id_counts_(std::move(id_counts)) {
  MOE_CHECK(sizes_.exact >= 1 && sizes_.exact < sizes_.size,
            "routing vocabulary: exact ids " << sizes_.exact << " must lie in [1, size " << sizes_.size << ")");
  MOE_CHECK(static_cast<int64_t>(exact_keys_.size()) <= sizes_.exact,
            "routing vocabulary: " << exact_keys_.size() << " exact keys for " << sizes_.exact << " exact ids");
  MOE_CHECK(!word_class_.empty(), "routing vocabulary: no word classes (empty vocabulary)");
  for (size_t v = 0; v < word_class_.size(); ++v)
    MOE_CHECK(word_class_[v] >= kContinue && word_class_[v] <= kSymbol,
              "routing vocabulary: word class " << word_class_[v] << " of token " << v << " is not 0, 1 or 2");
  id_of_.reserve(exact_keys_.size());
  for (size_t i = 0; i < exact_keys_.size(); ++i)
    MOE_CHECK(id_of_.emplace(exact_keys_[i], static_cast<int32_t>(i)).second,
              "routing vocabulary: exact key " << i << " appears twice");
}

bool RoutingVocabulary::starts_word(int32_t tok, int32_t prev) const {
  return prev < 0 || word_class_[tok] != kContinue || word_class_[prev] == kSymbol;
}

uint64_t RoutingVocabulary::key(int32_t tok, const int32_t* before) const {
  const int V = vocab_size();
  MOE_CHECK(tok >= 0 && tok < V, "routing vocabulary: token id " << tok << " outside [0, " << V << ")");
  int n = 0;  // earlier tokens of the word
  for (int32_t cur = tok; n < kContext; cur = before[n++]) {
    MOE_CHECK(before[n] < V, "routing vocabulary: context token id " << before[n] << " outside [0, " << V << ")");
    if (starts_word(cur, before[n])) break;
  }
  uint64_t h = kKeySeed;
  for (int i = n - 1; i >= 0; --i) h = fold(h, before[i]);  // the word's tokens in order
  return fold(h, tok);
}

int32_t RoutingVocabulary::id_of_key(uint64_t key) const {
  auto it = id_of_.find(key);
  if (it != id_of_.end()) return it->second;
  const uint64_t hashed = static_cast<uint64_t>(sizes_.size - sizes_.exact);
  return static_cast<int32_t>(sizes_.exact + static_cast<int64_t>(mix64(key ^ kKeySeed) % hashed));
}

void RoutingVocabulary::ids(int32_t* out, const int32_t* tokens, const int32_t* context, int N) const {
  for (int n = 0; n < N; ++n) out[n] = id(tokens[n], context + static_cast<int64_t>(n) * kContext);
}

RoutingVocabulary RoutingVocabulary::build(const std::vector<int32_t>& corpus, std::vector<int32_t> word_class,
                                           Sizes sizes) {
  RoutingVocabulary counter(word_class, sizes, {}, {});  // validates; hashes every key (no exact ones yet)
  std::unordered_map<uint64_t, int64_t> count;
  int32_t before[kContext];
  for (size_t i = 0; i < corpus.size(); ++i) {
    for (int j = 0; j < kContext; ++j) before[j] = i > size_t(j) ? corpus[i - 1 - j] : -1;
    ++count[counter.key(corpus[i], before)];
  }
  std::vector<std::pair<uint64_t, int64_t>> by_count(count.begin(), count.end());
  const size_t K = std::min<size_t>(by_count.size(), static_cast<size_t>(sizes.exact));
  std::partial_sort(by_count.begin(), by_count.begin() + K, by_count.end(), [](const auto& a, const auto& b) {
    return a.second > b.second || (a.second == b.second && a.first < b.first);
  });
  std::vector<uint64_t> keys(K);
  std::vector<int64_t> id_counts(sizes.size, 0);
  for (size_t i = 0; i < K; ++i) {
    keys[i] = by_count[i].first;
    id_counts[i] = by_count[i].second;
  }
  for (size_t i = K; i < by_count.size(); ++i) id_counts[counter.id_of_key(by_count[i].first)] += by_count[i].second;
  return RoutingVocabulary(std::move(word_class), sizes, std::move(keys), std::move(id_counts));
}

void RoutingVocabulary::to_tables(const std::string& prefix, std::map<std::string, std::vector<int32_t>>& out) const {
  out[prefix + ".meta"] = {static_cast<int32_t>(sizes_.size), static_cast<int32_t>(sizes_.exact)};
  out[prefix + ".classes"] = word_class_;
  std::vector<int32_t>& k = out[prefix + ".keys"];
  k.resize(2 * exact_keys_.size());
  for (size_t i = 0; i < exact_keys_.size(); ++i) {
    k[2 * i] = static_cast<int32_t>(static_cast<uint32_t>(exact_keys_[i]));
    k[2 * i + 1] = static_cast<int32_t>(static_cast<uint32_t>(exact_keys_[i] >> 32));
  }
}

bool RoutingVocabulary::has_tables(const std::string& prefix, const std::map<std::string, std::vector<int32_t>>& in) {
  return in.count(prefix + ".meta") > 0;
}

bool RoutingVocabulary::matches_tables(const std::string& prefix,
                                       const std::map<std::string, std::vector<int32_t>>& in) const {
  auto meta = in.find(prefix + ".meta"), classes = in.find(prefix + ".classes"), k = in.find(prefix + ".keys");
  if (meta == in.end() || classes == in.end() || k == in.end()) return false;
  if (meta->second != std::vector<int32_t>{int32_t(sizes_.size), int32_t(sizes_.exact)}) return false;
  if (classes->second != word_class_ || k->second.size() != 2 * exact_keys_.size()) return false;
  for (size_t i = 0; i < exact_keys_.size(); ++i)
    if (k->second[2 * i] != static_cast<int32_t>(static_cast<uint32_t>(exact_keys_[i])) ||
        k->second[2 * i + 1] != static_cast<int32_t>(static_cast<uint32_t>(exact_keys_[i] >> 32)))
      return false;
  return true;
}

RoutingVocabulary RoutingVocabulary::from_tables(const std::string& prefix,
                                                 const std::map<std::string, std::vector<int32_t>>& in) {
  const std::vector<int32_t>& meta = table_of(in, prefix + ".meta");
  MOE_CHECK(meta.size() == 2, "routing vocabulary: table '" << prefix << ".meta' has " << meta.size()
                                                            << " entries, expected 2 (size, exact)");
  const std::vector<int32_t>& k = table_of(in, prefix + ".keys");
  MOE_CHECK(k.size() % 2 == 0, "routing vocabulary: table '" << prefix << ".keys' has an odd length " << k.size());
  std::vector<uint64_t> keys(k.size() / 2);
  for (size_t i = 0; i < keys.size(); ++i)
    keys[i] = static_cast<uint64_t>(static_cast<uint32_t>(k[2 * i])) |
              static_cast<uint64_t>(static_cast<uint32_t>(k[2 * i + 1])) << 32;
  return RoutingVocabulary(table_of(in, prefix + ".classes"), Sizes{meta[0], meta[1]}, std::move(keys), {});
}

}  // namespace moe::router
