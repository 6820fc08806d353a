#include "core/model.h"

#include <cmath>
#include <cstring>


namespace moe {

// ================================================================== Block
Block::Block(ParamStore& ps, Workspace& ws, const proto::ModelConfig& cfg, int layer, const FfnFactory& ffn_factory)
    : be_(ws.backend()),
      C_(cfg.d_model()),
      norm1_(ps, ws, "layers." + std::to_string(layer) + ".attn_norm", cfg.d_model(), cfg.norm(), cfg.norm_eps()),
      attn_(ps, ws, "layers." + std::to_string(layer) + ".attn",
            AttentionDims{cfg.d_model(), cfg.n_heads(), cfg.n_kv_heads(), cfg.d_model() / cfg.n_heads(),
                          cfg.rope_theta()}),
      norm2_(ps, ws, "layers." + std::to_string(layer) + ".ffn_norm", cfg.d_model(), cfg.norm(), cfg.norm_eps()),
      ln1_(ws.buffer()), attn_out_(ws.buffer()), x2_(ws.buffer()), ln2_(ws.buffer()), ffn_out_(ws.buffer()),
      dtmp_(ws.buffer()), dx2_(ws.buffer()) {
  ffn_ = ffn_factory(ps, ws, "layers." + std::to_string(layer) + ".ffn", cfg, layer);
}

void Block::forward(const FfnContext& ctx, float* out, const float* x, int B, int T) {
  const int64_t NC = int64_t(B) * T * C_;
  const int N = B * T;
  float* ln1 = ln1_.get(NC);
  float* a = attn_out_.get(NC);
  float* x2 = x2_.get(NC);
  float* ln2 = ln2_.get(NC);
  float* f = ffn_out_.get(NC);
  norm1_.forward(ln1, x, N);
  attn_.forward(a, ln1, B, T);
  be_.add(x2, x, a, NC);
  norm2_.forward(ln2, x2, N);
  ffn_->forward(ctx, f, ln2, N);
  be_.add(out, x2, f, NC);
}

void Block::backward(const FfnContext& ctx, float* dx, const float* dout, int B, int T) {
  const int64_t NC = int64_t(B) * T * C_;
  const int N = B * T;
  float* dtmp = dtmp_.get(NC);
  float* dx2 = dx2_.get(NC);
  // out = x2 + ffn(norm2(x2))
  ffn_->backward(ctx, dtmp, dout, N);  // d ln2
  norm2_.backward(dx2, dtmp, N);
  be_.add_inplace(dx2, dout, NC);
  // x2 = x + attn(norm1(x))
  attn_.backward(dtmp, dx2, B, T);  // d ln1
  norm1_.backward(dx, dtmp, N);
  be_.add_inplace(dx, dx2, NC);
}

void Block::decode(float* out, const float* x, float* k_cache, float* v_cache, int pos, int32_t token) {
  float* ln = ln1_.get(C_);
  float* a = attn_out_.get(C_);
  float* x2 = x2_.get(C_);
  norm1_.forward(ln, x, 1);
  attn_.decode(a, ln, k_cache, v_cache, pos);
  be_.add(x2, x, a, C_);
  norm2_.forward(ln, x2, 1);
  float* f = ffn_out_.get(C_);
  FfnContext ctx;
  ctx.token_ids = &token;
  ctx.training = false;
  ffn_->forward(ctx, f, ln, 1);
  be_.add(out, x2, f, C_);
}

// ================================================================== Model
Model::Model(const proto::ModelConfig& cfg, const FfnFactory& ffn_factory, bool sized_only)
    : cfg_(cfg),
      V_(cfg.vocab_size()),
      C_(cfg.d_model()),
      ps_(sized_only),
      ws_(backend_for(cfg.device() == proto::DEVICE_CUDA ? Device::kCUDA : Device::kCPU)),
      lnf_(ws_.buffer()),
      logits_(ws_.buffer()),
      probs_(ws_.buffer()), losses_(ws_.buffer()), dlogits_(ws_.buffer()), dlnf_(ws_.buffer()), dres_a_(ws_.buffer()),
      dres_b_(ws_.buffer()), dec_x_(ws_.buffer()), dec_y_(ws_.buffer()), dec_lnf_(ws_.buffer()),
      dec_logits_(ws_.buffer()) {
  MOE_CHECK(V_ > 0, "model.vocab_size must be set (> 0) before building the model");
  wte_ = ps_.add("tok_emb.weight", {V_, C_}, true);
  for (int l = 0; l < cfg.n_layers(); ++l)
    blocks_.push_back(std::make_unique<Block>(ps_, ws_, cfg, l, ffn_factory));
  final_norm_ = std::make_unique<Norm>(ps_, ws_, "final_norm", C_, cfg.norm(), cfg.norm_eps());
  if (!cfg.tie_embeddings()) lm_head_ = ps_.add("lm_head.weight", {V_, C_}, true);
  for (int l = 0; l <= cfg.n_layers(); ++l) resid_.push_back(&ws_.buffer());
}

void Model::init_weights(uint64_t seed) {
  init_params(ps_, seed, cfg_.init_std(), cfg_.init_std() / std::sqrt(2.0f * cfg_.n_layers()));
}

UnitState Model::unit_state() const {
  UnitState s;
  for (auto& b : blocks_) b->ffn().capture_state(s);
  return s;
}

int Model::restore_unit_state(const UnitState& s) {
  int missing = 0;
  for (auto& b : blocks_) missing += b->ffn().restore_state(s) ? 0 : 1;
  return missing;
}

float Model::forward(const int32_t* inputs, const int32_t* targets, int B, int T, bool training) {
  MOE_CHECK(T <= cfg_.max_seq_len(), "sequence length " << T << " exceeds model.max_seq_len " << cfg_.max_seq_len());
  B_ = B;
  T_ = T;
  inputs_ = inputs;
  targets_ = targets;
  const int N = B * T;
  const int64_t NC = int64_t(N) * C_;
  for (int i = 0; i < N; ++i)
    MOE_CHECK(inputs[i] >= 0 && inputs[i] < V_, "token id " << inputs[i] << " at position " << i
                                                            << " is outside the vocabulary [0, " << V_ << ")");
  FfnContext ctx;
  ctx.token_ids = inputs;
  ctx.training = training;
  ws_.backend().embedding_forward(resid_[0]->get(NC), inputs, wte_->value.f32(), N, C_);
  for (size_t l = 0; l < blocks_.size(); ++l)
    blocks_[l]->forward(ctx, resid_[l + 1]->get(NC), resid_[l]->data(), B, T);
  float* lnf = lnf_.get(NC);
  final_norm_->forward(lnf, resid_.back()->data(), N);
  float* logits = logits_.get(int64_t(N) * V_);
  const float* w_out = lm_head_ ? lm_head_->value.f32() : wte_->value.f32();
  ws_.backend().linear_forward(logits, lnf, w_out, nullptr, N, C_, V_);
  if (!targets) return 0.0f;
  return ws_.backend().cross_entropy_forward(losses_.get(N), probs_.get(int64_t(N) * V_), logits, targets, N, V_);
}

void Model::backward() {
  MOE_CHECK(targets_ != nullptr, "Model::backward needs a forward with targets first");
  const int N = B_ * T_;
  const int64_t NC = int64_t(N) * C_;
  float* dlogits = dlogits_.get(int64_t(N) * V_);
  ws_.backend().cross_entropy_backward(dlogits, probs_.data(), targets_, N, V_, 1.0f);
  float* dlnf = dlnf_.get(NC);
  Param* head = lm_head_ ? lm_head_ : wte_;
  ws_.backend().linear_backward(dlnf, head->grad.f32(), nullptr, dlogits, lnf_.data(), head->value.f32(), N, C_, V_);
  float* da = dres_a_.get(NC);
  float* db = dres_b_.get(NC);
  final_norm_->backward(da, dlnf, N);
  FfnContext ctx;
  ctx.token_ids = inputs_;
  ctx.training = true;
  for (int l = static_cast<int>(blocks_.size()) - 1; l >= 0; --l) {
    blocks_[l]->backward(ctx, db, da, B_, T_);
    std::swap(da, db);
  }
  ws_.backend().embedding_backward(wte_->grad.f32(), da, inputs_, N, C_);
}

double Model::extra_loss() const {
  double s = 0;
  for (auto& b : blocks_) s += b->ffn().extra_loss();
  return s;
}

std::vector<FfnStats> Model::ffn_stats() const {
  std::vector<FfnStats> out;
  for (auto& b : blocks_) out.push_back(b->ffn().stats());
  return out;
}

Model::KvCache Model::make_cache(int max_T) const {
  MOE_CHECK(max_T > 0 && max_T <= cfg_.max_seq_len(),
            "KV cache length " << max_T << " must be in [1, model.max_seq_len = " << cfg_.max_seq_len() << "]");
  KvCache c;
  c.max_T = max_T;
  const int64_t per = int64_t(max_T) * cfg_.n_kv_heads() * (cfg_.d_model() / cfg_.n_heads());
  c.k.assign(cfg_.n_layers(), std::vector<float>(per));
  c.v.assign(cfg_.n_layers(), std::vector<float>(per));
  return c;
}

const float* Model::decode_step(KvCache& cache, int32_t token) {
  MOE_CHECK(cache.len < cache.max_T, "KV cache is full (" << cache.max_T << " positions)");
  MOE_CHECK(token >= 0 && token < V_, "token id " << token << " is outside the vocabulary [0, " << V_ << ")");
  float* x = dec_x_.get(C_);
  float* y = dec_y_.get(C_);
  ws_.backend().embedding_forward(x, &token, wte_->value.f32(), 1, C_);
  for (size_t l = 0; l < blocks_.size(); ++l) {
    blocks_[l]->decode(y, x, cache.k[l].data(), cache.v[l].data(), cache.len, token);
    std::swap(x, y);
  }
  float* lnf = dec_lnf_.get(C_);
  final_norm_->forward(lnf, x, 1);
  float* logits = dec_logits_.get(V_);
  const float* w_out = lm_head_ ? lm_head_->value.f32() : wte_->value.f32();
  ws_.backend().linear_forward(logits, lnf, w_out, nullptr, 1, C_, V_);
  ++cache.len;
  return logits;
}

}  // namespace moe
