// CUDA kernels, the GPU mirror of (a subset of) core/kernels/cpu/kernels.h: same argument order, same layouts,
// same semantics, plus a trailing cudaStream_t. Every pointer is a DEVICE pointer unless stated otherwise; a shape
// comment is on every pointer. All work is enqueued on `stream` (nothing synchronises the host); errors of the
// launches themselves are thrown as moe::Error through MOE_CUDA_CHECK / MOE_CUBLAS_CHECK.
//
// Conventions (as on the CPU): N = rows (tokens), C = channels, V = vocab, B = batch, T = time, H = query heads,
// Hkv = key/value heads (H % Hkv == 0), D = head dim. Backward functions ACCUMULATE (+=) into parameter gradients
// (dw, db, dwte) and WRITE (=) input gradients (dx, dq, ...).
//
// Numerics: all math in fp32 (no TF32: cuBLAS handles are set to CUBLAS_DEFAULT_MATH; bf16 GEMMs only when a
// stream's context asks for them, model.matmul_precision); reductions are
// deterministic (fixed trees, no atomics on values): the same inputs give the same bits, run after run.
//
// Differences from the CPU API, all because a host value would force a device synchronisation:
//  - cross_entropy_forward writes the mean loss to a device scalar instead of returning it;
//  - sum_squares writes its double result to a device scalar instead of returning it.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/kernels/cpu/kernels.h"

namespace moe::cuda {

// ---------------------------------------------------------------- per-stream context
// One cuBLAS handle (bound to the stream, CUBLAS_DEFAULT_MATH), one cuBLASLt handle with its workspace, and one
// small device scratch buffer per (device, stream), created on first use. The scratch and the workspace are only
// used by work enqueued on that same stream, so stream order makes reuse safe. Thread-safe lookup. Contexts live
// until release_all() (never destroyed at exit: the CUDA runtime may already be torn down then). The key is the
// stream's handle value: call release_all() before destroying a stream whose address might be reused by a later
// cudaStreamCreate on another device.
class StreamContext {
 public:
  static constexpr size_t kScratchBytes = 16 * 1024;
  static StreamContext& get(cudaStream_t stream);  // for the current device (cudaGetDevice)
  static void release_all();                       // destroys every handle and scratch buffer

  static constexpr size_t kLtWorkspaceBytes = 32 << 20;  // what cuBLASLt is given (32 MiB: Hopper's recommendation)
  cublasHandle_t blas() const { return blas_; }
  void* scratch() const { return scratch_; }  // [kScratchBytes] device bytes, 256-byte aligned
  cublasLtHandle_t lt() const { return lt_; }
  void* lt_workspace() const { return lt_workspace_; }  // [kLtWorkspaceBytes] device bytes
  // bf16 GEMMs for the matmuls (and linear layers, grouped GEMMs) on this stream; off by default
  bool bf16() const { return bf16_; }
  void set_bf16(bool on) { bf16_ = on; }

 private:
  StreamContext() = default;
  void destroy() noexcept;
  cublasHandle_t blas_ = nullptr;
  void* scratch_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  void* lt_workspace_ = nullptr;
  bool bf16_ = false;
};

// ---------------------------------------------------------------- matmul (cuBLAS sgemm)
// c[M,N] = alpha * op(a) @ op(b) + beta * c, op(a) is [M,K] (a stored [K,M] if trans_a), op(b) is [K,N]
// (b stored [N,K] if trans_b). Row-major, dense leading dimensions. alpha, beta are host values. fp32 products, or
// with the stream's bf16 GEMMs on (StreamContext::set_bf16) cuBLAS's CUBLAS_COMPUTE_32F_FAST_16BF: the operands
// rounded to bf16 on the tensor cores, fp32 accumulation and output.
void matmul(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b, float alpha,
            float beta, cudaStream_t stream);

// Grouped GEMM (Backend::matmul_grouped): for g < G, c[g][m,n] = alpha * op(a[g]) @ op(b[g]) + beta * c[g]. The
// pointers as [c[G], a[G], b[G]] in DEVICE memory (dev_ptrs, what cuBLAS reads) and the same on the host
// (host_ptrs), the shapes [m[G], n[G], k[G]] on the host; one cublasGemmGroupedBatchedEx for all groups. With bf16
// GEMMs on it is tried once per process: where this cuBLAS refuses bf16 compute on fp32 data in a grouped call,
// every later bf16 call is one matmul per group. Every group must have m, n >= 1.
void matmul_grouped(void* const* dev_ptrs, const void* const* host_ptrs, const int* dims, int G, bool trans_a,
                    bool trans_b, float alpha, float beta, cudaStream_t stream);
// Whether this process's bf16 grouped GEMMs run as one cuBLAS grouped launch (false: one matmul per group, or
// none tried yet).
bool bf16_grouped_is_one_launch();

// The same product on bf16 operands with fp32 accumulation and an fp32 c, through cuBLASLt (the tensor cores):
// c[M,N] = alpha * op(a) @ op(b) + beta * c with a, b bf16 (layouts as matmul). Products of bf16 values are exact
// in fp32, so the result differs from an fp32 matmul of the bf16-rounded operands only by summation order.
void matmul_bf16(float* c, const __nv_bfloat16* a, const __nv_bfloat16* b, int M, int N, int K, bool trans_a,
                 bool trans_b, float alpha, float beta, cudaStream_t stream);

// ---------------------------------------------------------------- linear layer: y = x W^T + b
// out[N,OC] = inp[N,IC] @ w[OC,IC]^T + bias[OC] (bias may be null)
void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC,
                    cudaStream_t stream);
// dinp[N,IC] = dout[N,OC] @ w[OC,IC] (written; skipped if null); dw[OC,IC] += dout^T @ inp[N,IC] (skipped if null);
// dbias[OC] += sum over rows of dout (skipped if dbias null)
void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w, int N,
                     int IC, int OC, cudaStream_t stream);

// ---------------------------------------------------------------- embedding
// out[N,C] = wte[ids[n], :]; ids[N] in [0, V), wte[V,C] (ids are not range-checked on the device)
void embedding_forward(float* out, const int32_t* ids, const float* wte, int N, int C, cudaStream_t stream);
// dwte[V,C] += scatter of dout[N,C] at ids[N]: each id's rows summed in token order, then added (deterministic)
void embedding_backward(float* dwte, const float* dout, const int32_t* ids, int N, int C, cudaStream_t stream);

// ---------------------------------------------------------------- RMSNorm: y = x / sqrt(mean(x^2) + eps) * w
// out[N,C], rstd[N] (saved for backward), inp[N,C], w[C]
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps,
                     cudaStream_t stream);
// dinp[N,C] written; dw[C] accumulated; dout[N,C], inp[N,C], w[C], rstd[N]
void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd,
                      int N, int C, cudaStream_t stream);

// ---------------------------------------------------------------- LayerNorm: y = (x - mean) * rstd * w + b
// out[N,C], mean[N], rstd[N], inp[N,C], w[C], b[C] (b may be null)
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N,
                       int C, float eps, cudaStream_t stream);
// dinp[N,C] written; dw[C], db[C] accumulated (db skipped if null); dout[N,C], inp[N,C], w[C], mean[N], rstd[N]
void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                        const float* mean, const float* rstd, int N, int C, cudaStream_t stream);

// ---------------------------------------------------------------- rotary position embedding (in place)
// x[B,T,nh,D], D even; rotates pairs (x[2i], x[2i+1]) of each head at position pos0 + t by angle
// (pos0 + t) * theta^(-2i/D) (interleaved pairs). Angles are computed in double precision.
void rope_forward(float* x, int B, int T, int nh, int D, int pos0, float theta, cudaStream_t stream);
// the inverse rotation applied to the gradient (in place): dx[B,T,nh,D] = R^T dy
void rope_backward(float* dx, int B, int T, int nh, int D, int pos0, float theta, cudaStream_t stream);

// ---------------------------------------------------------------- causal self-attention with GQA
// q[B,T,H,D], k[B,T,Hkv,D], v[B,T,Hkv,D] -> out[B,T,H,D]; att[B,H,T,T] saves the softmax probabilities
// (row t uses columns 0..t; columns > t are written as zero). Query head h uses kv head h / (H / Hkv).
// scale = 1/sqrt(D). One block per (b, h, t): correctness over speed. 0 < D <= 8192.
void attention_forward(float* out, float* att, const float* q, const float* k, const float* v, int B, int T, int H,
                       int Hkv, int D, cudaStream_t stream);
// dq[B,T,H,D], dk[B,T,Hkv,D], dv[B,T,Hkv,D] written (deterministic: no atomics). datt_scratch[B,H,T,T] is
// workspace and required (non-null) here, unlike on the CPU: it receives d(loss)/d(scaled scores), row t columns
// 0..t (the CPU stores it times 1/sqrt(D); only a workspace either way). dout[B,T,H,D]; q, k, v as above;
// att[B,H,T,T] from the forward.
void attention_backward(float* dq, float* dk, float* dv, float* datt_scratch, const float* dout, const float* q,
                        const float* k, const float* v, const float* att, int B, int T, int H, int Hkv, int D,
                        cudaStream_t stream);
// N query rows over a paged KV cache (core/kernels/cpu/kernels.h attention_paged; every pointer on the device):
// q[N,H,D] -> out[N,H,D], k_pool / v_pool [slots, Hkv, D], pos[N], block tables. One block per (head, row),
// online softmax over chunks of cached positions. 0 < D <= 8192, N <= 65535.
void attention_paged(float* out, const float* q, const float* k_pool, const float* v_pool, const int32_t* pos,
                     const int32_t* table, const int32_t* table_start, int block_size, int N, int H, int Hkv, int D,
                     cudaStream_t stream);

// ---------------------------------------------------------------- the inference path (inference.cu)
// Batch-invariant linear layer (cpu::linear_rows): out[N,OC] = inp[N,IC] @ w[OC,IC]^T + bias[OC]; one warp per
// output element with a fixed lane assignment and shuffle tree, so a row's result never depends on the batch.
void linear_rows(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC,
                 cudaStream_t stream);
// x[N,nh,D] rotated in place at positions pos[N] from the table cs[P, D/2, 2] (cpu::rope_rows)
void rope_rows(float* x, const int32_t* pos, const float* cs, int N, int nh, int D, cudaStream_t stream);
// dst[idx[n], :] = src[n, :], src[N,C]
void scatter_rows(float* dst, const float* src, const int32_t* idx, int N, int C, cudaStream_t stream);

// ---------------------------------------------------------------- activations
// GELU, tanh approximation. out[N], inp[N]
void gelu_forward(float* out, const float* inp, int64_t N, cudaStream_t stream);
// dinp[N] = dout[N] * gelu'(inp[N]) (written)
void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t N, cudaStream_t stream);
// SwiGLU: out[NF] = silu(gate[NF]) * up[NF]
void swiglu_forward(float* out, const float* gate, const float* up, int64_t NF, cudaStream_t stream);
// dgate[NF], dup[NF] written; dout[NF], gate[NF], up[NF]
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t NF,
                     cudaStream_t stream);

// ---------------------------------------------------------------- softmax cross-entropy
// logits[N,V], targets[N] (a target < 0 is ignored) -> losses[N] (0 for ignored), probs[N,V] (softmax, saved),
// mean_loss[1] (device scalar: mean loss over non-ignored rows, 0 if none; may be null). Online softmax per row.
void cross_entropy_forward(float* losses, float* probs, float* mean_loss, const float* logits, const int32_t* targets,
                           int N, int V, cudaStream_t stream);
// dlogits[N,V] = (probs[N,V] - onehot(targets[N])) * dloss / count(non-ignored) (written; zero for ignored rows).
// dloss is a host value. dlogits may alias probs (in place).
void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets, int N, int V, float dloss,
                            cudaStream_t stream);

// ---------------------------------------------------------------- elementwise helpers
void add_inplace(float* y, const float* x, int64_t n, cudaStream_t stream);            // y[n] += x[n]
void add(float* out, const float* a, const float* b, int64_t n, cudaStream_t stream);  // out[n] = a[n] + b[n]
void scale_inplace(float* y, float s, int64_t n, cudaStream_t stream);                 // y[n] *= s
// out[1] (device double) = sum of x[n]^2, accumulated in double, deterministic
void sum_squares(double* out, const float* x, int64_t n, cudaStream_t stream);
void mul(float* out, const float* a, const float* b, int64_t n, cudaStream_t stream);  // out[n] = a[n] * b[n]

// cpu::zero_rows / scale_rows / sum_squares_rows (elementwise.cu) with rows[n_rows] a DEVICE array of distinct rows;
// the sum goes to out[1] (device double), deterministic
void zero_rows(float* x, const int64_t* rows, int64_t n_rows, int64_t row_size, cudaStream_t stream);
void scale_rows(float* x, float s, const int64_t* rows, int64_t n_rows, int64_t row_size, cudaStream_t stream);
void sum_squares_rows(double* out, const float* x, const int64_t* rows, int64_t n_rows, int64_t row_size,
                      cudaStream_t stream);

// ---------------------------------------------------------------- token dispatch (dispatch.cu)
// cpu::gather_rows / combine_rows / row_dots with every array on the device. One block per output row (a token's
// k rows summed in slot order, a dot product in a fixed tree): deterministic, no atomics.
void gather_rows(float* out, const float* x, const int32_t* slot, const float* gate, int R, int k, int C,
                 cudaStream_t stream);
void combine_rows(float* out, const float* y, const int32_t* row, const float* gate, int N, int k, int C,
                  bool accumulate, cudaStream_t stream);
void row_dots(float* dot, const float* a, const float* y, const int32_t* row, int N, int k, int C,
              cudaStream_t stream);

// ---------------------------------------------------------------- learned router (router.cu)
// cpu::router_topk / router_logits_grad with every array on the device (bias[E] or null; stats[E+2] a device
// array): one thread per token, the same per-token code as the CPU (core/kernels/router_token.h); the sums over
// tokens in fixed trees (deterministic). A token with a non-finite logit gets lse NaN.
void router_topk(const cpu::RouterDims& d, int32_t* choice, float* gate, float* score, double* lse, double* stats,
                 const float* logits, const float* bias, cudaStream_t stream);
void router_logits_grad(const cpu::RouterDims& d, float* dlogits, const float* logits, const double* lse,
                        const int32_t* choice, const int32_t* row, const float* dgate, const float* f,
                        double aux_scale, double z_scale, cudaStream_t stream);

// ---------------------------------------------------------------- AdamW (optimizer.cu)
// The update of core/kernels/cpu/kernels.h adamw / adamw_rows, with its hyper-parameters (cpu::AdamWHyper, a
// plain struct passed by value to the kernels). adamw_rows: rows[n_rows] is a DEVICE array of distinct rows.
void adamw(float* w, const float* g, float* m, float* v, int64_t n, const cpu::AdamWHyper& h, float bc1, float bc2,
           cudaStream_t stream);
void adamw_rows(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows, int64_t n_rows,
                int64_t row_size, const cpu::AdamWHyper& h, cudaStream_t stream);

// ---------------------------------------------------------------- f32 <-> bf16
// out[n] = bf16(in[n]), round to nearest even (bit-identical to moe::float_to_bf16 in core/bf16.h)
void f32_to_bf16(__nv_bfloat16* out, const float* in, int64_t n, cudaStream_t stream);
// out[n] = float(in[n]) (exact)
void bf16_to_f32(float* out, const __nv_bfloat16* in, int64_t n, cudaStream_t stream);

}  // namespace moe::cuda
