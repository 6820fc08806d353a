#include "core/layers.h"

#include <cmath>
#include <cstring>

#include "core/kernels/cpu/kernels.h"

namespace moe {

// ================================================================== Norm
Norm::Norm(ParamStore& ps, const std::string& name, int C, proto::NormKind kind, float eps)
    : C_(C), kind_(kind), eps_(eps) {
  w_ = ps.add(name + ".weight", {C}, /*decay=*/false);
  w_->value.fill_(1.0f);
  if (kind == proto::LAYERNORM) b_ = ps.add(name + ".bias", {C}, /*decay=*/false);
}

void Norm::forward(float* out, const float* inp, int N) {
  inp_ = inp;
  if (kind_ == proto::RMSNORM) {
    cpu::rmsnorm_forward(out, rstd_.get(N), inp, w_->value.f32(), N, C_, eps_);
  } else {
    cpu::layernorm_forward(out, mean_.get(N), rstd_.get(N), inp, w_->value.f32(), b_->value.f32(), N, C_, eps_);
  }
}

void Norm::backward(float* dinp, const float* dout, int N) {
  if (kind_ == proto::RMSNORM) {
    cpu::rmsnorm_backward(dinp, w_->grad.f32(), dout, inp_, w_->value.f32(), rstd_.data(), N, C_);
  } else {
    cpu::layernorm_backward(dinp, w_->grad.f32(), b_->grad.f32(), dout, inp_, w_->value.f32(), mean_.data(),
                            rstd_.data(), N, C_);
  }
}

// ================================================================== Attention
Attention::Attention(ParamStore& ps, const std::string& prefix, const AttentionDims& d) : d_(d) {
  wq = ps.add(prefix + ".wq", {d.H * d.D, d.C}, true);
  wk = ps.add(prefix + ".wk", {d.Hkv * d.D, d.C}, true);
  wv = ps.add(prefix + ".wv", {d.Hkv * d.D, d.C}, true);
  wo = ps.add(prefix + ".wo", {d.C, d.H * d.D}, true);
}

void Attention::forward(float* out, const float* inp, int B, int T) {
  const int N = B * T, C = d_.C, H = d_.H, Hkv = d_.Hkv, D = d_.D;
  inp_ = inp;
  float* q = q_.get(int64_t(N) * H * D);  // [B,T,H,D]
  float* k = k_.get(int64_t(N) * Hkv * D);  // [B,T,Hkv,D]
  float* v = v_.get(int64_t(N) * Hkv * D);  // [B,T,Hkv,D]
  cpu::linear_forward(q, inp, wq->value.f32(), nullptr, N, C, H * D);
  cpu::linear_forward(k, inp, wk->value.f32(), nullptr, N, C, Hkv * D);
  cpu::linear_forward(v, inp, wv->value.f32(), nullptr, N, C, Hkv * D);
  cpu::rope_forward(q, B, T, H, D, 0, d_.rope_theta);
  cpu::rope_forward(k, B, T, Hkv, D, 0, d_.rope_theta);
  float* att = att_.get(int64_t(B) * H * T * T);  // [B,H,T,T]
  float* y = y_.get(int64_t(N) * H * D);          // [B,T,H,D]
  cpu::attention_forward(y, att, q, k, v, B, T, H, Hkv, D);
  cpu::linear_forward(out, y, wo->value.f32(), nullptr, N, H * D, C);
}

void Attention::backward(float* dinp, const float* dout, int B, int T) {
  const int N = B * T, C = d_.C, H = d_.H, Hkv = d_.Hkv, D = d_.D;
  float* dy = dy_.get(int64_t(N) * H * D);
  cpu::linear_backward(dy, wo->grad.f32(), nullptr, dout, y_.data(), wo->value.f32(), N, H * D, C);
  float* dq = dq_.get(int64_t(N) * H * D);
  float* dk = dk_.get(int64_t(N) * Hkv * D);
  float* dv = dv_.get(int64_t(N) * Hkv * D);
  float* datt = datt_.get(int64_t(B) * H * T * T);
  cpu::attention_backward(dq, dk, dv, datt, dy, q_.data(), k_.data(), v_.data(), att_.data(), B, T, H, Hkv, D);
  cpu::rope_backward(dq, B, T, H, D, 0, d_.rope_theta);
  cpu::rope_backward(dk, B, T, Hkv, D, 0, d_.rope_theta);
  // dinp = dq Wq + dk Wk + dv Wv; weight grads accumulate
  cpu::linear_backward(dinp, wq->grad.f32(), nullptr, dq, inp_, wq->value.f32(), N, C, H * D);
  cpu::linear_backward(nullptr, wk->grad.f32(), nullptr, dk, inp_, wk->value.f32(), N, C, Hkv * D);
  cpu::linear_backward(nullptr, wv->grad.f32(), nullptr, dv, inp_, wv->value.f32(), N, C, Hkv * D);
  cpu::matmul(dinp, dk, wk->value.f32(), N, C, Hkv * D, false, false, 1.0f, 1.0f);
  cpu::matmul(dinp, dv, wv->value.f32(), N, C, Hkv * D, false, false, 1.0f, 1.0f);
}

void Attention::decode(float* out, const float* inp, float* k_cache, float* v_cache, int pos) {
  const int C = d_.C, H = d_.H, Hkv = d_.Hkv, D = d_.D;
  float* q = q_.get(int64_t(H) * D);
  float* k = k_cache + int64_t(pos) * Hkv * D;  // written in place into the cache
  float* v = v_cache + int64_t(pos) * Hkv * D;
  cpu::linear_forward(q, inp, wq->value.f32(), nullptr, 1, C, H * D);
  cpu::linear_forward(k, inp, wk->value.f32(), nullptr, 1, C, Hkv * D);
  cpu::linear_forward(v, inp, wv->value.f32(), nullptr, 1, C, Hkv * D);
  cpu::rope_forward(q, 1, 1, H, D, pos, d_.rope_theta);
  cpu::rope_forward(k, 1, 1, Hkv, D, pos, d_.rope_theta);
  float* y = y_.get(int64_t(H) * D);
  float* s = tmp_.get(pos + 1);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int group = H / Hkv;
  for (int h = 0; h < H; ++h) {
    const int g = h / group;
    const float* qh = q + h * D;
    float mx = -INFINITY;
    for (int t = 0; t <= pos; ++t) {
      const float* kt = k_cache + (int64_t(t) * Hkv + g) * D;
      float dot = 0;
      for (int i = 0; i < D; ++i) dot += qh[i] * kt[i];
      s[t] = dot * scale;
      mx = std::max(mx, s[t]);
    }
    float sum = 0;
    for (int t = 0; t <= pos; ++t) sum += (s[t] = std::exp(s[t] - mx));
    float* yh = y + h * D;
    std::memset(yh, 0, sizeof(float) * D);
    for (int t = 0; t <= pos; ++t) {
      const float p = s[t] / sum;
      const float* vt = v_cache + (int64_t(t) * Hkv + g) * D;
      for (int i = 0; i < D; ++i) yh[i] += p * vt[i];
    }
  }
  cpu::linear_forward(out, y, wo->value.f32(), nullptr, 1, H * D, C);
}

// ================================================================== DenseFfn
DenseFfn::DenseFfn(ParamStore& ps, const std::string& prefix, int C, int F, proto::Activation act)
    : C_(C), F_(F), act_(act) {
  if (act == proto::SWIGLU) w_gate_ = ps.add(prefix + ".w_gate", {F, C}, true);
  w_up_ = ps.add(prefix + ".w_up", {F, C}, true);
  if (act == proto::GELU) b_up_ = ps.add(prefix + ".b_up", {F}, false);
  w_down_ = ps.add(prefix + ".w_down", {C, F}, true);
  if (act == proto::GELU) b_down_ = ps.add(prefix + ".b_down", {C}, false);
}

void DenseFfn::forward(const FfnContext&, float* y, const float* x, int N) {
  x_ = x;
  const int64_t NF = int64_t(N) * F_;
  float* up = up_.get(NF);
  float* act = act_out_.get(NF);
  if (act_ == proto::SWIGLU) {
    float* gate = gate_.get(NF);
    cpu::linear_forward(gate, x, w_gate_->value.f32(), nullptr, N, C_, F_);
    cpu::linear_forward(up, x, w_up_->value.f32(), nullptr, N, C_, F_);
    cpu::swiglu_forward(act, gate, up, NF);
    cpu::linear_forward(y, act, w_down_->value.f32(), nullptr, N, F_, C_);
  } else {
    cpu::linear_forward(up, x, w_up_->value.f32(), b_up_->value.f32(), N, C_, F_);
    cpu::gelu_forward(act, up, NF);
    cpu::linear_forward(y, act, w_down_->value.f32(), b_down_->value.f32(), N, F_, C_);
  }
}

void DenseFfn::backward(const FfnContext&, float* dx, const float* dy, int N) {
  const int64_t NF = int64_t(N) * F_;
  float* dact = dact_.get(NF);
  float* dup = dup_.get(NF);
  if (act_ == proto::SWIGLU) {
    cpu::linear_backward(dact, w_down_->grad.f32(), nullptr, dy, act_out_.data(), w_down_->value.f32(), N, F_, C_);
    float* dgate = dgate_.get(NF);
    cpu::swiglu_backward(dgate, dup, dact, gate_.data(), up_.data(), NF);
    cpu::linear_backward(dx, w_gate_->grad.f32(), nullptr, dgate, x_, w_gate_->value.f32(), N, C_, F_);
    cpu::linear_backward(nullptr, w_up_->grad.f32(), nullptr, dup, x_, w_up_->value.f32(), N, C_, F_);
    cpu::matmul(dx, dup, w_up_->value.f32(), N, C_, F_, false, false, 1.0f, 1.0f);
  } else {
    cpu::linear_backward(dact, w_down_->grad.f32(), b_down_->grad.f32(), dy, act_out_.data(), w_down_->value.f32(),
                         N, F_, C_);
    cpu::gelu_backward(dup, dact, up_.data(), NF);
    cpu::linear_backward(dx, w_up_->grad.f32(), b_up_->grad.f32(), dup, x_, w_up_->value.f32(), N, C_, F_);
  }
}

}  // namespace moe
