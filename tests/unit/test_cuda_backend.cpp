// The CUDA backend (core/backend.h, core/kernels/cuda/backend.cu): every Backend op run on
// backend_for(Device::kCUDA) against cpu_backend() on the same seeded cases (runners in backend_ops.h), plus the
// memory ops and a Workspace on the device. Tolerances (max_rel_err, relative to the CPU result's largest
// magnitude): 1e-4 for every op (fp32 throughout, different summation orders; the CPU is itself checked against
// the references in test_backend.cpp), 1e-9 for sum_squares (double accumulation on both). Compiled only into
// CUDA builds (cuda_tests); without a usable GPU every test skips with "no CUDA device" (the ctest skip regex).
#ifdef MOE_HAVE_CUDA

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/workspace.h"
#include "tests/unit/backend_ops.h"

namespace moe::test {
namespace {

constexpr double kTol = 1e-4;

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device (cuda_available() is false)";
    gpu_ = &backend_for(Device::kCUDA);
  }
  Backend& gpu() { return *gpu_; }
  Backend& cpu() { return cpu_backend(); }
  // runs one case on both backends and compares every output
  template <class Case, class Run>
  void expect_same(const Case& c, Run run, double tol = kTol) {
    expect_outputs_near(run(gpu(), c), run(cpu(), c), tol);
  }

  Backend* gpu_ = nullptr;
  Rng rng_{4321};
};

TEST_F(CudaBackendTest, IdentityAndProcessWideInstance) {
  EXPECT_EQ(gpu().device(), Device::kCUDA);
  EXPECT_STREQ(gpu().name(), "cuda");
  EXPECT_EQ(&backend_for(Device::kCUDA), &gpu());
}

TEST_F(CudaBackendTest, MemoryOps) {
  void* empty = gpu().alloc(0);
  EXPECT_NE(empty, nullptr);
  gpu().free(empty);
  gpu().free(nullptr);
  const std::vector<float> host = {1, 2, 3, 4, 5};
  auto* a = static_cast<float*>(gpu().alloc(sizeof(float) * 5));  // [5] device
  auto* b = static_cast<float*>(gpu().alloc(sizeof(float) * 5));  // [5] device
  gpu().from_host(a, host.data(), sizeof(float) * 5);
  gpu().copy(b, a, sizeof(float) * 5);
  gpu().memset0(b + 1, sizeof(float) * 2);
  gpu().sync();
  std::vector<float> back(5);
  gpu().to_host(back.data(), b, sizeof(float) * 5);
  EXPECT_EQ(back, (std::vector<float>{1, 0, 0, 4, 5}));
  gpu().free(a);
  gpu().free(b);
}

TEST_F(CudaBackendTest, Matmul) {
  for (int ta = 0; ta < 2; ++ta) {
    for (int tb = 0; tb < 2; ++tb) {
      SCOPED_TRACE("trans_a=" + std::to_string(ta) + " trans_b=" + std::to_string(tb));
      expect_same(make_matmul(rng_, 37, 53, 29, ta, tb, 1.25f, 0.75f), run_matmul);
    }
  }
  expect_same(make_matmul(rng_, 64, 96, 1031, false, false, 1.0f, 0.0f), run_matmul);
  // the word experts' product (the default implementation: matmul) against the CPU one (the small kernels)
  expect_same(make_matmul(rng_, 3, 256, 192, false, true, 1.0f, 0.0f), run_matmul_few_rows);
  expect_same(make_matmul(rng_, 256, 192, 5, true, false, 1.0f, 1.0f), run_matmul_few_rows);
}

// bf16 GEMMs (model.matmul_precision = MATMUL_BF16: operands rounded to bf16, 8 significant bits, fp32 accumulation)
// against the CPU's fp32 products: within 1e-2 of the largest magnitude (an operand's rounding is at most 2^-9
// relative; the errors of a K-term dot product mostly cancel). Plain, linear-layer and grouped forms.
TEST_F(CudaBackendTest, MatmulBf16) {
  struct Bf16Gemms {  // on for this test only, even when it fails half-way
    Backend& be;
    explicit Bf16Gemms(Backend& b) : be(b) { be.set_matmul_bf16(true); }
    ~Bf16Gemms() { be.set_matmul_bf16(false); }
  } on(gpu());
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) expect_same(make_matmul(rng_, 37, 53, 129, ta, tb, 1.25f, 0.75f), run_matmul, 1e-2);
  expect_same(make_linear(rng_, 40, 96, 72, true, true), run_linear, 1e-2);
  expect_same(make_matmul_groups(rng_, false, true, 0.0f), run_matmul_grouped, 1e-2);
  expect_same(make_matmul_groups(rng_, true, false, 1.0f), run_matmul_grouped, 1e-2);
}

// the expert bank's grouped GEMM (one cuBLAS grouped batched call) against the CPU's group-by-group matmuls, in the
// three forms the grouped FFN uses: x W^T (forward), dy W (backward data), dout^T x accumulated (weight gradients)
TEST_F(CudaBackendTest, MatmulGrouped) {
  expect_same(make_matmul_groups(rng_, false, true, 0.0f), run_matmul_grouped);
  expect_same(make_matmul_groups(rng_, false, false, 1.0f), run_matmul_grouped);
  expect_same(make_matmul_groups(rng_, true, false, 1.0f), run_matmul_grouped);
}

TEST_F(CudaBackendTest, Linear) {
  for (bool bias : {true, false}) {
    for (bool dinp : {true, false}) {
      SCOPED_TRACE(std::string("bias=") + (bias ? "1" : "0") + " dinp=" + (dinp ? "1" : "0"));
      expect_same(make_linear(rng_, 19, 24, 13, bias, dinp), run_linear);
    }
  }
}

TEST_F(CudaBackendTest, Embedding) { expect_same(make_embedding(rng_, 11, 40, 7), run_embedding); }

TEST_F(CudaBackendTest, RmsNormAndLayerNorm) {
  for (const auto& [N, C] : {std::pair{9, 33}, std::pair{3, 1000}}) {
    SCOPED_TRACE("N=" + std::to_string(N) + " C=" + std::to_string(C));
    expect_same(make_norm(rng_, N, C), run_rmsnorm);
    expect_same(make_norm(rng_, N, C), run_layernorm);
  }
}

TEST_F(CudaBackendTest, Rope) { expect_same(make_rope(rng_, 2, 5, 3, 8, 7), run_rope); }

TEST_F(CudaBackendTest, AttentionWithAndWithoutScratch) {
  for (bool scratch : {true, false}) {
    for (const auto& [H, Hkv] : {std::pair{4, 4}, std::pair{6, 2}, std::pair{4, 1}}) {
      SCOPED_TRACE("H=" + std::to_string(H) + " Hkv=" + std::to_string(Hkv) + " scratch=" + std::to_string(scratch));
      expect_same(make_attn(rng_, 2, 37, H, Hkv, 8, scratch), run_attention);
    }
  }
}

TEST_F(CudaBackendTest, AttentionPaged) {
  // T > 1024 crosses a chunk of the online softmax; D = 80 is not a multiple of the warp
  for (const auto& [T, H, Hkv, D, bs] : {std::tuple{1, 4, 2, 8, 16}, std::tuple{23, 6, 2, 16, 4},
                                         std::tuple{1100, 4, 1, 80, 16}, std::tuple{40, 8, 8, 64, 40}}) {
    SCOPED_TRACE("T=" + std::to_string(T) + " H=" + std::to_string(H) + " Hkv=" + std::to_string(Hkv) +
                 " D=" + std::to_string(D) + " block " + std::to_string(bs));
    expect_same(make_paged(rng_, make_attn(rng_, 2, T, H, Hkv, D, false), bs), run_paged);
  }
}

// bit for bit would be too strong across devices; within the GEMM tolerance, and every row alone equals itself in
// the batch on the GPU too (batch invariance)
TEST_F(CudaBackendTest, LinearRowsAndRowOps) {
  for (const auto& [N, IC, OC] : {std::tuple{1, 64, 48}, std::tuple{37, 192, 1024}, std::tuple{5, 33, 7}}) {
    const LinearCase c = make_linear(rng_, N, IC, OC, N % 2 == 1, false);
    expect_same(c, run_linear_rows);
    const Vec batch = run_linear_rows(gpu(), c).at("out");
    for (int n = 0; n < N; ++n) {
      LinearCase one = c;
      one.N = 1;
      one.inp.assign(c.inp.begin() + int64_t(n) * IC, c.inp.begin() + int64_t(n + 1) * IC);
      const Vec want(batch.begin() + int64_t(n) * OC, batch.begin() + int64_t(n + 1) * OC);
      EXPECT_EQ(run_linear_rows(gpu(), one).at("out"), want);
    }
  }
  expect_same(make_rows(rng_, 9, 3, 16, 40), run_rows);
}

TEST_F(CudaBackendTest, GeluAndSwiglu) {
  expect_same(make_act(rng_, 20001), run_gelu);
  expect_same(make_act(rng_, 20001), run_swiglu);
}

TEST_F(CudaBackendTest, CrossEntropyWithIgnoredTargets) {
  expect_same(make_cross_entropy(rng_, 13, 50), run_cross_entropy);
  expect_same(make_cross_entropy(rng_, 7, 3001), run_cross_entropy);
  const Outputs none = run_cross_entropy(gpu(), make_cross_entropy(rng_, 4, 9, /*all_ignored=*/true));
  EXPECT_EQ(none.at("mean")[0], 0.0f);
  EXPECT_EQ(none.at("dlogits"), Vec(4 * 9, 0.0f));
}

TEST_F(CudaBackendTest, Elementwise) {
  const ElementwiseCase c = make_elementwise(rng_, 100003);
  double sq_gpu = 0, sq_cpu = 0;
  const Outputs g = run_elementwise(gpu(), c, &sq_gpu);
  expect_outputs_near(g, run_elementwise(cpu(), c, &sq_cpu), kTol);
  EXPECT_NEAR(sq_gpu, sq_cpu, 1e-9 * sq_cpu);
}

// The MoE layer's token dispatch: gathers exact, combines and dots to fp32 rounding (the dots sum in double on both)
TEST_F(CudaBackendTest, TokenDispatch) {
  for (int k : {1, 2, 4}) expect_same(make_dispatch(rng_, 301, k, 130), run_dispatch);
}

// The learned router: the same choices (ties to the lower expert, with and without a selection bias), gates,
// scores, logsumexps and aux-loss sums (a different summation tree over tokens: 1e-6), and logits' gradients.
TEST_F(CudaBackendTest, RouterTopkAndLogitsGrad) {
  for (bool sigmoid : {false, true})
    for (int k : {1, 2, 3}) {
      expect_same(make_router(rng_, 700, 8, k, sigmoid, k > 1, false), run_router, 1e-6);
      expect_same(make_router(rng_, 300, 64, k, sigmoid, k > 1, true), run_router, 1e-6);
    }
  RouterCase c = make_router(rng_, 600, 8, 2, false, true, false);  // a non-finite logit: the first such token
  c.logits[int64_t(517) * 8 + 3] = std::numeric_limits<float>::infinity();
  c.logits[int64_t(290) * 8 + 1] = std::numeric_limits<float>::quiet_NaN();
  for (Backend* be : {&gpu(), &cpu()}) {
    DeviceArena d(*be);
    auto* choice = reinterpret_cast<int32_t*>(d.unwritten(600 * 2));
    auto* lse = reinterpret_cast<double*>(d.unwritten(2 * 600));
    auto* stats = reinterpret_cast<double*>(d.unwritten(2 * 10));
    be->router_topk(c.d, choice, d.unwritten(600 * 2), d.unwritten(600 * 8), lse, stats, d.put(c.logits), nullptr);
    EXPECT_EQ(d.get(stats, 10)[9], 290.0) << (be == &cpu() ? "cpu" : "cuda");
  }
}

// AdamW: the dense and the lazy row update (step counts on the device, rows from the host) as on the CPU, to 1e-5
// (fp32 on both; powf and the FMA contractions may differ in the last bits).
TEST_F(CudaBackendTest, AdamW) { expect_same(make_adamw(rng_, 61, 300), run_adamw, 1e-5); }

// The passes over a row-sparse table's touched rows (rows from the host), as on the CPU.
TEST_F(CudaBackendTest, RowOps) {
  for (int64_t row_size : {int64_t(1), int64_t(300), int64_t(70000)})
    expect_same(make_adamw(rng_, row_size > 1000 ? 5 : 61, row_size), run_row_ops);
}

TEST_F(CudaBackendTest, WorkspaceOnTheDevice) {
  Workspace ws(gpu());
  Workspace::Buffer& a = ws.buffer();
  Workspace::Buffer& b = ws.buffer();
  const std::vector<float> host = {1, 2, 3};
  gpu().from_host(a.get(3), host.data(), sizeof(float) * 3);
  b.get(7);
  a.get(1000);  // grows: keeps 1, 2, 3 and zero-fills the rest
  EXPECT_EQ(ws.bytes(), 1007 * sizeof(float));
  std::vector<float> back(1000, -1.0f), want(1000, 0.0f);
  want[0] = 1, want[1] = 2, want[2] = 3;
  gpu().to_host(back.data(), a.data(), sizeof(float) * 1000);
  EXPECT_EQ(back, want);
}

}  // namespace
}  // namespace moe::test

#endif  // MOE_HAVE_CUDA
