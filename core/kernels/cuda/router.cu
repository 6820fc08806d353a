// The learned router on the GPU (kernels.cuh "learned router"): one thread per token running the per-token code
// the CPU runs (core/kernels/router_token.h), the sums over tokens as block sums into per-block partials, then
// the partials summed in block order: deterministic, no atomics on values.
#include <climits>

#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/kernels.cuh"
#include "core/kernels/router_token.h"

namespace moe::cuda {
namespace {

constexpr int kTokensPerBlock = 256;

// partial[blockIdx.x, E+2]: the block's tokens' sums of q_ne and lse^2, and its first token with a non-finite logit
// (-1: none); such a token's lse is NaN
__global__ void router_topk_kernel(cpu::RouterDims d, int32_t* __restrict__ choice, float* __restrict__ gate,
                                   float* __restrict__ score, double* __restrict__ lse, double* __restrict__ partial,
                                   const float* __restrict__ logits, const float* __restrict__ bias) {
  const int E = d.E, n = blockIdx.x * blockDim.x + threadIdx.x;
  const float* p = score + static_cast<int64_t>(n) * E;
  bool ok = false;
  double t = 1.0;
  if (n < d.N) {
    ok = router_token::route(d, choice + static_cast<int64_t>(n) * d.k, gate + static_cast<int64_t>(n) * d.k,
                             score + static_cast<int64_t>(n) * E, lse + n, logits + static_cast<int64_t>(n) * E, bias);
    if (ok) t = router_token::q_norm(d, p);
    else lse[n] = NAN;
  }
  double* out = partial + static_cast<int64_t>(blockIdx.x) * (E + 2);
  for (int e = 0; e < E; ++e) {
    const double s = detail::block_sum(ok ? p[e] / t : 0.0);
    if (threadIdx.x == 0) out[e] = s;
  }
  const double z = detail::block_sum(ok ? lse[n] * lse[n] : 0.0);
  __shared__ int first;
  if (threadIdx.x == 0) first = INT_MAX;
  __syncthreads();
  if (n < d.N && !ok) atomicMin(&first, n);
  __syncthreads();
  if (threadIdx.x == 0) {
    out[E] = z;
    out[E + 1] = first == INT_MAX ? -1.0 : static_cast<double>(first);
  }
}

// stats[E+2] from partial[blocks, E+2], one thread per column, the blocks in order
__global__ void router_stats_kernel(double* __restrict__ stats, const double* __restrict__ partial, int blocks, int E) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= E + 2) return;
  double v = c == E + 1 ? -1.0 : 0.0;
  for (int b = 0; b < blocks; ++b) {
    const double x = partial[static_cast<int64_t>(b) * (E + 2) + c];
    if (c < E + 1) v += x;
    else if (v < 0) v = x;  // the first block with a non-finite logit
  }
  stats[c] = v;
}

__global__ void router_logits_grad_kernel(cpu::RouterDims d, float* __restrict__ dlogits,
                                          const float* __restrict__ logits, const double* __restrict__ lse,
                                          const int32_t* __restrict__ choice, const int32_t* __restrict__ row,
                                          const float* __restrict__ dgate, const float* __restrict__ f,
                                          double aux_scale, double z_scale) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= d.N) return;
  const int64_t s = static_cast<int64_t>(n) * d.k, r = static_cast<int64_t>(n) * d.E;
  router_token::logits_grad(d, dlogits + r, logits + r, lse[n], choice + s, row + s, dgate + s, f, aux_scale,
                            z_scale);
}

void check_dims(const char* op, const cpu::RouterDims& d) {
  MOE_CHECK(d.N >= 0 && d.E >= 1 && d.k >= 1 && d.k <= d.E,
            "cuda::" << op << ": bad shape N=" << d.N << " E=" << d.E << " k=" << d.k);
}

}  // namespace

void router_topk(const cpu::RouterDims& d, int32_t* choice, float* gate, float* score, double* lse, double* stats,
                 const float* logits, const float* bias, cudaStream_t stream) {
  check_dims("router_topk", d);
  const int blocks = std::max((d.N + kTokensPerBlock - 1) / kTokensPerBlock, 1);
  void* partial = nullptr;
  MOE_CUDA_CHECK(cudaMallocAsync(&partial, sizeof(double) * blocks * (d.E + 2), stream));
  router_topk_kernel<<<blocks, kTokensPerBlock, 0, stream>>>(d, choice, gate, score, lse,
                                                             static_cast<double*>(partial), logits, bias);
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) {
    router_stats_kernel<<<(d.E + 2 + 127) / 128, 128, 0, stream>>>(stats, static_cast<double*>(partial), blocks, d.E);
    e = cudaGetLastError();
  }
  cudaFreeAsync(partial, stream);
  MOE_CUDA_CHECK(e);
}

void router_logits_grad(const cpu::RouterDims& d, float* dlogits, const float* logits, const double* lse,
                        const int32_t* choice, const int32_t* row, const float* dgate, const float* f,
                        double aux_scale, double z_scale, cudaStream_t stream) {
  check_dims("router_logits_grad", d);
  if (d.N == 0) return;
  router_logits_grad_kernel<<<(d.N + kTokensPerBlock - 1) / kTokensPerBlock, kTokensPerBlock, 0, stream>>>(
      d, dlogits, logits, lse, choice, row, dgate, f, aux_scale, z_scale);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe::cuda
