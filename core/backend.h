// The backend seam (ggml style): a small table of operations on one device. Layers call a Backend instead of the
// moe::cpu:: kernels directly, and get their activations from a Workspace (core/workspace.h) on the same device.
//
// Every pointer argument is a pointer on this backend's device (host memory for "cpu", device memory for "cuda")
// unless its name says host. The ops have EXACTLY the signatures and semantics of core/kernels/cpu/kernels.h
// (shapes, the accumulate (+=) / write (=) conventions, null pointers that skip an output); see there for the
// details. Ops are ordered on the backend's one stream: a later op sees the results of earlier ones; to_host,
// from_host, sync and the two ops that return a host value (cross_entropy_forward, sum_squares) complete before
// returning. Numerics differ between backends within the tolerances stated in the tests (the CPU is the reference).
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/kernels/cpu/kernels.h"
#include "core/tensor.h"

namespace moe {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual const char* name() const = 0;  // "cpu" | "cuda"

  // ---------------------------------------------------------------- memory on this backend's device
  // [bytes] on the device, at least 64-byte aligned; never null (0 bytes gives a valid pointer); throws moe::Error
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* p) noexcept = 0;  // p from alloc (or null); waits for pending work on p where needed
  virtual void memset0(void* p, size_t bytes) = 0;                  // p[bytes] = 0
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;  // dst[bytes] = src[bytes], both on the device
  virtual void to_host(void* host_dst, const void* src, size_t bytes) = 0;    // host_dst[bytes] <- src; completes
  virtual void from_host(void* dst, const void* host_src, size_t bytes) = 0;  // dst[bytes] <- host_src; completes
  virtual void sync() = 0;  // waits for every op enqueued so far
  // [bytes] of HOST memory that to_host / from_host copy to and from fastest (page-locked on CUDA: staging buffers
  // for host collectives on device tensors, comm/staged_comm.h), 64-byte aligned; throws moe::Error. Default: the
  // process's host allocator.
  virtual void* alloc_host(size_t bytes);
  virtual void free_host(void* p) noexcept;  // p from alloc_host (or null)

  // ---------------------------------------------------------------- matmul, linear
  // bf16 GEMMs (model.matmul_precision = MATMUL_BF16): every later matmul, linear and grouped GEMM of this backend
  // rounds its operands to bf16 on the tensor cores, with fp32 accumulation and output. Process-wide, like the
  // backend: the last model built sets it. The CPU computes in fp32 only (throws when asked for bf16).
  virtual void set_matmul_bf16(bool on);
  virtual bool matmul_bf16() const { return false; }

  // c[M,N] = alpha * op(a) @ op(b) + beta * c; op(a)[M,K] (a stored [K,M] if trans_a), op(b)[K,N] (b [N,K] if trans_b)
  virtual void matmul(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b,
                      float alpha = 1.0f, float beta = 0.0f) = 0;
  // out[N,OC] = inp[N,IC] @ w[OC,IC]^T + bias[OC] (bias may be null)
  virtual void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC,
                              int OC) = 0;
  // dinp[N,IC] = dout[N,OC] @ w[OC,IC] (written; skipped if null); dw[OC,IC] += dout^T @ inp[N,IC];
  // dbias[OC] += sum over rows of dout (skipped if null)
  virtual void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp,
                               const float* w, int N, int IC, int OC) = 0;
  // matmul for the grouped FFN's groups of a row-sparse table (a word expert's few rows against its weights): the
  // same product, which a backend may sum in another order where that is faster (the CPU one streams the weights
  // when a dimension is small: core/kernels/cpu/small_matmul.cpp). Every other caller uses matmul, whose results stay
  // bit for bit what they were (tests/integration/demo_losses.sh). Default: matmul.
  virtual void matmul_few_rows(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a,
                               bool trans_b, float alpha = 1.0f, float beta = 0.0f) {
    matmul(c, a, b, M, N, K, trans_a, trans_b, alpha, beta);
  }

  // Grouped GEMM: for each group g < G, c = alpha * op(a) @ op(b) + beta * c with op(a)[m,k], op(b)[k,n] (the
  // transposes as in matmul, shared by the groups; shapes and pointers per group, in a HOST array of GemmGroup).
  // Groups with m or n == 0 do nothing. The experts of a layer as one launch on a GPU (cuBLAS grouped batched
  // GEMM); the CPU runs the groups' matmuls one after another (the default).
  struct GemmGroup {
    float* c;
    const float* a;
    const float* b;
    int m, n, k;
  };
  virtual void matmul_grouped(const GemmGroup* groups, int G, bool trans_a, bool trans_b, float alpha = 1.0f,
                              float beta = 0.0f);

  // ---------------------------------------------------------------- embedding
  // out[N,C] = wte[ids[n], :]; ids[N] in [0, V), wte[V,C]
  virtual void embedding_forward(float* out, const int32_t* ids, const float* wte, int N, int C) = 0;
  // dwte[V,C] += scatter of dout[N,C] at ids[N]
  virtual void embedding_backward(float* dwte, const float* dout, const int32_t* ids, int N, int C) = 0;

  // ---------------------------------------------------------------- norms
  // out[N,C], rstd[N] (saved), inp[N,C], w[C]
  virtual void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) = 0;
  // dinp[N,C] written; dw[C] accumulated; dout[N,C], inp[N,C], w[C], rstd[N]
  virtual void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                                const float* rstd, int N, int C) = 0;
  // out[N,C], mean[N], rstd[N] (saved), inp[N,C], w[C], b[C]
  virtual void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                                 int N, int C, float eps) = 0;
  // dinp[N,C] written; dw[C], db[C] accumulated; dout[N,C], inp[N,C], w[C], mean[N], rstd[N]
  virtual void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                                  const float* w, const float* mean, const float* rstd, int N, int C) = 0;

  // ---------------------------------------------------------------- rotary position embedding (in place)
  // x[B,T,nh,D], D even, positions pos0 + t (interleaved pairs)
  virtual void rope_forward(float* x, int B, int T, int nh, int D, int pos0, float theta) = 0;
  // dx[B,T,nh,D] = R^T dy, in place
  virtual void rope_backward(float* dx, int B, int T, int nh, int D, int pos0, float theta) = 0;

  // ---------------------------------------------------------------- causal self-attention with GQA
  // q[B,T,H,D], k[B,T,Hkv,D], v[B,T,Hkv,D] -> out[B,T,H,D]; att[B,H,T,T] softmax probabilities (zero above the
  // diagonal). Query head h uses kv head h / (H / Hkv); scale 1/sqrt(D).
  virtual void attention_forward(float* out, float* att, const float* q, const float* k, const float* v, int B, int T,
                                 int H, int Hkv, int D) = 0;
  // dq[B,T,H,D], dk[B,T,Hkv,D], dv[B,T,Hkv,D] written; datt_scratch[B,H,T,T] workspace (may be null: the backend
  // then finds its own); dout[B,T,H,D], att[B,H,T,T] from the forward
  virtual void attention_backward(float* dq, float* dk, float* dv, float* datt_scratch, const float* dout,
                                  const float* q, const float* k, const float* v, const float* att, int B, int T, int H,
                                  int Hkv, int D) = 0;
  // ---------------------------------------------------------------- the inference path (serving, generation)
  // Batch-invariant linear layer: as linear_forward, but each output row is a function of its input row alone, bit
  // for bit, whatever N, the other rows and the thread count. out[N,OC], inp[N,IC], bias[OC] or null; the weight
  // w[OC,IC] in this backend's inference layout: packed[packed_rows_floats(IC, OC)] made by pack_rows.
  virtual void linear_rows(float* out, const float* inp, const float* packed, const float* bias, int N, int IC,
                           int OC) = 0;
  virtual int64_t packed_rows_floats(int IC, int OC) = 0;
  virtual void pack_rows(float* packed, const float* w, int IC, int OC) = 0;  // w[OC,IC] -> packed
  // x[N,nh,D] rotated in place, row n at position pos[n], from the table cs[P, D/2, 2] of cpu::rope_cos_sin
  // (pos[N] < P)
  virtual void rope_rows(float* x, const int32_t* pos, const float* cs, int N, int nh, int D) = 0;
  // dst[idx[n], :] = src[n, :]: src[N,C], idx[N] >= 0
  virtual void scatter_rows(float* dst, const float* src, const int32_t* idx, int N, int C) = 0;
  // N query rows over a paged KV cache (cpu::attention_paged): q[N,H,D] -> out[N,H,D]; k_pool, v_pool
  // [slots, Hkv, D]; pos[N]; block tables table[...] with row n's at table_start[N]
  virtual void attention_paged(float* out, const float* q, const float* k_pool, const float* v_pool, const int32_t* pos,
                               const int32_t* table, const int32_t* table_start, int block_size, int N, int H, int Hkv,
                               int D) = 0;
  // SparQ attention for decode (cpu::attention_sparq and the cache's side tables, see kernels.h). has_sparq():
  // whether this backend has these three ops (the CUDA backend has not yet: they throw there).
  virtual bool has_sparq() const = 0;
  // v_sums[num_blocks, Hkv, D] at the blocks that rows ending a block complete, from v_pool [slots, Hkv, D]
  virtual void value_sums_paged(float* v_sums, const float* v_pool, const int32_t* pos, const int32_t* table,
                                const int32_t* table_start, int block_size, int N, int Hkv, int D) = 0;
  // k_cols[num_blocks, Hkv, D, block_size] <- the rows' keys k[N,Hkv,D] at slots[N]
  virtual void scatter_columns(float* k_cols, const float* k, const int32_t* slots, int block_size, int N, int Hkv,
                               int D) = 0;
  // attention_paged with SparQ for the rows with rk[2n] = r > 0, rk[2n+1] = k > 0 and more than k positions:
  // v_sums as above, k_cols or null, rk[N,2]
  virtual void attention_sparq(float* out, const float* q, const float* k_pool, const float* v_pool,
                               const float* v_sums, const float* k_cols, const int32_t* pos, const int32_t* table,
                               const int32_t* table_start, const int32_t* rk, int block_size, int N, int H, int Hkv,
                               int D) = 0;

  // ---------------------------------------------------------------- activations
  // GELU, tanh approximation: out[N], inp[N]
  virtual void gelu_forward(float* out, const float* inp, int64_t N) = 0;
  // dinp[N] = dout[N] * gelu'(inp[N]) (written)
  virtual void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t N) = 0;
  // out[NF] = silu(gate[NF]) * up[NF]
  virtual void swiglu_forward(float* out, const float* gate, const float* up, int64_t NF) = 0;
  // dgate[NF], dup[NF] written; dout[NF], gate[NF], up[NF]
  virtual void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up,
                               int64_t NF) = 0;

  // ---------------------------------------------------------------- softmax cross-entropy
  // logits[N,V], targets[N] (< 0 ignored) -> losses[N] (0 for ignored), probs[N,V]; returns the mean loss over
  // non-ignored rows, on the host (synchronises)
  virtual float cross_entropy_forward(float* losses, float* probs, const float* logits, const int32_t* targets, int N,
                                      int V) = 0;
  // dlogits[N,V] = (probs[N,V] - onehot(targets[N])) * dloss / count(non-ignored) (written; 0 for ignored rows)
  virtual void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets, int N, int V,
                                      float dloss) = 0;

  // ---------------------------------------------------------------- elementwise
  virtual void add_inplace(float* y, const float* x, int64_t n) = 0;            // y[n] += x[n]
  virtual void add(float* out, const float* a, const float* b, int64_t n) = 0;  // out[n] = a[n] + b[n]
  virtual void scale_inplace(float* y, float s, int64_t n) = 0;                 // y[n] *= s
  // sum of x[n]^2 accumulated in double, returned on the host (synchronises)
  virtual double sum_squares(const float* x, int64_t n) = 0;
  virtual void mul(float* out, const float* a, const float* b, int64_t n) = 0;  // out[n] = a[n] * b[n]

  // ---------------------------------------------------------------- token dispatch (the MoE layer's row movements)
  // cpu::gather_rows / combine_rows / row_dots: slot[R], row[N*k] and gate[N*k] on the device, like the rows
  // out[R,C] = gate[slot[r]] * x[slot[r] / k] (gate null: the row, exactly)
  virtual void gather_rows(float* out, const float* x, const int32_t* slot, const float* gate, int R, int k,
                           int C) = 0;
  // out[N,C] (+= or =) sum over kept slots j of token n of gate[n*k+j] * y[row[n*k+j]] (gate null: 1)
  virtual void combine_rows(float* out, const float* y, const int32_t* row, const float* gate, int N, int k, int C,
                            bool accumulate) = 0;
  // dot[N*k]: <a[s / k], y[row[s]]> for row[s] >= 0, else 0
  virtual void row_dots(float* dot, const float* a, const float* y, const int32_t* row, int N, int k, int C) = 0;

  // ---------------------------------------------------------------- learned router (the MoE layer's gate)
  // cpu::router_topk / router_logits_grad with every array in this backend's memory, stats[E+2] too (bias null:
  // none): scores, top-k, gates and the aux-loss sums of each token, and the logits' gradient, on the device
  virtual void router_topk(const cpu::RouterDims& d, int32_t* choice, float* gate, float* score, double* lse,
                           double* stats, const float* logits, const float* bias) = 0;
  virtual void router_logits_grad(const cpu::RouterDims& d, float* dlogits, const float* logits, const double* lse,
                                  const int32_t* choice, const int32_t* row, const float* dgate, const float* f,
                                  double aux_scale, double z_scale) = 0;

  // ---------------------------------------------------------------- row-sparse tables (their touched rows)
  // cpu::zero_rows / scale_rows / sum_squares_rows over rows_host[n_rows] (a HOST array of distinct rows) of a
  // [*, row_size] table on the device
  virtual void zero_rows(float* x, const int64_t* rows_host, int64_t n_rows, int64_t row_size) = 0;
  virtual void scale_rows(float* x, float s, const int64_t* rows_host, int64_t n_rows, int64_t row_size) = 0;
  virtual double sum_squares_rows(const float* x, const int64_t* rows_host, int64_t n_rows, int64_t row_size) = 0;

  // ---------------------------------------------------------------- AdamW (the optimizer's update, in place)
  // cpu::adamw: w, m, v [n] from g [n]; the bias corrections bc1, bc2 are host values
  virtual void adamw(float* w, const float* g, float* m, float* v, int64_t n, const cpu::AdamWHyper& h, float bc1,
                     float bc2) = 0;
  // cpu::adamw_rows: lazy Adam over rows_host[n_rows] (a HOST array of distinct rows) of [*, row_size] tables,
  // row_t the per-row step counts on the device
  virtual void adamw_rows(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows_host,
                          int64_t n_rows, int64_t row_size, const cpu::AdamWHyper& h) = 0;
};

// Keeps the GEMMs of a scope in fp32 on a backend with bf16 GEMMs on, and restores the setting: the MoE router's
// logits (a rounding must not flip a token's top-k; Megatron-Core and DeepSeek-V3 keep the router in fp32 too).
class Fp32Gemms {
 public:
  explicit Fp32Gemms(Backend& be) : be_(be), was_(be.matmul_bf16()) {
    if (was_) be_.set_matmul_bf16(false);
  }
  ~Fp32Gemms() {
    if (was_) be_.set_matmul_bf16(true);
  }
  Fp32Gemms(const Fp32Gemms&) = delete;
  Fp32Gemms& operator=(const Fp32Gemms&) = delete;

 private:
  Backend& be_;
  bool was_;
};

// The process-wide CPU backend.
Backend& cpu_backend();
// The backend of a device: the CPU one, or (CUDA builds) the process-wide CUDA backend of the current device.
// Throws moe::Error when the build has no CUDA or no CUDA device is visible.
Backend& backend_for(Device d);

#ifdef MOE_HAVE_CUDA
namespace cuda {
// The process-wide CUDA backend of the current device (core/kernels/cuda/backend.cu); call only when
// cuda_available() (backend_for checks).
Backend& cuda_backend();
}  // namespace cuda
#endif

}  // namespace moe
