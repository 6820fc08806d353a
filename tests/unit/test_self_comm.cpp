// comm::SelfCommunicator (one process, no MPI) and comm::Parallel on it; checkpoints/naming.h.
#include <gtest/gtest.h>

#include <vector>

#include "checkpoints/naming.h"
#include "comm/parallel.h"
#include "comm/self_comm.h"
#include "core/error.h"

namespace moe::test {
namespace {

TEST(SelfCommunicator, CollectivesAreIdentitiesOrCopies) {
  comm::SelfCommunicator c;
  EXPECT_STREQ(c.name(), "self");
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.size(), 1);
  std::vector<float> f{1.5f, -2};
  c.all_reduce_sum(f.data(), f.size());
  EXPECT_EQ(f, (std::vector<float>{1.5f, -2}));
  double d = 3.25;
  c.all_reduce_sum(&d, 1);
  EXPECT_EQ(d, 3.25);
  const int64_t send = 42;
  int64_t recv = 0;
  c.all_gather(&send, &recv, sizeof send);
  EXPECT_EQ(recv, 42);
  int b = 7;
  c.broadcast(&b, sizeof b, 0);
  EXPECT_EQ(b, 7);
  EXPECT_THROW(c.broadcast(&b, sizeof b, 1), Error);
  const int64_t sc = 3;
  int64_t rc = -1;
  c.all_to_all_counts(&sc, &rc);
  EXPECT_EQ(rc, 3);
  std::vector<float> rows{1, 2, 3, 4, 5, 6}, out(6, 0);
  c.all_to_all_v(rows.data(), &sc, out.data(), &rc, 2);
  EXPECT_EQ(out, rows);
  const int64_t wrong = 2;
  EXPECT_THROW(c.all_to_all_v(rows.data(), &sc, out.data(), &wrong, 2), Error);
  c.barrier();
  c.barrier_with_deadline(1);
}

TEST(SelfCommunicator, SplitGivesSelfOrNothing) {
  comm::SelfCommunicator c;
  c.set_deadline(12);
  auto child = c.split(5, 0);
  ASSERT_TRUE(child);
  EXPECT_EQ(child->size(), 1);
  EXPECT_EQ(child->rank(), 0);
  EXPECT_EQ(child->deadline(), 12);
  EXPECT_EQ(c.split(-1, 0), nullptr);
}

TEST(SelfCommunicator, AbortExitsTheProcess) {
  EXPECT_EXIT(comm::SelfCommunicator().abort(3), testing::ExitedWithCode(3), "");
}

// comm::Parallel on one process: every reduction is the identity, gather_experts returns the local shard.
TEST(SelfCommunicator, ParallelRunsWithoutMpi) {
  comm::Parallel par(std::make_unique<comm::SelfCommunicator>(), 1);
  EXPECT_EQ(par.size(), 1);
  EXPECT_EQ(par.ep_size(), 1);
  EXPECT_EQ(par.dp_size(), 1);
  EXPECT_EQ(par.mean(2.5), 2.5);
  EXPECT_EQ(par.sum_expert_group(4), 4);
  EXPECT_TRUE(par.any(true));
  EXPECT_FALSE(par.any(false));
  EXPECT_EQ(par.expert_group(), nullptr);
  Tensor t = Tensor::from_vector(std::vector<float>{1, 2, 3, 4}, {2, 2});
  EXPECT_EQ(par.gather_experts(t).raw(), t.raw());
  EXPECT_THROW(comm::Parallel(std::make_unique<comm::SelfCommunicator>(), 2), Error);
}

TEST(CheckpointNaming, MakeAndParse) {
  EXPECT_EQ(ckpt::param_key("layers.0.attn.wq"), "params/layers.0.attn.wq");
  EXPECT_EQ(ckpt::optim_m_key("a.b"), "optim/m/a.b");
  EXPECT_EQ(ckpt::optim_v_key("a.b"), "optim/v/a.b");
  EXPECT_EQ(ckpt::optim_row_t_key("a.b"), "optim/row_t/a.b");
  EXPECT_EQ(ckpt::routing_key("layers.1.ffn"), "routing/layers.1.ffn");
  for (ckpt::TensorKind k : {ckpt::TensorKind::kParam, ckpt::TensorKind::kOptimM, ckpt::TensorKind::kOptimV,
                             ckpt::TensorKind::kOptimRowT, ckpt::TensorKind::kRouting}) {
    const ckpt::ParsedKey p = ckpt::parse_key(ckpt::key_of(k, "layers.3.ffn.experts.w_up"));
    EXPECT_EQ(p.kind, k);
    EXPECT_EQ(p.name, "layers.3.ffn.experts.w_up");
  }
  const ckpt::ParsedKey m = ckpt::parse_key("optim/m/tok_emb.weight");
  EXPECT_TRUE(m.is_optim());
  EXPECT_FALSE(m.is_param());
  EXPECT_EQ(m.param(), "tok_emb.weight");
  EXPECT_TRUE(ckpt::is_param_key("params/x"));
  EXPECT_TRUE(ckpt::is_routing_key("routing/layers.0.ffn"));
  EXPECT_EQ(ckpt::parse_key("routing/layers.0.ffn").param(), "");
  for (const char* odd : {"params/", "optim/x/y", "model", "optim/m"}) {
    EXPECT_EQ(ckpt::parse_key(odd).kind, ckpt::TensorKind::kUnknown) << odd;
    EXPECT_EQ(ckpt::parse_key(odd).name, odd);
  }
  EXPECT_EQ(ckpt::key_of(ckpt::TensorKind::kUnknown, "raw"), "raw");
}

}  // namespace
}  // namespace moe::test
