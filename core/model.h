// Decoder-only causal language model built from ModelConfig: token embedding, n_layers blocks
// (pre-norm attention + pre-norm FFN, each with a residual), final norm, output projection, cross-entropy.
// The FFN of each block is a pluggable FfnUnit chosen per layer (model.ffn_pattern); a factory hook lets
// higher layers (experts/) provide MoE and word-expert units without core knowing about them: build a model with
// experts::build_model (experts/build_model.h), the one way to make a model.
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "core/kv_cache.h"
#include "core/layers.h"
#include "core/params.h"
#include "proto/config.pb.h"

namespace moe {

// Builds the FFN unit of layer `layer` (prefix "layers.<i>.ffn"). The default handles FFN_DENSE.
using FfnFactory = std::function<std::unique_ptr<FfnUnit>(ParamStore& ps, Workspace& ws, const std::string& prefix,
                                                          const proto::ModelConfig& cfg, int layer)>;

class Block {
 public:
  Block(ParamStore& ps, Workspace& ws, const proto::ModelConfig& cfg, int layer, const FfnFactory& ffn_factory);
  // out[N,C] = block(x[N,C]); keeps activations
  void forward(const FfnContext& ctx, float* out, const float* x, int B, int T);
  // dx[N,C] written from dout[N,C]
  void backward(const FfnContext& ctx, float* dx, const float* dout, int B, int T);
  void prepare_inference();  // the attention's and the FFN unit's matrices
  // the inference path: out[N,C] = block(x[N,C]) over a ragged batch, keys and values into this layer's pools
  void forward_infer(const FfnContext& ctx, float* out, const float* x, const InferRows& rows, const KvLayer& kv);
  FfnUnit& ffn() { return *ffn_; }
  Attention& attention() { return attn_; }

 private:
  Backend& be_;
  int C_;
  Norm norm1_;
  Attention attn_;
  Norm norm2_;
  std::unique_ptr<FfnUnit> ffn_;
  Workspace::Buffer &ln1_, &attn_out_, &x2_, &ln2_, &ffn_out_, &dtmp_, &dx2_;
};

// SparQ attention (core/kernels/cpu/kernels.h attention_sparq) for the rows of a chunk at positions >= from (a
// sequence's generated tokens: its prompt stays full attention, and a recomputed sequence gets the same rows as
// the first time): r query components, k keys. r = 0 and k = 0: full attention.
struct SparqKnobs {
  int r = 0;
  int k = 0;
  int from = 0;
};

// One sequence's chunk of an inference batch: n tokens at positions pos0.., and before[n_before], the sequence's
// tokens just before pos0 in order (the last min(pos0, kTokenContext) of them: exactly that many are required).
// want_logits: the logits of its last row; sparq: the SparQ attention of its rows (none by default).
struct SeqChunk {
  const int32_t* tokens = nullptr;
  int n = 0;
  int pos0 = 0;
  const int32_t* before = nullptr;
  int n_before = 0;
  bool want_logits = false;
  SparqKnobs sparq = {};
  // Positions [pos0, pos0 + n) of a sequence whose tokens up to there are all in `seq` (the context from there).
  static SeqChunk of(const int32_t* seq, int pos0, int n, bool want_logits, const SparqKnobs& sparq = {});
};

// A ragged batch of the inference path: rows are the tokens of several sequences (a prefill chunk, or the one
// new token of a decoding sequence), each at its own position, with its keys and values going into a paged KV
// cache (core/kv_cache.h). Host arrays; the model copies what its device needs.
struct InferBatch {
  std::vector<int32_t> tokens;       // [N]
  std::vector<int32_t> positions;    // [N] position of each row in its sequence (< model.max_seq_len)
  std::vector<int32_t> slots;        // [N] cache slot of each row: block * block_size + position % block_size
  std::vector<int32_t> table;        // the sequences' block tables, concatenated
  std::vector<int32_t> table_start;  // [N] where row n's block table starts in `table`
  std::vector<int32_t> logit_rows;   // the rows whose next-token logits are wanted
  std::vector<int32_t> context;      // [N, kTokenContext] the tokens before each row (FfnContext::token_context)
  std::vector<int32_t> sparq;        // [N, 2] each row's SparQ (r, k); (0, 0): full attention
  int rows() const { return static_cast<int>(tokens.size()); }
  void clear();
  // Appends one sequence's chunk with the sequence's block table (block ids by position).
  void add(const SeqChunk& chunk, const std::vector<int32_t>& blocks, int block_size);
};

class Model {
 public:
  // Registers every parameter (zeros, norms at 1) and takes activations from its own workspace; init_weights
  // draws the weights. experts::build_model does both (and restores extra state): use it.
  // sized_only: parameters get their shapes but no storage (a layout, e.g. for the checkpoint tools).
  // with_grads false: no gradient storage (inference only: forward_infer and the forward without backward).
  Model(const proto::ModelConfig& cfg, const FfnFactory& ffn_factory, bool sized_only = false,
        bool with_grads = true);
  const proto::ModelConfig& config() const { return cfg_; }
  ParamStore& params() { return ps_; }
  const ParamStore& params() const { return ps_; }

  // GPT-2 style init by each parameter's declared Init (init_params): N(0, init_std) for matrices and
  // embeddings, residual output projections scaled by 1/sqrt(2 n_layers), norms 1, biases 0; expert rows by
  // global expert id.
  void init_weights(uint64_t seed);
  Workspace& workspace() { return ws_; }

  // inputs[B,T], targets[B,T] (or null: logits only). Returns the mean cross-entropy (0 if no targets).
  // Logits [B*T, V] stay available through logits().
  float forward(const int32_t* inputs, const int32_t* targets, int B, int T, bool training = true);
  // Backward of the last forward (which must have had targets); accumulates into the parameter grads.
  // loss_scale: the weight of this forward's loss (and router losses) in the objective (1/k for k accumulated
  // micro-batches).
  void backward(float loss_scale = 1.0f);
  const float* logits() const { return logits_.data(); }
  const float* token_losses() const { return losses_.data(); }  // [B*T] per-token cross-entropy of the last forward
  // Sum of extra losses (router aux losses) from the last forward.
  double extra_loss() const;
  std::vector<FfnStats> ffn_stats() const;
  int n_layers() const { return static_cast<int>(blocks_.size()); }
  FfnUnit& ffn(int layer) { return blocks_.at(layer)->ffn(); }
  // The FFN units' extra state (router RNGs, routing tables), and its restoration; restore returns the number of
  // units that found no state of theirs in `s` (they keep their own).
  UnitState unit_state() const;
  int restore_unit_state(const UnitState& s);
  // After every optimizer step (all ranks, collective): each FFN unit's per-step update (FfnUnit).
  void after_optimizer_step(const WorldSum& sum_over_world);

  // ---- the inference path (generation and serving)
  // Packs every matrix into the inference layout of the backend (core/packed.h) from the current weights: before the
  // first forward_infer, and again after the weights changed.
  void prepare_inference();
  // The cache shape of this model with `num_blocks` blocks of `block_size` positions; with the value sums of SparQ
  // attention where the backend has it (Backend::has_sparq), without the key columns (a caller may add them).
  KvCacheDims kv_dims(int num_blocks, int block_size) const;
  // Runs the batch through the model (dropless, batch-invariant kernels: a row's result does not depend on the
  // other rows) writing every row's keys and values into `cache`, and returns the logits [logit_rows, V] on the
  // model's device (valid until the next call). Rows attend to positions 0..pos of their own sequence, so earlier
  // positions must already be in the cache (or in this batch, before them). Every expert-parallel rank must call
  // it for every step (with 0 rows if it has none): the MoE layers exchange tokens. Rows with SparQ knobs need a
  // cache with the value sums.
  const float* forward_infer(const InferBatch& batch, KvCache& cache);

 private:
  proto::ModelConfig cfg_;
  int V_, C_;
  ParamStore ps_;
  Workspace ws_;
  Param* wte_;
  Param* lm_head_ = nullptr;  // null when tied
  std::vector<std::unique_ptr<Block>> blocks_;
  std::unique_ptr<Norm> final_norm_;
  // activations of the last forward
  int B_ = 0, T_ = 0;
  const int32_t* inputs_ = nullptr;   // the caller's (host): the routers read them
  const int32_t* targets_ = nullptr;  // [N] on the device (ids_)
  std::vector<int32_t> context_;           // [N, kTokenContext] of the inputs (FfnContext::token_context)
  std::vector<Workspace::Buffer*> resid_;  // n_layers + 1 residual streams [N,C]
  Workspace::Buffer &ids_;  // [2N] int32 on the device: the inputs, then the targets
  Workspace::Buffer &lnf_, &logits_, &probs_, &losses_, &dlogits_, &dlnf_, &dres_a_, &dres_b_;
  // the inference path: the rows' int arrays on the device, two residual streams, the logit rows
  Workspace::Buffer &inf_ints_, &inf_a_, &inf_b_, &inf_last_, &inf_lnf_, &inf_logits_;
  bool check_sparq(const InferBatch& b, const KvCacheDims& kd) const;
  PackedWeight head_packed_;  // the output projection in the inference layout
  bool inference_ready_ = false;
};

}  // namespace moe
