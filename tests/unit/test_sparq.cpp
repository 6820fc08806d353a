// SparQ attention for decode (Ribar et al., 2024): the kernel (core/kernels/cpu/kernels.h attention_sparq) against
// the plain double reference of the formula (reference.cpp) at small r and k, for MHA, GQA and MQA; full coverage
// (k >= the context) is full attention; the cache's side tables (value prefix sums, key columns) and the two ways of
// reading key components agree bit for bit; the model's inference path with SparQ knobs (chunking, full coverage);
// the serving engine (greedy tokens with full-coverage SparQ equal full attention, SparQ only on generated tokens,
// batch invariance with preemption, the server default); the HTTP fields sparq_r / sparq_k (400s, pass-through).
#include <gtest/gtest.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "core/kernels/cpu/kernels.h"
#include "serve/engine.h"
#include "serve/openai.h"
#include "tests/unit/backend_ops.h"
#include "tests/unit/serve_helpers.h"

namespace moe::test {
namespace {

Backend& be() { return cpu_backend(); }

// ================================================================== the kernel
// The keys of a paged case as rows k[N,Hkv,D] and their slots (row (b, t) at position t of sequence b).
struct RowsOfCase {
  Ids slots;
  Vec k;
};
RowsOfCase rows_of(const PagedCase& c) {
  RowsOfCase r;
  const int64_t row = int64_t(c.Hkv) * c.D;
  for (int n = 0; n < c.rows(); ++n) {
    const int p = c.pos[n];
    const int32_t slot = c.table[c.table_start[n] + p / c.block_size] * c.block_size + p % c.block_size;
    r.slots.push_back(slot);
    r.k.insert(r.k.end(), c.k_pool.begin() + slot * row, c.k_pool.begin() + (slot + 1) * row);
  }
  return r;
}

// attention_sparq over a paged case with every row at (r, k): the value sums written by value_sums_paged over the
// case's rows (in position order), the key columns by scatter_columns (or none); outputs "out" and "v_sums".
Outputs run_sparq(const PagedCase& c, int r, int k, bool columns) {
  DeviceArena d(be());
  const int nblk = c.slots / c.block_size, N = c.rows();
  const int64_t blk_floats = int64_t(nblk) * c.Hkv * c.D;
  float* v_sums = d.unwritten(blk_floats);  // a sum read before it is written shows as 1e30
  const float* v_pool = d.put(c.v_pool);
  const int32_t *pos = d.put(c.pos), *table = d.put(c.table), *start = d.put(c.table_start);
  be().value_sums_paged(v_sums, v_pool, pos, table, start, c.block_size, N, c.Hkv, c.D);
  float* k_cols = nullptr;
  if (columns) {
    const RowsOfCase rc = rows_of(c);
    k_cols = d.unwritten(blk_floats * c.block_size);
    be().scatter_columns(k_cols, d.put(rc.k), d.put(rc.slots), c.block_size, N, c.Hkv, c.D);
  }
  Ids rk;
  for (int n = 0; n < N; ++n) rk.insert(rk.end(), {r, k});
  float* out = d.unwritten(int64_t(N) * c.H * c.D);
  be().attention_sparq(out, d.put(c.q), d.put(c.k_pool), v_pool, v_sums, k_cols, pos, table, start, d.put(rk),
                       c.block_size, N, c.H, c.Hkv, c.D);
  return {{"out", d.get(out, int64_t(N) * c.H * c.D)}, {"v_sums", d.get(v_sums, blk_floats)}};
}

// MHA, GQA (3 and 2 query heads per kv head) and MQA; head dims with a SIMD kernel (16, 64) and without (20)
const std::vector<std::tuple<int, int, int>> kShapes = {{4, 4, 16}, {6, 2, 64}, {4, 2, 32}, {4, 1, 20}};

std::string shape_name(int H, int Hkv, int D, int bs) {
  return "H=" + std::to_string(H) + " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D) + " block " +
         std::to_string(bs);
}

// k >= the context: attention_sparq is attention_paged bit for bit (any r, with or without key columns); and the
// formula itself (the reference, which never switches) is full attention there, for r = D and for r < D (every
// key chosen: alpha = 1).
TEST(Sparq, FullCoverageIsFullAttention) {
  Rng rng(31);
  for (const auto& [H, Hkv, D] : kShapes) {
    for (int bs : {1, 4, 21}) {
      SCOPED_TRACE(shape_name(H, Hkv, D, bs));
      const int B = 2, T = 21;
      const AttnCase a = make_attn(rng, B, T, H, Hkv, D, false);
      const PagedCase c = make_paged(rng, a, bs);
      const Vec full = run_paged(be(), c).at("out");
      for (bool columns : {false, true})
        for (int r : {D, D / 4}) EXPECT_EQ(run_sparq(c, r, T, columns).at("out"), full) << "r " << r;
      Vec want(a.nq()), att(a.natt()), got(a.nq());
      cpu::attention_forward_ref(want.data(), att.data(), a.q.data(), a.k.data(), a.v.data(), B, T, H, Hkv, D);
      for (int r : {D, D / 4}) {
        cpu::attention_sparq_ref(got.data(), a.q.data(), a.k.data(), a.v.data(), B, T, H, Hkv, D, r, T);
        EXPECT_LE(max_rel_err(got, want), 1e-6) << "reference, r " << r;
      }
    }
  }
}

// Small r and k: the kernel is the formula (within float rounding), whether it reads the components from the key
// columns or gathers them from the key rows (the same bits), for every block size; rows with at most k positions
// are full attention in both. The GQA shapes check the shared selection of a group.
TEST(Sparq, KernelMatchesTheReferenceAtSmallRAndK) {
  Rng rng(32);
  for (const auto& [H, Hkv, D] : kShapes) {
    for (int bs : {1, 4, 7, 40}) {
      const int B = 2, T = 40;
      const AttnCase a = make_attn(rng, B, T, H, Hkv, D, false);
      const PagedCase c = make_paged(rng, a, bs);
      for (const auto& [r, k] : {std::pair{1, 1}, std::pair{4, 3}, std::pair{D / 4, 8}, std::pair{D / 2, 16}}) {
        SCOPED_TRACE(shape_name(H, Hkv, D, bs) + " r " + std::to_string(r) + " k " + std::to_string(k));
        Vec want(a.nq());
        cpu::attention_sparq_ref(want.data(), a.q.data(), a.k.data(), a.v.data(), B, T, H, Hkv, D, r, k);
        const Vec got = run_sparq(c, r, k, true).at("out");
        expect_outputs_near({{"out", got}}, {{"out", want}}, 2e-5);
        EXPECT_EQ(run_sparq(c, r, k, false).at("out"), got) << "gathered components";
      }
    }
  }
}

// SparQ changes the result once k is below the context (the test above is not vacuous), and by less as k grows.
TEST(Sparq, ErrorShrinksAsKGrows) {
  Rng rng(33);
  const AttnCase a = make_attn(rng, 1, 64, 4, 2, 32, false);
  const PagedCase c = make_paged(rng, a, 16);
  const Vec full = run_paged(be(), c).at("out");
  double last = INFINITY;
  for (int k : {4, 16, 48}) {
    const double err = max_rel_err(run_sparq(c, 16, k, true).at("out"), full);
    EXPECT_GT(err, 1e-4) << "k " << k;
    EXPECT_LT(err, last) << "k " << k;
    last = err;
  }
}

// The value sums are the prefix sums of the values through the end of each completed block (and nothing is
// written for a block that no row completed); the key columns hold every key component exactly.
TEST(Sparq, SideTablesArePrefixSumsAndColumns) {
  Rng rng(34);
  const int B = 2, T = 19, Hkv = 2, D = 16, bs = 4;
  const AttnCase a = make_attn(rng, B, T, 4, Hkv, D, false);
  const PagedCase c = make_paged(rng, a, bs);
  const Vec sums = run_sparq(c, 4, 4, false).at("v_sums");
  std::vector<bool> seen(c.slots / bs, false);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < (T + bs - 1) / bs; ++j) {
      const int blk = c.table[b * ((T + bs - 1) / bs) + j];
      seen[blk] = true;
      for (int g = 0; g < Hkv; ++g)
        for (int i = 0; i < D; ++i) {
          const float got = sums[(int64_t(blk) * Hkv + g) * D + i];
          if ((j + 1) * bs > T) {
            EXPECT_EQ(got, kUnwritten) << "block " << j << " is not complete";
            continue;
          }
          double want = 0;
          for (int t = 0; t < (j + 1) * bs; ++t) want += a.v[((int64_t(b) * T + t) * Hkv + g) * D + i];
          EXPECT_NEAR(got, want, 1e-5 * (j + 1) * bs) << "sequence " << b << " block " << j;
        }
    }
  for (size_t blk = 0; blk < seen.size(); ++blk)
    if (!seen[blk]) {
      EXPECT_EQ(sums[blk * Hkv * D], kUnwritten) << "unused block " << blk;
    }
  const RowsOfCase rc = rows_of(c);
  Vec cols(size_t(c.slots) * Hkv * D, 0.0f);
  cpu::scatter_columns(cols.data(), rc.k.data(), rc.slots.data(), bs, c.rows(), Hkv, D);
  for (int n = 0; n < c.rows(); ++n)
    for (int g = 0; g < Hkv; ++g)
      for (int i = 0; i < D; ++i) {
        const int s = rc.slots[n];
        ASSERT_EQ(cols[((int64_t(s / bs) * Hkv + g) * D + i) * bs + s % bs], rc.k[(int64_t(n) * Hkv + g) * D + i]);
      }
}

// A row's output does not depend on the batch, bit for bit: each row alone gives what it gives among rows with
// other knobs (full attention, other r and k), and a full-attention row among SparQ rows is attention_paged's.
TEST(Sparq, RowsAreBatchInvariantAndKnobsArePerRow) {
  Rng rng(35);
  const AttnCase a = make_attn(rng, 2, 30, 6, 2, 64, false);
  const PagedCase c = make_paged(rng, a, 8);
  const int N = c.rows();
  const Vec full = run_paged(be(), c).at("out");
  const Vec sparq = run_sparq(c, 16, 8, true).at("out");
  DeviceArena d(be());
  const int nblk = c.slots / c.block_size;
  float* v_sums = d.unwritten(int64_t(nblk) * c.Hkv * c.D);
  be().value_sums_paged(v_sums, c.v_pool.data(), c.pos.data(), c.table.data(), c.table_start.data(), c.block_size, N,
                        c.Hkv, c.D);
  Ids rk;
  for (int n = 0; n < N; ++n) rk.insert(rk.end(), {n % 3 == 0 ? 0 : 16, n % 3 == 0 ? 0 : (n % 3 == 1 ? 8 : 5)});
  const int64_t w = int64_t(c.H) * c.D;
  Vec mixed(size_t(N) * w);
  be().attention_sparq(mixed.data(), c.q.data(), c.k_pool.data(), c.v_pool.data(), v_sums, nullptr, c.pos.data(),
                       c.table.data(), c.table_start.data(), rk.data(), c.block_size, N, c.H, c.Hkv, c.D);
  for (int n = 0; n < N; ++n) {
    Vec one(w);
    be().attention_sparq(one.data(), c.q.data() + n * w, c.k_pool.data(), c.v_pool.data(), v_sums, nullptr, &c.pos[n],
                         c.table.data(), &c.table_start[n], &rk[2 * n], c.block_size, 1, c.H, c.Hkv, c.D);
    const Vec got(mixed.begin() + n * w, mixed.begin() + (n + 1) * w);
    ASSERT_EQ(one, got) << "row " << n << " alone";
    if (rk[2 * n] == 0) {
      ASSERT_EQ(got, Vec(full.begin() + n * w, full.begin() + (n + 1) * w)) << "full row " << n;
    }
    if (rk[2 * n + 1] == 8) {
      ASSERT_EQ(got, Vec(sparq.begin() + n * w, sparq.begin() + (n + 1) * w)) << "row " << n;
    }
  }
}

TEST(Sparq, BadKnobsAreRejected) {
  Rng rng(36);
  const PagedCase c = make_paged(rng, make_attn(rng, 1, 4, 4, 2, 8, false), 4);
  Vec o(c.q.size()), sums(size_t(c.slots) * 16);
  for (const Ids& rk : {Ids{9, 2}, Ids{-1, 2}, Ids{2, -1}}) {
    Ids all;
    for (int n = 0; n < c.rows(); ++n) all.insert(all.end(), rk.begin(), rk.end());
    EXPECT_THROW(
        be().attention_sparq(o.data(), c.q.data(), c.k_pool.data(), c.v_pool.data(), sums.data(), nullptr, c.pos.data(),
                             c.table.data(), c.table_start.data(), all.data(), 4, c.rows(), 4, 2, 8),
        Error)
        << "r " << rk[0] << " k " << rk[1];
  }
  const Ids ok(2 * c.rows(), 2);
  EXPECT_THROW(
      be().attention_sparq(o.data(), c.q.data(), c.k_pool.data(), c.v_pool.data(), nullptr, nullptr, c.pos.data(),
                           c.table.data(), c.table_start.data(), ok.data(), 4, c.rows(), 4, 2, 8),
      Error)
      << "no value sums";
}

// ================================================================== the model's inference path
// Full coverage (k >= every context) gives full attention's logits bit for bit; with small k the logits differ,
// only from the first SparQ position on, and are the same whether the tokens come in one chunk or one at a time
// (a chunk's SparQ rows are decode rows), with or without the key columns.
TEST(SparqModel, KnobsChunkingAndFullCoverage) {
  const proto::ModelConfig cfg = serve_model_config(false);  // 4 query / 2 kv heads of 16
  auto model = make_model(cfg, 21, {.inference = true});
  const int T = 40, V = cfg.vocab_size(), from = 10;
  Rng rng(37);
  std::vector<int32_t> toks(T);
  for (auto& t : toks) t = static_cast<int32_t>(rng.below(V));
  const std::vector<float> full = chunked_logits(*model, toks, 4, T, {}, false);
  EXPECT_EQ(chunked_logits(*model, toks, 4, T, {16, cfg.max_seq_len(), 0}, true), full);
  EXPECT_EQ(chunked_logits(*model, toks, 4, 1, {4, T, 0}, false), full);
  const SparqKnobs sq{4, 6, from};
  const std::vector<float> sparse = chunked_logits(*model, toks, 4, T, sq, true);
  EXPECT_EQ(std::vector<float>(sparse.begin(), sparse.begin() + int64_t(from) * V),
            std::vector<float>(full.begin(), full.begin() + int64_t(from) * V))
      << "rows before `from` are full attention";
  EXPECT_GT(max_rel_err(sparse, full), 1e-4) << "SparQ with k = 6 of up to 40 positions changes the logits";
  EXPECT_EQ(chunked_logits(*model, toks, 4, 1, sq, true), sparse) << "token by token";
  EXPECT_EQ(chunked_logits(*model, toks, 4, 7, sq, false), sparse) << "chunks of 7, components gathered from the rows";
  KvCacheDims no_sums = model->kv_dims(20, 4);
  no_sums.value_sums = false;
  KvCache bare(model->workspace().backend(), no_sums);
  InferBatch b;
  b.add(SeqChunk::of(toks.data(), 0, 4, true, {2, 2, 0}), {0}, 4);
  EXPECT_THROW(model->forward_infer(b, bare), Error) << "SparQ rows need the value sums";
}

// ================================================================== the serving engine
struct Engine1 {
  comm::SelfCommunicator self;
  serve::Engine engine;
  Engine1(Model& model, const proto::ServingConfig& s) : engine(serve::EngineOptions{s}, self) {
    serve::ModelInfo info;
    info.name = "test";
    info.max_seq_len = model.config().max_seq_len();
    info.vocab_size = model.config().vocab_size();
    engine.attach(model, &serve_tokenizer(), info);
  }
};

serve::GenerationRequest greedy(const std::string& prompt, int n, std::optional<serve::SparqParams> sq) {
  serve::GenerationRequest r;
  r.prompt = serve_tokenizer().encode(prompt);
  r.sampling.temperature = 0;
  r.max_tokens = n;
  r.sparq = sq;
  return r;
}

// Greedy decoding by hand over the inference path: the prompt in one chunk, then one token at a time with SparQ
// (r, k) on the generated tokens (positions >= the prompt's length).
std::vector<int32_t> greedy_by_hand(Model& model, const std::vector<int32_t>& prompt, int n, serve::SparqParams sq) {
  const int V = model.config().vocab_size(), T = model.config().max_seq_len(), P = int(prompt.size());
  model.prepare_inference();
  KvCache cache(model.workspace().backend(), model.kv_dims(1, T));
  InferBatch b;
  b.add(SeqChunk::of(prompt.data(), 0, P, true, {sq.r, sq.k, P}), {0}, T);
  std::vector<int32_t> hist = prompt;  // prompt and generated tokens by position
  for (int i = 0; i < n; ++i) {
    const float* lg = model.forward_infer(b, cache);
    hist.push_back(static_cast<int32_t>(std::max_element(lg, lg + V) - lg));
    b.clear();
    b.add(SeqChunk::of(hist.data(), P + i, 1, true, {sq.r, sq.k, P}), {0}, T);
  }
  return std::vector<int32_t>(hist.begin() + P, hist.end());
}

// Greedy tokens: full-coverage SparQ equals full attention; SparQ (r 4, k 4) applies to the generated tokens only
// (the hand-made loop), changes some completions, and is batch invariant (16 requests at once, prompts chunked,
// with preemption and recomputation); the server default (serving.sparq_r / sparq_k, key columns kept) gives the
// tokens of the same knobs asked for by a request on a server without them (components gathered from the rows).
TEST(SparqServe, GreedyTokens) {
  auto model = make_model(serve_model_config(false), 22, {.inference = true});
  const serve::SparqParams sq{4, 4}, cover{16, 64};
  const std::vector<std::string>& prompts = serve_prompts();
  std::vector<std::vector<int32_t>> full, sparse;
  int differ = 0;
  {
    Engine1 one(*model, serve_config(64, 16));
    for (const std::string& p : prompts) {
      full.push_back(serve::generate(one.engine, greedy(p, 24, std::nullopt)).tokens);
      EXPECT_EQ(serve::generate(one.engine, greedy(p, 24, cover)).tokens, full.back()) << p;
      sparse.push_back(serve::generate(one.engine, greedy(p, 24, sq)).tokens);
      EXPECT_EQ(sparse.back(), greedy_by_hand(*model, serve_tokenizer().encode(p), 24, sq)) << p;
      differ += sparse.back() != full.back();
    }
  }
  EXPECT_GT(differ, 0) << "SparQ with k = 4 changed no completion";
  for (const auto& [blocks, dflt] : {std::pair{64, false}, std::pair{20, false}, std::pair{20, true}}) {
    SCOPED_TRACE("KV blocks " + std::to_string(blocks) + (dflt ? ", server default" : ""));
    proto::ServingConfig s = serve_config(blocks, 4, 24);
    if (dflt) {
      s.set_sparq_r(sq.r);
      s.set_sparq_k(sq.k);
      s.set_kv_cache_bytes(serve::serving_kv_dims(*model, s, blocks).block_bytes() * blocks);
    }
    Engine1 eng(*model, s);
    std::vector<std::shared_ptr<RecordingSink>> sinks;
    for (const std::string& p : prompts) {
      sinks.push_back(std::make_shared<RecordingSink>());
      ASSERT_EQ(eng.engine.submit(greedy(p, 24, dflt ? std::nullopt : std::optional(sq)), sinks.back()),
                serve::SubmitStatus::kAccepted);
    }
    eng.engine.run_until_idle();
    for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(sinks[i]->ids(), sparse[i]) << prompts[i];
    if (blocks == 20) {
      EXPECT_GT(eng.engine.stats().preemptions, 0) << "the small cache was meant to preempt";
    }
  }
}

// A request with knobs out of range ends alone with an error; a server default above the head dim is refused.
TEST(SparqServe, BadKnobsAreRefused) {
  auto model = make_model(serve_model_config(false), 23, {.inference = true});
  {
    Engine1 one(*model, serve_config(64, 16));
    EXPECT_EQ(one.engine.info().head_dim, 16);
    EXPECT_TRUE(one.engine.info().sparq);
    for (const serve::SparqParams bad : {serve::SparqParams{17, 4}, serve::SparqParams{4, 0}}) {
      auto sink = std::make_shared<RecordingSink>();
      ASSERT_EQ(one.engine.submit(greedy("ROMEO:", 4, bad), sink), serve::SubmitStatus::kAccepted);
      one.engine.run_until_idle();
      EXPECT_EQ(sink->finish.reason, "abort");
      EXPECT_NE(sink->finish.error.find("SparQ"), std::string::npos) << sink->finish.error;
    }
    EXPECT_EQ(serve::generate(one.engine, greedy("ROMEO:", 4, std::nullopt)).tokens.size(), 4u) << "still serving";
  }
  proto::ServingConfig s = serve_config(64, 16);
  s.set_sparq_r(17);
  s.set_sparq_k(8);
  try {
    Engine1 eng(*model, s);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("serving.sparq_r"), std::string::npos) << e.what();
  }
}

// ================================================================== the HTTP fields
serve::ParseContext parse_context(bool sparq) {
  serve::ParseContext ctx;
  ctx.info.name = "moe-test";
  ctx.info.max_seq_len = 64;
  ctx.info.vocab_size = serve_tokenizer().vocab_size();
  ctx.info.head_dim = 16;
  ctx.info.sparq = sparq;
  ctx.tokenizer = &serve_tokenizer();
  return ctx;
}

TEST(SparqApi, FieldsAreValidatedAndPassedThrough) {
  const serve::ParseContext ctx = parse_context(true);
  const auto pr = serve::parse_completion_request(R"({"prompt": "ab", "n": 2, "sparq_r": 8, "sparq_k": 32})", ctx);
  ASSERT_EQ(pr.choices.size(), 2u);
  for (const auto& c : pr.choices) {
    ASSERT_TRUE(c.sparq.has_value());
    EXPECT_EQ(c.sparq->r, 8);
    EXPECT_EQ(c.sparq->k, 32);
  }
  const auto ch = serve::parse_chat_request(
      R"({"messages": [{"role": "user", "content": "hi"}], "sparq_r": 0, "sparq_k": 0})", ctx);
  ASSERT_TRUE(ch.choices.at(0).sparq.has_value());
  EXPECT_EQ(ch.choices[0].sparq->r, 0) << "0 and 0: full attention for this request, whatever the server default";
  EXPECT_FALSE(serve::parse_completion_request(R"({"prompt": "ab"})", ctx).choices[0].sparq.has_value())
      << "neither: the server default";
  const std::vector<std::tuple<std::string, std::string, bool>> bad = {
      {R"("sparq_r": 8)", "sparq_k", true},
      {R"("sparq_k": 8)", "sparq_r", true},
      {R"("sparq_r": 17, "sparq_k": 8)", "sparq_r", true},
      {R"("sparq_r": -1, "sparq_k": 8)", "sparq_r", true},
      {R"("sparq_r": 4, "sparq_k": 65)", "sparq_k", true},
      {R"("sparq_r": 4, "sparq_k": 0)", "sparq_k", true},
      {R"("sparq_r": 0, "sparq_k": 4)", "sparq_r", true},
      {R"("sparq_r": 2.5, "sparq_k": 4)", "sparq_r", true},
      {R"("sparq_r": "4", "sparq_k": 4)", "sparq_r", true},
      {R"("sparq_r": 4, "sparq_k": 4)", "sparq_r", false},  // a server whose backend has no SparQ
  };
  for (const auto& [fields, param, sparq] : bad) {
    for (bool is_chat : {false, true}) {
      const std::string body = is_chat ? R"({"messages": [{"role": "user", "content": "hi"}], )" + fields + "}"
                                       : R"({"prompt": "ab", )" + fields + "}";
      try {
        if (is_chat)
          serve::parse_chat_request(body, parse_context(sparq));
        else
          serve::parse_completion_request(body, parse_context(sparq));
        ADD_FAILURE() << "accepted " << body;
      } catch (const serve::RequestError& e) {
        EXPECT_EQ(e.error().status, 400) << body;
        EXPECT_EQ(e.error().param, param) << body << ": " << e.error().message;
      }
    }
  }
}

}  // namespace
}  // namespace moe::test
