// Layers of the decoder: normalisation, grouped-query attention with rotary embeddings, and the FFN unit
// interface with its dense implementation. Each layer registers its parameters (with their init and sharding) in
// a ParamStore and takes the activation buffers its backward needs from the model's workspace; forward and
// backward sit side by side.
#pragma once
#include <array>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/grouped_ffn.h"
#include "core/kv_cache.h"
#include "core/packed.h"
#include "core/params.h"
#include "core/workspace.h"
#include "proto/config.pb.h"

namespace moe {

// ------------------------------------------------------------------ normalisation (RMSNorm or LayerNorm)
class Norm {
 public:
  Norm(ParamStore& ps, Workspace& ws, const std::string& name, int C, proto::NormKind kind, float eps);
  // out[N,C] = norm(inp[N,C]); keeps inp pointer and statistics for backward (inp must stay alive)
  void forward(float* out, const float* inp, int N);
  // dinp[N,C] written, parameter grads accumulated
  void backward(float* dinp, const float* dout, int N);

 private:
  Backend& be_;
  int C_;
  proto::NormKind kind_;
  float eps_;
  Param* w_;
  Param* b_ = nullptr;
  const float* inp_ = nullptr;
  Workspace::Buffer &mean_, &rstd_;
};

// ------------------------------------------------------------------ causal self-attention (MHA / GQA / MQA)
struct AttentionDims {
  int C;    // d_model
  int H;    // query heads
  int Hkv;  // key/value heads
  int D;    // head dim
  float rope_theta;
  int max_T;  // model.max_seq_len: the positions of the inference path's rotation table
};

// The rows of an inference batch as a layer sees them (device pointers, see InferBatch in core/model.h): row n is
// at position pos[n] of its sequence, its keys and values go to cache slot slots[n], and its sequence's block table
// starts at table + table_start[n]. With `sparq`, row n attends with SparQ (r, k) = (sparq[2n], sparq[2n+1]) where
// both are > 0 (kernels.h attention_sparq).
struct InferRows {
  int N = 0;
  const int32_t* pos = nullptr;          // [N]
  const int32_t* slots = nullptr;        // [N]
  const int32_t* table = nullptr;        // block tables, concatenated
  const int32_t* table_start = nullptr;  // [N]
  int block_size = 0;
  const int32_t* sparq = nullptr;  // [N, 2] or null: every row full attention
};

class Attention {
 public:
  Attention(ParamStore& ps, Workspace& ws, const std::string& prefix, const AttentionDims& dims);
  // out[B*T,C] from inp[B*T,C] (positions 0..T-1 of each sequence); keeps activations for backward
  void forward(float* out, const float* inp, int B, int T);
  // dinp[B*T,C] written; parameter grads accumulated
  void backward(float* dinp, const float* dout, int B, int T);
  // The inference path: out[N,C] from inp[N,C] of a ragged batch over a paged KV cache (batch-invariant kernels).
  // Writes the rows' keys and values into this layer's pools of a KvCache (and the side tables it keeps), then
  // attends over each row's positions 0..pos[n]. Keeps nothing for backward. Needs prepare_inference().
  void forward_infer(float* out, const float* inp, const InferRows& rows, const KvLayer& kv);
  // The projections in the inference layout and the rotation table of every position (from the current weights).
  void prepare_inference();

  const AttentionDims& dims() const { return d_; }
  Param *wq, *wk, *wv, *wo;

 private:
  Backend& be_;
  AttentionDims d_;
  const float* inp_ = nullptr;
  Workspace::Buffer &q_, &k_, &v_, &att_, &y_, &dq_, &dk_, &dv_, &datt_, &dy_, &rope_cs_;
  PackedWeight pq_, pk_, pv_, po_;  // wq, wk, wv, wo in the inference layout
};

// ------------------------------------------------------------------ FFN units (pluggable per layer)
// Tokens of context each row carries for word-level routing: the tokens before it in its sequence.
inline constexpr int kTokenContext = 7;

struct FfnContext {
  const int32_t* token_ids = nullptr;  // [N] the input token of each row (for vocabulary routing)
  // [N, kTokenContext] the tokens before each row in its sequence, nearest first, -1 before the sequence's start
  // (word-level routing reads them: router/routing_vocab.h). Filled by the model on every path.
  const int32_t* token_context = nullptr;
  // Training: capacity limits and router jitter apply. Otherwise (evaluation, generation, serving) every token
  // reaches all of its top-k experts (dropless), so a token's output never depends on the other tokens routed
  // with it, at any world size.
  bool training = true;
  // The inference path (generation, serving; not training): every matrix product uses the batch-invariant kernel
  // (Backend::linear_rows), so a token's output is the same bit for bit whatever it is batched with.
  bool batch_invariant = false;
  // Backward: the weight of the unit's extra losses (router aux / z-loss) in the objective (Model::backward).
  float loss_scale = 1.0f;
};

// What an FFN unit reports about its last forward (routers fill it; dense leaves it empty).
struct FfnStats {
  bool has_router = false;
  double aux_loss = 0;
  double dropped_fraction = 0;
  int64_t load_min = 0, load_max = 0;  // rows per expert (this rank's tokens), over the experts of the plan
  int64_t experts_used = 0;            // experts that got at least one row (this rank's tokens)
  // rows per GLOBAL expert from this rank's tokens (learned MoE layers; empty for word-expert tables, whose
  // expert count can be ~10^6)
  std::vector<int64_t> expert_load;
  // token-slots that CHOSE each global expert, before capacity drops, over every training forward of the last
  // step (all micro-batches; this rank's tokens): what load balancing acts on (learned MoE layers; else empty)
  std::vector<int64_t> expert_routed;
  // the selection bias of auxiliary-loss-free balancing, per global expert (empty when off); the same on every rank
  std::vector<float> expert_bias;
};

// max_e load_e / mean_e load_e (1 at perfect balance, E when one expert takes everything); 0 for no load.
double max_overload(const std::vector<int64_t>& load);

// An in-place sum of a vector over every rank of the world (identity on one rank).
using WorldSum = std::function<void(std::vector<double>&)>;

// Non-parameter state of the FFN units that a checkpoint keeps, by layer prefix ("layers.<l>.ffn"): RNG streams
// (a learned router's jitter noise), integer tables (a word-expert layer's routing table) and float vectors (a
// learned router's selection bias, bias balancing).
struct UnitState {
  std::map<std::string, std::array<uint64_t, 4>> rngs;
  std::map<std::string, std::vector<int32_t>> tables;
  std::map<std::string, std::vector<float>> biases;
};

class FfnUnit {
 public:
  virtual ~FfnUnit() = default;
  // y[N,C] = ffn(x[N,C]); keeps what backward needs (x must stay alive until backward)
  virtual void forward(const FfnContext& ctx, float* y, const float* x, int N) = 0;
  // dx[N,C] written; parameter grads accumulated
  virtual void backward(const FfnContext& ctx, float* dx, const float* dy, int N) = 0;
  // Extra scalar loss the unit adds to the objective (router aux losses); 0 for dense
  virtual double extra_loss() const { return 0.0; }
  virtual FfnStats stats() const { return {}; }
  // Adds this unit's extra state to `s` (capture) / takes it from `s` (restore; returns false when `s` has none
  // for this unit, which then keeps its own).
  virtual void capture_state(UnitState& s) const {}
  virtual bool restore_state(const UnitState& s) { return true; }
  // Called by the trainer on every rank after every optimizer step (collective: every rank calls it for every
  // unit in the same order): a unit with per-step state updates it here (a learned router's balancing bias, from
  // the loads of the step summed with `sum_over_world`), and the step's statistics close.
  virtual void after_optimizer_step(const WorldSum& sum_over_world) {}
  // Packs the unit's matrices for the inference path (forward with ctx.batch_invariant), from their current values.
  virtual void prepare_inference() = 0;
};

// Dense FFN: SwiGLU  y = (silu(x Wg^T) * (x Wu^T)) Wd^T   or   GELU  y = gelu(x Wu^T + bu) Wd^T + bd
// (the grouped FFN with one group)
class DenseFfn : public FfnUnit {
 public:
  DenseFfn(ParamStore& ps, Workspace& ws, const std::string& prefix, int C, int F, proto::Activation act);
  void forward(const FfnContext& ctx, float* y, const float* x, int N) override;
  void backward(const FfnContext& ctx, float* dx, const float* dy, int N) override;
  void prepare_inference() override { ffn_->prepare_inference(); }

 private:
  std::unique_ptr<GroupedFfn> ffn_;
};

}  // namespace moe
