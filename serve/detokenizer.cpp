#include "serve/detokenizer.h"

#include <algorithm>

namespace moe::serve {
namespace {

constexpr size_t kPromptContext = 6;              // prompt tokens decoded before the first generated one
const std::string kReplacement = "\xef\xbf\xbd";  // U+FFFD: what an incomplete UTF-8 sequence decodes to

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

Detokenizer::Detokenizer(const Tokenizer& tok, const std::vector<int32_t>& prompt, std::vector<std::string> stop)
    : tok_(tok), stop_(std::move(stop)) {
  stop_.erase(std::remove(stop_.begin(), stop_.end(), std::string()), stop_.end());
  const size_t keep = std::min(prompt.size(), kPromptContext);
  ids_.assign(prompt.end() - keep, prompt.end());
  prefix_ = 0;
  read_ = ids_.size();
}

std::string Detokenizer::push(int32_t token, bool* stopped) {
  *stopped = stopped_;
  if (stopped_) return "";
  ids_.push_back(token);
  const std::vector<int32_t> head(ids_.begin() + prefix_, ids_.begin() + read_),
      all(ids_.begin() + prefix_, ids_.end());
  const std::string before = tok_.decode(head), now = tok_.decode(all);
  if (now.size() > before.size() && !ends_with(now, kReplacement)) {
    text_ += now.substr(before.size());
    prefix_ = read_;
    read_ = ids_.size();
  }
  // the earliest stop string occurrence (none can start in the released text: see below)
  size_t cut = std::string::npos;
  for (const std::string& s : stop_) cut = std::min(cut, text_.find(s, released_));
  if (cut != std::string::npos) {
    stopped_ = *stopped = true;
    std::string out = text_.substr(released_, cut - released_);
    text_.resize(cut);
    released_ = cut;
    return out;
  }
  // hold back the longest tail that is a proper prefix of a stop string (so a released text never ends inside one)
  size_t hold = 0;
  for (const std::string& s : stop_)
    for (size_t n = std::min(s.size() - 1, text_.size() - released_); n > hold; --n)
      if (text_.compare(text_.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  std::string out = text_.substr(released_, text_.size() - hold - released_);
  released_ = text_.size() - hold;
  return out;
}

std::string Detokenizer::flush() {
  std::string out = text_.substr(released_);
  released_ = text_.size();
  return out;
}

}  // namespace moe::serve
