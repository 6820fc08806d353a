// Internal helpers shared by the .cu files of core/kernels/cuda (not part of the kernel API in kernels.cuh).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/kernels/cuda/cuda_check.h"

// A grid-stride loop: thread-global index i over [0, n), whatever the grid size (grid_for caps it).
#define MOE_GRID_STRIDE(i, n)                                                            \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

namespace moe::cuda::detail {

constexpr int kBlock = 256;  // default block size of the elementwise kernels

// Blocks for a grid-stride loop over n elements (the loop covers whatever the cap leaves out).
inline unsigned grid_for(int64_t n, int block = kBlock) {
  int64_t g = (n + block - 1) / block;
  return static_cast<unsigned>(std::clamp<int64_t>(g, 1, 65536));
}

// Threads for a block that loops over `width` items (a row): a multiple of 32 in [32, cap].
inline int block_for(int64_t width, int cap = kBlock) {
  int64_t b = (width + 31) / 32 * 32;
  return static_cast<int>(std::clamp<int64_t>(b, 32, cap));
}

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. blockDim.x must be a multiple of 32 (<= 1024) and every
// thread of the block must call it (it synchronises). Safe to call repeatedly in one kernel.
template <class T>
__device__ T block_sum(T v) {
  __shared__ T shared[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading `shared`
  if (lane == 0) shared[wid] = v;
  __syncthreads();
  v = lane < nw ? shared[lane] : T(0);
  return warp_sum(v);
}

__device__ inline float block_max(float v) {
  __shared__ float shared[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[wid] = v;
  __syncthreads();
  v = lane < nw ? shared[lane] : -INFINITY;
  return warp_max(v);
}

// Column reductions over a row-major [N,C] matrix, accumulated into out[C] (+=), in a fixed order
// (deterministic). Defined in norm.cu.
enum class ColumnReduce {
  kSum,            // out[c] += sum_n a[n,c]
  kProdRowScale,   // out[c] += sum_n a[n,c] * b[n,c] * r[n]
  kCenteredScale,  // out[c] += sum_n a[n,c] * (b[n,c] - m[n]) * r[n]
};
void column_reduce(float* out, ColumnReduce mode, const float* a, const float* b, const float* m, const float* r, int N,
                   int C, cudaStream_t stream);

}  // namespace moe::cuda::detail
