// Elementwise and gather/scatter kernels on the GPU: activations, residual add, scaling, sum of squares,
// f32 <-> bf16, embedding (its backward through a stable sort of the ids: deterministic), rotary position embedding.
#include <cuda_bf16.h>

#include <cub/device/device_radix_sort.cuh>

#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/kernels.cuh"

namespace moe::cuda {

namespace {

using detail::grid_for;
using detail::kBlock;

// ---------------------------------------------------------------- activations

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluC = 0.044715f;

__global__ void gelu_forward_kernel(float* __restrict__ out, const float* __restrict__ inp, int64_t n) {
  MOE_GRID_STRIDE(i, n) {
    const float x = inp[i];
    out[i] = 0.5f * x * (1.0f + tanhf(kGeluK * (x + kGeluC * x * x * x)));
  }
}

__global__ void gelu_backward_kernel(float* __restrict__ dinp, const float* __restrict__ dout,
                                     const float* __restrict__ inp, int64_t n) {
  MOE_GRID_STRIDE(i, n) {
    const float x = inp[i];
    const float t = tanhf(kGeluK * (x + kGeluC * x * x * x));
    const float dt = kGeluK * (1.0f + 3.0f * kGeluC * x * x);
    dinp[i] = dout[i] * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * dt);
  }
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

__global__ void swiglu_forward_kernel(float* __restrict__ out, const float* __restrict__ gate,
                                      const float* __restrict__ up, int64_t n) {
  MOE_GRID_STRIDE(i, n) {
    const float g = gate[i];
    out[i] = g * sigmoidf(g) * up[i];
  }
}

// d silu(g) / dg = s + g s (1 - s)
__global__ void swiglu_backward_kernel(float* __restrict__ dgate, float* __restrict__ dup,
                                       const float* __restrict__ dout, const float* __restrict__ gate,
                                       const float* __restrict__ up, int64_t n) {
  MOE_GRID_STRIDE(i, n) {
    const float g = gate[i], u = up[i], dy = dout[i];
    const float s = sigmoidf(g);
    dgate[i] = dy * u * (s + g * s * (1.0f - s));
    dup[i] = dy * g * s;
  }
}

// ---------------------------------------------------------------- elementwise helpers

__global__ void add_inplace_kernel(float* y, const float* x, int64_t n) { MOE_GRID_STRIDE(i, n) y[i] += x[i]; }

__global__ void add_kernel(float* out, const float* a, const float* b, int64_t n) {
  MOE_GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}

__global__ void scale_inplace_kernel(float* y, float s, int64_t n) { MOE_GRID_STRIDE(i, n) y[i] *= s; }
__global__ void mul_kernel(float* out, const float* a, const float* b, int64_t n) {
  MOE_GRID_STRIDE(i, n) out[i] = a[i] * b[i];
}

constexpr int kMaxPartials = 1024;

__global__ void sum_squares_partial_kernel(double* __restrict__ partial, const float* __restrict__ x, int64_t n) {
  double acc = 0.0;
  MOE_GRID_STRIDE(i, n) {
    const double v = x[i];
    acc += v * v;
  }
  acc = detail::block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(1024)
    sum_partials_kernel(double* __restrict__ out, const double* __restrict__ partial, int count) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  acc = detail::block_sum(acc);
  if (threadIdx.x == 0) *out = acc;
}

// ---------------------------------------------------------------- row-sparse tables: blocks over the rows, threads over
// a row's elements (rows are distinct: no two blocks write one element)
__global__ void zero_rows_kernel(float* x, const int64_t* rows, int64_t n_rows, int64_t row_size) {
  for (int64_t k = blockIdx.x; k < n_rows; k += gridDim.x)
    for (int64_t j = threadIdx.x; j < row_size; j += blockDim.x) x[rows[k] * row_size + j] = 0.0f;
}

__global__ void scale_rows_kernel(float* x, float s, const int64_t* rows, int64_t n_rows, int64_t row_size) {
  for (int64_t k = blockIdx.x; k < n_rows; k += gridDim.x)
    for (int64_t j = threadIdx.x; j < row_size; j += blockDim.x) x[rows[k] * row_size + j] *= s;
}

// partial[blockIdx.x] = sum of squares of the rows this block visits (a fixed grid: deterministic)
__global__ void sum_squares_rows_partial_kernel(double* __restrict__ partial, const float* __restrict__ x,
                                                const int64_t* __restrict__ rows, int64_t n_rows, int64_t row_size) {
  double acc = 0.0;
  for (int64_t k = blockIdx.x; k < n_rows; k += gridDim.x)
    for (int64_t j = threadIdx.x; j < row_size; j += blockDim.x) {
      const double v = x[rows[k] * row_size + j];
      acc += v * v;
    }
  acc = detail::block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// ---------------------------------------------------------------- f32 <-> bf16
// Same bit recipe as moe::float_to_bf16 (core/bf16.h): round to nearest even, NaN kept quiet with its sign and
// payload (cvt.rn.bf16.f32 would canonicalise NaNs, so results would differ from the CPU's bit for bit).

__global__ void f32_to_bf16_kernel(__nv_bfloat16* __restrict__ out, const float* __restrict__ in, int64_t n) {
  MOE_GRID_STRIDE(i, n) {
    uint32_t u = __float_as_uint(in[i]);
    unsigned short bits;
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
      bits = static_cast<unsigned short>((u >> 16) | 0x0040u);
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = static_cast<unsigned short>(u >> 16);
    }
    out[i] = __ushort_as_bfloat16(bits);
  }
}

__global__ void bf16_to_f32_kernel(float* __restrict__ out, const __nv_bfloat16* __restrict__ in, int64_t n) {
  MOE_GRID_STRIDE(i, n) out[i] = __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(in[i])) << 16);
}

// ---------------------------------------------------------------- embedding

__global__ void embedding_forward_kernel(float* __restrict__ out, const int32_t* __restrict__ ids,
                                         const float* __restrict__ wte, int64_t total, int C) {
  MOE_GRID_STRIDE(i, total) {
    const int64_t n = i / C, c = i % C;
    out[i] = wte[static_cast<int64_t>(ids[n]) * C + c];
  }
}

// Token n's index, the values the sort carries along with the ids
__global__ void iota_kernel(int32_t* __restrict__ v, int n) {
  MOE_GRID_STRIDE(i, n) v[i] = static_cast<int32_t>(i);
}

// One block per position i of the tokens sorted by id (stable: token order within an id); the block at the first
// position of an id adds that id's rows, summed in token order, to its row of dwte: deterministic, no atomics
__global__ void embedding_segments_kernel(float* __restrict__ dwte, const float* __restrict__ dout,
                                          const int32_t* __restrict__ id, const int32_t* __restrict__ token, int N,
                                          int C) {
  const int i = blockIdx.x;
  if (i > 0 && id[i] == id[i - 1]) return;
  int end = i + 1;
  while (end < N && id[end] == id[i]) ++end;
  float* row = dwte + static_cast<int64_t>(id[i]) * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = 0.0f;
    for (int j = i; j < end; ++j) acc += dout[static_cast<int64_t>(token[j]) * C + c];
    row[c] += acc;
  }
}

// ---------------------------------------------------------------- rotary position embedding
// One block per (b, t); thread i handles the pair (2i, 2i+1) of every head: one double-precision sincos per
// (t, i), shared by the heads. sign = +1 rotates forward (R x), -1 applies the inverse (R^T dy).

__global__ void rope_kernel(float* __restrict__ x, int T, int nh, int D, int pos0, double log_theta, float sign) {
  const int64_t bt = blockIdx.x;
  const int t = static_cast<int>(bt % T);
  const int half = D / 2;
  const double pos = static_cast<double>(pos0) + t;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const double freq = exp(-(2.0 * i / D) * log_theta);  // theta^(-2i/D)
    double sd, cd;
    sincos(pos * freq, &sd, &cd);
    const float s = sign * static_cast<float>(sd), c = static_cast<float>(cd);
    for (int h = 0; h < nh; ++h) {
      float* p = x + (bt * nh + h) * D + 2 * i;
      const float x0 = p[0], x1 = p[1];
      p[0] = x0 * c - x1 * s;
      p[1] = x0 * s + x1 * c;
    }
  }
}

#undef MOE_GRID_STRIDE

void rope(float* x, int B, int T, int nh, int D, int pos0, float theta, float sign, cudaStream_t stream,
          const char* fn) {
  MOE_CHECK(B >= 0 && T >= 0 && nh >= 0 && D > 0 && D % 2 == 0,
            fn << ": bad shape B=" << B << " T=" << T << " nh=" << nh << " D=" << D << " (D must be even)");
  MOE_CHECK(theta > 0.0f, fn << ": theta must be positive, got " << theta);
  if (B == 0 || T == 0 || nh == 0) return;
  const int64_t rows = static_cast<int64_t>(B) * T;
  MOE_CHECK(rows <= 0x7fffffff, fn << ": B*T too large");
  rope_kernel<<<static_cast<unsigned>(rows), detail::block_for(D / 2, 128), 0, stream>>>(
      x, T, nh, D, pos0, std::log(static_cast<double>(theta)), sign);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// ---------------------------------------------------------------- host entry points

void gelu_forward(float* out, const float* inp, int64_t N, cudaStream_t stream) {
  if (N <= 0) return;
  gelu_forward_kernel<<<grid_for(N), kBlock, 0, stream>>>(out, inp, N);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t N, cudaStream_t stream) {
  if (N <= 0) return;
  gelu_backward_kernel<<<grid_for(N), kBlock, 0, stream>>>(dinp, dout, inp, N);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void swiglu_forward(float* out, const float* gate, const float* up, int64_t NF, cudaStream_t stream) {
  if (NF <= 0) return;
  swiglu_forward_kernel<<<grid_for(NF), kBlock, 0, stream>>>(out, gate, up, NF);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t NF,
                     cudaStream_t stream) {
  if (NF <= 0) return;
  swiglu_backward_kernel<<<grid_for(NF), kBlock, 0, stream>>>(dgate, dup, dout, gate, up, NF);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void add_inplace(float* y, const float* x, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  add_inplace_kernel<<<grid_for(n), kBlock, 0, stream>>>(y, x, n);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void add(float* out, const float* a, const float* b, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  add_kernel<<<grid_for(n), kBlock, 0, stream>>>(out, a, b, n);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void scale_inplace(float* y, float s, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  scale_inplace_kernel<<<grid_for(n), kBlock, 0, stream>>>(y, s, n);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void mul(float* out, const float* a, const float* b, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  mul_kernel<<<grid_for(n), kBlock, 0, stream>>>(out, a, b, n);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void sum_squares(double* out, const float* x, int64_t n, cudaStream_t stream) {
  static_assert(kMaxPartials * sizeof(double) <= StreamContext::kScratchBytes, "scratch too small");
  if (n <= 0) {
    MOE_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), stream));
    return;
  }
  auto* partial = static_cast<double*>(StreamContext::get(stream).scratch());
  const unsigned blocks = std::min<unsigned>(grid_for(n), kMaxPartials);
  sum_squares_partial_kernel<<<blocks, kBlock, 0, stream>>>(partial, x, n);
  MOE_CUDA_CHECK(cudaGetLastError());
  sum_partials_kernel<<<1, 1024, 0, stream>>>(out, partial, static_cast<int>(blocks));
  MOE_CUDA_CHECK(cudaGetLastError());
}

namespace {
unsigned row_blocks(int64_t n_rows, int64_t cap = 65536) { return static_cast<unsigned>(std::min(n_rows, cap)); }
}  // namespace

void zero_rows(float* x, const int64_t* rows, int64_t n_rows, int64_t row_size, cudaStream_t stream) {
  if (n_rows <= 0 || row_size <= 0) return;
  zero_rows_kernel<<<row_blocks(n_rows), detail::block_for(row_size), 0, stream>>>(x, rows, n_rows, row_size);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void scale_rows(float* x, float s, const int64_t* rows, int64_t n_rows, int64_t row_size, cudaStream_t stream) {
  if (n_rows <= 0 || row_size <= 0) return;
  scale_rows_kernel<<<row_blocks(n_rows), detail::block_for(row_size), 0, stream>>>(x, s, rows, n_rows, row_size);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void sum_squares_rows(double* out, const float* x, const int64_t* rows, int64_t n_rows, int64_t row_size,
                      cudaStream_t stream) {
  if (n_rows <= 0 || row_size <= 0) {
    MOE_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), stream));
    return;
  }
  auto* partial = static_cast<double*>(StreamContext::get(stream).scratch());
  const unsigned blocks = row_blocks(n_rows, kMaxPartials);
  sum_squares_rows_partial_kernel<<<blocks, kBlock, 0, stream>>>(partial, x, rows, n_rows, row_size);
  MOE_CUDA_CHECK(cudaGetLastError());
  sum_partials_kernel<<<1, 1024, 0, stream>>>(out, partial, static_cast<int>(blocks));
  MOE_CUDA_CHECK(cudaGetLastError());
}

void f32_to_bf16(__nv_bfloat16* out, const float* in, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  f32_to_bf16_kernel<<<grid_for(n), kBlock, 0, stream>>>(out, in, n);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void bf16_to_f32(float* out, const __nv_bfloat16* in, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  bf16_to_f32_kernel<<<grid_for(n), kBlock, 0, stream>>>(out, in, n);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void embedding_forward(float* out, const int32_t* ids, const float* wte, int N, int C, cudaStream_t stream) {
  MOE_CHECK(N >= 0 && C > 0, "cuda::embedding_forward: bad shape N=" << N << " C=" << C);
  const int64_t total = static_cast<int64_t>(N) * C;
  if (total == 0) return;
  embedding_forward_kernel<<<grid_for(total), kBlock, 0, stream>>>(out, ids, wte, total, C);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void embedding_backward(float* dwte, const float* dout, const int32_t* ids, int N, int C, cudaStream_t stream) {
  MOE_CHECK(N >= 0 && C > 0, "cuda::embedding_backward: bad shape N=" << N << " C=" << C);
  if (N == 0) return;
  // the ids sorted with their token indices (cub's radix sort is stable), in one stream-ordered temporary
  size_t sort_bytes = 0;
  MOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, ids, static_cast<int32_t*>(nullptr),
                                                 static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                                 N, 0, 32, stream));
  sort_bytes = (sort_bytes + 255) / 256 * 256;  // [sort's storage | sorted ids | token indices | sorted tokens]
  void* temp = nullptr;
  MOE_CUDA_CHECK(cudaMallocAsync(&temp, sort_bytes + sizeof(int32_t) * 3 * size_t(N), stream));
  auto* sorted_id = reinterpret_cast<int32_t*>(static_cast<char*>(temp) + sort_bytes);
  int32_t *token = sorted_id + N, *sorted_token = token + N;
  iota_kernel<<<grid_for(N), kBlock, 0, stream>>>(token, N);
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess)
    e = cub::DeviceRadixSort::SortPairs(temp, sort_bytes, ids, sorted_id, token, sorted_token, N, 0, 32,
                                        stream);
  if (e == cudaSuccess) {
    embedding_segments_kernel<<<N, detail::block_for(C), 0, stream>>>(dwte, dout, sorted_id, sorted_token, N, C);
    e = cudaGetLastError();
  }
  cudaFreeAsync(temp, stream);
  MOE_CUDA_CHECK(e);
}

void rope_forward(float* x, int B, int T, int nh, int D, int pos0, float theta, cudaStream_t stream) {
  rope(x, B, T, nh, D, pos0, theta, 1.0f, stream, "cuda::rope_forward");
}

void rope_backward(float* dx, int B, int T, int nh, int D, int pos0, float theta, cudaStream_t stream) {
  rope(dx, B, T, nh, D, pos0, theta, -1.0f, stream, "cuda::rope_backward");
}

}  // namespace moe::cuda
