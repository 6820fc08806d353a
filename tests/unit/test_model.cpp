// Model-level tests: the whole decoder's loss, logits and every parameter gradient against the PyTorch twin
// (tests/oracle/model.py), a finite-difference check, and KV-cache decoding against the full forward.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/config.h"
#include "core/kernels/cpu/kernels.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "core/trainer.h"
#include "tests/unit/model_helpers.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

std::string to_json(const proto::ModelConfig& m) {
  std::ostringstream o;
  o << "{\"vocab_size\": " << m.vocab_size() << ", \"d_model\": " << m.d_model() << ", \"n_layers\": "
    << m.n_layers() << ", \"n_heads\": " << m.n_heads() << ", \"n_kv_heads\": " << m.n_kv_heads()
    << ", \"d_ff\": " << m.d_ff() << ", \"activation\": \"" << proto::Activation_Name(m.activation())
    << "\", \"norm\": \"" << proto::NormKind_Name(m.norm()) << "\", \"rope_theta\": " << m.rope_theta()
    << ", \"norm_eps\": " << m.norm_eps() << ", \"tie_embeddings\": " << (m.tie_embeddings() ? "true" : "false")
    << "}";
  return o.str();
}

struct Case {
  const char* name;
  int H, Hkv;
  proto::Activation act;
  proto::NormKind norm;
  bool tied;
};

class ModelVsTorch : public ::testing::TestWithParam<Case> {};

TEST_P(ModelVsTorch, LossLogitsAndAllGradients) {
  const Case& c = GetParam();
  proto::ModelConfig cfg = tiny_config(c.H, c.Hkv, c.act, c.norm, c.tied);
  auto owned = make_model(cfg, 42);
  Model& model = *owned;
  // non-trivial norm weights/biases so their gradients are tested in general position
  Rng rng(7);
  for (Param* p : model.params().all())
    if (p->value.ndim() == 1)
      for (int64_t i = 0; i < p->value.numel(); ++i) p->value.f32()[i] += 0.1f * rng.normal();
  const int B = 2, T = 11, N = B * T;
  std::vector<int32_t> inputs, targets;
  random_tokens(rng, inputs, N, cfg.vocab_size());
  random_tokens(rng, targets, N, cfg.vocab_size());
  targets[3] = -1;  // an ignored position
  model.params().zero_grad();
  const float loss = model.forward(inputs.data(), targets.data(), B, T);
  model.backward();

  TempDir dir;
  std::filesystem::create_directories(dir.file("weights"));
  for (Param* p : model.params().all())
    write_npy(dir.file("weights/" + p->name + ".npy"), p->value.f32(), p->value.shape());
  write_npy(dir.file("inputs.npy"), inputs.data(), {B, T});
  write_npy(dir.file("targets.npy"), targets.data(), {B, T});
  std::ofstream(dir.file("config.json")) << to_json(cfg);
  ASSERT_TRUE(run_oracle("model.py", {"check", dir.path(), dir.file("config.json")}));

  NpyArray ref_loss = read_npy(dir.file("loss.npy"));
  ASSERT_EQ(ref_loss.f.size(), 1u);
  EXPECT_NEAR(loss, ref_loss.f[0], 1e-5 * std::fabs(ref_loss.f[0]));
  NpyArray ref_logits = read_npy(dir.file("logits.npy"));
  EXPECT_LE(max_rel_err(model.logits(), ref_logits.f.data(), int64_t(N) * cfg.vocab_size()), 1e-5);
  for (Param* p : model.params().all()) {
    NpyArray g = read_npy(dir.file("grad_" + p->name + ".npy"));
    ASSERT_EQ(static_cast<int64_t>(g.f.size()), p->grad.numel()) << p->name;
    // gradients pass through every layer: f32 against an f64 reference, relative to the tensor's magnitude
    EXPECT_LE(max_rel_err(p->grad.f32(), g.f.data(), p->grad.numel()), 5e-5) << "gradient of " << p->name;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Variants, ModelVsTorch,
    ::testing::Values(Case{"mha_swiglu_rms", 4, 4, proto::SWIGLU, proto::RMSNORM, false},
                      Case{"gqa_swiglu_rms_tied", 4, 2, proto::SWIGLU, proto::RMSNORM, true},
                      Case{"mqa_gelu_layernorm", 4, 1, proto::GELU, proto::LAYERNORM, false}),
    [](const ::testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// A model of cfg (train.seed 3) with a batch of 2 x 6 random inputs and targets and its gradient of loss() = the
// cross-entropy + the router losses; fd(p, i, eps) = (loss(w_i + eps) - loss(w_i - eps)) / 2 eps in coordinate i
// of p, which is left as it was.
struct GradCheck {
  static constexpr int B = 2, T = 6;
  explicit GradCheck(const proto::ModelConfig& cfg) : model(make_model(cfg, 3)) {
    random_tokens(rng, inputs, B * T, cfg.vocab_size());
    random_tokens(rng, targets, B * T, cfg.vocab_size());
    model->params().zero_grad();
    loss();
    model->backward();
  }
  double loss() { return double(model->forward(inputs.data(), targets.data(), B, T)) + model->extra_loss(); }
  double fd(Param& p, int64_t i, float eps) {
    float& w = p.value.f32()[i];
    const float orig = w;
    w = orig + eps;
    const double lp = loss();
    w = orig - eps;
    const double lm = loss();
    w = orig;
    return (lp - lm) / (2 * eps);
  }
  std::unique_ptr<Model> model;
  Rng rng{11};
  std::vector<int32_t> inputs, targets;
};

// Central finite differences of the loss in a few coordinates of every parameter tensor.
TEST(ModelGradCheck, FiniteDifferences) {
  GradCheck g(tiny_config(4, 2, proto::SWIGLU, proto::RMSNORM, false));
  int checked = 0;
  for (Param* p : g.model->params().all()) {
    for (int k = 0; k < 3; ++k) {
      const int64_t i = static_cast<int64_t>(g.rng.below(p->value.numel()));
      const double fd = g.fd(*p, i, 1e-2f), an = p->grad.f32()[i];
      EXPECT_NEAR(an, fd, 2e-3 + 2e-2 * std::fabs(fd)) << p->name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 20);
}

// An MoE model's router on the backend (MoeFfn: scores, top-k, gates and the logits' gradient as Backend ops, the
// capacity drop on the host): the gradient of CE + the router losses (aux, z) in every coordinate of each layer's
// router weight and in a few of every other tensor against central differences, with slots dropped over capacity,
// for softmax (normalised top-2, and Switch's top-1) and sigmoid (raw top-2) scores. The seeds leave no selection
// within eps of a flip.
TEST(ModelGradCheck, MoeRouterFiniteDifferences) {
  struct Variant {
    proto::RouterScore score;
    int k;
    bool normalize;
  };
  for (const Variant v : {Variant{proto::SOFTMAX, 2, true}, Variant{proto::SOFTMAX, 1, true},
                          Variant{proto::SIGMOID, 2, false}}) {
    SCOPED_TRACE(std::string(v.score == proto::SIGMOID ? "sigmoid" : "softmax") + " top-" + std::to_string(v.k));
    proto::ModelConfig cfg = tiny_config(4, 2, proto::SWIGLU, proto::RMSNORM, false);
    cfg.add_ffn_pattern(proto::FFN_MOE);
    auto* moe = cfg.mutable_moe();
    moe->set_num_experts(4);
    moe->set_top_k(v.k);
    moe->set_d_expert(24);
    moe->set_capacity_factor(1.0f);
    moe->set_score(v.score);
    moe->set_no_normalize_topk(!v.normalize);
    moe->set_aux_loss_coef(0.1f);
    moe->set_z_loss_coef(0.01f);
    GradCheck g(cfg);
    double dropped = 0;
    for (const FfnStats& st : g.model->ffn_stats()) dropped += st.dropped_fraction;
    EXPECT_GT(dropped, 0.0) << "no slot dropped over capacity";
    for (Param* p : g.model->params().all()) {
      const bool router = p->name.find(".router.") != std::string::npos;
      const int64_t n = router ? p->value.numel() : 2;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = router ? j : static_cast<int64_t>(g.rng.below(p->value.numel()));
        const double fd = g.fd(*p, i, 1e-3f), an = p->grad.f32()[i];
        EXPECT_NEAR(an, fd, 1e-3 + 2e-2 * std::fabs(fd)) << p->name << "[" << i << "]";
      }
    }
  }
}

// The inference path (Model::forward_infer over a paged KV cache) reproduces the logits of the full causal
// forward, for MHA, GQA and MQA; and its logits are the same bit for bit whether the sequence is fed in one chunk
// or token by token, with blocks of 4 positions or one contiguous block of max_seq_len (the contiguous cache).
TEST(ModelInfer, PagedCacheMatchesFullForwardAndContiguousCache) {
  for (int Hkv : {4, 2, 1}) {
    proto::ModelConfig cfg = tiny_config(4, Hkv, proto::SWIGLU, proto::RMSNORM, false);
    auto owned = make_model(cfg, 5);
    Model& model = *owned;
    Rng rng(9);
    const int T = 9;
    std::vector<int32_t> toks;
    random_tokens(rng, toks, T, cfg.vocab_size());
    model.forward(toks.data(), nullptr, 1, T, false);
    const std::vector<float> full(model.logits(), model.logits() + int64_t(T) * cfg.vocab_size());
    const std::vector<float> paged = chunked_logits(model, toks, 4, T);
    EXPECT_LE(max_rel_err(paged, full), 1e-5) << "Hkv " << Hkv;
    EXPECT_EQ(chunked_logits(model, toks, cfg.max_seq_len(), T), paged) << "contiguous cache, Hkv " << Hkv;
    EXPECT_EQ(chunked_logits(model, toks, 4, 1), paged) << "token by token, Hkv " << Hkv;
    EXPECT_EQ(chunked_logits(model, toks, 2, 3), paged) << "chunks of 3, Hkv " << Hkv;
    // the cache holds n_kv_heads (not n_heads) per position
    EXPECT_EQ(model.kv_dims(1, 4).slot_floats(), Hkv * (cfg.d_model() / cfg.n_heads()));
  }
}

TEST(ModelErrors, TokenOutsideVocabularyIsRejected) {
  proto::ModelConfig cfg = tiny_config(4, 4, proto::SWIGLU, proto::RMSNORM, false);
  auto owned = make_model(cfg, 0);
  Model& model = *owned;
  std::vector<int32_t> toks = {1, 2, 99};
  try {
    model.forward(toks.data(), nullptr, 1, 3, false);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 99"), std::string::npos) << e.what();
  }
}

// AdamW against its closed form for one step; cosine schedule end points.
TEST(Optimizer, AdamWFirstStepAndSchedule) {
  ParamStore ps;
  Param* p = ps.add("w", {3}, true);
  Param* b = ps.add("b", {3}, false);
  for (int i = 0; i < 3; ++i) {
    p->value.f32()[i] = 1.0f + i;
    p->grad.f32()[i] = 0.5f - i;
    b->value.f32()[i] = 1.0f;
    b->grad.f32()[i] = 0.25f;
  }
  proto::OptimizerConfig oc;
  oc.set_lr(0.1f);
  oc.set_beta1(0.9f);
  oc.set_beta2(0.95f);
  oc.set_eps(1e-8f);
  oc.set_weight_decay(0.5f);
  AdamW opt(ps, oc);
  opt.step(0.1f);
  for (int i = 0; i < 3; ++i) {
    const float g = 0.5f - i, w0 = 1.0f + i;
    // first step: mhat = g, vhat = g^2 -> update = sign(g) (up to eps) + decay * w
    const float expect = w0 - 0.1f * (g / (std::fabs(g) + 1e-8f) + 0.5f * w0);
    EXPECT_NEAR(p->value.f32()[i], expect, 1e-6);
    EXPECT_NEAR(b->value.f32()[i], 1.0f - 0.1f * 1.0f, 1e-6);  // no decay on non-decay params
  }
  oc.set_warmup_steps(10);
  oc.set_min_lr(0.01f);
  EXPECT_NEAR(lr_at(oc, 0, 100), 0.01f, 1e-7);   // warmup 1/10
  EXPECT_NEAR(lr_at(oc, 9, 100), 0.1f, 1e-7);    // end of warmup
  EXPECT_NEAR(lr_at(oc, 10, 100), 0.1f, 1e-6);   // cosine start
  EXPECT_NEAR(lr_at(oc, 100, 100), 0.01f, 1e-6); // cosine end = min_lr
  // clipping
  ParamStore ps2;
  Param* q = ps2.add("q", {2}, true);
  q->grad.f32()[0] = 3;
  q->grad.f32()[1] = 4;
  EXPECT_NEAR(clip_grad_norm(ps2, 1.0), 5.0, 1e-9);
  EXPECT_NEAR(grad_norm(ps2), 1.0, 1e-5);
}

}  // namespace
}  // namespace moe::test

namespace moe::test {
namespace {

// Row-sparse AdamW: touching every row every step equals the dense update; untouched rows stay bit-identical
// and zero_grad clears only touched rows.
TEST(Optimizer, RowSparseAdamW) {
  proto::OptimizerConfig oc;
  oc.set_lr(0.05f);
  oc.set_beta1(0.9f);
  oc.set_beta2(0.95f);
  oc.set_eps(1e-8f);
  oc.set_weight_decay(0.1f);
  ParamStore dense_ps, sparse_ps, lazy_ps;
  Param* d = dense_ps.add("t", {6, 3}, true);
  Param* s = sparse_ps.add_expert("t", {6, 3}, true, Init::kNormal, 0, /*row_sparse=*/true);
  Param* l = lazy_ps.add_expert("t", {6, 3}, true, Init::kNormal, 0, /*row_sparse=*/true);
  Rng rng(4);
  for (int64_t i = 0; i < 18; ++i) d->value.f32()[i] = s->value.f32()[i] = l->value.f32()[i] = rng.normal();
  AdamW od(dense_ps, oc), os(sparse_ps, oc), ol(lazy_ps, oc);
  const std::vector<float> before(l->value.f32(), l->value.f32() + 18);
  for (int step = 0; step < 3; ++step) {
    dense_ps.zero_grad();
    sparse_ps.zero_grad();
    lazy_ps.zero_grad();
    for (int64_t r = 0; r < 6; ++r) {
      s->touch_row(r);
      for (int c = 0; c < 3; ++c) d->grad.f32()[r * 3 + c] = s->grad.f32()[r * 3 + c] = rng.normal();
    }
    // the lazy table only ever uses rows 1 and 4
    for (int64_t r : {1, 4}) {
      l->touch_row(r);
      for (int c = 0; c < 3; ++c) l->grad.f32()[r * 3 + c] = 0.5f;
    }
    od.step(0.05f);
    os.step(0.05f);
    ol.step(0.05f);
  }
  for (int i = 0; i < 18; ++i) EXPECT_NEAR(d->value.f32()[i], s->value.f32()[i], 1e-6) << i;
  for (int64_t r : {0, 2, 3, 5})
    for (int c = 0; c < 3; ++c) {
      EXPECT_EQ(l->value.f32()[r * 3 + c], before[r * 3 + c]);
      EXPECT_EQ(ol.m()[0].f32()[r * 3 + c], 0.0f);
    }
  EXPECT_EQ(ol.row_t()[0].i32()[1], 3);
  EXPECT_EQ(ol.row_t()[0].i32()[0], 0);
  EXPECT_NE(l->value.f32()[3], before[3]);
  lazy_ps.zero_grad();
  EXPECT_TRUE(l->touched.empty());
  for (int i = 0; i < 18; ++i) EXPECT_EQ(l->grad.f32()[i], 0.0f);
}

}  // namespace
}  // namespace moe::test

// The memory estimate counts exactly the parameters build_model allocates (one sized-only block per FFN kind,
// multiplied out), and its activation part covers what the model's workspace holds after a training step.
namespace moe::test {
namespace {
TEST(ModelMemory, EstimateMatchesTheBuiltModel) {
  Config cfg;
  *cfg.mutable_model() = tiny_config(4, 2, proto::SWIGLU, proto::RMSNORM, false);
  auto* m = cfg.mutable_model();
  m->set_n_layers(5);
  m->add_ffn_pattern(proto::FFN_DENSE);
  m->add_ffn_pattern(proto::FFN_MOE);
  m->add_ffn_pattern(proto::FFN_WORD_EXPERT);
  m->mutable_moe()->set_num_experts(4);
  m->mutable_moe()->set_top_k(2);
  m->mutable_moe()->set_d_expert(24);
  m->mutable_word_experts()->set_num_experts(64);
  m->mutable_word_experts()->set_d_expert(8);
  m->mutable_word_experts()->set_num_frequent(16);
  cfg.mutable_data()->set_batch_size(2);
  cfg.mutable_data()->set_seq_len(8);
  cfg.mutable_optimizer()->set_lr(1e-3f);
  cfg.mutable_train()->set_steps(1);
  fill_defaults(cfg);
  validate_config(cfg, false);
  const experts::MemoryEstimate e = experts::estimate_memory(cfg, 1);
  std::vector<int64_t> counts(cfg.model().vocab_size(), 1);
  auto model = experts::build_model(cfg, {.token_counts = &counts});
  EXPECT_EQ(e.params, double(model->params().numel()));
  int64_t rows = 0;
  for (const Param* p : model->params().all()) rows += p->row_sparse ? p->value.dim(0) : 0;
  EXPECT_EQ(e.optimizer_bytes, 8.0 * model->params().numel() + 4.0 * rows);
  Rng rng(1);
  std::vector<int32_t> in, tg;
  random_tokens(rng, in, 16, cfg.model().vocab_size());
  random_tokens(rng, tg, 16, cfg.model().vocab_size());
  model->forward(in.data(), tg.data(), 2, 8);
  model->backward();
  const double ws = double(model->workspace().bytes());
  EXPECT_GE(e.activation_bytes, ws) << "workspace " << ws;
  EXPECT_LE(e.activation_bytes, 3 * ws) << "workspace " << ws;
  // a world of 2 ranks halves the tokens per rank, so the activations
  EXPECT_NEAR(experts::estimate_memory(cfg, 2).activation_bytes, e.activation_bytes / 2, 1e-6 * e.activation_bytes);
}
// Gradient accumulation (train.micro_batch_size): a step over a batch of 8 in micro-batches of 2 (weights 1/4 in
// Model::backward) has the loss and the gradient (its global norm, before the optimizer) of the step over all 8 at
// once, for a dense and a dropless MoE model (without the router losses, which are computed per forward).
TEST(TrainerMicroBatches, AccumulatedStepEqualsTheWholeBatch) {
  for (bool moe : {false, true}) {
    Config cfg;
    *cfg.mutable_model() = tiny_config(4, 2, proto::SWIGLU, proto::RMSNORM, false);
    if (moe) {
      cfg.mutable_model()->add_ffn_pattern(proto::FFN_MOE);
      cfg.mutable_model()->mutable_moe()->set_num_experts(4);
      cfg.mutable_model()->mutable_moe()->set_dropless(true);
    }
    cfg.mutable_data()->set_seq_len(8);
    cfg.mutable_data()->set_batch_size(8);
    cfg.mutable_optimizer()->set_lr(1e-3f);
    cfg.mutable_train()->set_steps(4);
    cfg.mutable_train()->set_seed(3);
    fill_defaults(cfg);
    Corpus corpus;
    Rng rng(5);
    random_tokens(rng, corpus.train, 4000, cfg.model().vocab_size());
    random_tokens(rng, corpus.val, 400, cfg.model().vocab_size());
    std::vector<StepRecord> got;
    for (int micro : {0, 2}) {
      cfg.mutable_train()->set_micro_batch_size(micro);
      auto model = experts::build_model(cfg);
      Trainer t(cfg, *model, corpus);
      got.push_back(t.step(t.loader().next(), 0, {}));
    }
    SCOPED_TRACE(moe ? "MoE" : "dense");
    EXPECT_NEAR(got[1].loss, got[0].loss, 1e-6 * std::fabs(got[0].loss));
    EXPECT_NEAR(got[1].grad_norm, got[0].grad_norm, 1e-5 * got[0].grad_norm);
  }
}


// step(lr, s) is bit for bit clip_grad_norm (scaling the gradients by s in memory) then step(lr), dense and
// row-sparse params alike; frozen params: left out of the norm, not scaled, not updated (no moments, no decay, no
// row step counts) while the others move.
TEST(Optimizer, FoldedClipAndFrozenParams) {
  proto::OptimizerConfig oc;
  oc.set_beta1(0.9f);
  oc.set_beta2(0.95f);
  oc.set_eps(1e-8f);
  oc.set_weight_decay(0.1f);
  struct Store {
    ParamStore ps;
    Param *d, *s, *fd, *fs;  // dense, row-sparse, and a frozen one of each
  };
  Store a, b;
  for (Store* st : {&a, &b}) {
    st->d = st->ps.add("d", {5, 7}, true);
    st->s = st->ps.add_expert("s", {9, 4}, true, Init::kNormal, 0, /*row_sparse=*/true);
    st->fd = st->ps.add("fd", {3, 3}, true);
    st->fs = st->ps.add_expert("fs", {6, 2}, true, Init::kNormal, 0, /*row_sparse=*/true);
    st->fd->frozen = st->fs->frozen = true;
    init_params(st->ps, 8, 0.5f, 0.5f);
  }
  const Tensor fd0 = a.fd->value.clone(), fs0 = a.fs->value.clone(), d0 = a.d->value.clone();
  AdamW oa(a.ps, oc), ob(b.ps, oc);
  Rng rng(12);
  for (int step = 0; step < 4; ++step) {
    a.ps.zero_grad();
    b.ps.zero_grad();
    for (Param* p : a.ps.all()) {  // large gradients (the clip scale is well below 1), the same in b
      if (p->row_sparse)
        for (int64_t r : {0, 2, step + 1}) p->touch_row(r);  // rows 0 and 2 every step
      for (int64_t i = 0; i < p->grad.numel(); ++i)
        p->grad.f32()[i] = p->row_sparse && !p->touched_mask[i / p->row_size()] ? 0.0f : 3.0f * rng.normal();
      Param* q = b.ps.find(p->name);
      q->touched = p->touched;
      q->touched_mask = p->touched_mask;
      std::memcpy(q->grad.f32(), p->grad.f32(), p->grad.nbytes());
    }
    const double live = cpu::sum_squares(a.d->grad.f32(), a.d->grad.numel()) +
                        cpu::sum_squares(a.s->grad.f32(), a.s->grad.numel());
    const Tensor frozen_grad = a.fd->grad.clone();
    const double norm = clip_grad_norm(a.ps, 1.0);
    EXPECT_NEAR(norm, std::sqrt(live), 1e-9 * norm) << "the norm counts the frozen params";
    EXPECT_EQ(std::memcmp(a.fd->grad.f32(), frozen_grad.f32(), frozen_grad.nbytes()), 0) << "frozen grad scaled";
    oa.step(0.01f);
    const double norm_b = grad_norm(b.ps);
    EXPECT_EQ(norm_b, norm);
    ASSERT_LT(clip_scale(norm_b, 1.0), 1.0f);
    ob.step(0.01f, clip_scale(norm_b, 1.0));
  }
  for (size_t i = 0; i < a.ps.all().size(); ++i) {
    const Param *p = a.ps.all()[i], *q = b.ps.all()[i];
    EXPECT_EQ(std::memcmp(p->value.f32(), q->value.f32(), p->value.nbytes()), 0) << p->name << " value";
    EXPECT_EQ(std::memcmp(oa.m()[i].f32(), ob.m()[i].f32(), p->value.nbytes()), 0) << p->name << " m";
    EXPECT_EQ(std::memcmp(oa.v()[i].f32(), ob.v()[i].f32(), p->value.nbytes()), 0) << p->name << " v";
  }
  EXPECT_EQ(std::memcmp(a.fd->value.f32(), fd0.f32(), fd0.nbytes()), 0) << "frozen dense param changed";
  EXPECT_EQ(std::memcmp(a.fs->value.f32(), fs0.f32(), fs0.nbytes()), 0) << "frozen row-sparse param changed";
  EXPECT_EQ(cpu::sum_squares(oa.m()[2].f32(), 9) + cpu::sum_squares(oa.v()[3].f32(), 12), 0.0) << "frozen moments";
  for (int64_t r = 0; r < 6; ++r) EXPECT_EQ(oa.row_t()[3].i32()[r], 0) << "frozen row step count " << r;
  EXPECT_EQ(oa.row_t()[1].i32()[2], 4);
  EXPECT_NE(std::memcmp(a.d->value.f32(), d0.f32(), d0.nbytes()), 0) << "the live dense param did not move";
}

}  // namespace
}  // namespace moe::test
