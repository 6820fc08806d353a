// The serving engine over every rank of the world (attention data parallel, experts sharded over the ranks):
// 16 concurrent greedy requests give, token for token, what a one-rank engine holding every expert gives each of
// them alone, for a model with a learned MoE layer and a hash-routed word-expert layer; the engine spreads the
// sequences over the ranks and every rank's routers report their expert loads to rank 0.
#include <gtest/gtest.h>
#include <mpi.h>

#include <numeric>

#include "comm/parallel.h"
#include "tests/unit/serve_helpers.h"

namespace moe::test {
namespace {

const std::vector<std::string>& kPrompts = serve_prompts();

proto::ModelConfig moe_and_word_experts() {
  proto::ModelConfig m = serve_model_config(true);
  m.clear_ffn_pattern();
  m.add_ffn_pattern(proto::FFN_MOE);
  m.add_ffn_pattern(proto::FFN_WORD_EXPERT);
  m.mutable_word_experts()->set_num_experts(8);
  m.mutable_word_experts()->set_d_expert(16);
  m.mutable_word_experts()->set_hash_routing(true);
  fill_defaults(m.mutable_word_experts());
  return m;
}

serve::ModelInfo info_of(const Model& m) {
  return serve::ModelInfo{"test", m.config().max_seq_len(), m.config().vocab_size(), 0, -1};
}

TEST(ServeEngineMpi, ShardedExpertsGiveTheOneRankTokens) {
  auto world = comm::Communicator::world();
  world->set_deadline(120);
  comm::Parallel par(world->split(0, world->rank()), world->size());
  const bool lead = par.rank() == 0;
  const proto::ModelConfig mc = moe_and_word_experts();
  auto model = make_model(mc, 21, {.ep = par.expert_group(), .inference = true});
  serve::Engine engine(serve::EngineOptions{serve_config(24, 4, 40)}, par.world());
  engine.attach(*model, lead ? &serve_tokenizer() : nullptr, info_of(*model));
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  if (lead) {
    for (const std::string& p : kPrompts) {
      sinks.push_back(std::make_shared<RecordingSink>());
      serve::GenerationRequest r = greedy_request(p, 16);
      r.logprobs = 2;
      ASSERT_EQ(engine.submit(r, sinks.back()), serve::SubmitStatus::kAccepted);
    }
    engine.shutdown();  // drain: the submitted requests finish, then every rank leaves run()
  }
  engine.run();
  if (!lead) return;
  const serve::EngineStats st = engine.stats();
  EXPECT_EQ(st.kv_blocks_used, 0);
  EXPECT_EQ(st.kv_blocks_total, 24 * par.size());
  ASSERT_EQ(st.expert_tokens.size(), 1u);  // the learned MoE layer (word-expert tables report no loads)
  EXPECT_GT(std::accumulate(st.expert_tokens[0].begin(), st.expert_tokens[0].end(), int64_t(0)), 0);
  // the reference: one rank holding every expert (the same weights: experts are drawn by global id)
  auto whole = make_model(mc, 21, {.inference = true});
  OneRankEngine one(*whole, serve_config(64, 16));
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    serve::GenerationRequest r = greedy_request(kPrompts[i], 16);
    r.logprobs = 2;
    const serve::Completion c = serve::generate(one.engine, r);
    EXPECT_TRUE(sinks[i]->finished);
    EXPECT_EQ(sinks[i]->ids(), c.tokens) << "world " << par.size() << ", prompt '" << kPrompts[i] << "'";
    EXPECT_EQ(sinks[i]->text(), c.text);
    ASSERT_EQ(sinks[i]->tokens.size(), c.logprobs.size());
    for (size_t t = 0; t < c.logprobs.size(); ++t) EXPECT_EQ(sinks[i]->tokens[t].logprob, c.logprobs[t]);
  }
}

}  // namespace
}  // namespace moe::test
