// The token dispatch kernels on the GPU (kernels.cuh "token dispatch"): the MoE layer's row gathers, gate-weighted
// combines and gate gradients, one block per output row, every sum in a fixed order (deterministic).
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/kernels.cuh"

namespace moe::cuda {
namespace {

// The most rows of one call (one block per row: gridDim.x)
constexpr int64_t kMaxRowsPerLaunch = int64_t(1) << 30;

__global__ void gather_rows_kernel(float* __restrict__ out, const float* __restrict__ x,
                                   const int32_t* __restrict__ slot, const float* __restrict__ gate, int k, int C) {
  const int r = blockIdx.x, s = slot[r];
  const float* src = x + static_cast<int64_t>(s / k) * C;
  float* dst = out + static_cast<int64_t>(r) * C;
  if (gate) {
    const float g = gate[s];
    for (int c = threadIdx.x; c < C; c += blockDim.x) dst[c] = g * src[c];
  } else {
    for (int c = threadIdx.x; c < C; c += blockDim.x) dst[c] = src[c];
  }
}

__global__ void combine_rows_kernel(float* __restrict__ out, const float* __restrict__ y,
                                    const int32_t* __restrict__ row, const float* __restrict__ gate, int k, int C,
                                    bool accumulate) {
  const int n = blockIdx.x;
  float* o = out + static_cast<int64_t>(n) * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = accumulate ? o[c] : 0.0f;
    for (int j = 0; j < k; ++j) {  // slot order, as the CPU
      const int s = n * k + j, r = row[s];
      if (r < 0) continue;
      const float v = y[static_cast<int64_t>(r) * C + c];
      acc += gate ? gate[s] * v : v;
    }
    o[c] = acc;
  }
}

__global__ void row_dots_kernel(float* __restrict__ dot, const float* __restrict__ a, const float* __restrict__ y,
                                const int32_t* __restrict__ row, int k, int C) {
  const int s = blockIdx.x, r = row[s];
  if (r < 0) {  // the whole block returns: no thread reaches the block_sum
    if (threadIdx.x == 0) dot[s] = 0.0f;
    return;
  }
  const float* an = a + static_cast<int64_t>(s / k) * C;
  const float* yr = y + static_cast<int64_t>(r) * C;
  double acc = 0.0;
  for (int c = threadIdx.x; c < C; c += blockDim.x) acc += static_cast<double>(an[c]) * yr[c];
  acc = detail::block_sum(acc);
  if (threadIdx.x == 0) dot[s] = static_cast<float>(acc);
}

void check_rows(const char* op, int64_t rows, int k, int C) {
  MOE_CHECK(rows >= 0 && rows <= kMaxRowsPerLaunch && k >= 1 && C >= 0,
            "cuda::" << op << ": bad shape rows=" << rows << " k=" << k << " C=" << C);
}

}  // namespace

void gather_rows(float* out, const float* x, const int32_t* slot, const float* gate, int R, int k, int C,
                 cudaStream_t stream) {
  check_rows("gather_rows", R, k, C);
  if (R == 0 || C == 0) return;
  gather_rows_kernel<<<R, detail::block_for(C, 256), 0, stream>>>(out, x, slot, gate, k, C);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void combine_rows(float* out, const float* y, const int32_t* row, const float* gate, int N, int k, int C,
                  bool accumulate, cudaStream_t stream) {
  check_rows("combine_rows", N, k, C);
  if (N == 0 || C == 0) return;
  combine_rows_kernel<<<N, detail::block_for(C, 256), 0, stream>>>(out, y, row, gate, k, C, accumulate);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void row_dots(float* dot, const float* a, const float* y, const int32_t* row, int N, int k, int C,
              cudaStream_t stream) {
  check_rows("row_dots", int64_t(N) * k, k, C);
  if (N == 0) return;
  row_dots_kernel<<<N * k, detail::block_for(C, 256), 0, stream>>>(dot, a, y, row, k, C);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe::cuda
