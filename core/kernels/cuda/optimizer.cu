// AdamW on the GPU (kernels.cuh): one grid-stride kernel for a dense update, and for lazy Adam over the touched rows
// of a row-sparse table a step-count kernel then one kernel over all the rows' elements. The math is the CPU's
// (core/kernels/cpu/adamw.cpp), in fp32 with IEEE division and square root (nvcc's defaults; no --use_fast_math).
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/kernels.cuh"

namespace moe::cuda {
namespace {

using detail::grid_for;
using detail::kBlock;

__device__ __forceinline__ void update(float* w, const float* g, float* m, float* v, int64_t j, const AdamWArgs& h,
                                       float bc1, float bc2) {
  const float gj = g[j] * h.gscale;
  m[j] = h.b1 * m[j] + (1.0f - h.b1) * gj;
  v[j] = h.b2 * v[j] + (1.0f - h.b2) * gj * gj;
  const float mhat = m[j] / bc1;
  const float vhat = v[j] / bc2;
  w[j] -= h.lr * (mhat / (sqrtf(vhat) + h.eps) + h.decay * w[j]);
}

__global__ void adamw_kernel(float* w, const float* g, float* m, float* v, int64_t n, AdamWArgs h, float bc1,
                             float bc2) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    update(w, g, m, v, i, h, bc1, bc2);
}

__global__ void row_steps_kernel(int32_t* row_t, const int64_t* rows, int64_t n_rows) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n_rows; k += int64_t(gridDim.x) * blockDim.x)
    ++row_t[rows[k]];  // rows are distinct: no two threads touch one count
}

__global__ void adamw_rows_kernel(float* w, const float* g, float* m, float* v, const int32_t* row_t,
                                  const int64_t* rows, int64_t n_rows, int64_t row_size, AdamWArgs h) {
  const int64_t n = n_rows * row_size;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = rows[i / row_size];
    const float tr = static_cast<float>(row_t[r]);
    update(w, g, m, v, r * row_size + i % row_size, h, 1.0f - powf(h.b1, tr), 1.0f - powf(h.b2, tr));
  }
}

}  // namespace

void adamw(float* w, const float* g, float* m, float* v, int64_t n, const AdamWArgs& h, float bc1, float bc2,
           cudaStream_t stream) {
  if (n <= 0) return;
  adamw_kernel<<<grid_for(n), kBlock, 0, stream>>>(w, g, m, v, n, h, bc1, bc2);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void adamw_rows(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows, int64_t n_rows,
                int64_t row_size, const AdamWArgs& h, cudaStream_t stream) {
  if (n_rows <= 0 || row_size <= 0) return;
  row_steps_kernel<<<grid_for(n_rows), kBlock, 0, stream>>>(row_t, rows, n_rows);
  MOE_CUDA_CHECK(cudaGetLastError());
  adamw_rows_kernel<<<grid_for(n_rows * row_size), kBlock, 0, stream>>>(w, g, m, v, row_t, rows, n_rows, row_size,
                                                                         h);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe::cuda
