#include "core/data.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moe {

void Tokenizer::train(const std::string& text_file, const std::string& model_path, int vocab_size,
                      const std::string& type, int threads) {
  std::string prefix = model_path;
  const std::string ext = ".model";
  MOE_CHECK(prefix.size() > ext.size() && prefix.compare(prefix.size() - ext.size(), ext.size(), ext) == 0,
            "tokenizer model path '" << model_path << "' must end in .model");
  prefix.resize(prefix.size() - ext.size());
  std::ostringstream args;
  args << "--input=" << text_file << " --model_prefix=" << prefix << " --vocab_size=" << vocab_size
       << " --model_type=" << type << " --character_coverage=1.0 --num_threads=" << std::max(threads, 1)
       << " --user_defined_symbols=" << kNewline << " --minloglevel=2 --bos_id=-1 --eos_id=-1";
  auto st = sentencepiece::SentencePieceTrainer::Train(args.str());
  MOE_CHECK(st.ok(), "training the tokenizer on '" << text_file << "' (vocab " << vocab_size
                                                   << ") failed: " << st.ToString());
}

Tokenizer::Tokenizer(const std::string& model_path)
    : path_(model_path), sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  std::ifstream f(model_path, std::ios::binary);
  MOE_CHECK(f.good(), "cannot open tokenizer model '" << model_path << "'");
  std::stringstream ss;
  ss << f.rdbuf();
  blob_ = ss.str();
  auto st = sp_->LoadFromSerializedProto(blob_);
  MOE_CHECK(st.ok(), "'" << model_path << "' is not a SentencePiece model: " << st.ToString());
  nl_id_ = sp_->PieceToId(kNewline);
  if (sp_->IsUnknown(nl_id_)) nl_id_ = -1;
}

Tokenizer::~Tokenizer() = default;

int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }

int Tokenizer::eos_id() const { return sp_->eos_id() >= 0 && sp_->eos_id() < vocab_size() ? sp_->eos_id() : -1; }

std::string Tokenizer::token_text(int32_t id) const {
  MOE_CHECK(id >= 0 && id < vocab_size(), "token id " << id << " outside the tokenizer vocabulary");
  if (id == nl_id_) return "\n";
  if (sp_->IsControl(id)) return "";
  const std::string piece = sp_->IdToPiece(id);
  if (sp_->IsByte(id) && piece.size() == 6)  // "<0xNN>"
    return std::string(1, static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16)));
  static const std::string kSpace = "\xe2\x96\x81";  // U+2581
  std::string out;
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, kSpace.size(), kSpace) == 0) {
      out += ' ';
      i += kSpace.size();
    } else {
      out += piece[i++];
    }
  }
  return out;
}

std::vector<int32_t> word_classes(const Tokenizer& tok) {
  std::vector<int32_t> out(tok.vocab_size());
  for (int v = 0; v < tok.vocab_size(); ++v) {
    const std::string t = tok.token_text(v);
    const bool word = std::any_of(t.begin(), t.end(), [](char c) {
      return std::isalnum(static_cast<unsigned char>(c)) || static_cast<unsigned char>(c) >= 0x80;
    });
    out[v] = !word ? 2 : t[0] == ' ' ? 1 : 0;
  }
  return out;
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find('\n', start);
    const bool has_nl = end != std::string::npos;
    if (!has_nl) end = text.size();
    if (end > start) {
      std::vector<int> ids;
      auto st = sp_->Encode(std::string_view(text).substr(start, end - start), &ids);
      MOE_CHECK(st.ok(), "tokenizer encode failed: " << st.ToString());
      out.insert(out.end(), ids.begin(), ids.end());
    }
    if (!has_nl) break;
    if (nl_id_ >= 0) out.push_back(nl_id_);
    start = end + 1;
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  std::vector<int> seg;
  auto flush = [&] {
    if (seg.empty()) return;
    std::string s;
    auto st = sp_->Decode(seg, &s);
    MOE_CHECK(st.ok(), "tokenizer decode failed: " << st.ToString());
    out += s;
    seg.clear();
  };
  for (int32_t id : ids) {
    MOE_CHECK(id >= 0 && id < vocab_size(), "token id " << id << " outside the tokenizer vocabulary");
    if (id == nl_id_) {
      flush();
      out += '\n';
    } else {
      seg.push_back(id);
    }
  }
  flush();
  return out;
}

Corpus load_corpus(const Tokenizer& tok, const std::string& text_file, float val_fraction) {
  std::ifstream f(text_file, std::ios::binary);
  MOE_CHECK(f.good(), "cannot open training data '" << text_file << "'");
  std::stringstream ss;
  ss << f.rdbuf();
  std::vector<int32_t> all = tok.encode(ss.str());
  MOE_CHECK(all.size() >= 64, "training data '" << text_file << "' is too small (" << all.size() << " tokens)");
  Corpus c;
  const size_t n_val = std::max<size_t>(static_cast<size_t>(all.size() * val_fraction), 2);
  c.train.assign(all.begin(), all.end() - n_val);
  c.val.assign(all.end() - n_val, all.end());
  // cross-entropy of the validation tokens under the training unigram distribution (add-one smoothing):
  // the loss of the best model that ignores context.
  c.train_counts.assign(tok.vocab_size(), 0);
  for (int32_t t : c.train) ++c.train_counts[t];
  const double denom = static_cast<double>(c.train.size()) + tok.vocab_size();
  double h = 0;
  for (int32_t t : c.val) h -= std::log((c.train_counts[t] + 1.0) / denom);
  c.unigram_entropy = h / static_cast<double>(c.val.size());
  return c;
}

BatchLoader::BatchLoader(const std::vector<int32_t>* tokens, int B, int T, uint64_t seed)
    : tokens_(tokens), B_(B), T_(T), rng_(seed) {
  MOE_CHECK(tokens->size() > static_cast<size_t>(T) + 1,
            "training split has " << tokens->size() << " tokens, fewer than data.seq_len + 1 = " << T + 1);
}

Batch BatchLoader::next() {
  Batch b;
  b.B = B_;
  b.T = T_;
  b.inputs.resize(size_t(B_) * T_);
  b.targets.resize(size_t(B_) * T_);
  const uint64_t span = tokens_->size() - T_ - 1;
  for (int i = 0; i < B_; ++i) {
    const size_t off = rng_.below(span + 1);
    for (int t = 0; t < T_; ++t) {
      b.inputs[size_t(i) * T_ + t] = (*tokens_)[off + t];
      b.targets[size_t(i) * T_ + t] = (*tokens_)[off + t + 1];
    }
  }
  return b;
}

std::vector<Batch> validation_batches(const std::vector<int32_t>& val, int B, int T, int n_batches) {
  MOE_CHECK(val.size() > static_cast<size_t>(T) + 1,
            "validation split has " << val.size() << " tokens, fewer than data.seq_len + 1 = " << T + 1
                                    << " (raise data.val_fraction or use more data)");
  const size_t windows = size_t(B) * n_batches;
  const size_t span = val.size() - T - 1;
  std::vector<Batch> out(n_batches);
  for (int k = 0; k < n_batches; ++k) {
    Batch& b = out[k];
    b.B = B;
    b.T = T;
    b.inputs.resize(size_t(B) * T);
    b.targets.resize(size_t(B) * T);
    for (int i = 0; i < B; ++i) {
      const size_t w = size_t(k) * B + i;
      const size_t off = windows > 1 ? span * w / (windows - 1) : 0;
      for (int t = 0; t < T; ++t) {
        b.inputs[size_t(i) * T + t] = val[off + t];
        b.targets[size_t(i) * T + t] = val[off + t + 1];
      }
    }
  }
  return out;
}

}  // namespace moe
