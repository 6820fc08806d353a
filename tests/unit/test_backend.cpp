// The CPU backend (core/backend.h): every op, run through the Backend table on backend memory (runners in
// backend_ops.h), against the plain *_ref references of core/kernels/cpu/reference.cpp where one exists, else
// against a small loop or the direct cpu:: call; the inference ops (paged attention against causal attention,
// linear_rows against the linear layer) and their batch invariance, bit for bit; the memory ops; backend_for; and
// the Workspace (core/workspace.h).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <numbers>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/kernels/cpu/kernels.h"
#include "core/layers.h"
#include "core/params.h"
#include "core/workspace.h"
#include "tests/unit/backend_ops.h"

namespace moe::test {
namespace {

constexpr double kTol = 1e-5;  // fast kernel vs plain reference, relative to the reference's largest magnitude

Backend& host_be() { return cpu_backend(); }

// ================================================================== identity, memory, backend_for
TEST(BackendCpu, IdentityAndBackendFor) {
  EXPECT_EQ(host_be().device(), Device::kCPU);
  EXPECT_STREQ(host_be().name(), "cpu");
  EXPECT_EQ(&backend_for(Device::kCPU), &host_be());
}

TEST(BackendCpu, BackendForCudaThrowsAClearErrorWithoutADevice) {
#ifdef MOE_HAVE_CUDA
  if (cuda_available()) GTEST_SKIP() << "a CUDA device is visible (tested in cuda_tests)";
  EXPECT_NE(error_of([] { backend_for(Device::kCUDA); }).find("model.device = cuda: no CUDA device is visible"),
            std::string::npos);
#else
  EXPECT_NE(error_of([] { backend_for(Device::kCUDA); }).find("this build has no CUDA support"), std::string::npos);
#endif
}

TEST(BackendCpu, MemoryOps) {
  Backend& be = host_be();
  void* empty = be.alloc(0);
  EXPECT_NE(empty, nullptr);
  be.free(empty);
  be.free(nullptr);
  const std::vector<float> host = {1, 2, 3, 4, 5};
  auto* a = static_cast<float*>(be.alloc(sizeof(float) * 5));  // [5]
  auto* b = static_cast<float*>(be.alloc(sizeof(float) * 5));  // [5]
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 64, 0u);
  be.from_host(a, host.data(), sizeof(float) * 5);
  be.copy(b, a, sizeof(float) * 5);
  be.memset0(b + 1, sizeof(float) * 2);
  be.sync();
  std::vector<float> back(5);
  be.to_host(back.data(), b, sizeof(float) * 5);
  EXPECT_EQ(back, (std::vector<float>{1, 0, 0, 4, 5}));
  be.free(a);
  be.free(b);
}

// ================================================================== ops against the references
TEST(BackendCpu, MatmulVsRef) {
  Rng rng(1);
  for (int ta = 0; ta < 2; ++ta) {
    for (int tb = 0; tb < 2; ++tb) {
      const MatmulCase c = make_matmul(rng, 37, 53, 29, ta, tb, 1.25f, 0.75f);
      Vec want = c.c0;
      cpu::matmul_ref(want.data(), c.a.data(), c.b.data(), c.M, c.N, c.K, c.ta, c.tb, c.alpha, c.beta);
      SCOPED_TRACE("trans_a=" + std::to_string(ta) + " trans_b=" + std::to_string(tb));
      expect_outputs_near(run_matmul(host_be(), c), {{"c", want}}, kTol);
    }
  }
}

// matmul_few_rows: the grouped FFN's product for a word expert's few rows (the small-dimension kernels inside their
// bounds, matmul outside), both transposes it takes and one it passes on, beta 0 and 1
TEST(BackendCpu, MatmulFewRowsVsRef) {
  Rng rng(5);
  const MatmulCase cases[] = {make_matmul(rng, 3, 256, 192, false, true, 1.0f, 0.0f),
                              make_matmul(rng, 11, 192, 256, false, false, 1.0f, 1.0f),
                              make_matmul(rng, 256, 192, 5, true, false, 1.0f, 1.0f),
                              make_matmul(rng, 37, 53, 29, true, true, 1.25f, 0.75f)};
  for (const MatmulCase& c : cases) {
    Vec want = c.c0;
    cpu::matmul_ref(want.data(), c.a.data(), c.b.data(), c.M, c.N, c.K, c.ta, c.tb, c.alpha, c.beta);
    SCOPED_TRACE("M=" + std::to_string(c.M) + " N=" + std::to_string(c.N) + " K=" + std::to_string(c.K));
    expect_outputs_near(run_matmul_few_rows(host_be(), c), {{"c", want}}, kTol);
  }
}

Outputs linear_ref(const LinearCase& c) {
  Vec out(size_t(c.N) * c.OC), dinp(size_t(c.N) * c.IC), dw = c.dw0, db = c.db0;
  cpu::linear_forward_ref(out.data(), c.inp.data(), c.w.data(), c.bias ? c.b.data() : nullptr, c.N, c.IC, c.OC);
  cpu::linear_backward_ref(c.dinp ? dinp.data() : nullptr, dw.data(), c.bias ? db.data() : nullptr, c.dout.data(),
                           c.inp.data(), c.w.data(), c.N, c.IC, c.OC);
  Outputs o{{"out", out}, {"dw", dw}};
  if (c.dinp) o["dinp"] = dinp;
  if (c.bias) o["dbias"] = db;
  return o;
}

// The grouped GEMM is each group's matmul (the CPU runs them in turn): bit for bit, an empty group untouched
TEST(BackendCpu, MatmulGroupedIsEachGroupsMatmul) {
  Rng rng(14);
  for (int t = 0; t < 4; ++t) {
    const std::vector<MatmulCase> cases = make_matmul_groups(rng, t & 1, t & 2, t == 3 ? 1.0f : 0.0f);
    const Outputs got = run_matmul_grouped(host_be(), cases);
    for (size_t g = 0; g < cases.size(); ++g)
      EXPECT_EQ(got.at(group_output(g)), run_matmul(host_be(), cases[g]).at("c")) << "case " << t << " group " << g;
  }
}

TEST(BackendCpu, LinearVsRef) {
  Rng rng(2);
  for (bool bias : {true, false}) {
    for (bool dinp : {true, false}) {
      const LinearCase c = make_linear(rng, 19, 24, 13, bias, dinp);
      SCOPED_TRACE(std::string("bias=") + (bias ? "1" : "0") + " dinp=" + (dinp ? "1" : "0"));
      expect_outputs_near(run_linear(host_be(), c), linear_ref(c), kTol);
    }
  }
}

TEST(BackendCpu, EmbeddingVsLoop) {
  Rng rng(3);
  const EmbeddingCase c = make_embedding(rng, 11, 40, 7);  // 40 ids over 11 rows: repeats
  Vec out(size_t(c.N) * c.C), dwte = c.dw0;
  for (int n = 0; n < c.N; ++n) {
    for (int i = 0; i < c.C; ++i) {
      out[size_t(n) * c.C + i] = c.wte[size_t(c.ids[n]) * c.C + i];
      dwte[size_t(c.ids[n]) * c.C + i] += c.dout[size_t(n) * c.C + i];
    }
  }
  expect_outputs_near(run_embedding(host_be(), c), {{"out", out}, {"dwte", dwte}}, kTol);
}

TEST(BackendCpu, RmsNormVsRef) {
  Rng rng(4);
  const NormCase c = make_norm(rng, 9, 33);
  Vec out(size_t(c.N) * c.C), rstd(c.N), dinp(out.size()), dw = c.dw0;
  cpu::rmsnorm_forward_ref(out.data(), rstd.data(), c.inp.data(), c.w.data(), c.N, c.C, c.eps);
  cpu::rmsnorm_backward_ref(dinp.data(), dw.data(), c.dout.data(), c.inp.data(), c.w.data(), rstd.data(), c.N, c.C);
  expect_outputs_near(run_rmsnorm(host_be(), c), {{"out", out}, {"rstd", rstd}, {"dinp", dinp}, {"dw", dw}}, kTol);
}

TEST(BackendCpu, LayerNormVsRef) {
  Rng rng(5);
  const NormCase c = make_norm(rng, 9, 33);
  Vec out(size_t(c.N) * c.C), mean(c.N), rstd(c.N), dinp(out.size()), dw = c.dw0, db = c.db0;
  cpu::layernorm_forward_ref(out.data(), mean.data(), rstd.data(), c.inp.data(), c.w.data(), c.b.data(), c.N, c.C,
                             c.eps);
  cpu::layernorm_backward_ref(dinp.data(), dw.data(), db.data(), c.dout.data(), c.inp.data(), c.w.data(), mean.data(),
                              rstd.data(), c.N, c.C);
  expect_outputs_near(run_layernorm(host_be(), c),
                      {{"out", out}, {"mean", mean}, {"rstd", rstd}, {"dinp", dinp}, {"dw", dw}, {"db", db}}, kTol);
}

TEST(BackendCpu, RopeVsDirectCallAndInverse) {
  Rng rng(6);
  const RopeCase c = make_rope(rng, 2, 5, 3, 8, 7);
  Vec fwd = c.x, bwd = c.dy;
  cpu::rope_forward(fwd.data(), c.B, c.T, c.nh, c.D, c.pos0, c.theta);
  cpu::rope_backward(bwd.data(), c.B, c.T, c.nh, c.D, c.pos0, c.theta);
  const Outputs got = run_rope(host_be(), c);
  EXPECT_EQ(got.at("fwd"), fwd);
  EXPECT_EQ(got.at("bwd"), bwd);
  Vec back = got.at("fwd");  // R^T R x = x
  cpu::rope_backward(back.data(), c.B, c.T, c.nh, c.D, c.pos0, c.theta);
  EXPECT_LE(max_rel_err(back, c.x), 1e-6);
}

Outputs attention_ref(const AttnCase& c) {
  Vec out(c.nq()), att(c.natt()), dq(c.nq()), dk(c.nkv()), dv(c.nkv());
  cpu::attention_forward_ref(out.data(), att.data(), c.q.data(), c.k.data(), c.v.data(), c.B, c.T, c.H, c.Hkv, c.D);
  cpu::attention_backward_ref(dq.data(), dk.data(), dv.data(), c.dout.data(), c.q.data(), c.k.data(), c.v.data(),
                              att.data(), c.B, c.T, c.H, c.Hkv, c.D);
  return {{"out", out}, {"att", att}, {"dq", dq}, {"dk", dk}, {"dv", dv}};
}

TEST(BackendCpu, AttentionVsRefWithAndWithoutScratch) {
  Rng rng(7);
  for (bool scratch : {true, false}) {
    for (const auto& [H, Hkv] : {std::pair{4, 4}, std::pair{6, 2}, std::pair{4, 1}}) {
      const AttnCase c = make_attn(rng, 2, 37, H, Hkv, 8, scratch);
      SCOPED_TRACE("H=" + std::to_string(H) + " Hkv=" + std::to_string(Hkv) + " scratch=" + std::to_string(scratch));
      expect_outputs_near(run_attention(host_be(), c), attention_ref(c), kTol);
    }
  }
}

TEST(BackendCpu, GeluVsDirectCall) {
  Rng rng(8);
  const ActCase c = make_act(rng, 1001);
  Vec out(c.n), dinp(c.n);
  cpu::gelu_forward(out.data(), c.x.data(), c.n);
  cpu::gelu_backward(dinp.data(), c.dout.data(), c.x.data(), c.n);
  const Outputs got = run_gelu(host_be(), c);
  EXPECT_EQ(got.at("out"), out);
  EXPECT_EQ(got.at("dinp"), dinp);
  for (int64_t i = 0; i < c.n; i += 97) {  // and the tanh formula itself
    const double x = c.x[i], u = std::sqrt(2.0 / std::numbers::pi) * (x + 0.044715 * x * x * x);
    EXPECT_NEAR(out[i], 0.5 * x * (1.0 + std::tanh(u)), 1e-5 * (1.0 + std::fabs(x))) << "x=" << x;
  }
}

TEST(BackendCpu, SwigluVsLoop) {
  Rng rng(9);
  const ActCase c = make_act(rng, 1001);
  Vec out(c.n), dgate(c.n), dup(c.n);
  for (int64_t i = 0; i < c.n; ++i) {
    const double g = c.x[i], sig = 1.0 / (1.0 + std::exp(-g)), silu = g * sig;
    out[i] = static_cast<float>(silu * c.up[i]);
    dup[i] = static_cast<float>(c.dout[i] * silu);
    dgate[i] = static_cast<float>(c.dout[i] * c.up[i] * sig * (1.0 + g * (1.0 - sig)));
  }
  expect_outputs_near(run_swiglu(host_be(), c), {{"out", out}, {"dgate", dgate}, {"dup", dup}}, kTol);
}

Outputs cross_entropy_ref(const CrossEntropyCase& c) {
  Vec losses(c.N), probs(size_t(c.N) * c.V), dlogits(probs.size(), 0.0f);
  const float mean =
      cpu::cross_entropy_forward_ref(losses.data(), probs.data(), c.logits.data(), c.targets.data(), c.N, c.V);
  int count = 0;
  for (int32_t t : c.targets) count += t >= 0;
  for (int n = 0; n < c.N; ++n) {
    if (c.targets[n] < 0) continue;
    for (int i = 0; i < c.V; ++i) {
      const double onehot = i == c.targets[n] ? 1.0 : 0.0;
      dlogits[size_t(n) * c.V + i] = static_cast<float>((probs[size_t(n) * c.V + i] - onehot) * c.dloss / count);
    }
  }
  return {{"losses", losses}, {"probs", probs}, {"mean", {mean}}, {"dlogits", dlogits}};
}

TEST(BackendCpu, CrossEntropyVsRefWithIgnoredTargets) {
  Rng rng(10);
  const CrossEntropyCase c = make_cross_entropy(rng, 13, 50);
  expect_outputs_near(run_cross_entropy(host_be(), c), cross_entropy_ref(c), kTol);
  const Outputs none = run_cross_entropy(host_be(), make_cross_entropy(rng, 4, 9, /*all_ignored=*/true));
  EXPECT_EQ(none.at("mean")[0], 0.0f);
  EXPECT_EQ(none.at("dlogits"), Vec(4 * 9, 0.0f));
}

TEST(BackendCpu, ElementwiseVsLoop) {
  Rng rng(11);
  const ElementwiseCase c = make_elementwise(rng, 100003);
  Vec sum(c.n), scaled(c.n), prod(c.n);
  double sq = 0;
  for (int64_t i = 0; i < c.n; ++i) {
    sum[i] = c.x[i] + c.y[i];
    scaled[i] = c.y[i] * c.s;
    prod[i] = c.x[i] * c.y[i];
    sq += double(c.x[i]) * c.x[i];
  }
  double got_sq = 0;
  const Outputs got = run_elementwise(host_be(), c, &got_sq);
  EXPECT_EQ(got.at("add_inplace"), sum);
  EXPECT_EQ(got.at("add"), sum);
  EXPECT_EQ(got.at("scale_inplace"), scaled);
  EXPECT_EQ(got.at("mul"), prod);
  EXPECT_EQ(got.at("mul_inplace"), prod);
  EXPECT_NEAR(got_sq, sq, 1e-10 * sq);
}

// The token dispatch ops against plain loops: gathers copy rows exactly, a gated gather multiplies once, a combine
// sums a token's kept rows in slot order (written or accumulated), dropped slots contribute nothing and get dot 0.
// Large enough (N*C > 65536) that the CPU splits the loops over threads.
TEST(BackendCpu, TokenDispatchVsLoops) {
  Rng rng(12);
  for (int k : {1, 2, 3}) {
    const DispatchCase c = make_dispatch(rng, 700, k, 97);
    const int C = c.C;
    Vec gathered(size_t(c.R) * C), gated(gathered.size()), combined(size_t(c.N) * C, 0.0f), acc = c.acc;
    Vec dots(size_t(c.N) * k, 0.0f);
    for (int r = 0; r < c.R; ++r)
      for (int ch = 0; ch < C; ++ch) {
        const float v = c.x[size_t(c.slot[r] / k) * C + ch];
        gathered[size_t(r) * C + ch] = v;
        gated[size_t(r) * C + ch] = c.gate[c.slot[r]] * v;
      }
    for (int s = 0; s < c.N * k; ++s) {
      const int r = c.row[s], n = s / k;
      if (r < 0) continue;
      double dot = 0;
      for (int ch = 0; ch < C; ++ch) {
        const float yv = c.y[size_t(r) * C + ch];
        combined[size_t(n) * C + ch] += c.gate[s] * yv;
        acc[size_t(n) * C + ch] += yv;
        dot += double(c.x[size_t(n) * C + ch]) * yv;
      }
      dots[s] = float(dot);
    }
    const Outputs got = run_dispatch(host_be(), c);
    EXPECT_EQ(got.at("gathered"), gathered) << "k " << k;
    EXPECT_EQ(got.at("gated"), gated) << "k " << k;
    EXPECT_EQ(got.at("combined"), combined) << "k " << k;
    EXPECT_EQ(got.at("accumulated"), acc) << "k " << k;
    EXPECT_EQ(got.at("dots"), dots) << "k " << k;
  }
}

// AdamW through the backend: the dense update and the lazy row update equal the double reference (to float
// rounding), untouched rows do not move and their step counts stay.
TEST(BackendCpu, AdamWVsRef) {
  Rng rng(21);
  const AdamWCase c = make_adamw(rng, 37, 130);
  const Outputs got = run_adamw(host_be(), c);
  const int64_t n = c.rows * c.row_size;
  Vec w = c.w, m = c.m, v = c.v, wr = c.w, mr = c.m, vr = c.v;
  Ids rt = c.row_t;
  cpu::adamw_ref(w.data(), c.g.data(), m.data(), v.data(), n, c.h, c.bc1, c.bc2);
  cpu::adamw_rows_ref(wr.data(), c.g.data(), mr.data(), vr.data(), rt.data(), c.touched.data(),
                      static_cast<int64_t>(c.touched.size()), c.row_size, c.h);
  EXPECT_LT(max_rel_err(got.at("w"), w), 1e-6);
  EXPECT_LT(max_rel_err(got.at("m"), m), 1e-6);
  EXPECT_LT(max_rel_err(got.at("v"), v), 1e-6);
  EXPECT_LT(max_rel_err(got.at("w_rows"), wr), 1e-6);
  EXPECT_LT(max_rel_err(got.at("m_rows"), mr), 1e-6);
  EXPECT_LT(max_rel_err(got.at("v_rows"), vr), 1e-6);
  EXPECT_EQ(got.at("row_t"), Vec(rt.begin(), rt.end()));
  ASSERT_LT(c.touched.size(), size_t(c.rows));
  for (int64_t r = 0; r < c.rows; ++r) {
    if (std::find(c.touched.begin(), c.touched.end(), r) != c.touched.end()) continue;
    for (int64_t j = 0; j < c.row_size; ++j) ASSERT_EQ(got.at("w_rows")[r * c.row_size + j], c.w[r * c.row_size + j]);
  }
}

// The learned router's top-k on a hand-made case: ties go to the lower expert, a selection bias picks on score +
// bias while the gates stay the scores (renormalised over the k), the aux-loss sums and the first token with a
// non-finite logit. (Its gradient: ModelGradCheck.MoeRouterFiniteDifferences; the router against PyTorch:
// test_router.cpp.)
TEST(BackendCpu, RouterTopkTiesBiasAndNonFinite) {
  Backend& be = cpu_backend();
  const cpu::RouterDims d{3, 4, 2, false, true};
  Vec logits = {1, 3, 3, 0, 0, 0, 0, 0, 2, -1, 0.5f, 4};
  Ids choice(6);
  Vec gate(6), score(12);
  std::vector<double> lse(3), stats(6);
  be.router_topk(d, choice.data(), gate.data(), score.data(), lse.data(), stats.data(), logits.data(), nullptr);
  EXPECT_EQ(choice, (Ids{1, 2, 0, 1, 3, 0}));
  std::vector<double> want_sum(4, 0.0);
  double z = 0;
  for (int n = 0; n < 3; ++n) {
    double t = 0;
    for (int e = 0; e < 4; ++e) t += std::exp(double(logits[n * 4 + e]));
    EXPECT_NEAR(lse[n], std::log(t), 1e-12);
    z += std::log(t) * std::log(t);
    for (int e = 0; e < 4; ++e) want_sum[e] += std::exp(double(logits[n * 4 + e])) / t;
    const double p0 = score[n * 4 + choice[2 * n]], p1 = score[n * 4 + choice[2 * n + 1]];
    EXPECT_FLOAT_EQ(gate[2 * n], float(p0 / (p0 + p1)));
  }
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(stats[e], want_sum[e], 1e-6);
  EXPECT_NEAR(stats[4], z, 1e-9);
  EXPECT_EQ(stats[5], -1.0);
  const Vec bias = {0, 0, 0, -1};  // token 2: p = (.11, .005, .02, .86) + bias -> experts 0, 2
  be.router_topk(d, choice.data(), gate.data(), score.data(), lse.data(), stats.data(), logits.data(), bias.data());
  EXPECT_EQ(choice[4], 0);
  EXPECT_EQ(choice[5], 2);
  EXPECT_FLOAT_EQ(gate[4], float(double(score[8]) / (double(score[8]) + score[10])));
  logits[6] = std::nanf("");
  logits[11] = INFINITY;
  be.router_topk(d, choice.data(), gate.data(), score.data(), lse.data(), stats.data(), logits.data(), nullptr);
  EXPECT_EQ(stats[5], 1.0);
}

// The passes over a row-sparse table's touched rows: exactly the loops over those rows, the other rows untouched.
TEST(BackendCpu, RowOpsVsLoops) {
  Rng rng(23);
  for (int64_t row_size : {int64_t(1), int64_t(130), int64_t(70000)}) {  // (the last one: past the prefetch rows)
    const AdamWCase c = make_adamw(rng, row_size > 1000 ? 5 : 37, row_size);
    Vec zeroed = c.g, scaled = c.g;
    double sq = 0;
    for (int64_t r : c.touched)
      for (int64_t j = 0; j < c.row_size; ++j) {
        const float g = c.g[r * c.row_size + j];
        zeroed[r * c.row_size + j] = 0.0f;
        scaled[r * c.row_size + j] = g * -1.5f;
        sq += double(g) * g;
      }
    const Outputs got = run_row_ops(host_be(), c);
    EXPECT_EQ(got.at("zeroed"), zeroed) << row_size;
    EXPECT_EQ(got.at("scaled"), scaled) << row_size;
    EXPECT_NEAR(got.at("sum_squares")[0], sq, 1e-6 * sq) << row_size;
  }
  const AdamWCase none = make_adamw(rng, 3, 4);
  EXPECT_EQ(host_be().sum_squares_rows(none.g.data(), nullptr, 0, 4), 0.0);
}

// ================================================================== the inference path
// Paged attention over B sequences of T positions, their keys and values in shuffled blocks, is causal attention:
// every row (b, t) sees exactly positions 0..t of its own sequence, whatever the block size (1, 4, or T: one
// contiguous block per sequence); head dims with a SIMD kernel (16, 64) and without (20).
TEST(BackendCpu, AttentionPagedIsCausalAttention) {
  Rng rng(12);
  for (const auto& [H, Hkv, D] : {std::tuple{4, 4, 16}, std::tuple{6, 2, 64}, std::tuple{4, 1, 20}}) {
    for (int bs : {1, 4, 23}) {
      const int B = 3, T = 23;
      SCOPED_TRACE("H=" + std::to_string(H) + " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D) + " block " +
                   std::to_string(bs));
      const AttnCase full = make_attn(rng, B, T, H, Hkv, D, false);
      Vec out(full.nq()), att(full.natt());
      cpu::attention_forward_ref(out.data(), att.data(), full.q.data(), full.k.data(), full.v.data(), B, T, H, Hkv,
                                 D);
      expect_outputs_near(run_paged(host_be(), make_paged(rng, full, bs)), {{"out", out}}, kTol);
    }
  }
}

// A row's attention output does not depend on the other rows of the batch, bit for bit: each row alone (and in a
// reversed batch) gives what it gives in the whole batch, whatever the block size.
TEST(BackendCpu, AttentionPagedIsBatchInvariant) {
  Rng rng(15);
  const AttnCase full = make_attn(rng, 2, 19, 6, 2, 32, false);
  for (int bs : {1, 16, 19}) {
    const PagedCase c = make_paged(rng, full, bs);
    const Vec batch = run_paged(host_be(), c).at("out");
    const int64_t w = int64_t(c.H) * c.D;
    PagedCase rev = c;  // the rows in reverse order
    for (int n = 0; n < c.rows(); ++n) {
      const int m = c.rows() - 1 - n;
      std::copy(c.q.begin() + m * w, c.q.begin() + (m + 1) * w, rev.q.begin() + n * w);
      rev.pos[n] = c.pos[m];
      rev.table_start[n] = c.table_start[m];
    }
    const Vec reversed = run_paged(host_be(), rev).at("out");
    for (int n = 0; n < c.rows(); ++n) {
      PagedCase one = c;
      one.B = 1;
      one.T = 1;
      one.q.assign(c.q.begin() + n * w, c.q.begin() + (n + 1) * w);
      one.pos = {c.pos[n]};
      one.table_start = {c.table_start[n]};
      const Vec want(batch.begin() + n * w, batch.begin() + (n + 1) * w);
      ASSERT_EQ(run_paged(host_be(), one).at("out"), want) << "block " << bs << " row " << n;
      const int m = c.rows() - 1 - n;
      ASSERT_EQ(Vec(reversed.begin() + m * w, reversed.begin() + (m + 1) * w), want) << "block " << bs << " row " << n;
    }
  }
}

TEST(BackendCpu, AttentionPagedOfOnePositionIsItsValue) {
  Rng rng(13);
  const AttnCase one = make_attn(rng, 1, 1, 4, 2, 8, false);
  const PagedCase c = make_paged(rng, one, 16);
  const Vec out = run_paged(host_be(), c).at("out");
  for (int h = 0; h < 4; ++h)
    for (int i = 0; i < 8; ++i) EXPECT_EQ(out[h * 8 + i], one.v[(h / 2) * 8 + i]);
  Vec o(32);
  const int32_t pos = 0, table = 0, start = 0;
  EXPECT_THROW(host_be().attention_paged(o.data(), c.q.data(), c.k_pool.data(), c.v_pool.data(), &pos, &table,
                                         &start, 16, 1, 4, 3, 8),
               Error);
  EXPECT_THROW(host_be().attention_paged(o.data(), c.q.data(), c.k_pool.data(), c.v_pool.data(), &pos, &table,
                                         &start, 0, 1, 4, 2, 8),
               Error);
}

// linear_rows computes the linear layer, and each output row depends on its input row alone, bit for bit: the
// same alone, in any batch size, at any position of the batch, on 1 or 2 threads (tails of IC, N and OC that are
// not multiples of the SIMD width and the register tile included).
TEST(BackendCpu, LinearRowsIsTheLinearLayerAndBatchInvariant) {
  Rng rng(16);
  const int threads = omp_get_max_threads();
  for (const auto& [N, IC, OC] : {std::tuple{13, 192, 1024}, std::tuple{7, 37, 23}, std::tuple{64, 256, 192},
                                  std::tuple{3, 5, 1}, std::tuple{33, 513, 67}}) {
    SCOPED_TRACE("N=" + std::to_string(N) + " IC=" + std::to_string(IC) + " OC=" + std::to_string(OC));
    for (bool bias : {false, true}) {
      const LinearCase c = make_linear(rng, N, IC, OC, bias, false);
      Vec want(size_t(N) * OC);
      cpu::linear_forward_ref(want.data(), c.inp.data(), c.w.data(), bias ? c.b.data() : nullptr, N, IC, OC);
      omp_set_num_threads(2);
      const Vec batch = run_linear_rows(host_be(), c).at("out");
      expect_outputs_near({{"out", batch}}, {{"out", want}}, kTol);
      omp_set_num_threads(1);
      ASSERT_EQ(run_linear_rows(host_be(), c).at("out"), batch) << "one thread";
      for (int n = 0; n < N; n += std::max(1, N / 5)) {
        LinearCase part = c;  // rows n.. alone: row n first
        part.N = N - n;
        part.inp.assign(c.inp.begin() + int64_t(n) * IC, c.inp.end());
        const Vec got = run_linear_rows(host_be(), part).at("out");
        const Vec want(batch.begin() + int64_t(n) * OC, batch.begin() + int64_t(n + 1) * OC);
        ASSERT_EQ(Vec(got.begin(), got.begin() + OC), want) << "row " << n << " of a batch of " << part.N;
      }
    }
  }
  omp_set_num_threads(threads);
}

// rope_rows at per-row positions is rope_forward at those positions (the same table; the compiler may contract the
// rotation into FMAs differently in the two loops: within float rounding); scatter_rows moves whole rows exactly.
TEST(BackendCpu, RopeRowsAndScatterRows) {
  Rng rng(17);
  const RowsCase c = make_rows(rng, 9, 3, 16, 40);
  const Outputs got = run_rows(host_be(), c);
  const int64_t w = int64_t(c.nh) * c.D;
  Vec want_pool = c.pool;
  for (int n = 0; n < c.N; ++n) {
    Vec x(c.x.begin() + n * w, c.x.begin() + (n + 1) * w);
    host_be().rope_forward(x.data(), 1, 1, c.nh, c.D, c.pos[n], 10000.0f);
    const Vec row(got.at("x").begin() + n * w, got.at("x").begin() + (n + 1) * w);
    EXPECT_LE(max_rel_err(row, x), 1e-6) << "row " << n;
    std::copy(row.begin(), row.end(), want_pool.begin() + int64_t(c.slot[n]) * w);
  }
  EXPECT_EQ(got.at("pool"), want_pool);
}

// ================================================================== Workspace
TEST(Workspace, GrowthKeepsContentsAndZeroFills) {
  Workspace ws(host_be());
  EXPECT_EQ(&ws.backend(), &host_be());
  Workspace::Buffer& b = ws.buffer();
  EXPECT_EQ(b.data(), nullptr);
  EXPECT_EQ(b.size(), 0);
  float* p = b.get(5);
  EXPECT_EQ(b.size(), 5);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(p[i], 0.0f);
  for (int i = 0; i < 5; ++i) p[i] = float(i + 1);
  EXPECT_EQ(b.get(3), p);  // smaller: same block, nothing changes
  EXPECT_EQ(b.size(), 5);
  float* q = b.get(1000);
  EXPECT_EQ(b.size(), 1000);
  EXPECT_EQ(b.data(), q);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(q[i], float(i + 1));
  for (int i = 5; i < 1000; ++i) ASSERT_EQ(q[i], 0.0f) << i;
  EXPECT_THROW(b.get(-1), Error);
}

TEST(Workspace, BytesCountsEveryBufferAndBuffersAreDistinct) {
  Workspace ws(host_be());
  EXPECT_EQ(ws.bytes(), 0u);
  Workspace::Buffer& a = ws.buffer();
  Workspace::Buffer& b = ws.buffer();
  EXPECT_NE(&a, &b);
  float* pa = a.get(10);
  float* pb = b.get(20);
  EXPECT_TRUE(pa + 10 <= pb || pb + 20 <= pa);  // disjoint memory
  EXPECT_EQ(ws.bytes(), 30 * sizeof(float));
  for (int i = 0; i < 40; ++i) ws.buffer();  // more buffers (the vector of owners reallocates)...
  EXPECT_EQ(a.data(), pa);                   // ...and the references stay valid
  const float* grown = b.get(100);
  EXPECT_EQ(grown, b.data());
  EXPECT_EQ(ws.bytes(), 110 * sizeof(float));
}

}  // namespace
}  // namespace moe::test
