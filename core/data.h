// Data: SentencePiece tokenizer (trained from the corpus or loaded), a tokenized corpus with a
// train/validation split, and a seeded batch loader.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"
#include "proto/config.pb.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace moe {

// Newlines are kept as an explicit token (user-defined symbol "<nl>") so generated text keeps its lines.
class Tokenizer {
 public:
  static constexpr const char* kNewline = "<nl>";
  // Trains a SentencePiece model on `text_file` into `model_path` (BPE or unigram, `vocab_size` pieces).
  static void train(const std::string& text_file, const std::string& model_path, int vocab_size,
                    const std::string& type, int threads);
  explicit Tokenizer(const std::string& model_path);
  ~Tokenizer();
  int vocab_size() const;
  std::vector<int32_t> encode(const std::string& text) const;  // handles newlines
  std::string decode(const std::vector<int32_t>& ids) const;
  // The end-of-sequence id, -1 when the model has none (the tokenizers `moe train` makes have none; imported ones
  // may).
  int eos_id() const;
  // The text of one token alone: its piece with the word-boundary mark U+2581 as a space, the newline symbol as
  // "\n" and a byte piece <0xNN> as that byte (for logprobs; the text of a sequence is decode(ids)).
  std::string token_text(int32_t id) const;
  const std::string& model_path() const { return path_; }
  const std::string& serialized() const { return blob_; }  // the .model file bytes

 private:
  std::string path_;
  std::string blob_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int nl_id_ = -1;
};

// Word classes of the token ids, for word-level routing (router/routing_vocab.h): 1 a token that starts a word (its
// text begins with a space), 2 a symbol (no ASCII letter or digit and no non-ASCII byte: punctuation, the newline,
// control pieces), 0 a token that continues the word before it.
std::vector<int32_t> word_classes(const Tokenizer& tok);

// The corpus as token ids, split into a training head and a validation tail.
struct Corpus {
  std::vector<int32_t> train, val;
  std::vector<int64_t> train_counts;  // [V] occurrences of each token id in the training split
  double unigram_entropy = 0;  // nats per token of the training tokens' unigram distribution, evaluated on val
};
Corpus load_corpus(const Tokenizer& tok, const std::string& text_file, float val_fraction);

struct Batch {
  int B = 0, T = 0;
  std::vector<int32_t> inputs, targets;  // [B,T]
};

// Random windows of T+1 tokens from the training split (seeded; its position is its RNG state).
class BatchLoader {
 public:
  BatchLoader(const std::vector<int32_t>* tokens, int B, int T, uint64_t seed);
  Batch next();
  std::array<uint64_t, 4> state() const { return rng_.state(); }
  void set_state(const std::array<uint64_t, 4>& s) { rng_.set_state(s); }

 private:
  const std::vector<int32_t>* tokens_;
  int B_, T_;
  Rng rng_;
};

// Fixed, evenly spaced windows over the validation split (same every evaluation).
std::vector<Batch> validation_batches(const std::vector<int32_t>& val, int B, int T, int n_batches);

}  // namespace moe
