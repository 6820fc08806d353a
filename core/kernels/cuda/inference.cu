// The inference-path kernels on the GPU (kernels.cuh): the batch-invariant linear layer, rotary embedding at
// per-row positions from a table, and the row scatter of the paged KV cache write.
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/kernels.cuh"

namespace moe::cuda {
namespace {

using detail::warp_sum;

constexpr int kWarpsPerBlock = 8;

// Grid (ceil(OC / kWarpsPerBlock), N): warp w of block (b, n) computes out[n, b * kWarpsPerBlock + w]; lane l sums
// the products k = l, l + 32, ... in order, then a fixed shuffle tree: the same for every row and batch.
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    linear_rows_kernel(float* __restrict__ out, const float* __restrict__ inp, const float* __restrict__ w,
                       const float* __restrict__ bias, int IC, int OC) {
  const int n = blockIdx.y, lane = threadIdx.x & 31;
  const int o = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (o >= OC) return;
  const float* x = inp + static_cast<int64_t>(n) * IC;
  const float* wr = w + static_cast<int64_t>(o) * IC;
  float acc = 0.0f;
  for (int k = lane; k < IC; k += 32) acc = fmaf(x[k], wr[k], acc);
  acc = warp_sum(acc);
  if (lane == 0) out[static_cast<int64_t>(n) * OC + o] = bias ? acc + bias[o] : acc;
}

__global__ void rope_rows_kernel(float* __restrict__ x, const int32_t* __restrict__ pos, const float* __restrict__ cs,
                                 int nh, int D) {
  const int n = blockIdx.x, half = D / 2;
  const float* tab = cs + static_cast<int64_t>(pos[n]) * D;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float c = tab[2 * i], s = tab[2 * i + 1];
    for (int h = 0; h < nh; ++h) {
      float* p = x + (static_cast<int64_t>(n) * nh + h) * D + 2 * i;
      const float x0 = p[0], x1 = p[1];
      p[0] = x0 * c - x1 * s;
      p[1] = x0 * s + x1 * c;
    }
  }
}

__global__ void scatter_rows_kernel(float* __restrict__ dst, const float* __restrict__ src,
                                    const int32_t* __restrict__ idx, int C) {
  const int n = blockIdx.x;
  float* d = dst + static_cast<int64_t>(idx[n]) * C;
  const float* s = src + static_cast<int64_t>(n) * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) d[c] = s[c];
}

}  // namespace

void linear_rows(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC,
                 cudaStream_t stream) {
  MOE_CHECK(N >= 0 && IC >= 0 && OC >= 0 && N <= 65535,
            "cuda::linear_rows: bad size N=" << N << " IC=" << IC << " OC=" << OC << " (N <= 65535 per call)");
  if (N == 0 || OC == 0) return;
  const dim3 grid((OC + kWarpsPerBlock - 1) / kWarpsPerBlock, N);
  linear_rows_kernel<<<grid, 32 * kWarpsPerBlock, 0, stream>>>(out, inp, w, bias, IC, OC);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void rope_rows(float* x, const int32_t* pos, const float* cs, int N, int nh, int D, cudaStream_t stream) {
  MOE_CHECK(N >= 0 && nh >= 0 && D > 0 && D % 2 == 0,
            "cuda::rope_rows: bad shape N=" << N << " nh=" << nh << " D=" << D << " (D must be even)");
  if (N == 0 || nh == 0) return;
  rope_rows_kernel<<<N, detail::block_for(D / 2, 128), 0, stream>>>(x, pos, cs, nh, D);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void scatter_rows(float* dst, const float* src, const int32_t* idx, int N, int C, cudaStream_t stream) {
  MOE_CHECK(N >= 0 && C >= 0, "cuda::scatter_rows: bad shape N=" << N << " C=" << C);
  if (N == 0 || C == 0) return;
  scatter_rows_kernel<<<N, detail::block_for(C, 256), 0, stream>>>(dst, src, idx, C);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe::cuda
