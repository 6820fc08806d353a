// What the serving tests share: a small SentencePiece tokenizer trained once per process on the head of
// tinyshakespeare, models of its vocabulary (dense, MoE), a one-rank engine around a model, and a sink that
// records a request's events.
#pragma once
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "comm/self_comm.h"
#include "core/data.h"
#include "serve/engine.h"
#include "tests/unit/model_helpers.h"

namespace moe::test {

// A BPE tokenizer of 256 pieces trained on the first 100 kB of tinyshakespeare (once per process).
inline const Tokenizer& serve_tokenizer() {
  static std::unique_ptr<Tokenizer> tok = [] {
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / ("moe_serve_tok_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    std::ifstream in(std::string(MOE_TEST_SOURCE_DIR) + "/../shared/data/tinyshakespeare.txt");
    std::string text(100000, '\0');
    in.read(text.data(), static_cast<std::streamsize>(text.size()));
    text.resize(static_cast<size_t>(in.gcount()));
    std::ofstream(dir / "head.txt") << text;
    Tokenizer::train((dir / "head.txt").string(), (dir / "tok.model").string(), 256, "bpe", 1);
    auto t = std::make_unique<Tokenizer>((dir / "tok.model").string());
    fs::remove_all(dir);
    return t;
  }();
  return *tok;
}

// A model over the tokenizer's vocabulary: 2 layers, d_model 64, GQA 4/2 heads, max_seq_len 64; `moe`: every
// layer 4 experts top-2.
inline proto::ModelConfig serve_model_config(bool moe) {
  proto::ModelConfig m;
  m.set_vocab_size(serve_tokenizer().vocab_size());
  m.set_d_model(64);
  m.set_n_layers(2);
  m.set_n_heads(4);
  m.set_n_kv_heads(2);
  m.set_d_ff(96);
  m.set_max_seq_len(64);
  if (moe) {
    m.add_ffn_pattern(proto::FFN_MOE);
    m.mutable_moe()->set_num_experts(4);
    m.mutable_moe()->set_top_k(2);
    m.mutable_moe()->set_d_expert(48);
  }
  fill_defaults(&m, 64);
  return m;
}

inline proto::ServingConfig serve_config(int kv_blocks, int block_size, int max_batch_tokens = 64) {
  proto::ServingConfig s;
  fill_defaults(&s);
  s.set_kv_block_size(block_size);
  // keys and values of block_size positions, and the block's value sum (SparQ), per layer
  const int64_t block_bytes = int64_t(2 * block_size + 1) * 2 /*layers*/ * 2 /*kv heads*/ * 16 /*head dim*/ * 4;
  s.set_kv_cache_bytes(block_bytes * kv_blocks);
  s.set_max_batch_tokens(max_batch_tokens);
  return s;
}

// Records one request's events (engine thread only in these tests).
struct RecordingSink : serve::RequestSink {
  std::vector<serve::TokenEvent> tokens;
  serve::FinishEvent finish;
  bool finished = false;
  bool cancel = false;
  int cancel_after = -1;  // cancelled() turns true once this many tokens arrived
  void on_token(const serve::TokenEvent& ev) override {
    ASSERT_FALSE(finished) << "a token after on_finish";
    tokens.push_back(ev);
  }
  void on_finish(const serve::FinishEvent& ev) override {
    ASSERT_FALSE(finished) << "on_finish twice";
    finish = ev;
    finished = true;
  }
  bool cancelled() const override {
    return cancel || (cancel_after >= 0 && static_cast<int>(tokens.size()) >= cancel_after);
  }
  std::vector<int32_t> ids() const {
    std::vector<int32_t> out;
    for (const auto& t : tokens) out.push_back(t.token);
    return out;
  }
  std::string text() const {
    std::string s;
    for (const auto& t : tokens) s += t.text;
    return s + finish.text;
  }
};

// A one-rank engine (SelfCommunicator) around `model`.
struct OneRankEngine {
  comm::SelfCommunicator self;
  serve::Engine engine;
  OneRankEngine(Model& model, const proto::ServingConfig& s) : engine(serve::EngineOptions{s}, self) {
    serve::ModelInfo info;
    info.name = "test";
    info.max_seq_len = model.config().max_seq_len();
    info.vocab_size = model.config().vocab_size();
    engine.attach(model, &serve_tokenizer(), info);
  }
};

// 16 prompts of different lengths (batch-invariance tests send them together and one by one)
inline const std::vector<std::string>& serve_prompts() {
  static const std::vector<std::string> p = {
      "ROMEO:",  "First Citizen:\nBefore we proceed", "KING RICHARD", "O", "What light through yonder",
      "MENENIUS:\nEither you must", "I say", "JULIET:\nAy me", "He that", "Tell me, good",
      "Now is the winter", "Speak", "Good morrow", "What, ho!", "The king's a", "Alas"};
  return p;
}

inline serve::GenerationRequest greedy_request(const std::string& prompt, int max_tokens) {
  serve::GenerationRequest r;
  r.prompt = serve_tokenizer().encode(prompt);
  r.sampling.temperature = 0;
  r.max_tokens = max_tokens;
  return r;
}

}  // namespace moe::test
