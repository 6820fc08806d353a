// RMSNorm and LayerNorm on the GPU (one block per row, warp-shuffle reductions), and the deterministic column
// reduction used for the parameter gradients (dw, db, dbias).
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/kernels.cuh"

namespace moe::cuda {

namespace detail {

namespace {

constexpr int kColTile = 32;   // columns per block (one warp's width: coalesced row reads)
constexpr int kRowLanes = 32;  // rows summed in parallel per block
constexpr int kColThreads = kColTile * kRowLanes;

// out[C] += sum over rows of f(n, c); block (kColTile, kRowLanes), one block per tile of 32 columns.
// Each (x, y) thread sums rows y, y + 32, ... of column c in order; then a fixed tree over y: deterministic.
__global__ void __launch_bounds__(kColThreads)
    column_reduce_kernel(float* __restrict__ out, ColumnReduce mode, const float* __restrict__ a,
                         const float* __restrict__ b, const float* __restrict__ m, const float* __restrict__ r, int N,
                         int C) {
  __shared__ float partial[kRowLanes][kColTile + 1];
  const int c = blockIdx.x * kColTile + threadIdx.x;
  float acc = 0.0f;
  if (c < C) {
    for (int n = threadIdx.y; n < N; n += kRowLanes) {
      const int64_t i = static_cast<int64_t>(n) * C + c;
      switch (mode) {
        case ColumnReduce::kSum:
          acc += a[i];
          break;
        case ColumnReduce::kProdRowScale:
          acc += a[i] * b[i] * r[n];
          break;
        case ColumnReduce::kCenteredScale:
          acc += a[i] * (b[i] - m[n]) * r[n];
          break;
      }
    }
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  for (int s = kRowLanes / 2; s > 0; s >>= 1) {
    if (threadIdx.y < s) partial[threadIdx.y][threadIdx.x] += partial[threadIdx.y + s][threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) out[c] += partial[0][threadIdx.x];
}

}  // namespace

void column_reduce(float* out, ColumnReduce mode, const float* a, const float* b, const float* m, const float* r, int N,
                   int C, cudaStream_t stream) {
  if (C <= 0) return;
  dim3 block(kColTile, kRowLanes);
  dim3 grid((C + kColTile - 1) / kColTile);
  column_reduce_kernel<<<grid, block, 0, stream>>>(out, mode, a, b, m, r, N, C);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace detail

namespace {

using detail::block_sum;

constexpr int kNormBlock = 512;  // max threads per row block

// ---------------------------------------------------------------- RMSNorm

__global__ void __launch_bounds__(kNormBlock)
    rmsnorm_forward_kernel(float* __restrict__ out, float* __restrict__ rstd, const float* __restrict__ inp,
                           const float* __restrict__ w, int C, float eps) {
  const int64_t row = blockIdx.x;
  const float* x = inp + row * C;
  float* y = out + row * C;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < C; i += blockDim.x) ss += x[i] * x[i];
  ss = block_sum(ss);
  const float r = 1.0f / sqrtf(ss / C + eps);
  for (int i = threadIdx.x; i < C; i += blockDim.x) y[i] = x[i] * r * w[i];
  if (threadIdx.x == 0 && rstd) rstd[row] = r;
}

// dx_i = r * w_i * dy_i - r^3 / C * x_i * sum_j (dy_j * w_j * x_j)
__global__ void __launch_bounds__(kNormBlock)
    rmsnorm_backward_kernel(float* __restrict__ dinp, const float* __restrict__ dout, const float* __restrict__ inp,
                            const float* __restrict__ w, const float* __restrict__ rstd, int C) {
  const int64_t row = blockIdx.x;
  const float* x = inp + row * C;
  const float* dy = dout + row * C;
  float* dx = dinp + row * C;
  const float r = rstd[row];
  float dot = 0.0f;
  for (int i = threadIdx.x; i < C; i += blockDim.x) dot += dy[i] * w[i] * x[i];
  dot = block_sum(dot);
  const float k = r * r * r * dot / C;
  for (int i = threadIdx.x; i < C; i += blockDim.x) dx[i] = r * w[i] * dy[i] - k * x[i];
}

// ---------------------------------------------------------------- LayerNorm

__global__ void __launch_bounds__(kNormBlock)
    layernorm_forward_kernel(float* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
                             const float* __restrict__ inp, const float* __restrict__ w, const float* __restrict__ b,
                             int C, float eps) {
  const int64_t row = blockIdx.x;
  const float* x = inp + row * C;
  float* y = out + row * C;
  float s = 0.0f;
  for (int i = threadIdx.x; i < C; i += blockDim.x) s += x[i];
  const float mu = block_sum(s) / C;
  float v = 0.0f;
  for (int i = threadIdx.x; i < C; i += blockDim.x) v += (x[i] - mu) * (x[i] - mu);
  const float r = 1.0f / sqrtf(block_sum(v) / C + eps);
  for (int i = threadIdx.x; i < C; i += blockDim.x) y[i] = (x[i] - mu) * r * w[i] + (b ? b[i] : 0.0f);
  if (threadIdx.x == 0) {
    if (mean) mean[row] = mu;
    if (rstd) rstd[row] = r;
  }
}

// xhat = (x - mean) * r, g = dy * w: dx = r * (g - mean(g) - xhat * mean(g * xhat))
__global__ void __launch_bounds__(kNormBlock)
    layernorm_backward_kernel(float* __restrict__ dinp, const float* __restrict__ dout, const float* __restrict__ inp,
                              const float* __restrict__ w, const float* __restrict__ mean,
                              const float* __restrict__ rstd, int C) {
  const int64_t row = blockIdx.x;
  const float* x = inp + row * C;
  const float* dy = dout + row * C;
  float* dx = dinp + row * C;
  const float mu = mean[row], r = rstd[row];
  float sg = 0.0f, sgx = 0.0f;
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    const float g = dy[i] * w[i];
    sg += g;
    sgx += g * (x[i] - mu) * r;
  }
  const float mg = block_sum(sg) / C;
  const float mgx = block_sum(sgx) / C;
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    const float xhat = (x[i] - mu) * r;
    dx[i] = r * (dy[i] * w[i] - mg - xhat * mgx);
  }
}

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps,
                     cudaStream_t stream) {
  MOE_CHECK(N >= 0 && C > 0, "cuda::rmsnorm_forward: bad shape N=" << N << " C=" << C);
  if (N == 0) return;
  rmsnorm_forward_kernel<<<N, detail::block_for(C, kNormBlock), 0, stream>>>(out, rstd, inp, w, C, eps);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd,
                      int N, int C, cudaStream_t stream) {
  MOE_CHECK(N >= 0 && C > 0, "cuda::rmsnorm_backward: bad shape N=" << N << " C=" << C);
  if (N == 0) return;
  if (dinp) {
    rmsnorm_backward_kernel<<<N, detail::block_for(C, kNormBlock), 0, stream>>>(dinp, dout, inp, w, rstd, C);
    MOE_CUDA_CHECK(cudaGetLastError());
  }
  if (dw) detail::column_reduce(dw, detail::ColumnReduce::kProdRowScale, dout, inp, nullptr, rstd, N, C, stream);
}

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N,
                       int C, float eps, cudaStream_t stream) {
  MOE_CHECK(N >= 0 && C > 0, "cuda::layernorm_forward: bad shape N=" << N << " C=" << C);
  if (N == 0) return;
  layernorm_forward_kernel<<<N, detail::block_for(C, kNormBlock), 0, stream>>>(out, mean, rstd, inp, w, b, C, eps);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                        const float* mean, const float* rstd, int N, int C, cudaStream_t stream) {
  MOE_CHECK(N >= 0 && C > 0, "cuda::layernorm_backward: bad shape N=" << N << " C=" << C);
  if (N == 0) return;
  if (dinp) {
    layernorm_backward_kernel<<<N, detail::block_for(C, kNormBlock), 0, stream>>>(dinp, dout, inp, w, mean, rstd, C);
    MOE_CUDA_CHECK(cudaGetLastError());
  }
  if (dw) detail::column_reduce(dw, detail::ColumnReduce::kCenteredScale, dout, inp, mean, rstd, N, C, stream);
  if (db) detail::column_reduce(db, detail::ColumnReduce::kSum, dout, nullptr, nullptr, nullptr, N, C, stream);
}

}  // namespace moe::cuda
