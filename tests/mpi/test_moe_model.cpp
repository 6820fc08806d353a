// Data x expert parallel training step vs the single-rank result on the same global batch: a decoder with an MoE
// layer (learned top-2 router, dropless) and a MoWE word-expert layer, run at every expert-parallel size that
// divides the world. Loss, every non-expert gradient and every expert shard's gradient must match the 1-rank
// model (which holds all experts) to f32 tolerance. Bias balancing (model.moe.bias_balancing): a few training steps
// at every expert-parallel size leave every rank with the bias of the 1-rank run, bit for bit.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>

#include "core/config.h"
#include "core/data.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "core/trainer.h"
#include "experts/moe_layer.h"
#include "tests/unit/model_helpers.h"
#include "comm/parallel.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

int world_size() {
  int n;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

proto::ModelConfig moe_config(int num_experts, int word_experts, bool dropless) {
  proto::ModelConfig m;
  m.set_vocab_size(41);
  m.set_d_model(16);
  m.set_n_layers(3);
  m.set_n_heads(4);
  m.set_n_kv_heads(2);
  m.set_d_ff(24);
  m.set_max_seq_len(8);
  m.set_rope_theta(10000);
  m.set_norm_eps(1e-5f);
  m.set_init_std(0.1f);
  m.add_ffn_pattern(proto::FFN_MOE);
  m.add_ffn_pattern(proto::FFN_WORD_EXPERT);
  m.add_ffn_pattern(proto::FFN_DENSE);
  auto* e = m.mutable_moe();
  e->set_num_experts(num_experts);
  e->set_top_k(2);
  e->set_d_expert(12);
  e->set_dropless(dropless);
  e->set_capacity_factor(1.0f);
  e->set_z_loss_coef(0.01f);
  auto* w = m.mutable_word_experts();
  w->set_num_experts(word_experts);
  w->set_d_expert(6);
  w->set_num_frequent(5);
  return m;
}

struct StepResult {
  double loss = 0;
  double grad_norm = 0;  // global norm (what clipping uses): must be the same on every rank and layout
  std::map<std::string, std::vector<float>> grads;  // GLOBAL gradients (expert shards placed at their rows)
};

std::vector<int64_t> counts_for(int V) {
  std::vector<int64_t> c(V);
  for (int i = 0; i < V; ++i) c[i] = (i * 7919) % 23;
  return c;
}

void make_batch(int B, int T, int V, std::vector<int32_t>& in, std::vector<int32_t>& tg) {
  Rng rng(99);
  in.resize(size_t(B) * T);
  tg.resize(size_t(B) * T);
  for (auto& x : in) x = static_cast<int32_t>(rng.below(V));
  for (auto& x : tg) x = static_cast<int32_t>(rng.below(V));
}

// One forward/backward on rows [rank*B/W, ...) with the given expert-parallel communicator; returns the loss and
// the reduced gradients, expert shards in their global positions (only this rank's rows filled).
StepResult run_step(const proto::ModelConfig& cfg, comm::Parallel* par, int B, int T) {
  const std::vector<int64_t> counts = counts_for(cfg.vocab_size());
  // the routing vocabulary's corpus (model.word_experts.routing_vocab_size): a fixed stream, word classes by id
  std::vector<int32_t> corpus(4000), classes(cfg.vocab_size());
  for (size_t i = 0; i < corpus.size(); ++i) corpus[i] = static_cast<int32_t>((i * i * 31 + i * 7) % 23);
  for (int v = 0; v < cfg.vocab_size(); ++v) classes[v] = v % 5 == 0 ? 2 : v % 3 == 0 ? 1 : 0;
  auto owned = make_model(cfg, 5,
                          {.ep = par ? par->expert_group() : nullptr,
                           .ep_rows = par ? par->expert_rows_group() : nullptr,
                           .token_counts = &counts,
                           .corpus = &corpus,
                           .word_classes = &classes});
  Model& model = *owned;
  std::vector<int32_t> in, tg;
  make_batch(B, T, cfg.vocab_size(), in, tg);
  const int W = par ? par->size() : 1, r = par ? par->rank() : 0;
  const int Bl = B / W;
  model.params().zero_grad();
  double loss = model.forward(in.data() + size_t(r) * Bl * T, tg.data() + size_t(r) * Bl * T, Bl, T);
  loss += model.extra_loss();
  model.backward();
  StepResult res;
  if (par) {
    par->reduce_grads(model.params());
    loss = par->mean(loss);
  }
  res.loss = loss;
  res.grad_norm = par ? grad_norm(model.params(), [&](double v) { return par->sum_expert_group(v); })
                      : grad_norm(model.params());
  for (Param* p : model.params().all()) {
    std::vector<float> g(p->grad.f32(), p->grad.f32() + p->grad.numel());
    if (p->expert_sharded && par && par->ep_size() > 1) {
      std::vector<float> global(g.size() * par->ep_size(), NAN);
      std::copy(g.begin(), g.end(), global.begin() + int64_t(par->ep_rank()) * g.size());
      g = std::move(global);
    }
    res.grads[p->name] = std::move(g);
  }
  return res;
}

void compare(const StepResult& ref, const StepResult& got, const std::string& what) {
  EXPECT_NEAR(got.loss, ref.loss, 1e-5 * std::fabs(ref.loss)) << what;
  EXPECT_NEAR(got.grad_norm, ref.grad_norm, 1e-5 * ref.grad_norm) << what << ": global gradient norm";
  for (const auto& [name, g] : got.grads) {
    auto it = ref.grads.find(name);
    ASSERT_NE(it, ref.grads.end()) << what << ": " << name;
    ASSERT_EQ(it->second.size(), g.size()) << what << ": " << name;
    double maxdiff = 0, maxref = 1e-8;
    for (size_t i = 0; i < g.size(); ++i) {
      if (std::isnan(g[i])) continue;  // another rank's expert shard
      maxdiff = std::max(maxdiff, std::fabs(double(g[i]) - it->second[i]));
      maxref = std::max(maxref, std::fabs(double(it->second[i])));
    }
    EXPECT_LE(maxdiff / maxref, 2e-5) << what << ": gradient of " << name;
  }
}

// MoWE as the paper has it: word-level routing ids, the 2 most frequent skip the layer, one table shared by both
// word-expert layers (its gradient gathers both layers' rows before the expert-parallel reduction).
TEST(MoeParallel, RoutingVocabularySharedTableStepMatchesSingleRank) {
  const int W = world_size();
  const int B = 8, T = 6;
  proto::ModelConfig cfg = moe_config(/*experts=*/8, /*word_experts=*/64, /*dropless=*/true);
  cfg.set_n_layers(4);
  cfg.add_ffn_pattern(proto::FFN_WORD_EXPERT);  // MOE, WORD, DENSE, WORD
  auto* w = cfg.mutable_word_experts();
  w->set_num_frequent(48);
  w->set_routing_vocab_size(512);
  w->set_routing_exact(400);
  w->set_skip_top(2);
  w->set_share_table(true);
  w->set_placement(proto::WordExpertConfig::PLACEMENT_INTERLEAVED);
  const StepResult ref = run_step(cfg, nullptr, B, T);
  for (int ep = 1; ep <= W; ++ep) {
    if (W % ep) continue;
    comm::Parallel par(comm::Communicator::world(), ep);
    compare(ref, run_step(cfg, &par, B, T), "routing vocabulary, world " + std::to_string(W) + " ep " + std::to_string(ep));
  }
}

TEST(MoeParallel, StepMatchesSingleRank) {
  const int W = world_size();
  const int B = 8, T = 6;  // B divisible by 1, 2 and 4
  // second case: 128 word experts of which only the first ~41 are used, so at ep >= 2 some ranks' experts get no
  // rows at all (they must still take part in every collective and produce zero gradients)
  for (int word_experts : {16, 128}) {
    proto::ModelConfig cfg = moe_config(/*experts=*/8, word_experts, /*dropless=*/true);
    if (word_experts == 128) cfg.mutable_word_experts()->set_num_frequent(41);
    const StepResult ref = run_step(cfg, nullptr, B, T);
    for (int ep = 1; ep <= W; ++ep) {
      if (W % ep) continue;
      comm::Parallel par(comm::Communicator::world(), ep);
      compare(ref, run_step(cfg, &par, B, T),
              "world " + std::to_string(W) + " expert-parallel " + std::to_string(ep) + " word experts " +
                  std::to_string(word_experts));
    }
  }
}

// With tensor groups (what parallel.communicator = "nccl" gives on GPUs; here a second MPI world over the same host
// memory): the dense gradients are packed in the params' memory and reduced there, the token rows go over the tensor
// expert-parallel group. The result is the single rank's.
TEST(MoeParallel, TensorGroupsStepMatchesSingleRank) {
  const int W = world_size();
  const int B = 8, T = 6;
  const proto::ModelConfig cfg = moe_config(/*experts=*/8, /*word_experts=*/16, /*dropless=*/true);
  const StepResult ref = run_step(cfg, nullptr, B, T);
  for (int ep = 1; ep <= W; ++ep) {
    if (W % ep) continue;
    comm::Parallel par(comm::Communicator::world(), ep, comm::Communicator::world());
    ASSERT_TRUE(par.has_tensor_groups());
    EXPECT_EQ(par.expert_rows_group() != nullptr, ep > 1);
    compare(ref, run_step(cfg, &par, B, T), "tensor groups, world " + std::to_string(W) + " ep " + std::to_string(ep));
  }
}

// ---------------------------------------------------------------- bias balancing over the world
struct BiasRun {
  std::vector<float> losses;  // per step (global mean)
  std::vector<float> bias;    // the MoE layer's selection bias after the last step
};

// `steps` Trainer steps on the global batches of a random corpus; with `par` each rank trains on its rows (one
// sequence per micro-batch) with the hooks of `moe train` (gradients, loss and the balancing loads over the world).
BiasRun train_with_bias(const Config& cfg, comm::Parallel* par, int steps) {
  const std::vector<int64_t> counts = counts_for(cfg.model().vocab_size());
  auto model = experts::build_model(cfg, {.ep = par ? par->expert_group() : nullptr, .token_counts = &counts});
  Corpus corpus;
  Rng rng(17);
  for (int i = 0; i < 4000; ++i) corpus.train.push_back(static_cast<int32_t>(rng.below(cfg.model().vocab_size())));
  corpus.val.assign(corpus.train.begin(), corpus.train.begin() + 100);
  Trainer trainer(cfg, *model, corpus);
  TrainHooks h;
  if (par && par->size() > 1) {
    h.shard_rank = par->rank();
    h.shard_count = par->size();
    h.mean_over_ranks = [par](double v) { return par->mean(v); };
    h.reduce_grads = [par](ParamStore& ps) { par->reduce_grads(ps); };
    h.sum_over_expert_group = [par](double v) { return par->sum_expert_group(v); };
    h.sum_over_ranks = [par](std::vector<double>& v) { par->world().all_reduce_sum(v.data(), v.size()); };
  }
  BiasRun r;
  for (int s = 0; s < steps; ++s) r.losses.push_back(trainer.step(trainer.loader().next(), s, h).loss);
  r.bias = dynamic_cast<experts::MoeFfn&>(model->ffn(0)).router().bias();
  return r;
}

TEST(MoeParallel, BiasBalancingMatchesSingleRank) {
  const int W = world_size();
  for (bool dropless : {true, false}) {
    Config cfg;
    *cfg.mutable_model() = moe_config(/*experts=*/8, /*word_experts=*/16, dropless);
    cfg.mutable_model()->mutable_moe()->set_bias_balancing(true);
    cfg.mutable_model()->mutable_moe()->set_bias_update_rate(0.05f);  // large: the bias changes the routing
    cfg.mutable_model()->mutable_moe()->set_z_loss_coef(0.0f);
    cfg.mutable_data()->set_batch_size(8);
    cfg.mutable_data()->set_seq_len(6);
    cfg.mutable_optimizer()->set_lr(0.01f);
    cfg.mutable_train()->set_steps(4);
    cfg.mutable_train()->set_micro_batch_size(1);
    cfg.mutable_train()->set_seed(11);
    cfg.mutable_train()->set_eval_batches(1);
    fill_defaults(cfg);
    // with capacity drops the ranks' capacities differ from the 1-rank run's, so only the first update (made from
    // the pre-drop choices of identical weights) must match; dropless, every step must
    const int steps = dropless ? 4 : 1;
    const BiasRun ref = train_with_bias(cfg, nullptr, steps);
    ASSERT_NE(ref.bias, std::vector<float>(8, 0.0f));
    for (int ep = 1; ep <= W; ++ep) {
      if (W % ep) continue;
      Config c = cfg;
      c.mutable_parallel()->set_expert_parallel(ep);
      comm::Parallel par(comm::Communicator::world(), ep);
      const BiasRun got = train_with_bias(c, &par, steps);
      const std::string what = "world " + std::to_string(W) + " expert-parallel " + std::to_string(ep) +
                               (dropless ? " dropless" : " capacity");
      EXPECT_EQ(got.bias, ref.bias) << what;
      ASSERT_EQ(got.losses.size(), ref.losses.size());
      if (!dropless) continue;  // (the ranks drop other slots than the 1-rank run: other losses)
      for (size_t s = 0; s < ref.losses.size(); ++s) EXPECT_NEAR(got.losses[s], ref.losses[s], 1e-5) << what;
    }
  }
}

}  // namespace
}  // namespace moe::test
