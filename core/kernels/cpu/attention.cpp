// Rotary position embedding and causal self-attention with grouped-query heads (MHA / GQA / MQA), forward and
// backward side by side. Attention works per (batch, head) on blocks of kRowBlock query rows: the products
// (Q K^T, P V, dO V^T, dS K, dS^T Q, P^T dO) are single-threaded sgemm calls on strided views of the
// [B,T,heads,D] tensors, restricted to the causal columns 0..r1 of each row block (about 1/2 + 1/(2 T/kRowBlock)
// of the full square); the softmax and its backward are row loops. With the OpenMP build of OpenBLAS a BLAS
// call inside our parallel region runs on the calling thread, so the (b, h) or (b, kv head) work items split
// the threads without oversubscription.
#include <cblas.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/kernels/cpu/kernels.h"
#include "core/kernels/cpu/vec_math.h"

namespace moe::cpu {
namespace {

using detail::row_max;
using detail::vexp;

constexpr int64_t kParMin = 16384;  // below this much work a loop stays on one thread
constexpr int kRowBlock = 32;        // query rows per sgemm block in attention

// x[B,T,nh,D] in place: (x0, x1) <- (x0 c - x1 s, x0 s + x1 c); sign = -1 rotates by the negative angle (R^T)
void rope_apply(float* x, int B, int T, int nh, int D, int pos0, float theta, float sign) {
  MOE_CHECK(D % 2 == 0, "rope: head dim D=" << D << " must be even");
  if (int64_t(B) * T * nh * D == 0) return;
  std::vector<float> cs(size_t(T) * D);
  rope_cos_sin(cs.data(), T, D, pos0, theta);
  const int half = D / 2;
#pragma omp parallel for collapse(2) if (int64_t(B) * T * nh * D > kParMin) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      const float* tab = cs.data() + size_t(t) * D;  // [D/2, 2]
      for (int h = 0; h < nh; ++h) {
        float* xh = x + ((int64_t(b) * T + t) * nh + h) * D;  // [D]
#pragma omp simd
        for (int i = 0; i < half; ++i) {
          const float c = tab[2 * i], s = sign * tab[2 * i + 1];
          const float x0 = xh[2 * i], x1 = xh[2 * i + 1];
          xh[2 * i] = x0 * c - x1 * s;
          xh[2 * i + 1] = x0 * s + x1 * c;
        }
      }
    }
  }
}

// c[M,N] (ldc) = alpha op(a) op(b) + beta c, row-major with explicit leading dimensions
inline void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, a, lda,
              b, ldb, beta, c, ldc);
}

void check_heads(int H, int Hkv, int D) {
  MOE_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0, "attention: H=" << H << " must be a multiple of Hkv=" << Hkv);
  MOE_CHECK(D > 0, "attention: head dim D=" << D);
}

}  // namespace

// ---------------------------------------------------------------- rotary position embedding
void rope_forward(float* x, int B, int T, int nh, int D, int pos0, float theta) {
  rope_apply(x, B, T, nh, D, pos0, theta, 1.0f);
}
void rope_backward(float* dx, int B, int T, int nh, int D, int pos0, float theta) {
  rope_apply(dx, B, T, nh, D, pos0, theta, -1.0f);
}

// ---------------------------------------------------------------- causal attention, forward
// out[B,T,H,D], att[B,H,T,T] <- q[B,T,H,D], k[B,T,Hkv,D], v[B,T,Hkv,D]; parallel over (b, h).
// Per row block [r0, r1): S = scale Q[r0:r1] K[0:r1]^T into att, softmax of row t over columns 0..t (the rest
// zeroed), then out[r0:r1] = P[r0:r1, 0:r1] V[0:r1].
void attention_forward(float* out, float* att, const float* q, const float* k, const float* v, int B, int T, int H,
                       int Hkv, int D) {
  check_heads(H, Hkv, D);
  const int group = H / Hkv;
  const int ldq = H * D, ldk = Hkv * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t work = int64_t(B) * H * T * T * D / 2;
#pragma omp parallel for collapse(2) if (work > kParMin) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const int g = h / group;
      const float* qb = q + int64_t(b) * T * ldq + h * D;  // [T, D] rows strided by ldq
      const float* kb = k + int64_t(b) * T * ldk + g * D;  // [T, D] rows strided by ldk
      const float* vb = v + int64_t(b) * T * ldk + g * D;  // [T, D]
      float* ob = out + int64_t(b) * T * ldq + h * D;      // [T, D]
      float* A = att + (int64_t(b) * H + h) * T * T;       // [T, T]
      for (int r0 = 0; r0 < T; r0 += kRowBlock) {
        const int r1 = std::min(T, r0 + kRowBlock), m = r1 - r0;
        gemm(false, true, m, r1, D, scale, qb + int64_t(r0) * ldq, ldq, kb, ldk, 0.0f, A + int64_t(r0) * T, T);
        for (int t = r0; t < r1; ++t) {
          float* p = A + int64_t(t) * T;  // [T], columns 0..t
          const int n = t + 1;
          detail::softmax_row(p, p, n);
          std::memset(p + n, 0, sizeof(float) * (T - n));
        }
        gemm(false, false, m, D, r1, 1.0f, A + int64_t(r0) * T, T, vb, ldk, 0.0f, ob + int64_t(r0) * ldq, ldq);
      }
    }
  }
}

// ---------------------------------------------------------------- causal attention, backward
// Parallel over (b, kv head g): the query heads of a group are handled by one thread, so dk/dv accumulate
// without races. Per head h and row block [r0, r1), with P = att, dO = dout:
//   dP = dO[r0:r1] V[0:r1]^T;  dS[t, j] = scale P[t, j] (dP[t, j] - sum_i P[t, i] dP[t, i])   (j <= t, else 0)
//   dq[r0:r1] = dS K[0:r1];  dk[0:r1] += dS^T q[r0:r1];  dv[0:r1] += P[r0:r1, 0:r1]^T dO[r0:r1]
// (the dv product reads att's zeros above the diagonal, which attention_forward writes as specified).
void attention_backward(float* dq, float* dk, float* dv, float* datt_scratch, const float* dout, const float* q,
                        const float* k, const float* v, const float* att, int B, int T, int H, int Hkv, int D) {
  check_heads(H, Hkv, D);
  const int group = H / Hkv;
  const int ldq = H * D, ldk = Hkv * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t work = int64_t(B) * H * T * T * D;
#pragma omp parallel if (work > kParMin)
  {
    std::vector<float> own(datt_scratch ? 0 : size_t(T) * T);  // dS of one head when no scratch was given
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b) {
      for (int g = 0; g < Hkv; ++g) {
        const float* kb = k + int64_t(b) * T * ldk + g * D;  // [T, D] rows strided by ldk
        const float* vb = v + int64_t(b) * T * ldk + g * D;
        float* dkb = dk + int64_t(b) * T * ldk + g * D;
        float* dvb = dv + int64_t(b) * T * ldk + g * D;
        for (int t = 0; t < T; ++t) {
          std::memset(dkb + int64_t(t) * ldk, 0, sizeof(float) * D);
          std::memset(dvb + int64_t(t) * ldk, 0, sizeof(float) * D);
        }
        for (int h = g * group; h < (g + 1) * group; ++h) {
          const float* qb = q + int64_t(b) * T * ldq + h * D;     // [T, D] rows strided by ldq
          const float* dob = dout + int64_t(b) * T * ldq + h * D;
          float* dqb = dq + int64_t(b) * T * ldq + h * D;
          const float* P = att + (int64_t(b) * H + h) * T * T;    // [T, T]
          float* dS = datt_scratch ? datt_scratch + (int64_t(b) * H + h) * T * T : own.data();  // [T, T]
          for (int r0 = 0; r0 < T; r0 += kRowBlock) {
            const int r1 = std::min(T, r0 + kRowBlock), m = r1 - r0;
            float* dSb = dS + int64_t(r0) * T;
            gemm(false, true, m, r1, D, 1.0f, dob + int64_t(r0) * ldq, ldq, vb, ldk, 0.0f, dSb, T);  // dP
            for (int t = r0; t < r1; ++t) {
              const float* p = P + int64_t(t) * T;
              float* ds = dS + int64_t(t) * T;
              const int n = t + 1;
              float pdp = 0.0f;
#pragma omp simd reduction(+ : pdp)
              for (int j = 0; j < n; ++j) pdp += p[j] * ds[j];
#pragma omp simd
              for (int j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - pdp) * scale;
              for (int j = n; j < r1; ++j) ds[j] = 0.0f;  // above the diagonal inside the block
            }
            gemm(false, false, m, D, r1, 1.0f, dSb, T, kb, ldk, 0.0f, dqb + int64_t(r0) * ldq, ldq);
            gemm(true, false, r1, D, m, 1.0f, dSb, T, qb + int64_t(r0) * ldq, ldq, 1.0f, dkb, ldk);
            gemm(true, false, r1, D, m, 1.0f, P + int64_t(r0) * T, T, dob + int64_t(r0) * ldq, ldq, 1.0f, dvb, ldk);
          }
        }
      }
    }
  }
}

}  // namespace moe::cpu
