// Softmax cross-entropy on the GPU: one block per row, online softmax (running max and sum in one pass).
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/kernels.cuh"

namespace moe::cuda {

namespace {

constexpr int kLossBlock = 512;

// Merge two (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}

__global__ void __launch_bounds__(kLossBlock)
    cross_entropy_forward_kernel(float* __restrict__ losses, float* __restrict__ probs,
                                 const float* __restrict__ logits, const int32_t* __restrict__ targets, int V) {
  __shared__ float sh_m[32], sh_s[32];
  const int64_t row = blockIdx.x;
  const float* x = logits + row * V;
  float* p = probs + row * V;

  // per-thread online softmax
  float m = -INFINITY, s = 0.0f;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = x[i];
    if (v > m) {
      s = s * expf(m - v) + 1.0f;  // expf(-inf) = 0 on the first element
      m = v;
    } else if (m != -INFINITY) {  // (v <= m == -inf: an all -inf prefix adds nothing)
      s += expf(v - m);
    }
  }
  // warp, then block merge
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    online_merge(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) {
    sh_m[wid] = m;
    sh_s[wid] = s;
  }
  __syncthreads();
  m = lane < nw ? sh_m[lane] : -INFINITY;
  s = lane < nw ? sh_s[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    online_merge(m, s, m2, s2);
  }

  const float inv = 1.0f / s;
  for (int i = threadIdx.x; i < V; i += blockDim.x) p[i] = expf(x[i] - m) * inv;
  if (threadIdx.x == 0) {
    const int32_t t = targets[row];
    float loss = 0.0f;
    if (t >= V) {
      loss = NAN;  // out-of-range target: poison the loss rather than read out of bounds
    } else if (t >= 0) {
      loss = logf(s) + m - x[t];  // -log softmax(x)[t] = logsumexp(x) - x[t]
    }
    losses[row] = loss;
  }
}

// mean_loss[1] = sum(losses over non-ignored rows) / count (0 if none); one block.
__global__ void __launch_bounds__(1024)
    mean_loss_kernel(float* __restrict__ mean_loss, const float* __restrict__ losses,
                     const int32_t* __restrict__ targets, int N) {
  double sum = 0.0;
  int count = 0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    if (targets[i] >= 0) {
      sum += losses[i];
      ++count;
    }
  }
  sum = detail::block_sum(sum);
  count = detail::block_sum(count);
  if (threadIdx.x == 0) *mean_loss = count > 0 ? static_cast<float>(sum / count) : 0.0f;
}

// count[1] = number of rows with target >= 0; one block.
__global__ void __launch_bounds__(1024)
    count_targets_kernel(int* __restrict__ count, const int32_t* __restrict__ targets, int N) {
  int c = 0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) c += targets[i] >= 0 ? 1 : 0;
  c = detail::block_sum(c);
  if (threadIdx.x == 0) *count = c;
}

// dlogits may alias probs: each element is read, then written, by the same thread.
__global__ void __launch_bounds__(kLossBlock)
    cross_entropy_backward_kernel(float* dlogits, const float* probs, const int32_t* __restrict__ targets,
                                  const int* __restrict__ count, int V, float dloss) {
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  float* d = dlogits + row * V;
  const float* p = probs + row * V;
  if (t < 0) {
    for (int i = threadIdx.x; i < V; i += blockDim.x) d[i] = 0.0f;
    return;
  }
  const float scale = dloss / static_cast<float>(max(*count, 1));
  for (int i = threadIdx.x; i < V; i += blockDim.x) d[i] = (p[i] - (i == t ? 1.0f : 0.0f)) * scale;
}

}  // namespace

void cross_entropy_forward(float* losses, float* probs, float* mean_loss, const float* logits, const int32_t* targets,
                           int N, int V, cudaStream_t stream) {
  MOE_CHECK(N >= 0 && V > 0, "cuda::cross_entropy_forward: bad shape N=" << N << " V=" << V);
  if (N > 0) {
    cross_entropy_forward_kernel<<<N, detail::block_for(V, kLossBlock), 0, stream>>>(losses, probs, logits, targets, V);
    MOE_CUDA_CHECK(cudaGetLastError());
  }
  if (mean_loss) {
    mean_loss_kernel<<<1, 1024, 0, stream>>>(mean_loss, losses, targets, N);
    MOE_CUDA_CHECK(cudaGetLastError());
  }
}

void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets, int N, int V, float dloss,
                            cudaStream_t stream) {
  MOE_CHECK(N >= 0 && V > 0, "cuda::cross_entropy_backward: bad shape N=" << N << " V=" << V);
  if (N == 0) return;
  int* count = static_cast<int*>(StreamContext::get(stream).scratch());
  count_targets_kernel<<<1, 1024, 0, stream>>>(count, targets, N);
  MOE_CUDA_CHECK(cudaGetLastError());
  cross_entropy_backward_kernel<<<N, detail::block_for(V, kLossBlock), 0, stream>>>(dlogits, probs, targets, count, V,
                                                                                    dloss);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe::cuda
