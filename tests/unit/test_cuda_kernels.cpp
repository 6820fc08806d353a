// The CUDA kernels (core/kernels/cuda/kernels.cuh) against the CPU kernels (core/kernels/cpu/kernels.h) on seeded
// random data, to 1e-4 relative (max_rel_err). Compiled only into CUDA builds; on a machine without a usable GPU
// every test skips with the reason (the one allowed skip: there is no device to run on).
#ifdef MOE_HAVE_CUDA

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/kernels/cpu/kernels.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/kernels.cuh"
#include "core/rng.h"
#include "core/tensor.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

constexpr double kTol = 1e-4;

// Device buffer owning n elements of T; uploads / downloads synchronously on the given stream.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer(size_t n, cudaStream_t stream) : n_(n), stream_(stream) {
    MOE_CUDA_CHECK(cudaMalloc(&p_, (n ? n : 1) * sizeof(T)));
  }
  DeviceBuffer(const std::vector<T>& host, cudaStream_t stream) : DeviceBuffer(host.size(), stream) { upload(host); }
  ~DeviceBuffer() { cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() { return static_cast<T*>(p_); }
  void upload(const std::vector<T>& host) {
    MOE_CHECK(host.size() == n_, "upload: size " << host.size() << " != " << n_);
    MOE_CUDA_CHECK(cudaMemcpyAsync(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice, stream_));
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    MOE_CUDA_CHECK(cudaMemcpyAsync(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost, stream_));
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return host;
  }

 private:
  void* p_ = nullptr;
  size_t n_;
  cudaStream_t stream_;
};

using FBuf = DeviceBuffer<float>;
using IBuf = DeviceBuffer<int32_t>;

std::string no_device_reason() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  cudaGetLastError();  // clear the (non-sticky) error so later calls do not see it
  if (e != cudaSuccess) return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  return "cudaGetDeviceCount reports " + std::to_string(n) + " devices";
}

class CudaKernelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device: " << no_device_reason();
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  void TearDown() override {
    if (stream_) {
      MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      cuda::StreamContext::release_all();
      MOE_CUDA_CHECK(cudaStreamDestroy(stream_));
    }
  }
  void sync() { MOE_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  FBuf dev(const std::vector<float>& h) { return FBuf(h, stream_); }
  IBuf dev(const std::vector<int32_t>& h) { return IBuf(h, stream_); }
  FBuf dev_zeros(size_t n) { return FBuf(std::vector<float>(n, 0.0f), stream_); }

  cudaStream_t stream_ = nullptr;
  Rng rng_{1234};
};

void expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu, const std::string& what,
                  double tol = kTol) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  const double err = max_rel_err(gpu, cpu);
  EXPECT_LT(err, tol) << what << ": max relative error " << err;
  bool finite = true;
  for (float v : gpu) finite = finite && std::isfinite(v);
  EXPECT_TRUE(finite) << what << ": non-finite value in the GPU result";
}

std::vector<int32_t> rand_ids(Rng& rng, int n, int hi) {
  std::vector<int32_t> ids(n);
  for (auto& x : ids) x = static_cast<int32_t>(rng.below(hi));
  return ids;
}

// ---------------------------------------------------------------- matmul, linear

class CudaKernelBlas : public CudaKernelTest {};

TEST_F(CudaKernelBlas, MatmulAllTransposesAlphaBeta) {
  const int M = 37, N = 53, K = 29;
  for (int ta = 0; ta < 2; ++ta) {
    for (int tb = 0; tb < 2; ++tb) {
      for (float beta : {0.0f, 0.75f}) {
        const float alpha = 1.25f;
        auto a = randn(rng_, int64_t{M} * K), b = randn(rng_, int64_t{K} * N), c0 = randn(rng_, int64_t{M} * N);
        std::vector<float> c_cpu = c0;
        cpu::matmul(c_cpu.data(), a.data(), b.data(), M, N, K, ta, tb, alpha, beta);
        auto da = dev(a), db = dev(b), dc = dev(c0);
        cuda::matmul(dc.get(), da.get(), db.get(), M, N, K, ta, tb, alpha, beta, stream_);
        expect_close(dc.download(), c_cpu,
                     "matmul trans_a=" + std::to_string(ta) + " trans_b=" + std::to_string(tb) +
                         " beta=" + std::to_string(beta));
      }
    }
  }
}

TEST_F(CudaKernelBlas, MatmulLargeK) {
  const int M = 64, N = 96, K = 1031;
  auto a = randn(rng_, int64_t{M} * K), b = randn(rng_, int64_t{K} * N);
  std::vector<float> c_cpu(int64_t{M} * N);
  cpu::matmul(c_cpu.data(), a.data(), b.data(), M, N, K, false, false);
  auto da = dev(a), db = dev(b), dc = dev_zeros(c_cpu.size());
  cuda::matmul(dc.get(), da.get(), db.get(), M, N, K, false, false, 1.0f, 0.0f, stream_);
  expect_close(dc.download(), c_cpu, "matmul K=1031");
}

// bf16 operands with fp32 accumulation (cuBLASLt, the tensor cores): the fp32 matmul of the bf16-rounded operands,
// up to summation order, for every transpose, with beta, at an odd shape and at a tensor-core one.
TEST_F(CudaKernelBlas, MatmulBf16EqualsFp32OfTheRoundedOperands) {
  struct Dims {
    int M, N, K;
  };
  for (const Dims d : {Dims{37, 53, 29}, Dims{64, 128, 1024}}) {
    for (int ta = 0; ta < 2; ++ta) {
      for (int tb = 0; tb < 2; ++tb) {
        for (float beta : {0.0f, 0.75f}) {
          auto a = randn(rng_, int64_t{d.M} * d.K), b = randn(rng_, int64_t{d.K} * d.N);
          auto c0 = randn(rng_, int64_t{d.M} * d.N);
          std::vector<bf16> a16(a.size()), b16(b.size());
          for (size_t i = 0; i < a.size(); ++i) a[i] = bf16_to_float(a16[i] = float_to_bf16(a[i]));
          for (size_t i = 0; i < b.size(); ++i) b[i] = bf16_to_float(b16[i] = float_to_bf16(b[i]));
          std::vector<float> c_cpu = c0;
          cpu::matmul(c_cpu.data(), a.data(), b.data(), d.M, d.N, d.K, ta, tb, 1.25f, beta);
          DeviceBuffer<bf16> da(a16, stream_), db(b16, stream_);
          auto dc = dev(c0);
          cuda::matmul_bf16(dc.get(), reinterpret_cast<const __nv_bfloat16*>(da.get()),
                            reinterpret_cast<const __nv_bfloat16*>(db.get()), d.M, d.N, d.K, ta, tb, 1.25f, beta,
                            stream_);
          expect_close(dc.download(), c_cpu,
                       "matmul_bf16 " + std::to_string(d.M) + "x" + std::to_string(d.N) + "x" +
                           std::to_string(d.K) + " trans_a=" + std::to_string(ta) + " trans_b=" +
                           std::to_string(tb) + " beta=" + std::to_string(beta));
        }
      }
    }
  }
}

TEST_F(CudaKernelBlas, LinearForwardBackward) {
  const int N = 45, IC = 70, OC = 33;
  for (bool with_bias : {true, false}) {
    auto x = randn(rng_, int64_t{N} * IC), w = randn(rng_, int64_t{OC} * IC, 0.1f), bias = randn(rng_, OC);
    auto dout = randn(rng_, int64_t{N} * OC);
    auto dw0 = randn(rng_, int64_t{OC} * IC), db0 = randn(rng_, OC);  // nonzero: backward accumulates

    std::vector<float> out_cpu(int64_t{N} * OC), dx_cpu(int64_t{N} * IC), dw_cpu = dw0, db_cpu = db0;
    cpu::linear_forward(out_cpu.data(), x.data(), w.data(), with_bias ? bias.data() : nullptr, N, IC, OC);
    cpu::linear_backward(dx_cpu.data(), dw_cpu.data(), with_bias ? db_cpu.data() : nullptr, dout.data(), x.data(),
                         w.data(), N, IC, OC);

    auto dx = dev(x), dwt = dev(w), dbias = dev(bias), ddout = dev(dout);
    auto dout_gpu = dev_zeros(out_cpu.size()), ddx = dev_zeros(dx_cpu.size()), ddw = dev(dw0), ddb = dev(db0);
    cuda::linear_forward(dout_gpu.get(), dx.get(), dwt.get(), with_bias ? dbias.get() : nullptr, N, IC, OC, stream_);
    cuda::linear_backward(ddx.get(), ddw.get(), with_bias ? ddb.get() : nullptr, ddout.get(), dx.get(), dwt.get(), N,
                          IC, OC, stream_);
    const std::string tag = with_bias ? " (bias)" : " (no bias)";
    expect_close(dout_gpu.download(), out_cpu, "linear out" + tag);
    expect_close(ddx.download(), dx_cpu, "linear dinp" + tag);
    expect_close(ddw.download(), dw_cpu, "linear dw" + tag);
    expect_close(ddb.download(), db_cpu, "linear dbias" + tag);
  }
}

TEST_F(CudaKernelBlas, LinearBackwardWithoutDinp) {
  const int N = 300, IC = 17, OC = 65;  // N > 32 rows per column lane in the dbias reduction
  auto x = randn(rng_, int64_t{N} * IC), w = randn(rng_, int64_t{OC} * IC), dout = randn(rng_, int64_t{N} * OC);
  std::vector<float> dw_cpu(int64_t{OC} * IC, 0.0f), db_cpu(OC, 0.0f);
  cpu::linear_backward(nullptr, dw_cpu.data(), db_cpu.data(), dout.data(), x.data(), w.data(), N, IC, OC);
  auto dx = dev(x), dwt = dev(w), ddout = dev(dout), ddw = dev_zeros(dw_cpu.size()), ddb = dev_zeros(OC);
  cuda::linear_backward(nullptr, ddw.get(), ddb.get(), ddout.get(), dx.get(), dwt.get(), N, IC, OC, stream_);
  expect_close(ddw.download(), dw_cpu, "linear dw (no dinp)");
  expect_close(ddb.download(), db_cpu, "linear dbias (no dinp)");
}

// ---------------------------------------------------------------- embedding

class CudaKernelEmbedding : public CudaKernelTest {};

TEST_F(CudaKernelEmbedding, ForwardBackwardWithRepeatedIds) {
  const int V = 50, C = 40, N = 200;  // N > V: ids repeat, so the backward scatter collides
  auto wte = randn(rng_, int64_t{V} * C);
  auto ids = rand_ids(rng_, N, V);
  auto dout = randn(rng_, int64_t{N} * C);
  auto dwte0 = randn(rng_, int64_t{V} * C);
  std::vector<float> out_cpu(int64_t{N} * C), dwte_cpu = dwte0;
  cpu::embedding_forward(out_cpu.data(), ids.data(), wte.data(), N, C);
  cpu::embedding_backward(dwte_cpu.data(), dout.data(), ids.data(), N, C);

  auto dids = dev(ids);
  auto dwt = dev(wte), ddout = dev(dout), dout_gpu = dev_zeros(out_cpu.size()), ddwte = dev(dwte0);
  cuda::embedding_forward(dout_gpu.get(), dids.get(), dwt.get(), N, C, stream_);
  cuda::embedding_backward(ddwte.get(), ddout.get(), dids.get(), N, C, stream_);
  expect_close(dout_gpu.download(), out_cpu, "embedding out");
  expect_close(ddwte.download(), dwte_cpu, "embedding dwte");
}

// ---------------------------------------------------------------- norms

class CudaKernelNorm : public CudaKernelTest {};

TEST_F(CudaKernelNorm, RmsNormForwardBackward) {
  for (int C : {7, 96, 1100}) {  // below a warp, one block pass, several strided passes
    const int N = 67;
    const float eps = 1e-5f;
    auto x = randn(rng_, int64_t{N} * C), w = randn(rng_, C), dout = randn(rng_, int64_t{N} * C);
    auto dw0 = randn(rng_, C);
    std::vector<float> out_cpu(x.size()), rstd_cpu(N), dx_cpu(x.size()), dw_cpu = dw0;
    cpu::rmsnorm_forward(out_cpu.data(), rstd_cpu.data(), x.data(), w.data(), N, C, eps);
    cpu::rmsnorm_backward(dx_cpu.data(), dw_cpu.data(), dout.data(), x.data(), w.data(), rstd_cpu.data(), N, C);

    auto dx_in = dev(x), dwt = dev(w), ddout = dev(dout), dout_gpu = dev_zeros(x.size()), drstd = dev_zeros(N);
    auto ddx = dev_zeros(x.size()), ddw = dev(dw0);
    cuda::rmsnorm_forward(dout_gpu.get(), drstd.get(), dx_in.get(), dwt.get(), N, C, eps, stream_);
    cuda::rmsnorm_backward(ddx.get(), ddw.get(), ddout.get(), dx_in.get(), dwt.get(), drstd.get(), N, C, stream_);
    const std::string tag = " C=" + std::to_string(C);
    expect_close(dout_gpu.download(), out_cpu, "rmsnorm out" + tag);
    expect_close(drstd.download(), rstd_cpu, "rmsnorm rstd" + tag);
    expect_close(ddx.download(), dx_cpu, "rmsnorm dinp" + tag);
    expect_close(ddw.download(), dw_cpu, "rmsnorm dw" + tag);
  }
}

TEST_F(CudaKernelNorm, LayerNormForwardBackward) {
  for (int C : {7, 96, 1100}) {
    const int N = 41;
    const float eps = 1e-5f;
    auto x = randn(rng_, int64_t{N} * C), w = randn(rng_, C), b = randn(rng_, C);
    auto dout = randn(rng_, int64_t{N} * C), dw0 = randn(rng_, C), db0 = randn(rng_, C);
    for (auto& v : x) v = 0.5f + 2.0f * v;  // nonzero mean, non-unit variance
    std::vector<float> out_cpu(x.size()), mean_cpu(N), rstd_cpu(N), dx_cpu(x.size()), dw_cpu = dw0, db_cpu = db0;
    cpu::layernorm_forward(out_cpu.data(), mean_cpu.data(), rstd_cpu.data(), x.data(), w.data(), b.data(), N, C, eps);
    cpu::layernorm_backward(dx_cpu.data(), dw_cpu.data(), db_cpu.data(), dout.data(), x.data(), w.data(),
                            mean_cpu.data(), rstd_cpu.data(), N, C);

    auto dx_in = dev(x), dwt = dev(w), dbt = dev(b), ddout = dev(dout);
    auto dout_gpu = dev_zeros(x.size()), dmean = dev_zeros(N), drstd = dev_zeros(N);
    auto ddx = dev_zeros(x.size()), ddw = dev(dw0), ddb = dev(db0);
    cuda::layernorm_forward(dout_gpu.get(), dmean.get(), drstd.get(), dx_in.get(), dwt.get(), dbt.get(), N, C, eps,
                            stream_);
    cuda::layernorm_backward(ddx.get(), ddw.get(), ddb.get(), ddout.get(), dx_in.get(), dwt.get(), dmean.get(),
                             drstd.get(), N, C, stream_);
    const std::string tag = " C=" + std::to_string(C);
    expect_close(dout_gpu.download(), out_cpu, "layernorm out" + tag);
    expect_close(dmean.download(), mean_cpu, "layernorm mean" + tag);
    expect_close(drstd.download(), rstd_cpu, "layernorm rstd" + tag);
    expect_close(ddx.download(), dx_cpu, "layernorm dinp" + tag);
    expect_close(ddw.download(), dw_cpu, "layernorm dw" + tag);
    expect_close(ddb.download(), db_cpu, "layernorm db" + tag);
  }
}

// ---------------------------------------------------------------- activations

class CudaKernelActivation : public CudaKernelTest {};

TEST_F(CudaKernelActivation, GeluForwardBackward) {
  const int64_t n = 10007;
  auto x = randn(rng_, n, 3.0f), dout = randn(rng_, n);
  std::vector<float> out_cpu(n), dx_cpu(n);
  cpu::gelu_forward(out_cpu.data(), x.data(), n);
  cpu::gelu_backward(dx_cpu.data(), dout.data(), x.data(), n);
  auto dx_in = dev(x), ddout = dev(dout), dout_gpu = dev_zeros(n), ddx = dev_zeros(n);
  cuda::gelu_forward(dout_gpu.get(), dx_in.get(), n, stream_);
  cuda::gelu_backward(ddx.get(), ddout.get(), dx_in.get(), n, stream_);
  expect_close(dout_gpu.download(), out_cpu, "gelu out");
  expect_close(ddx.download(), dx_cpu, "gelu dinp");
}

TEST_F(CudaKernelActivation, SwigluForwardBackward) {
  const int64_t n = 9001;
  auto g = randn(rng_, n, 3.0f), u = randn(rng_, n), dout = randn(rng_, n);
  std::vector<float> out_cpu(n), dg_cpu(n), du_cpu(n);
  cpu::swiglu_forward(out_cpu.data(), g.data(), u.data(), n);
  cpu::swiglu_backward(dg_cpu.data(), du_cpu.data(), dout.data(), g.data(), u.data(), n);
  auto dg_in = dev(g), du_in = dev(u), ddout = dev(dout), dout_gpu = dev_zeros(n), ddg = dev_zeros(n),
       ddu = dev_zeros(n);
  cuda::swiglu_forward(dout_gpu.get(), dg_in.get(), du_in.get(), n, stream_);
  cuda::swiglu_backward(ddg.get(), ddu.get(), ddout.get(), dg_in.get(), du_in.get(), n, stream_);
  expect_close(dout_gpu.download(), out_cpu, "swiglu out");
  expect_close(ddg.download(), dg_cpu, "swiglu dgate");
  expect_close(ddu.download(), du_cpu, "swiglu dup");
}

// ---------------------------------------------------------------- cross-entropy

class CudaKernelLoss : public CudaKernelTest {};

TEST_F(CudaKernelLoss, CrossEntropyForwardBackwardWithIgnoredTargets) {
  for (int V : {11, 1000, 5003}) {
    const int N = 37;
    auto logits = randn(rng_, int64_t{N} * V, 4.0f);
    auto targets = rand_ids(rng_, N, V);
    for (int i = 0; i < N; i += 5) targets[i] = -1;  // ignored rows
    const float dloss = 0.7f;
    std::vector<float> losses_cpu(N), probs_cpu(logits.size()), dlogits_cpu(logits.size());
    const float mean_cpu =
        cpu::cross_entropy_forward(losses_cpu.data(), probs_cpu.data(), logits.data(), targets.data(), N, V);
    cpu::cross_entropy_backward(dlogits_cpu.data(), probs_cpu.data(), targets.data(), N, V, dloss);

    auto dtgt = dev(targets);
    auto dlog = dev(logits), dlosses = dev_zeros(N), dprobs = dev_zeros(logits.size());
    auto dmean = dev_zeros(1), ddlog = dev_zeros(logits.size());
    cuda::cross_entropy_forward(dlosses.get(), dprobs.get(), dmean.get(), dlog.get(), dtgt.get(), N, V, stream_);
    cuda::cross_entropy_backward(ddlog.get(), dprobs.get(), dtgt.get(), N, V, dloss, stream_);
    const std::string tag = " V=" + std::to_string(V);
    expect_close(dlosses.download(), losses_cpu, "ce losses" + tag);
    expect_close(dprobs.download(), probs_cpu, "ce probs" + tag);
    expect_close(dmean.download(), {mean_cpu}, "ce mean loss" + tag);
    expect_close(ddlog.download(), dlogits_cpu, "ce dlogits" + tag);

    // in place: dlogits aliasing probs
    cuda::cross_entropy_backward(dprobs.get(), dprobs.get(), dtgt.get(), N, V, dloss, stream_);
    expect_close(dprobs.download(), dlogits_cpu, "ce dlogits in place" + tag);
  }
}

TEST_F(CudaKernelLoss, CrossEntropyAllIgnored) {
  const int N = 4, V = 9;
  auto logits = randn(rng_, int64_t{N} * V);
  std::vector<int32_t> targets(N, -1);
  auto dtgt = dev(targets);
  auto dlog = dev(logits), dlosses = dev(std::vector<float>(N, 5.0f));
  auto dprobs = dev_zeros(logits.size()), dmean = dev(std::vector<float>{5.0f});
  auto ddlog = dev(std::vector<float>(logits.size(), 5.0f));
  cuda::cross_entropy_forward(dlosses.get(), dprobs.get(), dmean.get(), dlog.get(), dtgt.get(), N, V, stream_);
  cuda::cross_entropy_backward(ddlog.get(), dprobs.get(), dtgt.get(), N, V, 1.0f, stream_);
  EXPECT_EQ(dmean.download()[0], 0.0f);
  for (float v : dlosses.download()) EXPECT_EQ(v, 0.0f);
  for (float v : ddlog.download()) EXPECT_EQ(v, 0.0f);
}

// ---------------------------------------------------------------- rope

class CudaKernelRope : public CudaKernelTest {};

TEST_F(CudaKernelRope, ForwardBackward) {
  const int B = 2, T = 9, nh = 3, D = 16, pos0 = 5;
  const float theta = 10000.0f;
  auto x = randn(rng_, int64_t{B} * T * nh * D), dy = randn(rng_, x.size());
  std::vector<float> x_cpu = x, dy_cpu = dy;
  cpu::rope_forward(x_cpu.data(), B, T, nh, D, pos0, theta);
  cpu::rope_backward(dy_cpu.data(), B, T, nh, D, pos0, theta);
  auto dx = dev(x), ddy = dev(dy);
  cuda::rope_forward(dx.get(), B, T, nh, D, pos0, theta, stream_);
  cuda::rope_backward(ddy.get(), B, T, nh, D, pos0, theta, stream_);
  expect_close(dx.download(), x_cpu, "rope forward");
  expect_close(ddy.download(), dy_cpu, "rope backward");
  // the backward is the inverse rotation: backward(forward(x)) == x
  cuda::rope_backward(dx.get(), B, T, nh, D, pos0, theta, stream_);
  expect_close(dx.download(), x, "rope round trip");
}

// ---------------------------------------------------------------- attention

class CudaKernelAttention : public CudaKernelTest {};

struct AttCase {
  int B, T, H, Hkv, D;
};

TEST_F(CudaKernelAttention, CausalGqaForwardBackward) {
  for (AttCase c :
       {AttCase{2, 7, 4, 2, 16}, AttCase{1, 33, 3, 1, 40}, AttCase{2, 20, 2, 2, 64}, AttCase{1, 130, 4, 2, 8}}) {
    const int B = c.B, T = c.T, H = c.H, Hkv = c.Hkv, D = c.D;
    const int64_t nq = int64_t{B} * T * H * D, nkv = int64_t{B} * T * Hkv * D, natt = int64_t{B} * H * T * T;
    auto q = randn(rng_, nq), k = randn(rng_, nkv), v = randn(rng_, nkv), dout = randn(rng_, nq);

    std::vector<float> out_cpu(nq), att_cpu(natt, 0.0f), dq_cpu(nq), dk_cpu(nkv), dv_cpu(nkv), scratch(natt, 0.0f);
    cpu::attention_forward(out_cpu.data(), att_cpu.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, D);
    cpu::attention_backward(dq_cpu.data(), dk_cpu.data(), dv_cpu.data(), scratch.data(), dout.data(), q.data(),
                            k.data(), v.data(), att_cpu.data(), B, T, H, Hkv, D);

    auto dq_in = dev(q), dk_in = dev(k), dv_in = dev(v), ddout = dev(dout);
    auto dout_gpu = dev_zeros(nq), datt = dev(std::vector<float>(natt, 7.0f));  // garbage: the kernel zeroes t < j
    auto ddq = dev_zeros(nq), ddk = dev_zeros(nkv), ddv = dev_zeros(nkv), dscratch = dev_zeros(natt);
    cuda::attention_forward(dout_gpu.get(), datt.get(), dq_in.get(), dk_in.get(), dv_in.get(), B, T, H, Hkv, D,
                            stream_);
    cuda::attention_backward(ddq.get(), ddk.get(), ddv.get(), dscratch.get(), ddout.get(), dq_in.get(), dk_in.get(),
                             dv_in.get(), datt.get(), B, T, H, Hkv, D, stream_);
    const std::string tag = " B=" + std::to_string(B) + " T=" + std::to_string(T) + " H=" + std::to_string(H) +
                            " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D);
    expect_close(dout_gpu.download(), out_cpu, "attention out" + tag);
    expect_close(datt.download(), att_cpu, "attention att" + tag);
    expect_close(ddq.download(), dq_cpu, "attention dq" + tag);
    expect_close(ddk.download(), dk_cpu, "attention dk" + tag);
    expect_close(ddv.download(), dv_cpu, "attention dv" + tag);
  }
}

// ---------------------------------------------------------------- elementwise helpers, bf16

class CudaKernelElementwise : public CudaKernelTest {};

TEST_F(CudaKernelElementwise, AddScaleSumSquares) {
  const int64_t n = 70001;
  auto a = randn(rng_, n), b = randn(rng_, n);
  std::vector<float> sum_cpu(n), inplace_cpu = a, scaled_cpu = a;
  cpu::add(sum_cpu.data(), a.data(), b.data(), n);
  cpu::add_inplace(inplace_cpu.data(), b.data(), n);
  cpu::scale_inplace(scaled_cpu.data(), -0.37f, n);
  const double ss_cpu = cpu::sum_squares(a.data(), n);

  auto da = dev(a), db = dev(b), dsum = dev_zeros(n), dinplace = dev(a), dscaled = dev(a);
  DeviceBuffer<double> dss(1, stream_);
  cuda::add(dsum.get(), da.get(), db.get(), n, stream_);
  cuda::add_inplace(dinplace.get(), db.get(), n, stream_);
  cuda::scale_inplace(dscaled.get(), -0.37f, n, stream_);
  cuda::sum_squares(dss.get(), da.get(), n, stream_);
  expect_close(dsum.download(), sum_cpu, "add");
  expect_close(dinplace.download(), inplace_cpu, "add_inplace");
  expect_close(dscaled.download(), scaled_cpu, "scale_inplace");
  const double ss_gpu = dss.download()[0];
  EXPECT_NEAR(ss_gpu, ss_cpu, 1e-9 * ss_cpu) << "sum_squares";

  // more elements than the partial-sum grid covers in one stride
  const int64_t big = 3'000'001;
  std::vector<float> ones(big, 0.5f);
  auto dones = dev(ones);
  cuda::sum_squares(dss.get(), dones.get(), big, stream_);
  EXPECT_NEAR(dss.download()[0], 0.25 * big, 1e-9 * big) << "sum_squares big";
}

TEST_F(CudaKernelElementwise, Bf16ConversionMatchesCpuBitForBit) {
  std::vector<float> x = randn(rng_, 4099, 100.0f);
  const float specials[] = {0.0f,
                            -0.0f,
                            1.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::max(),
                            1.00390625f,   // exactly halfway between two bf16 values (ties to even: down)
                            1.01171875f};  // halfway, ties to even: up
  x.insert(x.end(), std::begin(specials), std::end(specials));
  const int64_t n = static_cast<int64_t>(x.size());

  auto dx = dev(x);
  DeviceBuffer<__nv_bfloat16> dbf(n, stream_);
  auto dback = dev_zeros(n);
  cuda::f32_to_bf16(dbf.get(), dx.get(), n, stream_);
  cuda::bf16_to_f32(dback.get(), dbf.get(), n, stream_);
  auto bf = dbf.download();
  auto back = dback.download();
  int mismatches = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint16_t gpu_bits;
    std::memcpy(&gpu_bits, &bf[i], 2);
    const bf16 ref = float_to_bf16(x[i]);
    const float ref_back = bf16_to_float(ref);
    uint32_t a, b;
    std::memcpy(&a, &back[i], 4);
    std::memcpy(&b, &ref_back, 4);
    if (gpu_bits != ref.bits || a != b) {
      if (++mismatches <= 5)
        ADD_FAILURE() << "bf16 mismatch at " << i << ": x=" << x[i] << " gpu=0x" << std::hex << gpu_bits << " cpu=0x"
                      << ref.bits;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST_F(CudaKernelElementwise, StreamContextIsPerStream) {
  cudaStream_t other = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking));
  cuda::StreamContext& a = cuda::StreamContext::get(stream_);
  cuda::StreamContext& b = cuda::StreamContext::get(other);
  EXPECT_EQ(&a, &cuda::StreamContext::get(stream_));
  EXPECT_NE(&a, &b);
  EXPECT_NE(a.blas(), b.blas());
  EXPECT_NE(a.scratch(), b.scratch());
  cudaStream_t bound = nullptr;
  MOE_CUBLAS_CHECK(cublasGetStream(b.blas(), &bound));
  EXPECT_EQ(bound, other);
  MOE_CUDA_CHECK(cudaStreamSynchronize(other));
  cuda::StreamContext::release_all();
  MOE_CUDA_CHECK(cudaStreamDestroy(other));
}

}  // namespace
}  // namespace moe::test

#endif  // MOE_HAVE_CUDA
