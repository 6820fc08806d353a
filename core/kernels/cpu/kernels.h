// CPU kernels, llm.c style: plain functions on raw row-major float pointers, forward and backward side by side,
// a shape comment on every pointer. Every kernel `foo` has a plain loop reference `foo_ref` (in reference.cpp)
// used by the tests; the fast versions use OpenBLAS and OpenMP.
//
// Conventions: N = number of rows (tokens), C = channels, V = vocab, B = batch, T = time, H = query heads,
// Hkv = key/value heads (H % Hkv == 0; Hkv == H is MHA, Hkv == 1 is MQA), D = head dim.
// Backward functions ACCUMULATE (+=) into parameter gradients (dw, db, dwte) and WRITE (=) input gradients
// (dx, dq, ...) unless stated otherwise.
#pragma once
#include <cstdint>

namespace moe::cpu {

// ---------------------------------------------------------------- matmul (OpenBLAS sgemm)
// c[M,N] = alpha * op(a) @ op(b) + beta * c, op(a) is [M,K] (a stored [K,M] if trans_a), op(b) is [K,N]
// (b stored [N,K] if trans_b). Row-major, dense leading dimensions.
void matmul(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b,
            float alpha = 1.0f, float beta = 0.0f);
void matmul_ref(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b,
                float alpha = 1.0f, float beta = 0.0f);
// matmul for a word expert's few rows against its weights (Backend::matmul_few_rows): the small-dimension kernels
// of small_matmul.cpp, which stream the weights once in their layout instead of packing them, where they beat sgemm
// (bench_moe section 6 on the build machine: 1.1-1.7x there, slower than sgemm outside these bounds), else matmul.
// They sum in another order than sgemm, so only the word-expert tables use them. matmul_takes_small: alpha 1,
// beta 0 or 1, the other two dimensions >= kSmallMatmulMinDim, and
//   c = a b^T   M <= kSmallMatmulNt rows     (forward of a linear layer)
//   c = a b     M <= kSmallMatmulNn rows     (input gradient)
//   c = a^T b   K <= kSmallMatmulTn rows     (weight gradient)
// The kernels themselves: beta 0: c written (never read); beta 1: c += the product (formed in full first, so adding
// the same product twice doubles c exactly, as with sgemm).
void matmul_few_rows(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b,
                     float alpha = 1.0f, float beta = 0.0f);
constexpr int kSmallMatmulNt = 6, kSmallMatmulNn = 16, kSmallMatmulTn = 8, kSmallMatmulMinDim = 64;
bool matmul_takes_small(int M, int N, int K, bool trans_a, bool trans_b, float alpha, float beta);
// c[M,N] = a[M,K] b[N,K]^T
void matmul_nt_small(float* c, const float* a, const float* b, int M, int N, int K, float beta);
// c[M,N] = a[M,K] b[K,N]
void matmul_nn_small(float* c, const float* a, const float* b, int M, int N, int K, float beta);
// c[M,N] = a[K,M]^T b[K,N]
void matmul_tn_small(float* c, const float* a, const float* b, int M, int N, int K, float beta);

// ---------------------------------------------------------------- linear layer: y = x W^T + b
// out[N,OC] = inp[N,IC] @ w[OC,IC]^T + bias[OC] (bias may be null)
void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC);
// dinp[N,IC] = dout[N,OC] @ w[OC,IC] (written; skipped if dinp null); dw[OC,IC] += dout^T @ inp; dbias[OC] += sum dout
void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w,
                     int N, int IC, int OC);

// ---------------------------------------------------------------- embedding
// out[N,C] = wte[ids[n], :]; ids[N] in [0, V)
void embedding_forward(float* out, const int32_t* ids, const float* wte, int N, int C);
// dwte[V,C] += scatter of dout[N,C] at ids
void embedding_backward(float* dwte, const float* dout, const int32_t* ids, int N, int C);

// ---------------------------------------------------------------- RMSNorm: y = x / sqrt(mean(x^2) + eps) * w
// out[N,C], rstd[N] (saved for backward), inp[N,C], w[C]
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps);
// dinp[N,C] written; dw[C] accumulated
void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd,
                      int N, int C);

// ---------------------------------------------------------------- LayerNorm: y = (x - mean) * rstd * w + b
// out[N,C], mean[N], rstd[N], inp[N,C], w[C], b[C]
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N,
                       int C, float eps);
// dinp[N,C] written; dw[C], db[C] accumulated
void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                        const float* mean, const float* rstd, int N, int C);

// ---------------------------------------------------------------- rotary position embedding (in place)
// x[B,T,nh,D], D even; rotates pairs (x[2i], x[2i+1]) of each head at position pos0 + t by angle
// (pos0 + t) * theta^(-2i/D) (interleaved pairs, as in RoFormer and the original LLaMA code).
void rope_forward(float* x, int B, int T, int nh, int D, int pos0, float theta);
// the inverse rotation applied to the gradient (in place): dx = R^T dy
void rope_backward(float* dx, int B, int T, int nh, int D, int pos0, float theta);

// ---------------------------------------------------------------- causal self-attention with GQA
// q[B,T,H,D], k[B,T,Hkv,D], v[B,T,Hkv,D] -> out[B,T,H,D]; att[B,H,T,T] saves the softmax probabilities
// (row t only uses columns 0..t; the rest are left zero). Query head h uses kv head h / (H / Hkv).
// scale = 1/sqrt(D).
void attention_forward(float* out, float* att, const float* q, const float* k, const float* v, int B, int T, int H,
                       int Hkv, int D);
// dq[B,T,H,D], dk[B,T,Hkv,D], dv[B,T,Hkv,D] written. datt_scratch[B,H,T,T] is workspace (may be reused).
void attention_backward(float* dq, float* dk, float* dv, float* datt_scratch, const float* dout, const float* q,
                        const float* k, const float* v, const float* att, int B, int T, int H, int Hkv, int D);
// ---------------------------------------------------------------- activations
// GELU, tanh approximation (as torch.nn.functional.gelu(approximate="tanh")). out[N], inp[N]
void gelu_forward(float* out, const float* inp, int64_t N);
// dinp[N] = dout * gelu'(inp) (written)
void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t N);
// SwiGLU: out[N,F] = silu(gate[N,F]) * up[N,F]
void swiglu_forward(float* out, const float* gate, const float* up, int64_t NF);
// dgate[N,F], dup[N,F] written
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t NF);

// ---------------------------------------------------------------- softmax cross-entropy
// logits[N,V], targets[N] (a target < 0 is ignored) -> losses[N] (0 for ignored), probs[N,V] (softmax, saved).
// Returns the mean loss over non-ignored rows.
float cross_entropy_forward(float* losses, float* probs, const float* logits, const int32_t* targets, int N, int V);
// dlogits[N,V] = (probs - onehot(target)) * dloss / count(non-ignored) (written; zero for ignored rows)
void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets, int N, int V, float dloss);

// ---------------------------------------------------------------- elementwise helpers
void add_inplace(float* y, const float* x, int64_t n);               // y += x
void add(float* out, const float* a, const float* b, int64_t n);     // out = a + b
void scale_inplace(float* y, float s, int64_t n);                    // y *= s
double sum_squares(const float* x, int64_t n);                       // sum x^2 in double
void mul(float* out, const float* a, const float* b, int64_t n);     // out = a * b (may alias a or b)

// ---------------------------------------------------------------- token dispatch (dispatch.cpp)
// The MoE layer's row movements (router/router.h DispatchPlan): N tokens with k slots each, slot s = n*k + j.
// gather_rows: out[R,C] row r = gate[slot[r]] * x[slot[r] / k] (gate null: the row itself, exactly); slot[R] in
// [0, N*k). With k = 1 and no gate a plain row gather out[r] = x[slot[r]].
void gather_rows(float* out, const float* x, const int32_t* slot, const float* gate, int R, int k, int C);
// combine_rows: out[N,C] row n = sum over j < k with row[n*k+j] >= 0 of gate[n*k+j] * y[row[n*k+j]] (gate null: 1,
// no multiply), j ascending; accumulate: added to out (+=), else written (= 0 for a token with no row).
void combine_rows(float* out, const float* y, const int32_t* row, const float* gate, int N, int k, int C,
                  bool accumulate);
// row_dots: dot[N*k], dot[s] = <a[s / k], y[row[s]]> for row[s] >= 0 (summed in double), else 0; a[N,C]
void row_dots(float* dot, const float* a, const float* y, const int32_t* row, int N, int k, int C);

// ---------------------------------------------------------------- learned router (router.cpp)
// The per-token math of the MoE layer's learned top-k router (router/router.h LearnedRouter), in double, for N
// tokens over E experts with k choices each; normalize: the k gates are divided by their sum.
struct RouterDims {
  int N, E, k;
  bool sigmoid, normalize;
};
// router_topk, from logits[N,E] (bias[E] the selection bias, or null):
//   lse[n] = logsumexp(l_n); score[n,e] = softmax(l_n)_e or sigmoid(l_ne), rounded to float;
//   choice[n*k+j] = the j-th of the k distinct experts by descending logit, or with a bias by descending
//   double(score) + bias (in double), ties to the lower expert index; gate[n*k+j] = the chosen score, divided by
//   the sum of the k chosen scores when normalize;
//   stats[E+2] (WRITTEN): [e] = sum_n q_ne, q the scores (for sigmoid divided by their sum over the experts: the
//   aux loss's distribution), [E] = sum_n lse_n^2, [E+1] = the first token with a non-finite logit, else -1 (such
//   a token's outputs are unspecified).
void router_topk(const RouterDims& d, int32_t* choice, float* gate, float* score, double* lse, double* stats,
                 const float* logits, const float* bias);
// router_logits_grad: dlogits[N,E] (WRITTEN) = d/dlogits of
//   sum over kept slots s (row[s] >= 0) of dgate[s] * gate[s]  +  aux_scale * E * sum_e f[e] * P_e
//   +  z_scale * mean_n lse_n^2,     P_e = mean_n q_ne,
// for the choice[N*k] and lse[N] of router_topk on the same logits (the scores recomputed from them in double;
// the selection and the drop are constants).
void router_logits_grad(const RouterDims& d, float* dlogits, const float* logits, const double* lse,
                        const int32_t* choice, const int32_t* row, const float* dgate, const float* f,
                        double aux_scale, double z_scale);

// ---------------------------------------------------------------- row-sparse tables (rows.cpp)
// Over the rows rows[n_rows] (distinct, any order) of a [*, row_size] table x: zeroed, scaled by s, or the sum of
// their squares (double; row by row, then over the rows in the order OpenMP's reduction gives).
void zero_rows(float* x, const int64_t* rows, int64_t n_rows, int64_t row_size);
void scale_rows(float* x, float s, const int64_t* rows, int64_t n_rows, int64_t row_size);
double sum_squares_rows(const float* x, const int64_t* rows, int64_t n_rows, int64_t row_size);

// ---------------------------------------------------------------- AdamW (adamw.cpp)
// The hyper-parameters of one parameter's update; every gradient is read as gscale * g (clipping folded in).
struct AdamWHyper {
  float lr, b1, b2, eps, decay, gscale;
};
// w, m, v [n] updated from g [n] with the bias corrections bc1 = 1 - b1^t, bc2 = 1 - b2^t:
//   m = b1 m + (1-b1) g';  v = b2 v + (1-b2) g'^2;  w -= lr (m/bc1 / (sqrt(v/bc2) + eps) + decay w)
void adamw(float* w, const float* g, float* m, float* v, int64_t n, const AdamWHyper& h, float bc1, float bc2);
// Lazy Adam over the rows rows[n_rows] (distinct) of a [*, row_size] table: each row's step count row_t[row] is
// incremented first and drives that row's bias corrections; the other rows do not move.
void adamw_rows(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows, int64_t n_rows,
                int64_t row_size, const AdamWHyper& h);

// ---------------------------------------------------------------- the inference path (inference.cpp)
// Batch-invariant linear layer: out[N,OC] = inp[N,IC] @ w[OC,IC]^T + bias[OC] (bias may be null), where each output
// row is a function of its input row alone, bit for bit: the same whatever N, the other rows, the row's place in
// the batch and the thread count (each element is one fma chain over k in order; see inference.cpp). Serving and
// generation use it so that a request's tokens do not depend on what it is batched with. w is given in the
// inference layout: packed[packed_rows_floats(IC, OC)] from pack_rows (panels of rows_panel() outputs, each
// [IC][rows_panel()], zero past OC).
void linear_rows(float* out, const float* inp, const float* packed, const float* bias, int N, int IC, int OC);
int rows_panel();
int64_t packed_rows_floats(int IC, int OC);
void pack_rows(float* packed, const float* w, int IC, int OC);
// cs[T, D/2, 2] = (cos, sin) of (pos0 + t) * theta^(-2i/D), computed in double: the rotation table of
// rope_forward, and of rope_rows at positions pos0..pos0+T-1.
void rope_cos_sin(float* cs, int T, int D, int pos0, float theta);
// x[N,nh,D] rotated in place, row n at position pos[n] (interleaved pairs, as rope_forward), from a table
// cs[P, D/2, 2] of rope_cos_sin(cs, P, D, 0, theta) with P > every pos[n].
void rope_rows(float* x, const int32_t* pos, const float* cs, int N, int nh, int D);
// dst[idx[n], :] = src[n, :] for n < N (rows of C floats; idx[N] >= 0): the KV cache write.
void scatter_rows(float* dst, const float* src, const int32_t* idx, int N, int C);
// Attention of N query rows over a paged KV cache. Row n is at position pos[n] of its sequence and attends to
// positions 0..pos[n] (its own included, written before the call). Position p of row n is cache slot
// table[table_start[n] + p / block_size] * block_size + p % block_size of k_pool / v_pool [slots, Hkv, D] (keys
// already rotated). q[N,H,D] rotated -> out[N,H,D]. Query head h uses kv head h / (H / Hkv); scale 1/sqrt(D).
// Each (row, head) is computed in a fixed order: batch-invariant like linear_rows.
void attention_paged(float* out, const float* q, const float* k_pool, const float* v_pool, const int32_t* pos,
                     const int32_t* table, const int32_t* table_start, int block_size, int N, int H, int Hkv, int D);

// ---------------------------------------------------------------- SparQ attention (Ribar et al., 2024)
// The cache's two side tables (rows, pools and block tables as in attention_paged; "block j" of a row is block
// table[table_start[n] + j] of its sequence):
// - value sums v_sums[num_blocks, Hkv, D]: at block j of a sequence, the sum of its values over positions
//   0 .. (j+1)*block_size - 1 (the sequence's prefix through the end of that block), so the mean value over
//   positions 0..p reads the sum at block p/block_size - 1 and the rows of p's own block, never the whole history.
//   value_sums_paged writes it for every row whose position ends a block (after the rows' values are in v_pool):
//   v_sums[block j] = v_sums[block j-1] (0 for j = 0) + (v_{j*bs} + ... + v_{(j+1)*bs-1}), the block's values
//   added in position order from 0. The rows of one sequence come in position order (a block's prefix may be
//   written by an earlier row of the same call).
// - key columns k_cols[num_blocks, Hkv, D, block_size] (optional): the keys again, by component: component i of
//   the key at slot s (kv head g) is k_cols[((s / bs) * Hkv + g) * D + i][s % bs], so one component of a block's
//   positions is contiguous. scatter_columns writes the rows' keys k[N,Hkv,D] at slots[N].
void value_sums_paged(float* v_sums, const float* v_pool, const int32_t* pos, const int32_t* table,
                      const int32_t* table_start, int block_size, int N, int Hkv, int D);
void scatter_columns(float* k_cols, const float* k, const int32_t* slots, int block_size, int N, int Hkv, int D);
// attention_paged, where row n with rk[2n] = r > 0 and rk[2n+1] = k > 0 and more than k positions (pos[n] + 1 > k)
// uses SparQ; every other row is attention_paged's, bit for bit. For the query heads of kv head g (the group
// G = H / Hkv shares one selection, as the paper suggests for GQA, so the group reads r columns and k rows once):
//   I      = the r components i with the largest sum over the group of |q_h[i]| (ties: the lower i)
//   s_h    = softmax_t(q_h[I] . K_t[I] / sqrt(D * sum_{i in I} |q_h[i]| / sum_i |q_h[i]|)), t <= pos[n]
//            (each dot an fma chain over I in increasing i, the same from k_cols or gathered from k_pool)
//   T      = the k positions t with the largest sum over the group of s_h[t] (ties: the lower t)
//   alpha_h = sum_{t in T} s_h[t]
//   y_h    = alpha_h * softmax_{t in T}(q_h . K_t / sqrt(D)) V_T + (1 - alpha_h) * mean_{t <= pos[n]} V_t
// with the mean from v_sums. k_cols may be null: the components are then read from k_pool (the same result bit
// for bit, more bytes touched). 0 <= r <= D. Batch-invariant like attention_paged.
void attention_sparq(float* out, const float* q, const float* k_pool, const float* v_pool, const float* v_sums,
                     const float* k_cols, const int32_t* pos, const int32_t* table, const int32_t* table_start,
                     const int32_t* rk, int block_size, int N, int H, int Hkv, int D);

// ---------------------------------------------------------------- plain references (reference.cpp)
void linear_forward_ref(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC);
void linear_backward_ref(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w,
                         int N, int IC, int OC);
void rmsnorm_forward_ref(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps);
void rmsnorm_backward_ref(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                          const float* rstd, int N, int C);
void layernorm_forward_ref(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                           int N, int C, float eps);
void layernorm_backward_ref(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                            const float* mean, const float* rstd, int N, int C);
void attention_forward_ref(float* out, float* att, const float* q, const float* k, const float* v, int B, int T,
                           int H, int Hkv, int D);
void attention_backward_ref(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                            const float* v, const float* att, int B, int T, int H, int Hkv, int D);
float cross_entropy_forward_ref(float* losses, float* probs, const float* logits, const int32_t* targets, int N,
                                int V);
// SparQ (attention_sparq's formula, in double) for every row of a causal attention case: q[B,T,H,D],
// k[B,T,Hkv,D], v[B,T,Hkv,D] -> out[B,T,H,D], row t over positions 0..t with r components and k keys, without
// attention_sparq's switch to full attention when k covers the context (the formula then is full attention).
void attention_sparq_ref(float* out, const float* q, const float* k, const float* v, int B, int T, int H, int Hkv,
                         int D, int r, int k_top);
// AdamW in double, element by element: adamw's formula (the row version: bias corrections from each row's
// incremented step count)
void adamw_ref(float* w, const float* g, float* m, float* v, int64_t n, const AdamWHyper& h, float bc1, float bc2);
void adamw_rows_ref(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows,
                    int64_t n_rows, int64_t row_size, const AdamWHyper& h);

}  // namespace moe::cpu
