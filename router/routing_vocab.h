// The MoWE routing vocabulary (dos Santos et al., 2024, for a causal decoder): word-level routing ids, separate from
// the tokenizer's vocabulary, so a word-expert table can have far more distinct routes than the model has token ids.
//
// A token's routing KEY is the prefix of its word up to and including the token: the token and the earlier tokens of
// the same word (at most kMaxWordTokens in all), folded into a 64-bit hash. Word boundaries come from the token ids'
// word classes (from the tokenizer's pieces, core/data.h word_classes): a token starts a word when it is a word
// start (its piece begins with the space mark) or a symbol (no letter or digit), when it follows a symbol, or at
// the start of its sequence. Only the token and earlier tokens are read: routing is causal by construction.
//
// A key's routing ID: the `exact` most frequent keys of the training corpus get ids 0..exact-1 by descending count
// (ties: smaller key first), every other key exact + mix64(key) % (size - exact). The table is the exact keys plus
// the two sizes; the checkpoint stores it (tables(), from_tables()).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

namespace moe::router {

inline constexpr int kMaxWordTokens = 8;  // a key spans at most this many tokens (the current one and 7 before)

class RoutingVocabulary {
 public:
  struct Sizes {
    int64_t size = 0;   // routing ids [0, size)
    int64_t exact = 0;  // ids of exact keys: [0, exact); 1 <= exact < size
  };
  // Counts the keys of the token stream `corpus` (one sequence) and keeps the most frequent `sizes.exact` exactly.
  // word_class[V]: 0 continues a word, 1 starts one, 2 a symbol (core/data.h word_classes).
  static RoutingVocabulary build(const std::vector<int32_t>& corpus, std::vector<int32_t> word_class, Sizes sizes);

  // The key of token `tok` whose sequence has `before` (the tokens before it, nearest first: before[0] is the
  // previous token; -1 where the sequence has none; kMaxWordTokens - 1 entries).
  uint64_t key(int32_t tok, const int32_t* before /*[kMaxWordTokens-1]*/) const;
  int32_t id_of_key(uint64_t key) const;
  int32_t id(int32_t tok, const int32_t* before) const { return id_of_key(key(tok, before)); }
  // Routing ids of N tokens with their contexts (context[n * (kMaxWordTokens-1) ...]).
  void ids(int32_t* out /*[N]*/, const int32_t* tokens /*[N]*/, const int32_t* context /*[N,kMaxWordTokens-1]*/,
           int N) const;

  // Corpus count of every routing id (exact ids: their key's count; hashed ids: the sum over their keys): what the
  // word-expert router orders its experts by. Empty for a vocabulary read from a checkpoint (whose routers keep
  // their own tables).
  const std::vector<int64_t>& id_counts() const { return id_counts_; }
  const Sizes& sizes() const { return sizes_; }
  int64_t num_exact_keys() const { return static_cast<int64_t>(exact_keys_.size()); }  // <= sizes.exact
  int vocab_size() const { return static_cast<int>(word_class_.size()); }

  // The checkpoint's view: int32 tables under `prefix` (".meta" {size, exact}, ".classes" [V], ".keys" [2*K] as
  // (low, high) words), and back; from_tables throws naming what is missing or inconsistent.
  void to_tables(const std::string& prefix, std::map<std::string, std::vector<int32_t>>& out) const;
  static bool has_tables(const std::string& prefix, const std::map<std::string, std::vector<int32_t>>& in);
  // Whether `in` holds exactly this vocabulary (what to_tables would write), without building anything.
  bool matches_tables(const std::string& prefix, const std::map<std::string, std::vector<int32_t>>& in) const;
  static RoutingVocabulary from_tables(const std::string& prefix,
                                       const std::map<std::string, std::vector<int32_t>>& in);

 private:
  RoutingVocabulary(std::vector<int32_t> word_class, Sizes sizes, std::vector<uint64_t> exact_keys,
                    std::vector<int64_t> id_counts);
  bool starts_word(int32_t tok, int32_t prev) const;
  std::vector<int32_t> word_class_;  // [V]
  Sizes sizes_;
  std::vector<uint64_t> exact_keys_;  // [K] by id
  std::unordered_map<uint64_t, int32_t> id_of_;
  std::vector<int64_t> id_counts_;  // [size]
};

}  // namespace moe::router
