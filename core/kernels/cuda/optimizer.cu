// AdamW on the GPU (kernels.cuh): one grid-stride kernel for a dense update, and for lazy Adam over the touched rows
// of a row-sparse table one kernel with a block per row (block-stride over the rows): the block's first thread
// advances the row's step count, every thread derives the row's bias corrections from it once, then the block
// walks the row. The math is the CPU's (core/kernels/cpu/adamw.cpp), in fp32 with IEEE division and square root
// (nvcc's defaults; no --use_fast_math).
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/kernels.cuh"

namespace moe::cuda {
namespace {

using detail::block_for;
using detail::grid_for;
using detail::kBlock;

__device__ __forceinline__ void update(float* w, const float* g, float* m, float* v, int64_t j,
                                       const cpu::AdamWHyper& h, float bc1, float bc2) {
  const float gj = g[j] * h.gscale;
  m[j] = h.b1 * m[j] + (1.0f - h.b1) * gj;
  v[j] = h.b2 * v[j] + (1.0f - h.b2) * gj * gj;
  const float mhat = m[j] / bc1;
  const float vhat = v[j] / bc2;
  w[j] -= h.lr * (mhat / (sqrtf(vhat) + h.eps) + h.decay * w[j]);
}

__global__ void adamw_kernel(float* w, const float* g, float* m, float* v, int64_t n, cpu::AdamWHyper h, float bc1,
                             float bc2) {
  MOE_GRID_STRIDE(i, n) update(w, g, m, v, i, h, bc1, bc2);
}

__global__ void adamw_rows_kernel(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows,
                                  int64_t n_rows, int64_t row_size, cpu::AdamWHyper h) {
  for (int64_t k = blockIdx.x; k < n_rows; k += gridDim.x) {
    const int64_t r = rows[k];
    if (threadIdx.x == 0) ++row_t[r];  // rows are distinct: no other block touches this count
    __syncthreads();
    const float tr = static_cast<float>(row_t[r]);
    const float bc1 = 1.0f - powf(h.b1, tr), bc2 = 1.0f - powf(h.b2, tr);
    for (int64_t j = threadIdx.x; j < row_size; j += blockDim.x) update(w, g, m, v, r * row_size + j, h, bc1, bc2);
  }
}

}  // namespace

void adamw(float* w, const float* g, float* m, float* v, int64_t n, const cpu::AdamWHyper& h, float bc1, float bc2,
           cudaStream_t stream) {
  if (n <= 0) return;
  adamw_kernel<<<grid_for(n), kBlock, 0, stream>>>(w, g, m, v, n, h, bc1, bc2);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void adamw_rows(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows, int64_t n_rows,
                int64_t row_size, const cpu::AdamWHyper& h, cudaStream_t stream) {
  if (n_rows <= 0 || row_size <= 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(n_rows, 65536));
  adamw_rows_kernel<<<blocks, block_for(row_size), 0, stream>>>(w, g, m, v, row_t, rows, n_rows, row_size, h);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe::cuda
