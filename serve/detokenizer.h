// The completion text of one sequence as it grows, for streaming (vLLM's incremental detokenisation): a token's
// text is what decoding the last few stable tokens adds, so SentencePiece's word-boundary spaces come out right
// (the first generated token is decoded after the prompt's last tokens) and an incomplete UTF-8 character (a
// byte-fallback piece) is held until its last byte arrives. Stop strings end the completion before their first
// occurrence; text that may be the start of a stop string is held back until it cannot be.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/data.h"

namespace moe::serve {

class Detokenizer {
 public:
  Detokenizer(const Tokenizer& tok, const std::vector<int32_t>& prompt, std::vector<std::string> stop);
  // Adds a generated token; returns the text released now. Sets *stopped when a stop string has completed: the
  // completion ends right before it and nothing more is released.
  std::string push(int32_t token, bool* stopped);
  // The text held back (the end of a completion that ended otherwise than by a stop string).
  std::string flush();
  const std::string& text() const { return text_; }  // the completion so far, released and held

 private:
  const Tokenizer& tok_;
  std::vector<std::string> stop_;
  std::vector<int32_t> ids_;  // the prompt's last tokens, then the generated ones
  size_t prefix_ = 0;         // ids_[prefix_, read_) were decoded already; their text ends the completion so far
  size_t read_ = 0;
  std::string text_;  // the completion: released, then held
  size_t released_ = 0;
  bool stopped_ = false;
};

}  // namespace moe::serve
