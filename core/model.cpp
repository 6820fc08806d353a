#include "core/model.h"

#include <algorithm>
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
                          cfg.rope_theta(), cfg.max_seq_len()}),
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

void Block::prepare_inference() {
  attn_.prepare_inference();
  ffn_->prepare_inference();
}

void Block::forward_infer(const FfnContext& ctx, float* out, const float* x, const InferRows& rows, const KvLayer& kv) {
  const int N = rows.N;
  const int64_t NC = int64_t(N) * C_;
  float* ln = ln1_.get(NC);
  float* a = attn_out_.get(NC);
  float* x2 = x2_.get(NC);
  float* f = ffn_out_.get(NC);
  norm1_.forward(ln, x, N);
  attn_.forward_infer(a, ln, rows, kv);
  be_.add(x2, x, a, NC);
  norm2_.forward(ln, x2, N);
  ffn_->forward(ctx, f, ln, N);  // every rank, even with N == 0: the MoE layers exchange tokens
  be_.add(out, x2, f, NC);
}

// ================================================================== Model
Model::Model(const proto::ModelConfig& cfg, const FfnFactory& ffn_factory, bool sized_only, bool with_grads)
    : cfg_(cfg),
      V_(cfg.vocab_size()),
      C_(cfg.d_model()),
      ps_(sized_only, with_grads, cfg.device() == proto::DEVICE_CUDA ? Device::kCUDA : Device::kCPU),
      ws_(backend_for(ps_.device())),
      ids_(ws_.buffer()),
      lnf_(ws_.buffer()),
      logits_(ws_.buffer()),
      probs_(ws_.buffer()), losses_(ws_.buffer()), dlogits_(ws_.buffer()), dlnf_(ws_.buffer()), dres_a_(ws_.buffer()),
      dres_b_(ws_.buffer()), inf_ints_(ws_.buffer()), inf_a_(ws_.buffer()), inf_b_(ws_.buffer()),
      inf_last_(ws_.buffer()), inf_lnf_(ws_.buffer()), inf_logits_(ws_.buffer()), head_packed_(ws_) {
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

void Model::after_optimizer_step(const WorldSum& sum_over_world) {
  for (auto& b : blocks_) b->ffn().after_optimizer_step(sum_over_world);
}

float Model::forward(const int32_t* inputs, const int32_t* targets, int B, int T, bool training) {
  MOE_CHECK(T <= cfg_.max_seq_len(), "sequence length " << T << " exceeds model.max_seq_len " << cfg_.max_seq_len());
  B_ = B;
  T_ = T;
  const int N = B * T;
  const int64_t NC = int64_t(N) * C_;
  for (int i = 0; i < N; ++i)
    MOE_CHECK(inputs[i] >= 0 && inputs[i] < V_, "token id " << inputs[i] << " at position " << i
                                                            << " is outside the vocabulary [0, " << V_ << ")");
  Backend& be = ws_.backend();
  auto* ids = reinterpret_cast<int32_t*>(ids_.get(2 * int64_t(std::max(N, 1))));  // (int32 fits a float's slot)
  be.from_host(ids, inputs, sizeof(int32_t) * N);
  if (targets) be.from_host(ids + N, targets, sizeof(int32_t) * N);
  inputs_ = inputs;
  targets_ = targets ? ids + N : nullptr;
  context_.resize(int64_t(N) * kTokenContext);
  for (int n = 0; n < N; ++n)  // row n is position n % T of sequence n / T
    for (int j = 0; j < kTokenContext; ++j) context_[int64_t(n) * kTokenContext + j] = n % T > j ? inputs[n - 1 - j] : -1;
  FfnContext ctx;
  ctx.token_ids = inputs;
  ctx.token_context = context_.data();
  ctx.training = training;
  be.embedding_forward(resid_[0]->get(NC), ids, wte_->value.f32(), N, C_);
  for (size_t l = 0; l < blocks_.size(); ++l)
    blocks_[l]->forward(ctx, resid_[l + 1]->get(NC), resid_[l]->data(), B, T);
  float* lnf = lnf_.get(NC);
  final_norm_->forward(lnf, resid_.back()->data(), N);
  float* logits = logits_.get(int64_t(N) * V_);
  const float* w_out = lm_head_ ? lm_head_->value.f32() : wte_->value.f32();
  be.linear_forward(logits, lnf, w_out, nullptr, N, C_, V_);
  if (!targets) return 0.0f;
  return be.cross_entropy_forward(losses_.get(N), probs_.get(int64_t(N) * V_), logits, targets_, N, V_);
}

void Model::backward(float loss_scale) {
  MOE_CHECK(targets_ != nullptr, "Model::backward needs a forward with targets first");
  const int N = B_ * T_;
  const int64_t NC = int64_t(N) * C_;
  float* dlogits = dlogits_.get(int64_t(N) * V_);
  ws_.backend().cross_entropy_backward(dlogits, probs_.data(), targets_, N, V_, loss_scale);
  float* dlnf = dlnf_.get(NC);
  Param* head = lm_head_ ? lm_head_ : wte_;
  ws_.backend().linear_backward(dlnf, head->grad.f32(), nullptr, dlogits, lnf_.data(), head->value.f32(), N, C_, V_);
  float* da = dres_a_.get(NC);
  float* db = dres_b_.get(NC);
  final_norm_->backward(da, dlnf, N);
  FfnContext ctx;
  ctx.token_ids = inputs_;
  ctx.token_context = context_.data();
  ctx.training = true;
  ctx.loss_scale = loss_scale;
  for (int l = static_cast<int>(blocks_.size()) - 1; l >= 0; --l) {
    blocks_[l]->backward(ctx, db, da, B_, T_);
    std::swap(da, db);
  }
  ws_.backend().embedding_backward(wte_->grad.f32(), da, reinterpret_cast<const int32_t*>(ids_.data()), N, C_);
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

void InferBatch::clear() {
  tokens.clear();
  positions.clear();
  slots.clear();
  table.clear();
  table_start.clear();
  logit_rows.clear();
  context.clear();
  sparq.clear();
}

SeqChunk SeqChunk::of(const int32_t* seq, int pos0, int n, bool want_logits, const SparqKnobs& sparq) {
  const int nb = std::min(pos0, kTokenContext);
  return {seq + pos0, n, pos0, seq + pos0 - nb, nb, want_logits, sparq};
}

void InferBatch::add(const SeqChunk& c, const std::vector<int32_t>& blocks, int block_size) {
  const int n = c.n, pos0 = c.pos0, n_before = c.n_before;
  const int32_t *toks = c.tokens, *before = c.before;
  MOE_CHECK(n > 0 && pos0 >= 0, "inference batch: a sequence chunk needs tokens (" << n << " at position " << pos0
                                                                                     << ")");
  MOE_CHECK(n_before == std::min(pos0, kTokenContext) && (n_before == 0 || before),
            "inference batch: a chunk at position " << pos0 << " needs the " << std::min(pos0, kTokenContext)
                                                    << " tokens before it, got " << n_before);
  MOE_CHECK(int64_t(blocks.size()) * block_size >= int64_t(pos0) + n,
            "inference batch: " << blocks.size() << " blocks of " << block_size
                                << " positions cannot hold positions up to " << pos0 + n - 1);
  const int start = static_cast<int>(table.size());
  table.insert(table.end(), blocks.begin(), blocks.end());
  for (int i = 0; i < n; ++i) {
    const int p = pos0 + i;
    tokens.push_back(toks[i]);
    positions.push_back(p);
    slots.push_back(blocks[p / block_size] * block_size + p % block_size);
    table_start.push_back(start);
    for (int j = 0; j < kTokenContext; ++j) {  // the j+1-th token before row i: in the chunk, or before it
      const int back = i - 1 - j;
      context.push_back(back >= 0 ? toks[back] : -back <= n_before ? before[n_before + back] : -1);
    }
    const bool on = c.sparq.r > 0 && c.sparq.k > 0 && p >= c.sparq.from;
    sparq.push_back(on ? c.sparq.r : 0);
    sparq.push_back(on ? c.sparq.k : 0);
  }
  if (c.want_logits) logit_rows.push_back(rows() - 1);
}

void Model::prepare_inference() {
  for (auto& b : blocks_) b->prepare_inference();
  head_packed_.pack(lm_head_ ? *lm_head_ : *wte_);
  inference_ready_ = true;
}

KvCacheDims Model::kv_dims(int num_blocks, int block_size) const {
  KvCacheDims d{cfg_.n_layers(), num_blocks, block_size, cfg_.n_kv_heads(), cfg_.d_model() / cfg_.n_heads()};
  d.value_sums = ws_.backend().has_sparq();
  return d;
}

// Whether a row of the batch asks for SparQ attention; checks the knobs against the model and the cache.
bool Model::check_sparq(const InferBatch& b, const KvCacheDims& kd) const {
  bool any = false;
  for (int i = 0; i < b.rows(); ++i) {
    const int r = b.sparq[2 * i], k = b.sparq[2 * i + 1];
    MOE_CHECK(r >= 0 && r <= kd.head_dim && k >= 0 && (r == 0) == (k == 0),
              "SparQ at row " << i << ": r = " << r << " components (1.." << kd.head_dim << ") and k = " << k
                              << " keys (> 0) are set together (both 0: full attention)");
    any = any || r > 0;
  }
  MOE_CHECK(!any || kd.value_sums, "SparQ attention needs a KV cache with the value sums (backend "
                                       << ws_.backend().name() << (ws_.backend().has_sparq() ? ")" : " has no SparQ)"));
  return any;
}

const float* Model::forward_infer(const InferBatch& b, KvCache& cache) {
  MOE_CHECK(inference_ready_, "Model::forward_infer before prepare_inference()");
  const KvCacheDims& kd = cache.dims();
  MOE_CHECK(kd.n_layers == cfg_.n_layers() && kd.n_kv_heads == cfg_.n_kv_heads() &&
                kd.head_dim == cfg_.d_model() / cfg_.n_heads(),
            "KV cache shape (" << kd.n_layers << " layers, " << kd.n_kv_heads << " x " << kd.head_dim
                               << ") does not match the model");
  const int N = b.rows(), L = static_cast<int>(b.logit_rows.size());
  const int64_t n_slots = int64_t(kd.num_blocks) * kd.block_size;
  MOE_CHECK(int(b.positions.size()) == N && int(b.slots.size()) == N && int(b.table_start.size()) == N &&
                int64_t(b.context.size()) == int64_t(N) * kTokenContext && int(b.sparq.size()) == 2 * N,
            "inference batch: per-row arrays of different lengths");
  const bool sparq = check_sparq(b, kd);
  for (int i = 0; i < N; ++i) {
    MOE_CHECK(b.tokens[i] >= 0 && b.tokens[i] < V_,
              "token id " << b.tokens[i] << " at row " << i << " is outside the vocabulary [0, " << V_ << ")");
    MOE_CHECK(b.positions[i] >= 0 && b.positions[i] < cfg_.max_seq_len(),
              "position " << b.positions[i] << " at row " << i << " is outside [0, model.max_seq_len = "
                          << cfg_.max_seq_len() << ")");
    MOE_CHECK(b.slots[i] >= 0 && b.slots[i] < n_slots,
              "cache slot " << b.slots[i] << " at row " << i << " is outside the cache (" << n_slots << " slots)");
  }
  for (int32_t blk : b.table)
    MOE_CHECK(blk >= 0 && blk < kd.num_blocks, "block " << blk << " is outside the cache (" << kd.num_blocks << ")");
  for (int32_t r : b.logit_rows) MOE_CHECK(r >= 0 && r < N, "logit row " << r << " is outside the batch");
  Backend& be = ws_.backend();
  // the int arrays on the device, in one copy (the SparQ knobs when a row has them)
  static const std::vector<int32_t> kNone;
  const auto [tokens, positions, slots, table_start, logit_rows, table, rk] = inf_ints_.upload_all(
      b.tokens, b.positions, b.slots, b.table_start, b.logit_rows, b.table, sparq ? b.sparq : kNone);
  InferRows rows{N, positions, slots, table, table_start, kd.block_size, sparq ? rk : nullptr};
  FfnContext ctx;
  ctx.token_ids = b.tokens.data();  // host: the routers read them
  ctx.token_context = b.context.data();
  ctx.training = false;
  ctx.batch_invariant = true;
  const int64_t NC = int64_t(N) * C_;
  float* x = inf_a_.get(std::max<int64_t>(NC, 1));
  float* y = inf_b_.get(std::max<int64_t>(NC, 1));
  be.embedding_forward(x, tokens, wte_->value.f32(), N, C_);
  for (size_t l = 0; l < blocks_.size(); ++l) {
    blocks_[l]->forward_infer(ctx, y, x, rows, cache.layer(int(l)));
    std::swap(x, y);
  }
  float* last = inf_last_.get(std::max<int64_t>(int64_t(L) * C_, 1));  // [L,C] the rows that want logits
  be.embedding_forward(last, logit_rows, x, L, C_);  // (a row gather)
  float* lnf = inf_lnf_.get(std::max<int64_t>(int64_t(L) * C_, 1));
  final_norm_->forward(lnf, last, L);
  float* logits = inf_logits_.get(std::max<int64_t>(int64_t(L) * V_, 1));
  be.linear_rows(logits, lnf, head_packed_.slot(), nullptr, L, C_, V_);
  return logits;
}

}  // namespace moe
