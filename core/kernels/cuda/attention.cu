// Causal self-attention with GQA on the GPU, same layouts as the CPU version (core/kernels/cpu/kernels.h).
// Straightforward and deterministic rather than fast: the forward and the dq pass run one block per
// (b, h, t) query row; the dk/dv pass runs one block per (b, kvh, j) key row and sums over the query heads of
// the group and the rows t >= j in a fixed order (no atomics).
#include <cmath>

#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/kernels.cuh"

namespace moe::cuda {

namespace {

using detail::block_max;
using detail::block_sum;
using detail::warp_sum;

constexpr int kAttBlock = 128;

struct AttShape {
  int T, H, Hkv, D;
  float scale;
};

// Grid (T, H, B). att row [T] holds the scores, then the probabilities; columns > t are zeroed.
__global__ void __launch_bounds__(kAttBlock)
    attention_forward_kernel(float* __restrict__ out, float* __restrict__ att, const float* __restrict__ q,
                             const float* __restrict__ k, const float* __restrict__ v, AttShape s) {
  extern __shared__ float q_row[];  // [D]
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int T = s.T, H = s.H, Hkv = s.Hkv, D = s.D;
  const int kvh = h / (H / Hkv);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;

  const float* qp = q + ((static_cast<int64_t>(b) * T + t) * H + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) q_row[d] = qp[d];
  __syncthreads();

  float* a = att + ((static_cast<int64_t>(b) * H + h) * T + t) * T;
  const int64_t kv_stride = static_cast<int64_t>(Hkv) * D;  // between consecutive time steps
  const float* kb = k + (static_cast<int64_t>(b) * T * Hkv + kvh) * D;
  const float* vb = v + (static_cast<int64_t>(b) * T * Hkv + kvh) * D;

  // scores: one warp per key row
  for (int j = wid; j <= t; j += nw) {
    const float* kj = kb + j * kv_stride;
    float dot = 0.0f;
    for (int d = lane; d < D; d += 32) dot += q_row[d] * kj[d];
    dot = warp_sum(dot);
    if (lane == 0) a[j] = dot * s.scale;
  }
  __syncthreads();  // makes the global writes above visible to the whole block

  float mx = -INFINITY;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) mx = fmaxf(mx, a[j]);
  mx = block_max(mx);
  float sum = 0.0f;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) {
    const float e = expf(a[j] - mx);
    a[j] = e;
    sum += e;
  }
  sum = block_sum(sum);  // synchronises: all exp values are written
  const float inv = 1.0f / sum;
  for (int j = threadIdx.x; j < T; j += blockDim.x) a[j] = j <= t ? a[j] * inv : 0.0f;
  __syncthreads();

  float* op = out + ((static_cast<int64_t>(b) * T + t) * H + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j <= t; ++j) acc += a[j] * vb[j * kv_stride + d];
    op[d] = acc;
  }
}

// Grid (T, H, B). With P = att row, dP[j] = dout_t . v_j, dS[j] = P[j] (dP[j] - sum_j' P[j'] dP[j']) (gradient
// of the scaled scores), stored in datt[j] for j <= t; dq_t = scale * sum_j dS[j] k_j.
__global__ void __launch_bounds__(kAttBlock)
    attention_backward_dq_kernel(float* __restrict__ dq, float* __restrict__ datt, const float* __restrict__ dout,
                                 const float* __restrict__ k, const float* __restrict__ v,
                                 const float* __restrict__ att, AttShape s) {
  extern __shared__ float do_row[];  // [D]
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int T = s.T, H = s.H, Hkv = s.Hkv, D = s.D;
  const int kvh = h / (H / Hkv);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;

  const int64_t row = (static_cast<int64_t>(b) * T + t) * H + h;  // into [B,T,H]
  for (int d = threadIdx.x; d < D; d += blockDim.x) do_row[d] = dout[row * D + d];
  __syncthreads();

  const int64_t arow = ((static_cast<int64_t>(b) * H + h) * T + t) * T;
  const float* p = att + arow;
  float* da = datt + arow;
  const int64_t kv_stride = static_cast<int64_t>(Hkv) * D;
  const float* kb = k + (static_cast<int64_t>(b) * T * Hkv + kvh) * D;
  const float* vb = v + (static_cast<int64_t>(b) * T * Hkv + kvh) * D;

  for (int j = wid; j <= t; j += nw) {
    const float* vj = vb + j * kv_stride;
    float dot = 0.0f;
    for (int d = lane; d < D; d += 32) dot += do_row[d] * vj[d];
    dot = warp_sum(dot);
    if (lane == 0) da[j] = dot;
  }
  __syncthreads();

  float pd = 0.0f;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) pd += p[j] * da[j];
  pd = block_sum(pd);  // synchronises
  for (int j = threadIdx.x; j <= t; j += blockDim.x) da[j] = p[j] * (da[j] - pd);
  __syncthreads();

  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j <= t; ++j) acc += da[j] * kb[j * kv_stride + d];
    dq[row * D + d] = acc * s.scale;
  }
}

// Grid (T, Hkv, B), one block per key row j: dk_j = scale * sum_{h in group} sum_{t >= j} dS[h,t,j] q[t,h];
// dv_j = sum_{h in group} sum_{t >= j} P[h,t,j] dout[t,h].
__global__ void __launch_bounds__(kAttBlock)
    attention_backward_dkv_kernel(float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ datt,
                                  const float* __restrict__ dout, const float* __restrict__ q,
                                  const float* __restrict__ att, AttShape s) {
  const int j = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int T = s.T, H = s.H, Hkv = s.Hkv, D = s.D;
  const int group = H / Hkv;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc_k = 0.0f, acc_v = 0.0f;
    for (int g = 0; g < group; ++g) {
      const int h = kvh * group + g;
      const int64_t col = (static_cast<int64_t>(b) * H + h) * T * T + j;  // att[b,h,0,j]
      for (int t = j; t < T; ++t) {
        const int64_t a = col + static_cast<int64_t>(t) * T;
        const int64_t qi = ((static_cast<int64_t>(b) * T + t) * H + h) * D + d;
        acc_k += datt[a] * q[qi];
        acc_v += att[a] * dout[qi];
      }
    }
    const int64_t kvi = ((static_cast<int64_t>(b) * T + j) * Hkv + kvh) * D + d;
    dk[kvi] = acc_k * s.scale;
    dv[kvi] = acc_v;
  }
}

AttShape check_shape(int B, int T, int H, int Hkv, int D, const char* fn) {
  MOE_CHECK(B >= 0 && T >= 0 && H > 0 && Hkv > 0 && H % Hkv == 0 && D > 0,
            fn << ": bad shape B=" << B << " T=" << T << " H=" << H << " Hkv=" << Hkv << " D=" << D
               << " (H must be a multiple of Hkv)");
  MOE_CHECK(D <= 8192, fn << ": head dim " << D << " > 8192 (the row is staged in shared memory)");
  MOE_CHECK(H <= 65535 && Hkv <= 65535 && B <= 65535, fn << ": grid too large (H, Hkv, B must be <= 65535)");
  return AttShape{T, H, Hkv, D, static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)))};
}

}  // namespace

void attention_forward(float* out, float* att, const float* q, const float* k, const float* v, int B, int T, int H,
                       int Hkv, int D, cudaStream_t stream) {
  const AttShape s = check_shape(B, T, H, Hkv, D, "cuda::attention_forward");
  if (B == 0 || T == 0) return;
  dim3 grid(T, H, B);
  attention_forward_kernel<<<grid, kAttBlock, D * sizeof(float), stream>>>(out, att, q, k, v, s);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void attention_backward(float* dq, float* dk, float* dv, float* datt_scratch, const float* dout, const float* q,
                        const float* k, const float* v, const float* att, int B, int T, int H, int Hkv, int D,
                        cudaStream_t stream) {
  const AttShape s = check_shape(B, T, H, Hkv, D, "cuda::attention_backward");
  MOE_CHECK(datt_scratch != nullptr, "cuda::attention_backward: datt_scratch [B,H,T,T] is required on the GPU");
  if (B == 0 || T == 0) return;
  attention_backward_dq_kernel<<<dim3(T, H, B), kAttBlock, D * sizeof(float), stream>>>(dq, datt_scratch, dout, k, v,
                                                                                        att, s);
  MOE_CUDA_CHECK(cudaGetLastError());
  attention_backward_dkv_kernel<<<dim3(T, Hkv, B), detail::block_for(D, kAttBlock), 0, stream>>>(dk, dv, datt_scratch,
                                                                                                 dout, q, att, s);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe::cuda
