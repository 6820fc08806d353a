// Causal self-attention with GQA on the GPU, same layouts as the CPU version (core/kernels/cpu/kernels.h).
// Straightforward and deterministic rather than fast: the forward and the dq pass run one block per
// (b, h, t) query row; the dk/dv pass runs one block per (b, kvh, j) key row and sums over the query heads of
// the group and the rows t >= j in a fixed order (no atomics). Decoding (one query position over a KV cache)
// runs one block per (query head, row) over a paged KV cache with an online softmax.
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

constexpr int kDecodeChunk = 1024;  // cached positions whose scores one block stages in shared memory at a time

// Grid (H, N): one block per (query head, row) of a paged KV cache. Online softmax over chunks of kDecodeChunk
// positions: m and sum (the running max and sum of exp(score - m), the same in every thread) and out (each thread
// owns its columns d) are rescaled by exp(m_old - m_new) when a chunk raises the max; out is divided by sum at
// the end. Position t of row n lives in slot table[table_start[n] + t / block_size] * block_size + t % block_size.
struct PagedArgs {
  const int32_t* pos;
  const int32_t* table;
  const int32_t* table_start;
  int block_size;
};

__global__ void __launch_bounds__(kAttBlock)
    attention_paged_kernel(float* __restrict__ out, const float* __restrict__ q, const float* __restrict__ k_pool,
                           const float* __restrict__ v_pool, PagedArgs pa, AttShape s) {
  extern __shared__ float smem[];
  const int h = blockIdx.x, n = blockIdx.y, D = s.D;
  float* q_row = smem;  // [D]
  float* p = smem + D;  // [kDecodeChunk] scores, then exp(score - m)
  const int kvh = h / (s.H / s.Hkv);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int len = pa.pos[n] + 1;
  const int32_t* blocks = pa.table + pa.table_start[n];
  const int64_t qo = (static_cast<int64_t>(n) * s.H + h) * D;
  float* o = out + qo;  // [D]
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    q_row[d] = q[qo + d];
    o[d] = 0.0f;
  }
  __syncthreads();
  const int64_t row = static_cast<int64_t>(s.Hkv) * D;  // floats per slot
  auto slot_off = [&](int t) {
    return (static_cast<int64_t>(blocks[t / pa.block_size]) * pa.block_size + t % pa.block_size) * row +
           static_cast<int64_t>(kvh) * D;
  };
  float m = -INFINITY, sum = 0.0f;
  for (int c0 = 0; c0 < len; c0 += kDecodeChunk) {
    const int cn = min(kDecodeChunk, len - c0);
    for (int j = wid; j < cn; j += nw) {  // scores: one warp per cached position
      const float* kj = k_pool + slot_off(c0 + j);
      float dot = 0.0f;
      for (int d = lane; d < D; d += 32) dot += q_row[d] * kj[d];
      dot = warp_sum(dot);
      if (lane == 0) p[j] = dot * s.scale;
    }
    __syncthreads();
    float cm = -INFINITY;
    for (int j = threadIdx.x; j < cn; j += blockDim.x) cm = fmaxf(cm, p[j]);
    const float m_new = fmaxf(m, block_max(cm));
    const float rescale = expf(m - m_new);  // 0 on the first chunk (m = -inf)
    float cs = 0.0f;
    for (int j = threadIdx.x; j < cn; j += blockDim.x) {
      const float e = expf(p[j] - m_new);
      p[j] = e;
      cs += e;
    }
    sum = sum * rescale + block_sum(cs);  // block_sum synchronises: every p[j] is written
    m = m_new;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      float acc = o[d] * rescale;
      for (int j = 0; j < cn; ++j) acc += p[j] * v_pool[slot_off(c0 + j) + d];
      o[d] = acc;
    }
    __syncthreads();  // the next chunk overwrites p
  }
  const float inv = 1.0f / sum;
  for (int d = threadIdx.x; d < D; d += blockDim.x) o[d] *= inv;
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

void attention_paged(float* out, const float* q, const float* k_pool, const float* v_pool, const int32_t* pos,
                     const int32_t* table, const int32_t* table_start, int block_size, int N, int H, int Hkv, int D,
                     cudaStream_t stream) {
  const AttShape s = check_shape(1, 1, H, Hkv, D, "cuda::attention_paged");
  MOE_CHECK(block_size > 0, "cuda::attention_paged: block size " << block_size << " must be positive");
  MOE_CHECK(N >= 0 && N <= 65535, "cuda::attention_paged: " << N << " rows (at most 65535 per call)");
  if (N == 0) return;
  const size_t shmem = (static_cast<size_t>(D) + kDecodeChunk) * sizeof(float);  // <= 36 KiB for D <= 8192
  attention_paged_kernel<<<dim3(H, N), kAttBlock, shmem, stream>>>(out, q, k_pool, v_pool,
                                                                   PagedArgs{pos, table, table_start, block_size}, s);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe::cuda
