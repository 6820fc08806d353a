// Dense matrix products through OpenBLAS sgemm: matmul, and the linear layer (y = x W^T + b) forward/backward;
// matmul_few_rows (the small-dimension kernels of small_matmul.cpp where they are faster, else matmul).
#include <cblas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/kernels/cpu/kernels.h"

namespace moe::cpu {
namespace {
constexpr int64_t kParMin = 16384;  // below this many elements a loop stays on one thread
}

bool matmul_takes_small(int M, int N, int K, bool trans_a, bool trans_b, float alpha, float beta) {
  if (alpha != 1.0f || (beta != 0.0f && beta != 1.0f) || N < kSmallMatmulMinDim) return false;
  if (trans_a) return !trans_b && K <= kSmallMatmulTn && M >= kSmallMatmulMinDim;
  return K >= kSmallMatmulMinDim && M <= (trans_b ? kSmallMatmulNt : kSmallMatmulNn);
}

// matmul, or the small-dimension kernels where matmul_takes_small says
void matmul_few_rows(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b,
                     float alpha, float beta) {
  if (!matmul_takes_small(M, N, K, trans_a, trans_b, alpha, beta) || M == 0)
    return matmul(c, a, b, M, N, K, trans_a, trans_b, alpha, beta);
  if (trans_a)
    matmul_tn_small(c, a, b, M, N, K, beta);
  else if (trans_b)
    matmul_nt_small(c, a, b, M, N, K, beta);
  else
    matmul_nn_small(c, a, b, M, N, K, beta);
}

// c[M,N] = alpha * op(a)[M,K] @ op(b)[K,N] + beta * c[M,N]
void matmul(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b, float alpha,
            float beta) {
  MOE_CHECK(M >= 0 && N >= 0 && K >= 0, "matmul: negative size M=" << M << " N=" << N << " K=" << K);
  if (M == 0 || N == 0) return;
  const int lda = std::max(1, trans_a ? M : K);  // a stored [M,K] or [K,M]
  const int ldb = std::max(1, trans_b ? K : N);  // b stored [K,N] or [N,K]
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K,
              alpha, a, lda, b, ldb, beta, c, N);
}

// out[N,OC] = inp[N,IC] @ w[OC,IC]^T + bias[OC]
void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC) {
  if (N == 0 || OC == 0) return;
  float beta = 0.0f;
  if (bias) {  // broadcast the bias into out, then let sgemm accumulate onto it (one pass over out)
#pragma omp parallel for if (int64_t(N) * OC > kParMin) schedule(static)
    for (int n = 0; n < N; ++n) std::memcpy(out + int64_t(n) * OC, bias, sizeof(float) * OC);
    beta = 1.0f;
  }
  matmul(out, inp, w, N, OC, IC, /*trans_a=*/false, /*trans_b=*/true, 1.0f, beta);
}

// dinp[N,IC] = dout[N,OC] @ w[OC,IC]  (written, skipped if null)
// dw[OC,IC] += dout^T @ inp[N,IC]
// dbias[OC] += sum_n dout[n,:]        (skipped if null)
void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w,
                     int N, int IC, int OC) {
  if (dinp) matmul(dinp, dout, w, N, IC, OC, false, false, 1.0f, 0.0f);
  if (dw) matmul(dw, dout, inp, OC, IC, N, /*trans_a=*/true, false, 1.0f, 1.0f);
  if (dbias && N > 0 && OC > 0) {
    // column sums; each thread owns a block of columns and walks every row (no races, contiguous inner loop)
    constexpr int kBlock = 256;
    const int nblk = (OC + kBlock - 1) / kBlock;
#pragma omp parallel for if (int64_t(N) * OC > kParMin && nblk > 1) schedule(static)
    for (int blk = 0; blk < nblk; ++blk) {
      const int o0 = blk * kBlock, o1 = std::min(OC, o0 + kBlock), len = o1 - o0;
      float acc[kBlock] = {};
      for (int n = 0; n < N; ++n) {
        const float* row = dout + int64_t(n) * OC + o0;
#pragma omp simd
        for (int o = 0; o < len; ++o) acc[o] += row[o];
      }
      for (int o = 0; o < len; ++o) dbias[o0 + o] += acc[o];
    }
  }
}

}  // namespace moe::cpu
