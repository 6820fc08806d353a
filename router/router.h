// Routers of the MoE layer: they decide, per token, which experts process it and with what combine weight.
// Every router produces a DispatchPlan; the plan also owns the permutation (tokens sorted by expert) and the
// permute / unpermute-combine kernels with their backward, llm.c style: raw row-major float pointers, a shape
// comment on every pointer, forward and backward side by side.
//
//   LearnedRouter  logits = x W_r^T, softmax or sigmoid scores, top-k, capacity drop, Switch aux loss, z-loss,
//                  input jitter (GShard / Switch / ST-MoE), per-expert selection bias (auxiliary-loss-free load
//                  balancing, DeepSeek-V3)
//   VocabRouter    MoWE: token id -> expert table built from corpus frequencies (frequent tokens get their own
//                  word expert, the rest are hashed onto shared experts)
//   HashRouter     expert = mix64(token id) % E
//
// Notation: N tokens, C channels, E experts, k slots (choices) per token, "slot" s = n*k + j is the j-th choice
// of token n, rows = number of kept slots = length of the permuted buffer.
// Everything is deterministic given the inputs and the seed; nothing here knows about MPI or devices.
#pragma once
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "core/rng.h"

namespace moe::cpu {
struct RouterDims;  // core/kernels/cpu/kernels.h
}  // namespace moe::cpu

namespace moe::router {

// ---------------------------------------------------------------- hashing
// splitmix64 finaliser: a fixed 64-bit mix (bijective; mix64(0) == 0). Used by the hash router and by the
// vocabulary router for its shared experts; never change it, routing tables of old checkpoints depend on it.
uint64_t mix64(uint64_t x);

// Per-expert capacity for N tokens, k slots each, E experts: ceil(k * N * capacity_factor / E). The product is
// taken in double and shrunk by a relative 1e-6 before the ceil, so a float config value such as 1.1f (really
// 1.10000002) does not turn an exact integer into the next one. Requires N >= 0, k >= 1, E >= 1, factor > 0.
int expert_capacity(int N, int k, int E, double capacity_factor);

// ---------------------------------------------------------------- DispatchPlan
// Where each (token, slot) goes. Filled by a router (which then calls build_permutation()); the MoE layer uses it
// to permute tokens into per-expert contiguous rows, run the experts, and combine the results back.
struct DispatchPlan {
  int num_tokens = 0;   // N
  int k = 0;            // slots per token
  int num_experts = 0;  // E
  int capacity = -1;    // per expert; -1: dropless (no capacity)

  std::vector<int32_t> expert;    // [N*k] expert of slot n*k+j, -1 if dropped (or never routed)
  std::vector<float> gate;        // [N*k] combine weight; 0 for dropped slots
  std::vector<int32_t> position;  // [N*k] index within its expert's capacity buffer in assignment-priority order
                                  //       (0..counts[e]-1), -1 if dropped. NOT the row within the expert's block
                                  //       of the permuted buffer when k > 1: see order below.
  std::vector<int32_t> counts;    // [E] slots kept per expert

  // ---- compact plans (table routers over very many experts) ----
  // Empty: plan expert e is global expert e. Otherwise the plan lists only the experts that received tokens:
  // plan expert i is global expert global_expert[i] (strictly ascending) of total_experts, and counts,
  // expert_offsets and every loop over experts cost O(experts used), not O(total_experts).
  std::vector<int32_t> global_expert;  // [num_experts] or empty
  int total_experts = 0;               // compact plans only
  int global_id(int i) const { return global_expert.empty() ? i : global_expert[i]; }
  int global_num_experts() const { return global_expert.empty() ? num_experts : total_experts; }

  // ---- permutation (build_permutation) ----
  std::vector<int32_t> order;           // [rows] slot ids sorted by destination expert, stable by token index
                                        //        (a token holds at most one slot per expert, so this is total)
  std::vector<int32_t> expert_offsets;  // [E+1] expert e owns permuted rows [offsets[e], offsets[e+1])
  std::vector<int32_t> row_of_slot;     // [N*k] permuted row of a slot, -1 if dropped (inverse of order)

  // Allocates expert/gate/position for N*k slots, all dropped (-1, 0, -1); counts zeroed.
  void reset(int N, int k, int E, int capacity);
  // Validates expert/gate/position (expert in [-1, E), positions per expert a permutation of 0..count-1,
  // dropped slots have gate 0 and position -1) and computes counts, order, expert_offsets, row_of_slot.
  // Throws moe::Error naming the offending slot.
  void build_permutation();

  int rows() const { return expert_offsets.empty() ? 0 : expert_offsets.back(); }
  int num_slots() const { return num_tokens * k; }
  int num_dropped() const;          // slots with expert == -1
  double dropped_fraction() const;  // num_dropped / (N*k); 0 for N == 0
  int load_min() const;             // min over experts of counts (0 when a compact plan leaves experts unused)
  int load_max() const;             // max over experts of counts
  int experts_used() const;         // experts with at least one kept slot

  // out[r] = x[token of order[r]]: gather the kept slots into per-expert contiguous rows.
  void permute(float* out /*[rows,C]*/, const float* x /*[N,C]*/, int C) const;
  // dx[n] += sum over kept slots of n of dout[row]: scatter-ADD (x also feeds the residual and the router).
  void permute_backward(float* dx /*[N,C] +=*/, const float* dout /*[rows,C]*/, int C) const;

  // out[n] = sum over kept slots s of n of gate[s] * y[row_of_slot[s]] (WRITTEN; a token whose slots are all
  // dropped gets 0: the residual outside the layer carries it).
  void unpermute_combine(float* out /*[N,C]*/, const float* y /*[rows,C]*/, int C) const;
  // dy[row] = gate[s] * dout[n] (WRITTEN); dgate[s] = <dout[n], y[row]> for kept slots, 0 for dropped (WRITTEN).
  // dy or dgate may be null (skipped).
  void unpermute_combine_backward(float* dy /*[rows,C]*/, float* dgate /*[N*k]*/, const float* dout /*[N,C]*/,
                                  const float* y /*[rows,C]*/, int C) const;
};

// A dropless k=1 plan with gate 1 from an expert id per token (ids checked to lie in [0, E), or -1: the token
// skips the layer, a dropped slot whose output is 0); positions in token order. Shared by the table routers.
DispatchPlan make_top1_plan(const int32_t* expert /*[N]*/, int N, int E);
// The same plan in compact form (global_expert lists the distinct experts used, ascending): O(N log N) work and
// memory whatever E is, for word-expert tables with up to ~10^5 experts of which a batch uses a few thousand.
DispatchPlan make_top1_plan_compact(const int32_t* expert /*[N]*/, int N, int E);

// ---------------------------------------------------------------- learned top-k router
enum class ScoreFn { kSoftmax, kSigmoid };

struct LearnedRouterOptions {
  ScoreFn score = ScoreFn::kSoftmax;
  double capacity_factor = 1.25;  // > 0 unless dropless; capacity = expert_capacity(N, k, E, capacity_factor)
  bool dropless = false;          // no capacity, nothing dropped (plan.capacity = -1)
  bool normalize_topk = true;     // k > 1: gates = selected scores / their sum. Ignored for k = 1 (Switch: the raw
                                  // score is the gate, else the gate would be a constant 1 with no gradient)
  float aux_loss_coef = 0.0f;     // Switch load balancing: E * sum_e f_e P_e (see LearnedRouter)
  float z_loss_coef = 0.0f;       // ST-MoE z-loss: mean_n logsumexp(logits_n)^2
  float jitter_eps = 0.0f;        // training only: x *= U[1-eps, 1+eps] elementwise; 0 <= eps < 1
  uint64_t seed = 0;              // jitter noise stream
  // Auxiliary-loss-free load balancing (DeepSeek-V3, Wang et al. 2024): the top-k is chosen on score + b_e (b: the
  // router's bias(), state, not a parameter) and update_bias() moves b by bias_update_rate per call. Off: the
  // selection is on the logits and the bias is never used. Applies in training and inference alike.
  bool bias_balancing = false;
  float bias_update_rate = 0.0f;  // >= 0 (model.moe.bias_update_rate)
};

struct RouterOutput {
  DispatchPlan plan;
  float aux_loss = 0.0f;  // unscaled load-balancing loss (1 at perfect balance)
  float z_loss = 0.0f;    // unscaled z-loss
  float loss = 0.0f;      // aux_loss_coef * aux_loss + z_loss_coef * z_loss: add this to the training loss
};

// Learned top-k gate over E experts for C-channel tokens. The weight w_router[E,C] is owned by the caller (the
// model layer registers it as a parameter) and passed to forward and backward.
//
// forward(x):  x' = x * noise (training with jitter, else x);  logits[N,E] = x' W^T;
//   scores: softmax(logits) or sigmoid(logits) (probs());
//   top-k on the logits (same order as the scores for both score functions), descending, TIE-BREAK: the lower
//   expert index wins; the k experts of a token are always distinct; with bias_balancing the top-k is taken on
//   score_e + b_e instead (in double; same tie-break), in training and inference alike;
//   gates: the selected scores (never the bias), renormalised to sum 1 when normalize_topk and k > 1;
//   capacity (unless dropless, or not training): slot-major priority as GShard / Switch: every token's 1st choice is assigned a
//   position before any 2nd choice, and within a slot tokens go by index; a slot finding its expert full is
//   dropped (expert -1, gate 0, position -1). Gates are normalised BEFORE dropping.
//   aux loss = E * sum_e f_e * P_e, f_e = (token-slots choosing e before dropping) / (N*k) (a constant),
//   P_e = mean_n of the token's probability of e: softmax probs, or for sigmoid the scores normalised over all
//   experts per token (s_e / sum_j s_j, as DeepSeek-V3), so that P is a distribution and the loss is 1 at balance;
//   z-loss = mean_n logsumexp_e(logits_ne)^2 (for both score functions).
// backward: the top-k selection and the capacity drop are constants; gates, aux loss and z-loss are
// differentiated w.r.t. the logits, then to x and W (the bias only moved the selection: it has no gradient).
// update_bias(load): b_e += rate * sign(mean_j load_j - load_e): underloaded experts become more attractive,
// overloaded ones less, an expert exactly at the mean keeps its bias.
class LearnedRouter {
 public:
  // Throws moe::Error unless 1 <= k <= E, C >= 1 and the options are valid.
  LearnedRouter(int num_experts, int k, int channels, const LearnedRouterOptions& opts = {});

  // x[N,C], w_router[E,C]. Keeps what backward needs (a copy of x', scores, choices) until the next forward.
  // Capacity and jitter apply only when `training`: inference (evaluation, generation, serving) is dropless.
  // w_packed: the router weight in the inference layout (cpu::pack_rows): the logits come from cpu::linear_rows
  // (a token's routing independent of the other tokens, bit for bit: the inference path) instead of sgemm on
  // w_router.
  RouterOutput forward(const float* x /*[N,C]*/, const float* w_router /*[E,C]*/, int N, bool training,
                       const float* w_packed = nullptr);

  // Backward of L = sum_s dgate[s] * gate[s] + loss_scale * (aux_loss_coef * aux + z_loss_coef * z) for the
  // last forward. dx += dL/dx (null: skipped), dw += dL/dW (null: skipped). dgate of dropped slots is ignored.
  // loss_scale is the weight of the router losses in the total loss (e.g. 1/accumulation steps).
  void backward(float* dx /*[N,C] +=*/, float* dw /*[E,C] +=*/, const float* dgate /*[N*k]*/,
                const float* w_router /*[E,C]*/, float loss_scale = 1.0f);

  // forward and backward in three parts, for a caller that runs the router's GEMMs itself (the MoE layer, on its
  // backend's device):
  //   draw_noise(N, training)  the jitter multipliers noise[N,C] of this forward (empty without jitter or when not
  //                            training): x' = x * noise; draws from the RNG exactly as forward does
  //   route(logits, N, training)  everything after the GEMM logits[N,E] = x' W^T (a host array)
  //   logits_grad(dgate, loss_scale)  dL/dlogits [N,E] of the last route; then dW += dlogits^T x' and
  //                            dx += (dlogits W) * noise
  // forward / backward are exactly these with the GEMMs on the host.
  const std::vector<float>& draw_noise(int N, bool training);
  RouterOutput route(const float* logits /*[N,E]*/, int N, bool training);
  const std::vector<float>& logits_grad(const float* dgate /*[N*k]*/, float loss_scale = 1.0f);
  // The part of route after the per-token math, for a caller that ran cpu::router_topk (or a backend's) itself,
  // on a device: from its choice[N*k], gate[N*k] and stats[E+2] (host copies), the capacity drop, the plan, f and
  // the losses. Throws when stats flags a non-finite logit. The logits' gradient of such a forward is then
  // cpu::router_logits_grad (or the backend's) with expert_fraction() and kept_rows(); logits_grad refuses it.
  RouterOutput assign(const int32_t* choice /*[N*k]*/, const float* gate /*[N*k]*/, const double* stats /*[E+2]*/,
                      int N, bool training);
  // The shape and score options of N tokens for those kernels (normalize: normalize_topk with k > 1).
  cpu::RouterDims dims(int N) const;

  int num_experts() const { return E_; }
  int top_k() const { return k_; }
  int channels() const { return C_; }
  const LearnedRouterOptions& options() const { return opts_; }

  // State of the last forward (for tests, logging and the layer).
  int last_num_tokens() const { return N_; }
  const std::vector<float>& logits() const { return logits_; }          // [N,E] (route: the host's logits)
  const std::vector<float>& probs() const { return probs_; }            // [N,E] scores (route only)
  const std::vector<int32_t>& topk_experts() const { return choice_; }  // [N*k] choices BEFORE dropping
  const std::vector<float>& jitter_noise() const { return noise_; }     // [N,C] multipliers; empty if no jitter
  const std::vector<float>& expert_fraction() const { return f_; }      // [E] f_e of the aux loss
  const std::vector<int32_t>& kept_rows() const { return kept_; }       // [N*k] 0: kept, -1: dropped
  // The jitter RNG (its state belongs in a checkpoint for bit-exact resumption).
  Rng& rng() { return rng_; }
  std::array<uint64_t, 4> rng_state() const { return rng_.state(); }
  void set_rng_state(const std::array<uint64_t, 4>& s) { rng_.set_state(s); }
  // The selection bias b[E] (zeros until updated or set; used only with bias_balancing).
  const std::vector<float>& bias() const { return bias_; }
  // Sets b (a checkpoint's); throws unless it has E finite values.
  void set_bias(const std::vector<float>& b);
  // One balancing step from load[E], the token-slots each expert was chosen for (before capacity drops) summed
  // over everything the step routed (all ranks, all micro-batches): b_e += rate * sign(mean - load_e). Throws
  // unless bias_balancing is on and the loads are finite and >= 0.
  void update_bias(const double* load /*[E]*/);

 private:
  int E_, k_, C_;
  LearnedRouterOptions opts_;
  Rng rng_;
  // last forward
  int N_ = 0;
  bool have_forward_ = false;
  std::vector<float> xin_;      // [N,C] x' (jittered copy of x), the input of the router GEMM
  std::vector<float> noise_;    // [N,C] jitter multipliers (training with jitter only)
  std::vector<float> logits_;   // [N,E]
  std::vector<float> probs_;    // [N,E]
  std::vector<double> lse_;     // [N] logsumexp of the logits
  std::vector<int32_t> choice_; // [N*k] top-k experts, descending score
  std::vector<int32_t> kept_;   // [N*k] 0 if the slot survived the capacity drop, else -1
  bool host_logits_ = false;    // the last forward was route (logits_, probs_, lse_ are its)
  std::vector<float> f_;        // [E]
  std::vector<float> dlogits_;  // [N,E] scratch
  std::vector<float> bias_;     // [E] selection bias (bias_balancing)
};

// ---------------------------------------------------------------- vocabulary router (MoWE)
// A routing table token id -> expert id. Experts [0, W) are word experts, one per frequent token; experts
// [W, E) are shared by all other tokens: expert = W + mix64(id) % (E - W).
class VocabRouter {
 public:
  // token_counts[V]: corpus frequency of each token id. The min(num_word_experts, #tokens with count > 0) most
  // frequent tokens (ties: lower id first) each get their own word expert 0, 1, ... in descending frequency;
  // word experts left over stay empty. Requires E >= 1, 0 <= num_word_experts <= E, V >= 1, counts >= 0, and
  // E - num_word_experts >= 1 unless every token of the vocabulary got a word expert.
  static VocabRouter build(const std::vector<int64_t>& token_counts /*[V]*/, int num_experts,
                           int num_word_experts);
  // From a saved table (checkpoint): every entry must lie in [0, E).
  static VocabRouter load(std::vector<int32_t> table /*[V]*/, int num_experts, int num_word_experts);

  // k = 1, gate 1, dropless plan; token ids must lie in [0, V).
  DispatchPlan route(const int32_t* token_ids /*[N]*/, int N) const;
  int expert_of(int32_t token_id) const;

  const std::vector<int32_t>& table() const { return table_; }  // [V]: what the checkpoint stores
  std::vector<int32_t> save() const { return table_; }
  int vocab_size() const { return static_cast<int>(table_.size()); }
  int num_experts() const { return E_; }
  int num_word_experts() const { return W_; }

 private:
  VocabRouter(std::vector<int32_t> table, int E, int W) : table_(std::move(table)), E_(E), W_(W) {}
  std::vector<int32_t> table_;
  int E_ = 0, W_ = 0;
};

// ---------------------------------------------------------------- hash router
class HashRouter {
 public:
  explicit HashRouter(int num_experts);  // throws unless num_experts >= 1
  int expert_of(int64_t token_id) const { return static_cast<int>(mix64(static_cast<uint64_t>(token_id)) % E_); }
  // k = 1, gate 1, dropless plan.
  DispatchPlan route(const int32_t* token_ids /*[N]*/, int N) const;
  int num_experts() const { return E_; }

 private:
  int E_;
};

}  // namespace moe::router
