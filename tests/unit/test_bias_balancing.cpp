// Auxiliary-loss-free load balancing (model.moe.bias_balancing) in the MoE layer and the trainer:
//   LoadsOfTheStepMoveTheBias    the loads are the pre-drop choices of every training forward of the step
//                                (micro-batches, not evaluation), the world sum feeds the update, the next step
//                                starts counting afresh; the trainer calls the update after every optimizer step
//   CheckpointRoundTrip          the bias goes into a checkpoint (expert_bias/<layer>) and comes back bit for bit,
//                                through `moe ckpt verify`, reshard and a safetensors export/import
//   TrainingGetsMoreBalanced     a small deterministic training on a skewed corpus: with the bias (and no aux
//                                loss) the routed loads of the second half are more balanced than without
// (The update rule itself and the selection / gates / backward are in test_router.cpp RouterBias and the torch
// oracle cases bias_*; N ranks == 1 rank in tests/mpi/test_moe_model.cpp.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "checkpoints/convert.h"
#include "checkpoints/hf.h"
#include "checkpoints/naming.h"
#include "core/config.h"
#include "core/data.h"
#include "core/model.h"
#include "core/trainer.h"
#include "experts/build_model.h"
#include "experts/moe_layer.h"
#include "launcher/ckpt_tool.h"
#include "launcher/run_state.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

// One MoE layer of 8 experts (top-2) over a small vocabulary; capacity 1.0, so some slots are dropped. init_std 0.2:
// the router's scores differ between tokens by more than a few bias steps (at 0.02 every token of this tiny model
// scores the experts alike, so the whole batch would follow the bias from expert to expert).
Config bias_config(bool bias, float aux, float rate = 0.01f) {
  Config c;
  auto* m = c.mutable_model();
  m->set_vocab_size(48);
  m->set_d_model(16);
  m->set_n_layers(2);
  m->set_n_heads(2);
  m->set_n_kv_heads(1);
  m->set_d_ff(24);
  m->set_max_seq_len(16);
  m->set_init_std(0.2f);
  m->add_ffn_pattern(proto::FFN_MOE);
  m->add_ffn_pattern(proto::FFN_DENSE);
  auto* e = m->mutable_moe();
  e->set_num_experts(8);
  e->set_top_k(2);
  e->set_d_expert(16);
  e->set_capacity_factor(1.0f);
  e->set_aux_loss_coef(aux);
  e->set_bias_balancing(bias);
  e->set_bias_update_rate(rate);
  c.mutable_data()->set_seq_len(16);
  c.mutable_data()->set_batch_size(8);
  c.mutable_optimizer()->set_lr(0.01f);
  c.mutable_train()->set_steps(60);
  c.mutable_train()->set_seed(3);
  c.mutable_train()->set_eval_batches(1);
  fill_defaults(c);
  validate_config(c, false);
  return c;
}

// A corpus with a skewed (Zipf-like, p(t) ~ 1 / (t + 1)) token distribution: frequent tokens pull the router
// towards their experts.
Corpus skewed_corpus(int V, uint64_t seed) {
  Rng rng(seed);
  std::vector<double> cdf(V);
  double total = 0;
  for (int t = 0; t < V; ++t) cdf[t] = (total += 1.0 / (t + 1));
  auto draw = [&] {
    const double u = rng.uniform() * total;
    return static_cast<int32_t>(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
  };
  Corpus c;
  for (int i = 0; i < 20000; ++i) c.train.push_back(std::min(draw(), V - 1));
  for (int i = 0; i < 400; ++i) c.val.push_back(std::min(draw(), V - 1));
  return c;
}

experts::MoeFfn& moe_layer(Model& m) { return dynamic_cast<experts::MoeFfn&>(m.ffn(0)); }

std::vector<int64_t> choice_counts(const experts::MoeFfn& f, int E) {
  std::vector<int64_t> n(E, 0);
  for (int32_t e : f.router().topk_experts()) ++n[e];
  return n;
}

TEST(BiasBalancing, LoadsOfTheStepMoveTheBias) {
  const Config cfg = bias_config(true, 0.0f, 0.25f);
  auto model = experts::build_model(cfg);
  experts::MoeFfn& f = moe_layer(*model);
  const int E = 8, B = 4, T = 16;
  const Corpus corpus = skewed_corpus(48, 1);
  BatchLoader loader(&corpus.train, B, T, 5);
  // two training micro-batches and one evaluation forward (not counted)
  std::vector<int64_t> want(E, 0);
  for (int mb = 0; mb < 2; ++mb) {
    const Batch b = loader.next();
    model->forward(b.inputs.data(), b.targets.data(), B, T, /*training=*/true);
    EXPECT_GT(f.stats().dropped_fraction, 0.0) << "capacity 1.0 should drop some slots";
    const std::vector<int64_t> n = choice_counts(f, E);
    for (int e = 0; e < E; ++e) want[e] += n[e];
  }
  const Batch ev = loader.next();
  model->forward(ev.inputs.data(), ev.targets.data(), B, T, /*training=*/false);
  const FfnStats st = f.stats();
  EXPECT_EQ(st.expert_routed, want);
  int64_t slots = 0;
  for (int64_t x : st.expert_routed) slots += x;
  EXPECT_EQ(slots, 2 * B * T * 2) << "every slot of both micro-batches, before capacity drops";
  EXPECT_EQ(st.expert_bias, std::vector<float>(E, 0.0f));
  // the update sees the world's loads: here another "rank" adds 3 slots to expert 0 and expert 5
  std::vector<double> seen;
  model->after_optimizer_step([&](std::vector<double>& v) {
    v[0] += 3;
    v[5] += 3;
    seen = v;
  });
  ASSERT_EQ(seen.size(), size_t(E));
  double mean = 0;
  for (double x : seen) mean += x / E;
  const std::vector<float>& bias = f.router().bias();
  for (int e = 0; e < E; ++e) {
    const float want_b = seen[e] < mean ? 0.25f : seen[e] > mean ? -0.25f : 0.0f;
    EXPECT_EQ(bias[e], want_b) << "expert " << e << " load " << seen[e] << " mean " << mean;
  }
  EXPECT_EQ(f.stats().expert_bias, bias);
  EXPECT_EQ(f.stats().expert_routed, want) << "the closed step's loads stay visible until the next step";
  // the next training forward starts a new step
  const Batch b = loader.next();
  model->forward(b.inputs.data(), b.targets.data(), B, T, true);
  EXPECT_EQ(f.stats().expert_routed, choice_counts(f, E));

  // the trainer: after Trainer::step (two micro-batches) the bias moved by the step's loads from both
  Config tc = bias_config(true, 0.0f, 0.25f);
  tc.mutable_train()->set_micro_batch_size(4);
  auto m2 = experts::build_model(tc);
  Trainer trainer(tc, *m2, corpus);
  trainer.step(trainer.loader().next(), 0, {});
  const FfnStats s2 = moe_layer(*m2).stats();
  int64_t total = 0;
  for (int64_t x : s2.expert_routed) total += x;
  EXPECT_EQ(total, int64_t(8) * T * 2);
  for (int e = 0; e < E; ++e) {
    const double mu = double(total) / E, l = double(s2.expert_routed[e]);
    EXPECT_EQ(s2.expert_bias[e], l < mu ? 0.25f : l > mu ? -0.25f : 0.0f) << e;
  }
  // without bias balancing nothing is kept or updated, and the world sum is never called
  Config plain = bias_config(false, 0.01f);
  auto m3 = experts::build_model(plain);
  m3->forward(b.inputs.data(), b.targets.data(), B, T, true);
  m3->after_optimizer_step([](std::vector<double>&) { ADD_FAILURE() << "no collective without bias balancing"; });
  EXPECT_TRUE(moe_layer(*m3).stats().expert_bias.empty());
  EXPECT_EQ(moe_layer(*m3).stats().expert_routed.size(), size_t(E));
}

// Runs `moe ckpt <args...>` in-process.
int ckpt_cli(std::vector<std::string> args) {
  args.insert(args.begin(), "ckpt");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return launcher::ckpt_tool_main(static_cast<int>(argv.size()), argv.data());
}

std::vector<float> stored_bias(const std::string& path, const std::string& layer) {
  const std::string dir = ckpt::resolve(path);
  const proto::Manifest m = ckpt::read_manifest(dir);
  ckpt::Reader reader(dir, m);
  const launcher::RunState rs = launcher::RunState::read(reader, m);
  auto it = rs.units.biases.find(layer);
  return it == rs.units.biases.end() ? std::vector<float>{} : it->second;
}

TEST(BiasBalancing, CheckpointRoundTrip) {
  TempDir dir;
  const Config cfg = bias_config(true, 0.0f, 0.01f);
  const Corpus corpus = skewed_corpus(48, 2);
  auto model = experts::build_model(cfg);
  Trainer trainer(cfg, *model, corpus);
  for (int s = 0; s < 5; ++s) trainer.step(trainer.loader().next(), s, {});
  const std::vector<float> bias = moe_layer(*model).router().bias();
  ASSERT_NE(bias, std::vector<float>(8, 0.0f));
  const launcher::RunState rs = launcher::RunState::capture(5, *model, trainer.optimizer(), trainer.loader());
  ASSERT_EQ(rs.units.biases.count("layers.0.ffn"), 1u);
  ckpt::SaveRequest req;
  req.config = &cfg;
  req.step = 5;
  req.tensors = launcher::collect_state(model->params(), &trainer.optimizer());
  for (auto& t : rs.tensors()) req.tensors.push_back({t.name, t.tensor, t.sharded});
  req.optimizer_t = trainer.optimizer().t();
  const std::string saved = ckpt::save(dir.file("a"), req);
  const proto::Manifest m = ckpt::read_manifest(saved);
  bool listed = false;
  for (const auto& e : m.tensors()) listed |= e.name() == ckpt::expert_bias_key("layers.0.ffn") && e.dtype() == "f32";
  EXPECT_TRUE(listed) << "manifest entry expert_bias/layers.0.ffn (f32)";
  EXPECT_EQ(stored_bias(saved, "layers.0.ffn"), bias);

  // restored into a fresh model (what --resume and load_for_inference do), bit for bit; the dense layer has none
  ckpt::Reader reader(saved, m);
  const launcher::RunState back = launcher::RunState::read(reader, m);
  auto restored = experts::build_model(cfg, {.state = &back.units, .init = false});
  EXPECT_EQ(0, std::memcmp(moe_layer(*restored).router().bias().data(), bias.data(), bias.size() * sizeof(float)));
  // a config without bias balancing ignores a stored bias
  auto off = experts::build_model(bias_config(false, 0.01f), {.state = &back.units, .init = false});
  EXPECT_EQ(moe_layer(*off).router().bias(), std::vector<float>(8, 0.0f));
  // a stored bias of the wrong size is refused naming the layer
  UnitState bad = back.units;
  bad.biases["layers.0.ffn"].push_back(0.0f);
  EXPECT_NE(error_of([&] { experts::build_model(cfg, {.state = &bad, .init = false}); }).find("layers.0.ffn"),
            std::string::npos);

  // the ckpt tools keep it: verify, reshard, bf16 convert, safetensors export + import
  EXPECT_EQ(ckpt_cli({"verify", saved}), 0);
  ASSERT_EQ(ckpt_cli({"reshard", saved, "--ep", "2", "--out", dir.file("r")}), 0);
  EXPECT_EQ(stored_bias(dir.file("r"), "layers.0.ffn"), bias);
  ASSERT_EQ(ckpt_cli({"convert", saved, "--dtype", "bf16", "--out", dir.file("bf")}), 0);
  EXPECT_EQ(stored_bias(dir.file("bf"), "layers.0.ffn"), bias) << "the bias is state: not cast";
  ASSERT_EQ(ckpt_cli({"convert", saved, "--to-safetensors", dir.file("m.safetensors")}), 0);
  ASSERT_EQ(ckpt_cli({"convert", "--from-safetensors", dir.file("m.safetensors"), "--out", dir.file("st")}), 0);
  EXPECT_EQ(stored_bias(dir.file("st"), "layers.0.ffn"), bias);
  EXPECT_EQ(ckpt_cli({"verify", dir.file("st")}), 0);
  // transformers' mixtral has no selection bias: the export is refused naming the field
  Config all_moe = cfg;
  all_moe.mutable_model()->clear_ffn_pattern();
  all_moe.mutable_model()->add_ffn_pattern(proto::FFN_MOE);
  ckpt::CheckpointValue v = ckpt::load_all(saved);
  *v.manifest.mutable_config() = all_moe;
  v.has_tokenizer = true;
  EXPECT_NE(error_of([&] { ckpt::to_hf(v); }).find("model.moe.bias_balancing"), std::string::npos);
}

// What a training run shows over its second half (layer 0, the MoE layer).
struct BalanceRun {
  double overload = 0;  // mean max_overload of the second half
  double dropped = 0;   // mean dropped fraction of the second half
  float last_loss = 0;
};

BalanceRun train_for_balance(bool bias, float aux) {
  const Config cfg = bias_config(bias, aux, 0.01f);
  const Corpus corpus = skewed_corpus(48, 4);
  auto model = experts::build_model(cfg);
  Trainer trainer(cfg, *model, corpus);
  const int steps = cfg.train().steps();
  BalanceRun r;
  for (int s = 0; s < steps; ++s) {
    r.last_loss = trainer.step(trainer.loader().next(), s, {}).loss;
    if (s < steps / 2) continue;
    const FfnStats st = moe_layer(*model).stats();
    r.overload += max_overload(st.expert_routed) / (steps - steps / 2);
    r.dropped += st.dropped_fraction / (steps - steps / 2);
  }
  return r;
}

TEST(BiasBalancing, TrainingGetsMoreBalanced) {
  const BalanceRun none = train_for_balance(false, 0.0f), biased = train_for_balance(true, 0.0f);
  std::printf("second half: max overload %.3f -> %.3f with the bias, dropped %.3f -> %.3f, loss %.3f / %.3f\n",
              none.overload, biased.overload, none.dropped, biased.dropped, none.last_loss, biased.last_loss);
  EXPECT_GT(none.overload, 2.5) << "the skewed corpus should unbalance an unregularised router";
  EXPECT_LT(biased.overload, 0.6 * none.overload);
  EXPECT_LT(biased.dropped, 0.5 * none.dropped);
  EXPECT_TRUE(std::isfinite(biased.last_loss));
}

}  // namespace
}  // namespace moe::test
