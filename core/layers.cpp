#include "core/layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/kernels/cpu/kernels.h"


namespace moe {

// ================================================================== Norm
Norm::Norm(ParamStore& ps, Workspace& ws, const std::string& name, int C, proto::NormKind kind, float eps)
    : be_(ws.backend()), C_(C), kind_(kind), eps_(eps), mean_(ws.buffer()), rstd_(ws.buffer()) {
  w_ = ps.add(name + ".weight", {C}, /*decay=*/false, Init::kOnes);
  if (kind == proto::LAYERNORM) b_ = ps.add(name + ".bias", {C}, /*decay=*/false, Init::kZeros);
}

void Norm::forward(float* out, const float* inp, int N) {
  inp_ = inp;
  if (kind_ == proto::RMSNORM) {
    be_.rmsnorm_forward(out, rstd_.get(N), inp, w_->value.f32(), N, C_, eps_);
  } else {
    be_.layernorm_forward(out, mean_.get(N), rstd_.get(N), inp, w_->value.f32(), b_->value.f32(), N, C_, eps_);
  }
}

void Norm::backward(float* dinp, const float* dout, int N) {
  if (kind_ == proto::RMSNORM) {
    be_.rmsnorm_backward(dinp, w_->grad.f32(), dout, inp_, w_->value.f32(), rstd_.data(), N, C_);
  } else {
    be_.layernorm_backward(dinp, w_->grad.f32(), b_->grad.f32(), dout, inp_, w_->value.f32(), mean_.data(),
                            rstd_.data(), N, C_);
  }
}

// ================================================================== Attention
Attention::Attention(ParamStore& ps, Workspace& ws, const std::string& prefix, const AttentionDims& d)
    : be_(ws.backend()), d_(d), q_(ws.buffer()), k_(ws.buffer()), v_(ws.buffer()), att_(ws.buffer()), y_(ws.buffer()),
      dq_(ws.buffer()),
      dk_(ws.buffer()), dv_(ws.buffer()), datt_(ws.buffer()), dy_(ws.buffer()), rope_cs_(ws.buffer()),
      pq_(ws), pk_(ws), pv_(ws), po_(ws) {
  wq = ps.add(prefix + ".wq", {d.H * d.D, d.C}, true);
  wk = ps.add(prefix + ".wk", {d.Hkv * d.D, d.C}, true);
  wv = ps.add(prefix + ".wv", {d.Hkv * d.D, d.C}, true);
  wo = ps.add(prefix + ".wo", {d.C, d.H * d.D}, true, Init::kNormalOut);
}

void Attention::forward(float* out, const float* inp, int B, int T) {
  const int N = B * T, C = d_.C, H = d_.H, Hkv = d_.Hkv, D = d_.D;
  inp_ = inp;
  float* q = q_.get(int64_t(N) * H * D);  // [B,T,H,D]
  float* k = k_.get(int64_t(N) * Hkv * D);  // [B,T,Hkv,D]
  float* v = v_.get(int64_t(N) * Hkv * D);  // [B,T,Hkv,D]
  be_.linear_forward(q, inp, wq->value.f32(), nullptr, N, C, H * D);
  be_.linear_forward(k, inp, wk->value.f32(), nullptr, N, C, Hkv * D);
  be_.linear_forward(v, inp, wv->value.f32(), nullptr, N, C, Hkv * D);
  be_.rope_forward(q, B, T, H, D, 0, d_.rope_theta);
  be_.rope_forward(k, B, T, Hkv, D, 0, d_.rope_theta);
  float* att = att_.get(int64_t(B) * H * T * T);  // [B,H,T,T]
  float* y = y_.get(int64_t(N) * H * D);          // [B,T,H,D]
  be_.attention_forward(y, att, q, k, v, B, T, H, Hkv, D);
  be_.linear_forward(out, y, wo->value.f32(), nullptr, N, H * D, C);
}

void Attention::backward(float* dinp, const float* dout, int B, int T) {
  const int N = B * T, C = d_.C, H = d_.H, Hkv = d_.Hkv, D = d_.D;
  float* dy = dy_.get(int64_t(N) * H * D);
  be_.linear_backward(dy, wo->grad.f32(), nullptr, dout, y_.data(), wo->value.f32(), N, H * D, C);
  float* dq = dq_.get(int64_t(N) * H * D);
  float* dk = dk_.get(int64_t(N) * Hkv * D);
  float* dv = dv_.get(int64_t(N) * Hkv * D);
  float* datt = datt_.get(int64_t(B) * H * T * T);
  be_.attention_backward(dq, dk, dv, datt, dy, q_.data(), k_.data(), v_.data(), att_.data(), B, T, H, Hkv, D);
  be_.rope_backward(dq, B, T, H, D, 0, d_.rope_theta);
  be_.rope_backward(dk, B, T, Hkv, D, 0, d_.rope_theta);
  // dinp = dq Wq + dk Wk + dv Wv; weight grads accumulate
  be_.linear_backward(dinp, wq->grad.f32(), nullptr, dq, inp_, wq->value.f32(), N, C, H * D);
  be_.linear_backward(nullptr, wk->grad.f32(), nullptr, dk, inp_, wk->value.f32(), N, C, Hkv * D);
  be_.linear_backward(nullptr, wv->grad.f32(), nullptr, dv, inp_, wv->value.f32(), N, C, Hkv * D);
  be_.matmul(dinp, dk, wk->value.f32(), N, C, Hkv * D, false, false, 1.0f, 1.0f);
  be_.matmul(dinp, dv, wv->value.f32(), N, C, Hkv * D, false, false, 1.0f, 1.0f);
}

void Attention::prepare_inference() {
  pq_.pack(*wq);
  pk_.pack(*wk);
  pv_.pack(*wv);
  po_.pack(*wo);
  // the rotation table of every position (the same values rope_forward computes)
  std::vector<float> cs(size_t(d_.max_T) * d_.D);
  cpu::rope_cos_sin(cs.data(), d_.max_T, d_.D, 0, d_.rope_theta);
  be_.from_host(rope_cs_.get(int64_t(d_.max_T) * d_.D), cs.data(), sizeof(float) * cs.size());
}

void Attention::forward_infer(float* out, const float* inp, const InferRows& r, const KvLayer& kv) {
  const int N = r.N, C = d_.C, H = d_.H, Hkv = d_.Hkv, D = d_.D;
  if (N == 0) return;
  float* q = q_.get(int64_t(N) * H * D);    // [N,H,D]
  float* k = k_.get(int64_t(N) * Hkv * D);  // [N,Hkv,D]
  float* v = v_.get(int64_t(N) * Hkv * D);  // [N,Hkv,D]
  be_.linear_rows(q, inp, pq_.slot(), nullptr, N, C, H * D);
  be_.linear_rows(k, inp, pk_.slot(), nullptr, N, C, Hkv * D);
  be_.linear_rows(v, inp, pv_.slot(), nullptr, N, C, Hkv * D);
  be_.rope_rows(q, r.pos, rope_cs_.data(), N, H, D);
  be_.rope_rows(k, r.pos, rope_cs_.data(), N, Hkv, D);
  be_.scatter_rows(kv.keys, k, r.slots, N, Hkv * D);
  be_.scatter_rows(kv.values, v, r.slots, N, Hkv * D);
  if (kv.value_sums)
    be_.value_sums_paged(kv.value_sums, kv.values, r.pos, r.table, r.table_start, r.block_size, N, Hkv, D);
  if (kv.key_columns) be_.scatter_columns(kv.key_columns, k, r.slots, r.block_size, N, Hkv, D);
  float* y = y_.get(int64_t(N) * H * D);  // [N,H,D]
  if (r.sparq)
    be_.attention_sparq(y, q, kv.keys, kv.values, kv.value_sums, kv.key_columns, r.pos, r.table, r.table_start,
                        r.sparq, r.block_size, N, H, Hkv, D);
  else
    be_.attention_paged(y, q, kv.keys, kv.values, r.pos, r.table, r.table_start, r.block_size, N, H, Hkv, D);
  be_.linear_rows(out, y, po_.slot(), nullptr, N, H * D, C);
}

// ================================================================== DenseFfn
DenseFfn::DenseFfn(ParamStore& ps, Workspace& ws, const std::string& prefix, int C, int F, proto::Activation act) {
  FfnWeights w;
  if (act == proto::SWIGLU) w.w_gate = ps.add(prefix + ".w_gate", {F, C}, true);
  w.w_up = ps.add(prefix + ".w_up", {F, C}, true);
  if (act == proto::GELU) w.b_up = ps.add(prefix + ".b_up", {F}, false, Init::kZeros);
  w.w_down = ps.add(prefix + ".w_down", {C, F}, true, Init::kNormalOut);
  if (act == proto::GELU) w.b_down = ps.add(prefix + ".b_down", {C}, false, Init::kZeros);
  ffn_ = std::make_unique<GroupedFfn>(ws, C, F, act, w);
}

void DenseFfn::forward(const FfnContext& ctx, float* y, const float* x, int N) {
  const int64_t slot = 0, offsets[2] = {0, N};
  ffn_->forward(y, x, &slot, offsets, 1, ctx.batch_invariant);
}

void DenseFfn::backward(const FfnContext&, float* dx, const float* dy, int N) { ffn_->backward(dx, dy); }

double max_overload(const std::vector<int64_t>& load) {
  int64_t total = 0, hi = 0;
  for (int64_t x : load) {
    total += x;
    hi = std::max(hi, x);
  }
  return total > 0 ? static_cast<double>(hi) * static_cast<double>(load.size()) / static_cast<double>(total) : 0.0;
}

}  // namespace moe
