// The serving engine's parts (serve/): the sampler, the incremental detokenizer with stop strings, the scheduler
// (token budget, chunked prefill, admission, preemption, placement over ranks), and a one-rank engine end to end:
// greedy tokens equal plain greedy decoding over the model, are batch invariant (alone or among 16 requests, with
// or without preemption, any block size and prefill chunking), and requests end by stop strings, max_tokens or
// cancellation with their KV blocks freed. (Several ranks: tests/mpi/test_serve.cpp; HTTP: test_http_server.cpp.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "serve/detokenizer.h"
#include "serve/engine.h"
#include "serve/sampler.h"
#include "serve/scheduler.h"
#include "tests/unit/oracle.h"
#include "tests/unit/serve_helpers.h"

namespace moe::test {
namespace {

using serve::sample_token;
using serve::SampleChoice;

// ================================================================== sampler
TEST(ServeSampler, GreedyIsTheArgmaxWithTiesToTheLowerId) {
  const std::vector<float> l = {0.5f, 2.0f, -1.0f, 2.0f};
  const serve::Sampled s = sample_token(l.data(), 4, SampleChoice{0, 1, 0, 0.99, 2});
  EXPECT_EQ(s.token, 1);
  double lse = 0;
  for (float x : l) lse += std::exp(double(x));
  lse = std::log(lse);
  EXPECT_NEAR(s.logprob, 2.0 - lse, 1e-9);
  ASSERT_EQ(s.top.size(), 2u);
  EXPECT_EQ(s.top[0].token, 1);
  EXPECT_EQ(s.top[1].token, 3);
  EXPECT_NEAR(s.top[1].logprob, 2.0 - lse, 1e-9);
}

// Sampling inverts the CDF of softmax(l / T) in id order: over an even grid of draws, each token's share is its
// probability; top_k and top_p restrict the support to the most likely tokens.
TEST(ServeSampler, DrawsFollowTheFilteredDistribution) {
  const std::vector<float> l = {1.0f, 3.0f, 0.0f, 2.5f, -2.0f};
  const int V = 5, n = 20000;
  auto shares = [&](const SampleChoice& c) {
    std::vector<double> f(V, 0);
    for (int i = 0; i < n; ++i) {
      SampleChoice ci = c;
      ci.u = (i + 0.5) / n;
      f[sample_token(l.data(), V, ci).token] += 1.0 / n;
    }
    return f;
  };
  auto softmax = [&](float T, const std::vector<int>& keep) {
    std::vector<double> p(V, 0);
    double z = 0;
    for (int i : keep) z += (p[i] = std::exp(l[i] / T));
    for (double& x : p) x /= z;
    return p;
  };
  const std::vector<std::pair<SampleChoice, std::vector<double>>> cases = {
      {SampleChoice{1.0f, 1.0f, 0, 0, -1}, softmax(1.0f, {0, 1, 2, 3, 4})},
      {SampleChoice{0.5f, 1.0f, 0, 0, -1}, softmax(0.5f, {0, 1, 2, 3, 4})},
      {SampleChoice{1.0f, 1.0f, 2, 0, -1}, softmax(1.0f, {1, 3})},  // top-2: ids 1 and 3
      // top_p 0.8: p(1) = 0.51, p(3) = 0.31 (cumulative 0.82 >= 0.8): the nucleus is {1, 3}
      {SampleChoice{1.0f, 0.8f, 0, 0, -1}, softmax(1.0f, {1, 3})},
      {SampleChoice{1.0f, 0.3f, 0, 0, -1}, softmax(1.0f, {1})},
  };
  for (const auto& [c, want] : cases) {
    const std::vector<double> got = shares(c);
    for (int i = 0; i < V; ++i)
      EXPECT_NEAR(got[i], want[i], 2.0 / n)
          << "T " << c.temperature << " top_k " << c.top_k << " top_p " << c.top_p << " token " << i;
  }
  const std::vector<float> bad = {0.0f, NAN};
  EXPECT_THROW(sample_token(bad.data(), 2, SampleChoice{}), Error);
}

// ================================================================== detokenizer
TEST(ServeDetokenizer, StreamedTextIsTheDecodedContinuation) {
  const Tokenizer& tok = serve_tokenizer();
  const std::vector<int32_t> prompt = tok.encode("ROMEO:\nBut soft, what light");
  const std::vector<int32_t> gen = tok.encode(" through yonder window breaks?\nIt is the east, and Juliet");
  serve::Detokenizer d(tok, prompt, {});
  std::string text;
  bool stopped = false;
  for (int32_t t : gen) {
    text += d.push(t, &stopped);
    EXPECT_FALSE(stopped);
  }
  text += d.flush();
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), gen.begin(), gen.end());
  const std::string whole = tok.decode(all), head = tok.decode(prompt);
  EXPECT_EQ(text, whole.substr(head.size()));
}

// The completion ends right before the first stop string; text that might start one is held back (never released
// in part), and released when it turns out not to be one.
TEST(ServeDetokenizer, StopStringsEndTheCompletionAndAreNeverReleasedInPart) {
  const Tokenizer& tok = serve_tokenizer();
  const std::vector<int32_t> prompt = tok.encode("KING:");
  const std::vector<int32_t> gen = tok.encode(" the king is dead, long live the king");
  serve::Detokenizer d(tok, prompt, {"live the", "king is dead!"});
  std::vector<std::string> released;
  bool stopped = false;
  size_t i = 0;
  for (; i < gen.size() && !stopped; ++i) released.push_back(d.push(gen[i], &stopped));
  EXPECT_TRUE(stopped);
  EXPECT_LT(i, gen.size()) << "stopped before the end of the tokens";
  std::string text;
  for (const auto& r : released) {
    text += r;
    EXPECT_EQ(text.find("king is dead!"), std::string::npos);
  }
  EXPECT_EQ(text, " the king is dead, long ");
  EXPECT_EQ(d.flush(), "");
  EXPECT_EQ(d.push(gen.back(), &stopped), "");
  EXPECT_TRUE(stopped);
  // the held-back start of "king is dead!" came out once it could no longer become the stop string
  serve::Detokenizer e(tok, prompt, {"king is dead!"});
  std::string all;
  for (int32_t t : gen) all += e.push(t, &stopped);
  EXPECT_FALSE(stopped);
  EXPECT_EQ(all + e.flush(), " the king is dead, long live the king");
}

// ================================================================== scheduler
std::unique_ptr<serve::Sequence> seq(int64_t id, int prompt_len) {
  auto s = std::make_unique<serve::Sequence>();
  s->id = id;
  s->tokens.assign(prompt_len, 1);
  s->n_prompt = prompt_len;
  return s;
}

int total_tokens(const std::vector<serve::ScheduledChunk>& chunks) {
  int n = 0;
  for (const auto& c : chunks) n += c.n;
  return n;
}

TEST(ServeScheduler, ChunkedPrefillUnderTheTokenBudgetThenOneTokenPerDecode) {
  serve::Scheduler s({1, 64, 4, 10, 8}, 32);
  s.add(seq(0, 23));
  s.add(seq(1, 3));
  auto c = s.schedule();  // 10 of seq 0's prompt; seq 1 waits for budget
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].n, 10);
  EXPECT_FALSE(c[0].sample);
  s.completed(c);
  c = s.schedule();  // 10 more of seq 0
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].pos0, 10);
  s.completed(c);
  c = s.schedule();  // the last 3 of seq 0 (sampled) and seq 1's whole prompt
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].n, 3);
  EXPECT_TRUE(c[0].sample);
  EXPECT_EQ(c[1].seq->id, 1);
  EXPECT_TRUE(c[1].sample);
  s.completed(c);
  for (auto& ch : c) ch.seq->tokens.push_back(2);  // the sampled tokens
  c = s.schedule();                                // decodes: one token each
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(total_tokens(c), 2);
  EXPECT_EQ(c[0].pos0, 23);
  EXPECT_EQ(s.pool(0).free(), 64 - 6 - 1);  // 24 positions = 6 blocks, 4 positions = 1 block
  s.finish(0);
  s.finish(1);
  EXPECT_EQ(s.pool(0).free(), 64);
  EXPECT_EQ(s.running() + s.waiting(), 0);
}

TEST(ServeScheduler, AdmissionStopsAtMaxRunningAndBalancesRanks) {
  serve::Scheduler s({2, 16, 4, 1000, 3}, 16);
  for (int i = 0; i < 5; ++i) s.add(seq(i, 4));
  const auto c = s.schedule();
  ASSERT_EQ(c.size(), 3u);
  EXPECT_EQ(s.waiting(), 2);
  std::map<int, int> per_rank;
  for (const auto& ch : c) ++per_rank[ch.seq->rank];
  EXPECT_EQ(per_rank[0], 2);  // the rank with the most free blocks, ties to fewer sequences
  EXPECT_EQ(per_rank[1], 1);
  EXPECT_THROW(serve::Scheduler({1, 3, 4, 10, 1}, 16), Error);  // 3 blocks cannot hold 16 positions
}

// Two sequences on a rank with room for one: the newer is preempted when the older needs a block, then recomputed
// from its first token once the older finished; nothing is ever refused.
TEST(ServeScheduler, RunningOutOfBlocksPreemptsTheNewestAndRecomputesIt) {
  serve::Scheduler s({1, 4, 4, 100, 8}, 16);
  s.add(seq(0, 7));  // 2 blocks
  s.add(seq(1, 8));  // 2 blocks
  auto c = s.schedule();
  ASSERT_EQ(c.size(), 2u);
  s.completed(c);
  for (auto& ch : c) ch.seq->tokens.push_back(5);
  c = s.schedule();  // seq 0 fits in its block; seq 1 needs a third: none is free, it preempts itself
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].seq->id, 0);
  EXPECT_EQ(s.preemptions(), 1);
  EXPECT_EQ(s.waiting(), 1);
  s.completed(c);
  c[0].seq->tokens.push_back(5);  // seq 0 at 9 tokens: needs block 3 of 4... it is free now
  c = s.schedule();
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].seq->id, 0);
  s.completed(c);
  s.finish(0);
  c = s.schedule();  // seq 1 again, all 9 of its tokens (prompt + the one generated) recomputed
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].seq->id, 1);
  EXPECT_EQ(c[0].pos0, 0);
  EXPECT_EQ(c[0].n, 9);
  EXPECT_TRUE(c[0].sample);
  EXPECT_EQ(c[0].seq->preemptions, 1);
}

// ================================================================== one-rank engine
// Plain greedy decoding over the model's inference path, one token at a time into a contiguous cache: the
// reference the engine's scheduling, paging and batching must not change.
std::vector<int32_t> reference_greedy(Model& model, std::vector<int32_t> toks, int n) {
  const int V = model.config().vocab_size(), T = model.config().max_seq_len();
  model.prepare_inference();
  KvCache cache(model.workspace().backend(), model.kv_dims(1, T));
  InferBatch b;
  std::vector<int32_t> out;
  b.add(SeqChunk::of(toks.data(), 0, static_cast<int>(toks.size()), true), {0}, T);
  for (int i = 0; i < n; ++i) {
    const float* lg = model.forward_infer(b, cache);
    const int32_t next = static_cast<int32_t>(std::max_element(lg, lg + V) - lg);
    out.push_back(next);
    toks.push_back(next);
    b.clear();
    b.add(SeqChunk::of(toks.data(), static_cast<int>(toks.size()) - 1, 1, true), {0}, T);
  }
  return out;
}

const std::vector<std::string>& kPrompts = serve_prompts();

// The serving models: dense, MoE, or MoWE with a routing vocabulary (its word-level routes need each row's earlier
// tokens, which the engine's step plans carry), with what building each needs.
struct ServeModel {
  std::unique_ptr<Model> model;
  std::vector<int32_t> corpus, classes;
};
ServeModel serve_model(const std::string& kind, uint64_t seed) {
  ServeModel sm;
  proto::ModelConfig cfg = serve_model_config(kind == "MoE");
  if (kind == "MoWE") {
    cfg.add_ffn_pattern(proto::FFN_WORD_EXPERT);
    auto* w = cfg.mutable_word_experts();
    w->set_num_experts(512);
    w->set_d_expert(16);
    w->set_num_frequent(384);
    w->set_routing_vocab_size(4096);
    fill_defaults(&cfg, 64);
    std::ifstream in(std::string(MOE_TEST_SOURCE_DIR) + "/../shared/data/tinyshakespeare.txt");
    std::string text(30000, '\0');
    in.read(text.data(), static_cast<std::streamsize>(text.size()));
    sm.corpus = serve_tokenizer().encode(text);
    sm.classes = word_classes(serve_tokenizer());
  }
  sm.model = make_model(cfg, seed, {.corpus = &sm.corpus, .word_classes = &sm.classes, .inference = true});
  return sm;
}

TEST(ServeEngine, GreedyTokensEqualPlainGreedyDecodingAndAreBatchInvariant) {
  for (const std::string kind : {"dense", "MoE", "MoWE"}) {
    SCOPED_TRACE(kind);
    const bool moe = kind == "MoE";
    ServeModel sm = serve_model(kind, 11);
    auto& model = sm.model;
    std::vector<std::vector<int32_t>> alone;
    {
      OneRankEngine one(*model, serve_config(64, 16));
      for (const std::string& p : kPrompts) {
        const serve::GenerationRequest r = greedy_request(p, 20);
        alone.push_back(serve::generate(one.engine, r).tokens);
        ASSERT_EQ(alone.back(), reference_greedy(*model, r.prompt, 20)) << p;
      }
    }
    // all 16 at once: in one batch, with blocks of 4 and a budget of 24 tokens (prompts chunked), then in a cache
    // so small that sequences are preempted and recomputed
    for (const auto& [blocks, block_size] : {std::pair{64, 4}, std::pair{20, 4}}) {
      SCOPED_TRACE("KV blocks " + std::to_string(blocks));
      OneRankEngine eng(*model, serve_config(blocks, block_size, 24));
      std::vector<std::shared_ptr<RecordingSink>> sinks;
      for (const std::string& p : kPrompts) {
        sinks.push_back(std::make_shared<RecordingSink>());
        ASSERT_EQ(eng.engine.submit(greedy_request(p, 20), sinks.back()), serve::SubmitStatus::kAccepted);
      }
      eng.engine.run_until_idle();
      for (size_t i = 0; i < kPrompts.size(); ++i) {
        EXPECT_TRUE(sinks[i]->finished);
        EXPECT_EQ(sinks[i]->finish.reason, "length");
        EXPECT_EQ(sinks[i]->ids(), alone[i]) << kPrompts[i];
      }
      const serve::EngineStats st = eng.engine.stats();
      EXPECT_EQ(st.kv_blocks_used, 0);
      EXPECT_EQ(st.running, 0);
      if (blocks == 20) {
        EXPECT_GT(st.preemptions, 0) << "the small cache was meant to preempt";
      }
      if (moe) {
        int64_t routed = 0;  // every token of every step went to top-2 experts in each of the 2 MoE layers
        for (const auto& layer : st.expert_tokens) routed += std::accumulate(layer.begin(), layer.end(), int64_t(0));
        EXPECT_GT(routed, 0);
      }
    }
  }
}

TEST(ServeEngine, StopStringsMaxTokensLogprobsAndCancellation) {
  auto model = make_model(serve_model_config(true), 12, {.inference = true});
  OneRankEngine eng(*model, serve_config(64, 16));
  // greedy text of 30 tokens, then the same request stopped at a string inside it
  const serve::Completion full = serve::generate(eng.engine, greedy_request("ROMEO:", 30));
  ASSERT_GE(full.text.size(), 6u);
  const std::string stop = full.text.substr(full.text.size() / 2, 3);
  serve::GenerationRequest r = greedy_request("ROMEO:", 30);
  r.stop = {stop};
  r.logprobs = 3;
  auto sink = std::make_shared<RecordingSink>();
  ASSERT_EQ(eng.engine.submit(r, sink), serve::SubmitStatus::kAccepted);
  auto cancelled = std::make_shared<RecordingSink>();
  cancelled->cancel_after = 4;
  ASSERT_EQ(eng.engine.submit(greedy_request("KING:", 30), cancelled), serve::SubmitStatus::kAccepted);
  eng.engine.run_until_idle();
  EXPECT_EQ(sink->finish.reason, "stop");
  EXPECT_EQ(sink->text(), full.text.substr(0, full.text.find(stop)));
  EXPECT_EQ(sink->finish.usage.completion_tokens, static_cast<int>(sink->tokens.size()));
  for (const auto& t : sink->tokens) {
    ASSERT_EQ(t.top.size(), 3u);
    EXPECT_EQ(t.top[0].token, t.token);  // greedy: the chosen token is the most likely
    EXPECT_NEAR(t.top[0].logprob, t.logprob, 1e-6);
    EXPECT_LE(t.top[1].logprob, t.top[0].logprob);
  }
  EXPECT_EQ(cancelled->finish.reason, "abort");
  EXPECT_EQ(cancelled->tokens.size(), 4u);
  EXPECT_EQ(eng.engine.stats().kv_blocks_used, 0);
}

TEST(ServeEngine, QueueLimitAndReadiness) {
  auto model = make_model(serve_model_config(false), 13, {.inference = true});
  proto::ServingConfig s = serve_config(64, 16);
  s.set_max_queue(2);
  comm::SelfCommunicator self;
  serve::Engine engine(serve::EngineOptions{s}, self);
  EXPECT_FALSE(engine.ready());
  EXPECT_EQ(engine.submit(greedy_request("A", 2), std::make_shared<RecordingSink>()), serve::SubmitStatus::kNotReady);
  engine.attach(*model, &serve_tokenizer(), serve::ModelInfo{"t", 64, model->config().vocab_size(), 0, -1});
  EXPECT_TRUE(engine.ready());
  EXPECT_EQ(engine.submit(greedy_request("A", 2), std::make_shared<RecordingSink>()), serve::SubmitStatus::kAccepted);
  EXPECT_EQ(engine.submit(greedy_request("B", 2), std::make_shared<RecordingSink>()), serve::SubmitStatus::kAccepted);
  EXPECT_EQ(engine.submit(greedy_request("C", 2), std::make_shared<RecordingSink>()), serve::SubmitStatus::kQueueFull);
  engine.run_until_idle();
  EXPECT_EQ(engine.submit(greedy_request("D", 2), std::make_shared<RecordingSink>()), serve::SubmitStatus::kAccepted);
  engine.run_until_idle();
  EXPECT_EQ(engine.stats().generated_tokens, 6);
}

}  // namespace
}  // namespace moe::test
