// The MoWE routing vocabulary (router/routing_vocab.h) and the word-expert layer's options that go with it: word-prefix
// keys, exact and hashed routing ids, the checkpoint tables, causality through the whole model, the inference path
// routing like training, the skip list and one table shared by every word-expert layer.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "core/kv_cache.h"
#include "core/optimizer.h"
#include "core/rng.h"
#include "experts/moe_layer.h"
#include "router/routing_vocab.h"
#include "tests/unit/model_helpers.h"

namespace moe::test {
namespace {
using router::RoutingVocabulary;
constexpr int kCtx = router::kMaxWordTokens - 1;

// 12 token ids: 0-3 start a word, 4-8 continue one, 9-11 are symbols
std::vector<int32_t> classes12() { return {1, 1, 1, 1, 0, 0, 0, 0, 0, 2, 2, 2}; }

std::vector<int32_t> context_of(const std::vector<int32_t>& seq, int i) {
  std::vector<int32_t> c(kCtx);
  for (int j = 0; j < kCtx; ++j) c[j] = i - 1 - j >= 0 ? seq[i - 1 - j] : -1;
  return c;
}
uint64_t key_at(const RoutingVocabulary& v, const std::vector<int32_t>& seq, int i) {
  return v.key(seq[i], context_of(seq, i).data());
}

// A Zipf-like stream over V ids (id v drawn with weight 1 / (v + 1)), fixed seed.
std::vector<int32_t> zipf_stream(int V, int n, uint64_t seed) {
  std::vector<double> cdf(V);
  double acc = 0;
  for (int v = 0; v < V; ++v) cdf[v] = acc += 1.0 / (v + 1);
  Rng rng(seed);
  std::vector<int32_t> out(n);
  for (auto& t : out)
    t = static_cast<int32_t>(std::lower_bound(cdf.begin(), cdf.end(), rng.uniform() * acc) - cdf.begin());
  return out;
}

TEST(RoutingVocab, KeyIsTheWordPrefixUpToTheToken) {
  const RoutingVocabulary v = RoutingVocabulary::build({}, classes12(), {64, 32});
  const std::vector<int32_t> a = {9, 0, 4, 5, 1, 4, 5};  // ". A b c B b c"
  const std::vector<int32_t> b = {2, 6, 0, 4, 5};        // "C g A b c"
  EXPECT_EQ(key_at(v, a, 3), key_at(v, b, 4)) << "the same word prefix 'A b c' in two places";
  EXPECT_NE(key_at(v, a, 3), key_at(v, a, 6)) << "'A b c' vs 'B b c'";
  EXPECT_NE(key_at(v, a, 2), key_at(v, a, 3)) << "'A b' vs 'A b c'";
  EXPECT_EQ(key_at(v, a, 1), key_at(v, b, 2)) << "a word start does not look back";
  // a symbol ends a word and the token after a symbol starts one; so does the start of the sequence
  const std::vector<int32_t> c = {0, 4, 10, 4}, d = {4};
  EXPECT_EQ(key_at(v, c, 3), key_at(v, d, 0));
  EXPECT_NE(key_at(v, c, 1), key_at(v, d, 0));
  // a word of 12 tokens: the key spans the last kMaxWordTokens tokens only
  std::vector<int32_t> w1 = {0, 4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 4}, w2 = w1;
  w2[0] = 1;
  w2[3] = 8;
  EXPECT_EQ(key_at(v, w1, 11), key_at(v, w2, 11));
  w2[4] = 4;  // inside the last 8 tokens
  EXPECT_NE(key_at(v, w1, 11), key_at(v, w2, 11));
  std::vector<int32_t> bad = {0, 12};
  EXPECT_THROW(key_at(v, bad, 1), Error);
  EXPECT_THROW(v.key(-1, context_of(bad, 0).data()), Error);
}

TEST(RoutingVocab, FrequentKeysGetExactIdsByCountTheRestAreHashed) {
  std::vector<int32_t> corpus;
  for (int i = 0; i < 50; ++i) corpus.insert(corpus.end(), {0, 4, 9});  // "A b ." x 50
  for (int i = 0; i < 20; ++i) corpus.insert(corpus.end(), {1, 10});    // "B ," x 20
  const std::vector<int32_t> tail = zipf_stream(12, 400, 3);
  corpus.insert(corpus.end(), tail.begin(), tail.end());
  const RoutingVocabulary v = RoutingVocabulary::build(corpus, classes12(), {64, 5});
  EXPECT_EQ(v.num_exact_keys(), 5);
  const std::vector<int64_t>& counts = v.id_counts();
  ASSERT_EQ(counts.size(), 64u);
  EXPECT_EQ(std::accumulate(counts.begin(), counts.end(), int64_t(0)), int64_t(corpus.size()));
  for (int i = 1; i < 5; ++i) EXPECT_GE(counts[i - 1], counts[i]) << "exact ids go by descending count";
  const std::vector<int32_t> ab = {0, 4};
  const int32_t id_a = v.id(0, context_of(ab, 0).data()), id_ab = v.id(4, context_of(ab, 1).data());
  EXPECT_LT(id_a, 5);
  EXPECT_LT(id_ab, 5);
  EXPECT_GE(counts[id_ab], 50);
  // a key never seen: hashed into [exact, size)
  const std::vector<int32_t> rare = {3, 8, 8, 8, 8, 8, 8};
  const int32_t id_rare = v.id(8, context_of(rare, 6).data());
  EXPECT_GE(id_rare, 5);
  EXPECT_LT(id_rare, 64);
}

TEST(RoutingVocab, TablesRoundTripAndNameWhatIsMissing) {
  const RoutingVocabulary v = RoutingVocabulary::build(zipf_stream(12, 2000, 5), classes12(), {128, 100});
  std::map<std::string, std::vector<int32_t>> t;
  v.to_tables("wr", t);
  EXPECT_TRUE(RoutingVocabulary::has_tables("wr", t));
  EXPECT_TRUE(v.matches_tables("wr", t));
  const RoutingVocabulary back = RoutingVocabulary::from_tables("wr", t);
  Rng rng(1);
  for (int i = 0; i < 500; ++i) {
    std::vector<int32_t> seq(8);
    for (auto& x : seq) x = static_cast<int32_t>(rng.below(12));
    EXPECT_EQ(back.id(seq[7], context_of(seq, 7).data()), v.id(seq[7], context_of(seq, 7).data()));
  }
  t["wr.keys"][0] ^= 1;
  EXPECT_FALSE(v.matches_tables("wr", t));
  t.erase("wr.classes");
  try {
    RoutingVocabulary::from_tables("wr", t);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("wr.classes"), std::string::npos) << e.what();
  }
  EXPECT_THROW(RoutingVocabulary::build({}, classes12(), {64, 64}), Error);  // no hashed ids left
  EXPECT_THROW(RoutingVocabulary::build({}, {0, 3}, {64, 8}), Error);        // a word class that is not 0, 1, 2
}

// ---------------------------------------------------------------- through the model
proto::ModelConfig mowe_config(bool share, int skip_top) {
  proto::ModelConfig m;
  m.set_vocab_size(12);
  m.set_d_model(16);
  m.set_n_layers(3);
  m.set_n_heads(4);
  m.set_n_kv_heads(2);
  m.set_d_ff(24);
  m.set_max_seq_len(16);
  m.set_rope_theta(10000);
  m.set_norm_eps(1e-5f);
  m.set_init_std(0.1f);
  m.add_ffn_pattern(proto::FFN_WORD_EXPERT);
  m.add_ffn_pattern(proto::FFN_DENSE);
  auto* w = m.mutable_word_experts();
  w->set_num_experts(64);
  w->set_d_expert(8);
  w->set_num_frequent(48);
  w->set_placement(proto::WordExpertConfig::PLACEMENT_INTERLEAVED);
  w->set_routing_vocab_size(256);
  w->set_routing_exact(200);
  w->set_skip_top(skip_top);
  w->set_share_table(share);
  return m;
}

struct MoweInputs {
  std::vector<int32_t> corpus = zipf_stream(12, 5000, 11), classes = classes12();
  experts::ModelInputs in() const { return {.corpus = &corpus, .word_classes = &classes}; }
};

std::vector<float> logits_of(Model& m, const std::vector<int32_t>& seq) {
  const int T = static_cast<int>(seq.size()), V = m.config().vocab_size();
  m.forward(seq.data(), nullptr, 1, T, false);
  return std::vector<float>(m.logits(), m.logits() + int64_t(T) * V);
}

TEST(RoutingVocabModel, ChangingALaterTokenNeverChangesAnEarlierPosition) {
  MoweInputs mi;
  for (bool share : {false, true}) {
    auto model = make_model(mowe_config(share, 2), 3, mi.in());
    const int V = 12, T = 12;
    Rng rng(7);
    int later_changed = 0;
    for (int trial = 0; trial < 6; ++trial) {
      std::vector<int32_t> seq(T);
      for (auto& x : seq) x = static_cast<int32_t>(rng.below(V));
      const std::vector<float> base = logits_of(*model, seq);
      for (int t = 1; t < T; ++t) {
        std::vector<int32_t> alt = seq;
        alt[t] = (alt[t] + 1 + static_cast<int32_t>(rng.below(V - 1))) % V;
        const std::vector<float> got = logits_of(*model, alt);
        // (a tolerance, not bit equality: the changed token moves between expert groups, whose GEMMs then have
        // other row counts; a changed route would change a logit by far more)
        for (int64_t i = 0; i < int64_t(t) * V; ++i)
          ASSERT_NEAR(got[i], base[i], 1e-5)
              << "share " << share << ": changing token " << t << " changed position " << i / V;
        double later = 0;
        for (int64_t i = int64_t(t) * V; i < int64_t(T) * V; ++i)
          later = std::max(later, double(std::fabs(got[i] - base[i])));
        later_changed += later > 1e-3;
      }
    }
    EXPECT_GT(later_changed, 0);  // (the test can fail: later positions do see the change)
  }
}

// Decoding token by token through the paged-cache inference path (each row's context from InferBatch::add) gives the
// logits of the teacher-forced forward: the two paths compute the same routing ids.
TEST(RoutingVocabModel, InferencePathRoutesLikeTheTrainingForward) {
  MoweInputs mi;
  auto model = make_model(mowe_config(true, 2), 3, mi.in());
  const int T = 14, V = 12;
  const std::vector<int32_t> seq = zipf_stream(V, T, 21);
  const std::vector<float> full = logits_of(*model, seq);
  model->prepare_inference();
  KvCache cache(model->workspace().backend(), model->kv_dims(1, T));
  InferBatch b;
  for (int t = 0; t < T; ++t) {
    b.clear();
    b.add(SeqChunk::of(seq.data(), t, 1, true), {0}, T);
    const float* lg = model->forward_infer(b, cache);
    for (int v = 0; v < V; ++v) EXPECT_NEAR(lg[v], full[int64_t(t) * V + v], 1e-4) << "position " << t;
  }
  b.clear();
  EXPECT_THROW(b.add({seq.data() + 9, 1, 9, seq.data() + 5, 4, true}, {0}, T), Error);  // 7 tokens before are required
}

// The skip_top most frequent routes bypass the layer: their rows get output 0 and reach no expert.
TEST(WordExpertSkip, MostFrequentRoutesBypassTheLayer) {
  proto::ModelConfig cfg = mowe_config(false, 2);
  cfg.mutable_word_experts()->set_routing_vocab_size(0);  // route by token id: tokens 3 and 7 are the most frequent
  std::vector<int64_t> counts(12, 1);
  counts[3] = 100;
  counts[7] = 90;
  ParamStore ps;
  Workspace ws{cpu_backend()};
  experts::WordExpertFfn ffn(ps, ws, "l", cfg, nullptr, &counts);
  init_params(ps, 1, 0.5f, 0.5f);
  const int N = 12, C = cfg.d_model();
  std::vector<int32_t> toks(N), ctxt(int64_t(N) * kTokenContext, -1);
  std::iota(toks.begin(), toks.end(), 0);
  std::vector<float> x(int64_t(N) * C), y(x.size()), dx(x.size()), dy(x.size(), 1.0f);
  Rng rng(2);
  for (auto& v : x) v = rng.uniform() - 0.5f;
  FfnContext ctx;
  ctx.token_ids = toks.data();
  ctx.token_context = ctxt.data();
  ffn.forward(ctx, y.data(), x.data(), N);
  ffn.backward(ctx, dx.data(), dy.data(), N);
  for (int n = 0; n < N; ++n) {
    const bool skipped = n == 3 || n == 7;
    double ny = 0, ndx = 0;
    for (int c = 0; c < C; ++c) {
      ny += std::fabs(y[int64_t(n) * C + c]);
      ndx += std::fabs(dx[int64_t(n) * C + c]);
    }
    EXPECT_EQ(ny == 0, skipped) << "token " << n << " output";
    EXPECT_EQ(ndx == 0, skipped) << "token " << n << " input gradient";
  }
  EXPECT_EQ(ffn.stats().experts_used, N - 2);
}

// Three word-expert layers with their own tables (`own`) and with one shared table (`shared`), given the same
// weights: every non-table parameter copied, and each layer's own table = the shared one.
struct OwnAndSharedTables {
  MoweInputs mi;
  std::unique_ptr<Model> own, shared;
  OwnAndSharedTables() {
    proto::ModelConfig cfg = mowe_config(false, 0);
    cfg.clear_ffn_pattern();
    cfg.add_ffn_pattern(proto::FFN_WORD_EXPERT);  // three word-expert layers
    own = make_model(cfg, 3, mi.in());
    cfg.mutable_word_experts()->set_share_table(true);
    shared = make_model(cfg, 3, mi.in());
    for (Param* p : shared->params().all()) {
      const bool table = p->name.rfind("word_experts.shared", 0) == 0;
      const std::string mat = p->name.substr(p->name.rfind('.'));
      for (int l = 0; l < (table ? 3 : 1); ++l) {
        const std::string dst = table ? "layers." + std::to_string(l) + ".ffn.experts" + mat : p->name;
        std::copy_n(p->value.f32(), p->value.numel(), own->params().get(dst).value.f32());
      }
    }
  }
};

// share_table: one set of table parameters for every word-expert layer, whose gradient is the sum of what each layer
// would give its own copy of the same table.
TEST(WordExpertShared, OneTableForEveryLayerAndItsGradientIsTheLayersSum) {
  OwnAndSharedTables t;
  Model *own = t.own.get(), *shared = t.shared.get();
  const std::vector<std::string> mats = {".w_gate", ".w_up", ".w_down"};
  for (const std::string& m : mats) {
    EXPECT_EQ(shared->params().find("layers.0.ffn.experts" + m), nullptr);
    ASSERT_NE(shared->params().find(std::string(experts::WordExpertShared::kSharedTablePrefix) + m), nullptr);
  }
  const std::vector<int32_t> in = zipf_stream(12, 32, 8), tg = zipf_stream(12, 32, 9);
  double loss[2];
  int i = 0;
  for (Model* m : {own, shared}) {
    m->params().zero_grad();
    loss[i++] = m->forward(in.data(), tg.data(), 2, 16);
    m->backward();
  }
  EXPECT_NEAR(loss[1], loss[0], 1e-6 * std::fabs(loss[0]));
  for (const std::string& m : mats) {
    const Param& g = shared->params().get(std::string(experts::WordExpertShared::kSharedTablePrefix) + m);
    double maxdiff = 0, maxref = 1e-12;
    for (int64_t k = 0; k < g.grad.numel(); ++k) {
      double sum = 0;
      for (int l = 0; l < 3; ++l)
        sum += own->params().get("layers." + std::to_string(l) + ".ffn.experts" + m).grad.f32()[k];
      maxdiff = std::max(maxdiff, std::fabs(sum - g.grad.f32()[k]));
      maxref = std::max(maxref, std::fabs(sum));
    }
    EXPECT_LE(maxdiff / maxref, 1e-5) << m;
    EXPECT_GT(maxref, 1e-6) << m << ": the layers do reach the table";
  }
}

// A shared table is packed for inference once, not once per layer: the packed copies of three layers' own tables
// take three tables' worth of memory, a shared table's one; and both models infer the same logits.
TEST(WordExpertShared, PackedForInferenceOnce) {
  OwnAndSharedTables t;
  Model *own = t.own.get(), *shared = t.shared.get();
  const std::vector<int32_t> seq = zipf_stream(own->config().vocab_size(), 12, 5);
  const size_t own0 = own->workspace().bytes(), shared0 = shared->workspace().bytes();
  const std::vector<float> a = chunked_logits(*own, seq, 4, 12), b = chunked_logits(*shared, seq, 4, 12);
  const size_t own_packed = own->workspace().bytes() - own0, shared_packed = shared->workspace().bytes() - shared0;
  int64_t table_bytes = 0;
  for (const char* m : {".w_gate", ".w_up", ".w_down"})
    table_bytes += shared->params().get(std::string("word_experts.shared") + m).value.nbytes();
  EXPECT_GE(own_packed - shared_packed, size_t(2 * table_bytes)) << own_packed << " vs " << shared_packed;
  EXPECT_LT(shared_packed, own_packed / 2);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-5) << "logit " << i;
}

// model.word_experts.freeze: the tables keep their values bit for bit through training steps (weight decay
// included) while every other parameter trains; with a shared table too.
TEST(WordExpertFreeze, FrozenTablesDoNotChangeTheRestTrains) {
  MoweInputs mi;
  for (bool share : {false, true}) {
    proto::ModelConfig cfg = mowe_config(share, 2);
    cfg.mutable_word_experts()->set_freeze(true);
    auto model = make_model(cfg, 3, mi.in());
    std::map<std::string, std::vector<float>> before;
    for (Param* p : model->params().all()) before[p->name].assign(p->value.f32(), p->value.f32() + p->value.numel());
    proto::OptimizerConfig oc;
    oc.set_beta1(0.9f);
    oc.set_beta2(0.95f);
    oc.set_eps(1e-8f);
    oc.set_weight_decay(0.1f);
    AdamW opt(model->params(), oc);
    const std::vector<int32_t> in = zipf_stream(12, 32, 8), tg = zipf_stream(12, 32, 9);
    for (int step = 0; step < 3; ++step) {
      model->params().zero_grad();
      model->forward(in.data(), tg.data(), 2, 16);
      model->backward();
      opt.step(0.01f);
    }
    int frozen = 0, changed = 0;
    for (Param* p : model->params().all()) {
      const bool same = std::equal(before[p->name].begin(), before[p->name].end(), p->value.f32());
      const bool table = p->name.find(".experts.") != std::string::npos || p->name.rfind("word_experts.shared", 0) == 0;
      if (table) {
        EXPECT_TRUE(p->frozen) << p->name;
        EXPECT_TRUE(same) << p->name << " changed although frozen (share " << share << ")";
        ++frozen;
      } else {
        changed += !same;
      }
    }
    EXPECT_EQ(frozen, share ? 3 : 3 * 2);  // SwiGLU: 3 matrices per table; 2 word-expert layers of 3
    EXPECT_GT(changed, 5);
  }
}

}  // namespace
}  // namespace moe::test
