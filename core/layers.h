// Layers of the decoder: normalisation, grouped-query attention with rotary embeddings, and the FFN unit
// interface with its dense implementation. Each layer owns its parameters (registered in a ParamStore) and the
// activations its backward needs; forward and backward sit side by side.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/params.h"
#include "proto/config.pb.h"

namespace moe {

// Float buffer that grows on demand (activations sized by the largest batch seen).
class Buffer {
 public:
  float* get(int64_t n) {
    if (static_cast<int64_t>(v_.size()) < n) v_.resize(n);
    return v_.data();
  }
  float* data() { return v_.data(); }
  const float* data() const { return v_.data(); }

 private:
  std::vector<float> v_;
};

// ------------------------------------------------------------------ normalisation (RMSNorm or LayerNorm)
class Norm {
 public:
  Norm(ParamStore& ps, const std::string& name, int C, proto::NormKind kind, float eps);
  // out[N,C] = norm(inp[N,C]); keeps inp pointer and statistics for backward (inp must stay alive)
  void forward(float* out, const float* inp, int N);
  // dinp[N,C] written, parameter grads accumulated
  void backward(float* dinp, const float* dout, int N);

 private:
  int C_;
  proto::NormKind kind_;
  float eps_;
  Param* w_;
  Param* b_ = nullptr;
  const float* inp_ = nullptr;
  Buffer mean_, rstd_;
};

// ------------------------------------------------------------------ causal self-attention (MHA / GQA / MQA)
struct AttentionDims {
  int C;    // d_model
  int H;    // query heads
  int Hkv;  // key/value heads
  int D;    // head dim
  float rope_theta;
};

class Attention {
 public:
  Attention(ParamStore& ps, const std::string& prefix, const AttentionDims& dims);
  // out[B*T,C] from inp[B*T,C] (positions 0..T-1 of each sequence); keeps activations for backward
  void forward(float* out, const float* inp, int B, int T);
  // dinp[B*T,C] written; parameter grads accumulated
  void backward(float* dinp, const float* dout, int B, int T);
  // One decoding step with a KV cache. inp[C] is the token at position pos; k_cache/v_cache[max_T,Hkv,D]
  // hold positions 0..pos-1 and get position pos appended. out[C].
  void decode(float* out, const float* inp, float* k_cache, float* v_cache, int pos);

  const AttentionDims& dims() const { return d_; }
  Param *wq, *wk, *wv, *wo;

 private:
  AttentionDims d_;
  const float* inp_ = nullptr;
  Buffer q_, k_, v_, att_, y_, dq_, dk_, dv_, datt_, dy_, tmp_;
};

// ------------------------------------------------------------------ FFN units (pluggable per layer)
struct FfnContext {
  const int32_t* token_ids = nullptr;  // [N] the input token of each row (for vocabulary routing)
  bool training = true;
};

// Aggregated statistics an FFN unit may report (routers fill them; dense leaves them empty).
struct FfnStats {
  double aux_loss = 0;
  double dropped_fraction = 0;
  int64_t load_min = 0, load_max = 0;
  bool has_router = false;
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
};

// Dense FFN: SwiGLU  y = (silu(x Wg^T) * (x Wu^T)) Wd^T   or   GELU  y = gelu(x Wu^T + bu) Wd^T + bd
class DenseFfn : public FfnUnit {
 public:
  DenseFfn(ParamStore& ps, const std::string& prefix, int C, int F, proto::Activation act);
  void forward(const FfnContext& ctx, float* y, const float* x, int N) override;
  void backward(const FfnContext& ctx, float* dx, const float* dy, int N) override;

 private:
  int C_, F_;
  proto::Activation act_;
  Param *w_gate_ = nullptr, *w_up_, *b_up_ = nullptr, *w_down_, *b_down_ = nullptr;
  const float* x_ = nullptr;
  Buffer gate_, up_, act_out_, dact_, dgate_, dup_;
};

}  // namespace moe
