// Plain-loop references for the CPU kernels: the most direct transcription of each formula, no BLAS, no OpenMP,
// double accumulators. Only the tests use them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "core/kernels/cpu/kernels.h"

namespace moe::cpu {

// c[M,N] = alpha * op(a) @ op(b) + beta * c
void matmul_ref(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b,
                float alpha, float beta) {
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      double s = 0.0;
      for (int kk = 0; kk < K; ++kk) {
        const float av = trans_a ? a[int64_t(kk) * M + i] : a[int64_t(i) * K + kk];
        const float bv = trans_b ? b[int64_t(j) * K + kk] : b[int64_t(kk) * N + j];
        s += double(av) * bv;
      }
      float& cij = c[int64_t(i) * N + j];
      cij = static_cast<float>(alpha * s + (beta == 0.0f ? 0.0 : double(beta) * cij));
    }
  }
}

// out[N,OC] = inp[N,IC] @ w[OC,IC]^T + bias[OC]
void linear_forward_ref(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC) {
  for (int n = 0; n < N; ++n) {
    for (int o = 0; o < OC; ++o) {
      double s = bias ? bias[o] : 0.0;
      for (int i = 0; i < IC; ++i) s += double(inp[int64_t(n) * IC + i]) * w[int64_t(o) * IC + i];
      out[int64_t(n) * OC + o] = static_cast<float>(s);
    }
  }
}

// dinp[N,IC] = dout @ w (written, if non-null); dw[OC,IC] += dout^T @ inp; dbias[OC] += sum dout (if non-null)
void linear_backward_ref(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w,
                         int N, int IC, int OC) {
  if (dinp) {
    for (int n = 0; n < N; ++n) {
      for (int i = 0; i < IC; ++i) {
        double s = 0.0;
        for (int o = 0; o < OC; ++o) s += double(dout[int64_t(n) * OC + o]) * w[int64_t(o) * IC + i];
        dinp[int64_t(n) * IC + i] = static_cast<float>(s);
      }
    }
  }
  for (int o = 0; o < OC; ++o) {
    for (int i = 0; i < IC; ++i) {
      double s = 0.0;
      for (int n = 0; n < N; ++n) s += double(dout[int64_t(n) * OC + o]) * inp[int64_t(n) * IC + i];
      dw[int64_t(o) * IC + i] += static_cast<float>(s);
    }
  }
  if (dbias) {
    for (int o = 0; o < OC; ++o) {
      double s = 0.0;
      for (int n = 0; n < N; ++n) s += dout[int64_t(n) * OC + o];
      dbias[o] += static_cast<float>(s);
    }
  }
}

// out[N,C] = inp / sqrt(mean(inp^2) + eps) * w; rstd[N]
void rmsnorm_forward_ref(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) {
  for (int n = 0; n < N; ++n) {
    const float* x = inp + int64_t(n) * C;
    double ss = 0.0;
    for (int c = 0; c < C; ++c) ss += double(x[c]) * x[c];
    const double r = 1.0 / std::sqrt(ss / C + eps);
    rstd[n] = static_cast<float>(r);
    for (int c = 0; c < C; ++c) out[int64_t(n) * C + c] = static_cast<float>(x[c] * r * w[c]);
  }
}

// dinp[N,C] written, dw[C] accumulated
void rmsnorm_backward_ref(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                          const float* rstd, int N, int C) {
  for (int n = 0; n < N; ++n) {
    const float* x = inp + int64_t(n) * C;
    const float* dy = dout + int64_t(n) * C;
    const double r = rstd[n];
    double s = 0.0;  // sum_c dy w x
    for (int c = 0; c < C; ++c) s += double(dy[c]) * w[c] * x[c];
    for (int c = 0; c < C; ++c) {
      dinp[int64_t(n) * C + c] = static_cast<float>(r * dy[c] * w[c] - r * r * r / C * s * x[c]);
      dw[c] += static_cast<float>(double(dy[c]) * x[c] * r);
    }
  }
}

// out[N,C] = (inp - mean) * rstd * w + b; mean[N], rstd[N]
void layernorm_forward_ref(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                           int N, int C, float eps) {
  for (int n = 0; n < N; ++n) {
    const float* x = inp + int64_t(n) * C;
    double m = 0.0;
    for (int c = 0; c < C; ++c) m += x[c];
    m /= C;
    double var = 0.0;
    for (int c = 0; c < C; ++c) var += (x[c] - m) * (x[c] - m);
    var /= C;
    const double r = 1.0 / std::sqrt(var + eps);
    mean[n] = static_cast<float>(m);
    rstd[n] = static_cast<float>(r);
    for (int c = 0; c < C; ++c) out[int64_t(n) * C + c] = static_cast<float>((x[c] - m) * r * w[c] + b[c]);
  }
}

// dinp[N,C] written; dw[C], db[C] accumulated
void layernorm_backward_ref(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                            const float* mean, const float* rstd, int N, int C) {
  for (int n = 0; n < N; ++n) {
    const float* x = inp + int64_t(n) * C;
    const float* dy = dout + int64_t(n) * C;
    const double m = mean[n], r = rstd[n];
    double mg = 0.0, mgx = 0.0;  // mean(dy w), mean(dy w xhat)
    for (int c = 0; c < C; ++c) {
      const double xhat = (x[c] - m) * r;
      mg += double(dy[c]) * w[c];
      mgx += double(dy[c]) * w[c] * xhat;
    }
    mg /= C;
    mgx /= C;
    for (int c = 0; c < C; ++c) {
      const double xhat = (x[c] - m) * r;
      dinp[int64_t(n) * C + c] = static_cast<float>(r * (double(dy[c]) * w[c] - mg - xhat * mgx));
      dw[c] += static_cast<float>(dy[c] * xhat);
      db[c] += dy[c];
    }
  }
}

// out[B,T,H,D], att[B,H,T,T] <- q[B,T,H,D], k/v[B,T,Hkv,D]; causal softmax(q k^T / sqrt(D)) v
void attention_forward_ref(float* out, float* att, const float* q, const float* k, const float* v, int B, int T,
                           int H, int Hkv, int D) {
  const int group = H / Hkv;
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> s(T);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const int g = h / group;
      for (int t = 0; t < T; ++t) {
        const float* qt = q + ((int64_t(b) * T + t) * H + h) * D;
        double mx = -INFINITY;
        for (int j = 0; j <= t; ++j) {
          const float* kj = k + ((int64_t(b) * T + j) * Hkv + g) * D;
          double dot = 0.0;
          for (int d = 0; d < D; ++d) dot += double(qt[d]) * kj[d];
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0.0;
        for (int j = 0; j <= t; ++j) sum += (s[j] = std::exp(s[j] - mx));
        float* p = att + ((int64_t(b) * H + h) * T + t) * T;
        for (int j = 0; j < T; ++j) p[j] = j <= t ? static_cast<float>(s[j] / sum) : 0.0f;
        float* o = out + ((int64_t(b) * T + t) * H + h) * D;
        for (int d = 0; d < D; ++d) {
          double acc = 0.0;
          for (int j = 0; j <= t; ++j) acc += s[j] / sum * v[((int64_t(b) * T + j) * Hkv + g) * D + d];
          o[d] = static_cast<float>(acc);
        }
      }
    }
  }
}

// dq[B,T,H,D], dk/dv[B,T,Hkv,D] written, from the saved softmax att[B,H,T,T]
void attention_backward_ref(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                            const float* v, const float* att, int B, int T, int H, int Hkv, int D) {
  const int group = H / Hkv;
  const double scale = 1.0 / std::sqrt(double(D));
  const int64_t nkv = int64_t(B) * T * Hkv * D;
  std::vector<double> dk_acc(nkv, 0.0), dv_acc(nkv, 0.0), dp(T);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const int g = h / group;
      for (int t = 0; t < T; ++t) {
        const float* p = att + ((int64_t(b) * H + h) * T + t) * T;
        const float* dot = dout + ((int64_t(b) * T + t) * H + h) * D;
        const float* qt = q + ((int64_t(b) * T + t) * H + h) * D;
        double pdp = 0.0;
        for (int j = 0; j <= t; ++j) {
          const float* vj = v + ((int64_t(b) * T + j) * Hkv + g) * D;
          double s = 0.0;
          for (int d = 0; d < D; ++d) s += double(dot[d]) * vj[d];
          dp[j] = s;
          pdp += p[j] * s;
        }
        for (int d = 0; d < D; ++d) {
          double acc = 0.0;
          for (int j = 0; j <= t; ++j) {
            const double ds = p[j] * (dp[j] - pdp) * scale;
            const int64_t kv = ((int64_t(b) * T + j) * Hkv + g) * D + d;
            acc += ds * k[kv];
            dk_acc[kv] += ds * qt[d];
            dv_acc[kv] += double(p[j]) * dot[d];
          }
          dq[((int64_t(b) * T + t) * H + h) * D + d] = static_cast<float>(acc);
        }
      }
    }
  }
  for (int64_t i = 0; i < nkv; ++i) {
    dk[i] = static_cast<float>(dk_acc[i]);
    dv[i] = static_cast<float>(dv_acc[i]);
  }
}

// losses[N], probs[N,V] <- logits[N,V], targets[N] (< 0 ignored); returns the mean over non-ignored rows
float cross_entropy_forward_ref(float* losses, float* probs, const float* logits, const int32_t* targets, int N,
                                int V) {
  double total = 0.0;
  int count = 0;
  for (int n = 0; n < N; ++n) {
    const float* z = logits + int64_t(n) * V;
    double mx = -INFINITY;
    for (int i = 0; i < V; ++i) mx = std::max(mx, double(z[i]));
    double sum = 0.0;
    for (int i = 0; i < V; ++i) sum += std::exp(z[i] - mx);
    for (int i = 0; i < V; ++i) probs[int64_t(n) * V + i] = static_cast<float>(std::exp(z[i] - mx) / sum);
    if (targets[n] >= 0) {
      const double loss = std::log(sum) - (z[targets[n]] - mx);
      losses[n] = static_cast<float>(loss);
      total += loss;
      ++count;
    } else {
      losses[n] = 0.0f;
    }
  }
  return count > 0 ? static_cast<float>(total / count) : 0.0f;
}

namespace {

// the indices of the n largest of x (ties: the lower index), in increasing order
std::vector<int> top_indices_ref(const std::vector<double>& x, int n) {
  std::vector<int> idx(x.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return x[a] > x[b]; });
  idx.resize(std::min<size_t>(size_t(n), idx.size()));
  std::sort(idx.begin(), idx.end());
  return idx;
}

void softmax_ref(std::vector<double>& z) {
  double mx = -INFINITY, sum = 0.0;
  for (double x : z) mx = std::max(mx, x);
  for (double& x : z) sum += (x = std::exp(x - mx));
  for (double& x : z) x /= sum;
}

// One (row, kv head) of SparQ: yg[G,D] from the group's queries qg[G,D] over keys kt[len][Hkv*D] and values
// vt[len][Hkv*D] (kv head g at offset g*D of each row).
void sparq_group_ref(float* yg, const float* qg, const float* kt, const float* vt, int len, int G, int D, int64_t row,
                     int r, int k_top) {
  auto K = [&](int t, int i) { return double(kt[t * row + i]); };
  auto V = [&](int t, int i) { return double(vt[t * row + i]); };
  std::vector<double> a(D, 0.0), c(len, 0.0), mean(D, 0.0);
  for (int h = 0; h < G; ++h)
    for (int i = 0; i < D; ++i) a[i] += std::fabs(double(qg[h * D + i]));
  const std::vector<int> I = top_indices_ref(a, r);
  std::vector<std::vector<double>> s(G, std::vector<double>(len));
  for (int h = 0; h < G; ++h) {
    const float* qh = qg + h * D;
    double in = 0.0, all = 0.0;
    for (int i = 0; i < D; ++i) all += std::fabs(double(qh[i]));
    for (int i : I) in += std::fabs(double(qh[i]));
    const double scale = in > 0 ? 1.0 / std::sqrt(D * in / all) : 1.0 / std::sqrt(double(D));
    for (int t = 0; t < len; ++t) {
      double dot = 0.0;
      for (int i : I) dot += double(qh[i]) * K(t, i);
      s[h][t] = dot * scale;
    }
    softmax_ref(s[h]);
    for (int t = 0; t < len; ++t) c[t] += s[h][t];
  }
  const std::vector<int> top = top_indices_ref(c, k_top);
  for (int t = 0; t < len; ++t)
    for (int i = 0; i < D; ++i) mean[i] += V(t, i) / len;
  for (int h = 0; h < G; ++h) {
    const float* qh = qg + h * D;
    double alpha = 0.0;
    std::vector<double> e;
    for (int t : top) {
      alpha += s[h][t];
      double dot = 0.0;
      for (int i = 0; i < D; ++i) dot += double(qh[i]) * K(t, i);
      e.push_back(dot / std::sqrt(double(D)));
    }
    softmax_ref(e);
    for (int i = 0; i < D; ++i) {
      double y = 0.0;
      for (size_t m = 0; m < top.size(); ++m) y += e[m] * V(top[m], i);
      yg[h * D + i] = static_cast<float>(alpha * y + (1.0 - alpha) * mean[i]);
    }
  }
}

}  // namespace

// out[B,T,H,D]: every row (b, t) SparQ over positions 0..t
void attention_sparq_ref(float* out, const float* q, const float* k, const float* v, int B, int T, int H, int Hkv,
                         int D, int r, int k_top) {
  const int G = H / Hkv;
  const int64_t row = int64_t(Hkv) * D;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t)
      for (int g = 0; g < Hkv; ++g) {
        const int64_t qo = ((int64_t(b) * T + t) * H + int64_t(g) * G) * D;
        const int64_t ko = int64_t(b) * T * row + int64_t(g) * D;
        sparq_group_ref(out + qo, q + qo, k + ko, v + ko, t + 1, G, D, row, r, k_top);
      }
}

void adamw_ref(float* w, const float* g, float* m, float* v, int64_t n, const AdamWHyper& h, float bc1, float bc2) {
  for (int64_t j = 0; j < n; ++j) {
    const double gj = double(g[j]) * h.gscale;
    const double mj = double(h.b1) * m[j] + (1.0 - h.b1) * gj, vj = double(h.b2) * v[j] + (1.0 - h.b2) * gj * gj;
    m[j] = static_cast<float>(mj);
    v[j] = static_cast<float>(vj);
    const double step = mj / bc1 / (std::sqrt(vj / bc2) + h.eps) + double(h.decay) * w[j];
    w[j] = static_cast<float>(w[j] - double(h.lr) * step);
  }
}

void adamw_rows_ref(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows,
                    int64_t n_rows, int64_t row_size, const AdamWHyper& h) {
  for (int64_t k = 0; k < n_rows; ++k) {
    const int64_t o = rows[k] * row_size;
    const int32_t t = ++row_t[rows[k]];
    const float bc1 = static_cast<float>(1.0 - std::pow(double(h.b1), t));
    const float bc2 = static_cast<float>(1.0 - std::pow(double(h.b2), t));
    adamw_ref(w + o, g + o, m + o, v + o, row_size, h, bc1, bc2);
  }
}

}  // namespace moe::cpu
