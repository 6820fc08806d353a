// Dense, MoE and word-expert models on CUDA (model.device = DEVICE_CUDA: parameters, gradients, activations and AdamW moments in
// device memory) against the same model on the CPU: the same initial weights bit for bit (drawn on the host,
// copied), then three training steps (forward, backward, the gradient norm, AdamW) with losses within 1e-4 and
// every gradient and weight within 1e-3 relative error (fp32 on both, different summation orders; errors grow
// with the steps), and a checkpoint saved from a device model (host copies) read back into another one bit for bit.
// Compiled only into CUDA builds; without a usable GPU every test skips with "no CUDA device".
#ifdef MOE_HAVE_CUDA

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "core/config.h"
#include "core/optimizer.h"
#include "launcher/run_state.h"
#include "tests/unit/model_helpers.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

std::vector<float> host_floats(const Tensor& t) {
  std::vector<float> out(t.numel());
  device_copy(out.data(), Device::kCPU, t.raw(), t.device(), t.nbytes());
  return out;
}

proto::OptimizerConfig adamw_config() {
  proto::OptimizerConfig oc;
  oc.set_lr(3e-3f);
  oc.set_weight_decay(0.1f);
  oc.set_beta1(0.9f);
  oc.set_beta2(0.95f);
  oc.set_eps(1e-8f);
  oc.set_grad_clip(1.0f);
  return oc;
}

// max relative error over every parameter's value (or gradient) of two models of one config
double params_err(Model& a, Model& b, bool grads) {
  double worst = 0;
  for (size_t i = 0; i < a.params().all().size(); ++i) {
    const Param &pa = *a.params().all()[i], &pb = *b.params().all()[i];
    worst = std::max(worst, max_rel_err(host_floats(grads ? pa.grad : pa.value), host_floats(grads ? pb.grad : pb.value)));
  }
  return worst;
}

class CudaModel : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device (cuda_available() is false)";
  }
};

// Three training steps of `m` on the CPU and on CUDA (model.matmul_precision as in m) from the same initial
// weights: losses (with the router losses) and gradient norms within loss_tol, gradients and weights within
// param_tol (fp32: 1e-4 and 1e-3).
void expect_steps_match(proto::ModelConfig m, const std::string& what, double loss_tol = 1e-4,
                        double param_tol = 1e-3, const experts::ModelInputs& in = {}) {
  const proto::MatmulPrecision precision = m.matmul_precision();
  m.set_matmul_precision(proto::MATMUL_FP32);  // the CPU reference
  auto cpu = make_model(m, 11, in);
  m.set_device(proto::DEVICE_CUDA);
  m.set_matmul_precision(precision);
  auto gpu = make_model(m, 11, in);
  ASSERT_EQ(gpu->params().device(), Device::kCUDA);
  EXPECT_EQ(params_err(*cpu, *gpu, false), 0.0) << "initial weights differ";
  AdamW oc(cpu->params(), adamw_config()), og(gpu->params(), adamw_config());
  Rng rng(5);
  const int B = 3, T = 16;
  for (int step = 0; step < 3; ++step) {
    std::vector<int32_t> in, tg;
    random_tokens(rng, in, B * T, m.vocab_size());
    random_tokens(rng, tg, B * T, m.vocab_size());
    double norms[2];
    float losses[2];
    Model* models[2] = {cpu.get(), gpu.get()};
    AdamW* opts[2] = {&oc, &og};
    for (int k = 0; k < 2; ++k) {
      models[k]->params().zero_grad();
      losses[k] = models[k]->forward(in.data(), tg.data(), B, T, true);
      models[k]->backward(1.0f);
      norms[k] = grad_norm(models[k]->params());
    }
    EXPECT_NEAR(losses[1], losses[0], loss_tol * std::abs(losses[0])) << what << ", step " << step;
    EXPECT_NEAR(norms[1], norms[0], loss_tol * norms[0]) << what << ", step " << step;
    EXPECT_LE(params_err(*cpu, *gpu, true), param_tol) << what << ": gradients, step " << step;
    for (int k = 0; k < 2; ++k) opts[k]->step(3e-3f, clip_scale(norms[k], 1.0f));
    EXPECT_LE(params_err(*cpu, *gpu, false), param_tol) << what << ": weights after step " << step;
  }
}

TEST_F(CudaModel, TrainingStepsMatchTheCpu) {
  for (bool tied : {true, false})
    expect_steps_match(tiny_config(4, 2, proto::SWIGLU, proto::RMSNORM, tied), tied ? "tied" : "untied");
}

// MoE layers on the device: the router (GEMMs, scores, top-k, gates, the logits' gradient with the aux and z
// losses), the token gathers and combines, the expert bank's GEMMs and the expert gradients on CUDA; the capacity
// drop and the plan on the host from the device's choices. Top-2 of 4 experts with drops (capacity factor 1.0),
// Switch top-1 with jitter, and sigmoid scores with bias balancing's selection bias.
TEST_F(CudaModel, MoeTrainingStepsMatchTheCpu) {
  proto::ModelConfig m = tiny_config(4, 2, proto::SWIGLU, proto::RMSNORM, false);
  m.add_ffn_pattern(proto::FFN_MOE);
  m.add_ffn_pattern(proto::FFN_DENSE);
  m.mutable_moe()->set_num_experts(4);
  m.mutable_moe()->set_top_k(2);
  m.mutable_moe()->set_d_expert(24);
  m.mutable_moe()->set_capacity_factor(1.0f);
  m.mutable_moe()->set_aux_loss_coef(0.01f);
  m.mutable_moe()->set_z_loss_coef(1e-3f);
  expect_steps_match(m, "top-2 with capacity drops");
  m.set_activation(proto::GELU);
  m.mutable_moe()->set_top_k(1);
  m.mutable_moe()->set_jitter_eps(0.05f);
  expect_steps_match(m, "top-1 GELU experts with jitter");
  m.mutable_moe()->set_top_k(2);
  m.mutable_moe()->set_jitter_eps(0.0f);
  m.mutable_moe()->set_score(proto::SIGMOID);
  m.mutable_moe()->set_bias_balancing(true);
  m.mutable_moe()->set_bias_update_rate(1e-3f);
  expect_steps_match(m, "top-2 sigmoid with a selection bias");
}

// Training on CUDA is deterministic: the same three steps twice (MoE and word-expert layers, repeated token ids in
// the embedding's gradient) give the same losses and weights bit for bit.
TEST_F(CudaModel, TrainingIsBitwiseDeterministic) {
  proto::ModelConfig m = tiny_config(4, 2, proto::SWIGLU, proto::RMSNORM, false);
  m.add_ffn_pattern(proto::FFN_MOE);
  m.add_ffn_pattern(proto::FFN_WORD_EXPERT);
  m.mutable_moe()->set_num_experts(4);
  m.mutable_moe()->set_top_k(2);
  m.mutable_moe()->set_d_expert(24);
  m.mutable_moe()->set_aux_loss_coef(0.01f);
  m.mutable_word_experts()->set_num_experts(16);
  m.mutable_word_experts()->set_d_expert(8);
  m.mutable_word_experts()->set_hash_routing(true);
  m.set_device(proto::DEVICE_CUDA);
  std::vector<std::vector<float>> losses(2), weights(2);
  for (int run = 0; run < 2; ++run) {
    auto model = make_model(m, 11);
    AdamW opt(model->params(), adamw_config());
    Rng rng(5);
    for (int step = 0; step < 3; ++step) {
      std::vector<int32_t> in, tg;
      random_tokens(rng, in, 48, 8);  // 8 distinct ids: each repeated
      random_tokens(rng, tg, 48, m.vocab_size());
      model->params().zero_grad();
      losses[run].push_back(model->forward(in.data(), tg.data(), 3, 16, true));
      model->backward(1.0f);
      opt.step(3e-3f, clip_scale(grad_norm(model->params()), 1.0f));
    }
    for (const Param* p : model->params().all()) {
      const std::vector<float> v = host_floats(p->value);
      weights[run].insert(weights[run].end(), v.begin(), v.end());
    }
  }
  EXPECT_EQ(losses[0], losses[1]);
  ASSERT_EQ(weights[0].size(), weights[1].size());
  EXPECT_EQ(0, std::memcmp(weights[0].data(), weights[1].data(), sizeof(float) * weights[0].size()));
}

// Word-expert layers on the device: the tables' rows gathered and updated there (row-sparse gradients: zeroing, the
// norm, clipping and lazy AdamW over the touched rows), the routing by token id on the host. Vocabulary routing
// (12 own experts of 64, the rest shared) with SwiGLU, then hash routing with GELU and one table for both layers.
TEST_F(CudaModel, WordExpertTrainingStepsMatchTheCpu) {
  proto::ModelConfig m = tiny_config(4, 2, proto::SWIGLU, proto::RMSNORM, false);
  m.add_ffn_pattern(proto::FFN_WORD_EXPERT);
  m.mutable_word_experts()->set_num_experts(64);
  m.mutable_word_experts()->set_d_expert(8);
  m.mutable_word_experts()->set_num_frequent(12);
  std::vector<int64_t> counts(m.vocab_size());
  for (int v = 0; v < m.vocab_size(); ++v) counts[v] = (v * 7919) % 23;
  expect_steps_match(m, "word experts, vocabulary routing", 1e-4, 1e-3, {.token_counts = &counts});
  m.set_activation(proto::GELU);
  m.mutable_word_experts()->set_hash_routing(true);
  m.mutable_word_experts()->set_share_table(true);
  expect_steps_match(m, "word experts, hash routing, shared table");
}

// bf16 GEMMs (model.matmul_precision = MATMUL_BF16) against the CPU's fp32: the loss and gradient norm within 1e-2,
// gradients within 5e-2 of each tensor's largest magnitude and the fp32 master weights within 1e-2 after each step
// (the AdamW update is fp32; only the products round their operands to bf16). Dense and MoE (top-2, dropless, so
// that a rounding cannot move a token across a capacity limit).
TEST_F(CudaModel, Bf16TrainingStepsTrackTheCpu) {
  proto::ModelConfig m = tiny_config(4, 2, proto::SWIGLU, proto::RMSNORM, false);
  m.set_matmul_precision(proto::MATMUL_BF16);
  expect_steps_match(m, "dense, bf16 GEMMs", 1e-2, 5e-2);
  m.add_ffn_pattern(proto::FFN_MOE);
  m.mutable_moe()->set_num_experts(4);
  m.mutable_moe()->set_top_k(2);
  m.mutable_moe()->set_d_expert(24);
  m.mutable_moe()->set_dropless(true);
  expect_steps_match(m, "MoE, bf16 GEMMs", 1e-2, 5e-2);
  m.set_matmul_precision(proto::MATMUL_FP32);
  m.set_device(proto::DEVICE_CUDA);
  make_model(m, 1);  // the backend back to fp32 GEMMs for the tests after this one
}

TEST_F(CudaModel, CheckpointRoundTripThroughTheHost) {
  TempDir dir;
  Config cfg;
  *cfg.mutable_model() = tiny_config(4, 1, proto::GELU, proto::LAYERNORM, false);
  cfg.mutable_model()->set_device(proto::DEVICE_CUDA);
  *cfg.mutable_optimizer() = adamw_config();
  fill_defaults(cfg);
  auto a = make_model(cfg.model(), 3), b = make_model(cfg.model(), 4);
  AdamW oa(a->params(), cfg.optimizer()), ob(b->params(), cfg.optimizer());
  std::vector<int32_t> in;
  Rng rng(8);
  random_tokens(rng, in, 16, cfg.model().vocab_size());
  a->forward(in.data(), in.data(), 1, 16, true);
  a->backward(1.0f);
  oa.step(1e-3f);
  // the checkpoint gets host copies of the device's parameters and moments
  ckpt::SaveRequest req;
  req.config = &cfg;
  req.tensors = launcher::collect_state(a->params(), &oa, {});
  for (const auto& t : req.tensors) EXPECT_EQ(t.tensor.device(), Device::kCPU) << t.name;
  req.optimizer_t = oa.t();
  req.step = 1;
  ckpt::save(dir.path(), req);
  const std::string latest = ckpt::resolve(dir.path());
  const proto::Manifest man = ckpt::read_manifest(latest);
  ckpt::Reader reader(latest, man);
  ASSERT_GT(params_err(*a, *b, false), 0.0);
  launcher::restore_state(reader, b->params(), &ob);
  EXPECT_EQ(params_err(*a, *b, false), 0.0) << "values";
  for (size_t i = 0; i < oa.m().size(); ++i) {
    EXPECT_EQ(host_floats(oa.m()[i]), host_floats(ob.m()[i])) << "m " << i;
    EXPECT_EQ(host_floats(oa.v()[i]), host_floats(ob.v()[i])) << "v " << i;
  }
}

}  // namespace
}  // namespace moe::test

#endif  // MOE_HAVE_CUDA
