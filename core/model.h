// Decoder-only causal language model built from ModelConfig: token embedding, n_layers blocks
// (pre-norm attention + pre-norm FFN, each with a residual), final norm, output projection, cross-entropy.
// The FFN of each block is a pluggable FfnUnit chosen per layer (model.ffn_pattern); a factory hook lets
// higher layers (experts/) provide MoE and word-expert units without core knowing about them: build a model with
// experts::build_model (experts/build_model.h), the one way to make a model.
#pragma once
#include <functional>
#include <memory>
#include <vector>

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
  // one decoding step (x, out [C]); caches [max_T, Hkv, D]
  void decode(float* out, const float* x, float* k_cache, float* v_cache, int pos, int32_t token);
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

class Model {
 public:
  // Registers every parameter (zeros, norms at 1) and takes activations from its own workspace; init_weights
  // draws the weights. experts::build_model does both (and restores extra state): use it.
  // sized_only: parameters get their shapes but no storage (a layout, e.g. for the checkpoint tools).
  Model(const proto::ModelConfig& cfg, const FfnFactory& ffn_factory, bool sized_only = false);
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
  void backward();
  const float* logits() const { return logits_.data(); }
  // Sum of extra losses (router aux losses) from the last forward.
  double extra_loss() const;
  std::vector<FfnStats> ffn_stats() const;
  int n_layers() const { return static_cast<int>(blocks_.size()); }
  FfnUnit& ffn(int layer) { return blocks_.at(layer)->ffn(); }
  // The FFN units' extra state (router RNGs, routing tables), and its restoration; restore returns the number of
  // units that found no state of theirs in `s` (they keep their own).
  UnitState unit_state() const;
  int restore_unit_state(const UnitState& s);

  // ---- incremental decoding with a KV cache sized [n_layers, max_T, n_kv_heads, head_dim]
  struct KvCache {
    int max_T = 0;
    int len = 0;
    std::vector<std::vector<float>> k, v;  // per layer, [max_T * Hkv * D]
  };
  KvCache make_cache(int max_T) const;
  // Feeds one token at position cache.len; writes logits[V] (returned pointer valid until the next call).
  const float* decode_step(KvCache& cache, int32_t token);

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
  const int32_t* inputs_ = nullptr;
  const int32_t* targets_ = nullptr;
  std::vector<Workspace::Buffer*> resid_;  // n_layers + 1 residual streams [N,C]
  Workspace::Buffer &lnf_, &logits_, &probs_, &losses_, &dlogits_, &dlnf_, &dres_a_, &dres_b_;
  Workspace::Buffer &dec_x_, &dec_y_, &dec_lnf_, &dec_logits_;
};

}  // namespace moe
