// Per-stream context (cuBLAS handle + scratch), matmul and the linear layer on the GPU.
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/kernels.cuh"

namespace moe::cuda {

namespace {

std::mutex g_ctx_mu;
// Leaked on purpose: destroying cuBLAS handles from a static destructor races the CUDA runtime's own teardown.
auto* g_ctx_table = new std::map<std::pair<int, cudaStream_t>, StreamContext*>();

}  // namespace

// ---------------------------------------------------------------- StreamContext

StreamContext& StreamContext::get(cudaStream_t stream) {
  int device = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(g_ctx_mu);
  auto key = std::make_pair(device, stream);
  auto it = g_ctx_table->find(key);
  if (it != g_ctx_table->end()) return *it->second;

  std::unique_ptr<StreamContext> ctx(new StreamContext());
  try {
    MOE_CUBLAS_CHECK(cublasCreate(&ctx->blas_));
    MOE_CUBLAS_CHECK(cublasSetStream(ctx->blas_, stream));
    MOE_CUBLAS_CHECK(cublasSetMathMode(ctx->blas_, CUBLAS_DEFAULT_MATH));  // fp32 stays fp32 (no TF32)
    MOE_CUDA_CHECK(cudaMalloc(&ctx->scratch_, kScratchBytes));
    MOE_CUBLAS_CHECK(cublasLtCreate(&ctx->lt_));
    MOE_CUDA_CHECK(cudaMalloc(&ctx->lt_workspace_, kLtWorkspaceBytes));
  } catch (...) {
    ctx->destroy();
    throw;
  }
  StreamContext* raw = ctx.release();
  g_ctx_table->emplace(key, raw);
  return *raw;
}

void StreamContext::destroy() noexcept {
  if (blas_) cublasDestroy(blas_);
  if (scratch_) cudaFree(scratch_);
  if (lt_) cublasLtDestroy(lt_);
  if (lt_workspace_) cudaFree(lt_workspace_);
  blas_ = nullptr;
  scratch_ = nullptr;
  lt_ = nullptr;
  lt_workspace_ = nullptr;
}

void StreamContext::release_all() {
  std::lock_guard<std::mutex> lock(g_ctx_mu);
  int current = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&current));
  for (auto& [key, ctx] : *g_ctx_table) {
    MOE_CUDA_CHECK(cudaSetDevice(key.first));
    ctx->destroy();
    delete ctx;
  }
  g_ctx_table->clear();
  MOE_CUDA_CHECK(cudaSetDevice(current));
}

// ---------------------------------------------------------------- matmul

void matmul(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b, float alpha,
            float beta, cudaStream_t stream) {
  MOE_CHECK(M >= 0 && N >= 0 && K >= 0, "cuda::matmul: negative size M=" << M << " N=" << N << " K=" << K);
  if (M == 0 || N == 0) return;
  cublasHandle_t h = StreamContext::get(stream).blas();
  // Row-major C[M,N] is column-major C^T[N,M] = op(B)^T op(A)^T: swap the operands, keep the op flags.
  // Row-major b (not transposed) [K,N] is column-major [N,K] with ld N; transposed, stored [N,K] -> [K,N], ld K.
  // Row-major a (not transposed) [M,K] is column-major [K,M] with ld K; transposed, stored [K,M] -> [M,K], ld M.
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int ldb = std::max(trans_b ? K : N, 1);
  const int lda = std::max(trans_a ? M : K, 1);
  if (!StreamContext::get(stream).bf16()) {
    MOE_CUBLAS_CHECK(cublasSgemm(h, op_b, op_a, N, M, K, &alpha, b, ldb, a, lda, &beta, c, N));
    return;
  }
  MOE_CUBLAS_CHECK(cublasGemmEx(h, op_b, op_a, N, M, K, &alpha, b, CUDA_R_32F, ldb, a, CUDA_R_32F, lda, &beta, c,
                                CUDA_R_32F, N, CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_GEMM_DEFAULT));
}

// ---------------------------------------------------------------- grouped matmul

namespace {
// bf16 GEMMs through cublasGemmGroupedBatchedEx: -1 not tried yet, 1 it ran them, 0 it refused them (the CUDA
// version has no grouped kernel for bf16 compute on fp32 data): then one bf16 matmul per group, process-wide
std::atomic<int> g_bf16_grouped{-1};
void bf16_per_group(const void* const* host_ptrs, const int* dims, int G, bool trans_a, bool trans_b, float alpha,
                    float beta, cudaStream_t stream);
}  // namespace

void matmul_grouped(void* const* dev_ptrs, const void* const* host_ptrs, const int* dims, int G, bool trans_a,
                    bool trans_b, float alpha, float beta, cudaStream_t stream) {
  MOE_CHECK(G >= 0, "cuda::matmul_grouped: negative group count " << G);
  if (G == 0) return;
  if (StreamContext::get(stream).bf16() && g_bf16_grouped.load() == 0) {
    bf16_per_group(host_ptrs, dims, G, trans_a, trans_b, alpha, beta, stream);
    return;
  }
  const int *m = dims, *n = dims + G, *k = dims + 2 * G;
  StreamContext& ctx = StreamContext::get(stream);
  // per group as matmul: row-major C[m,n] is column-major C^T = op(B)^T op(A)^T, so b is cuBLAS's first operand
  // and cuBLAS's (m, n) are our (n, m); one cuBLAS "group" of one problem per expert group
  std::vector<cublasOperation_t> op_b(G, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
  std::vector<cublasOperation_t> op_a(G, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
  std::vector<int> ldb(G), lda(G), ldc(G), ones(G, 1);
  std::vector<float> alphas(G, alpha), betas(G, beta);
  for (int g = 0; g < G; ++g) {
    MOE_CHECK(m[g] >= 1 && n[g] >= 1 && k[g] >= 0,
              "cuda::matmul_grouped: group " << g << " has m=" << m[g] << " n=" << n[g] << " k=" << k[g]);
    ldb[g] = std::max(trans_b ? k[g] : n[g], 1);
    lda[g] = std::max(trans_a ? m[g] : k[g], 1);
    ldc[g] = n[g];
  }
  const cublasStatus_t st = cublasGemmGroupedBatchedEx(
      ctx.blas(), op_b.data(), op_a.data(), n, m, k, alphas.data(), const_cast<const void**>(dev_ptrs + 2 * G),
      CUDA_R_32F, ldb.data(), const_cast<const void**>(dev_ptrs + G), CUDA_R_32F, lda.data(), betas.data(), dev_ptrs,
      CUDA_R_32F, ldc.data(), G, ones.data(), ctx.bf16() ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F);
  if (!ctx.bf16()) {
    MOE_CUBLAS_CHECK(st);
    return;
  }
  g_bf16_grouped.store(st == CUBLAS_STATUS_SUCCESS ? 1 : 0);
  if (st == CUBLAS_STATUS_SUCCESS) return;
  bf16_per_group(host_ptrs, dims, G, trans_a, trans_b, alpha, beta, stream);
}

bool bf16_grouped_is_one_launch() { return g_bf16_grouped.load() == 1; }

namespace {
void bf16_per_group(const void* const* host_ptrs, const int* dims, int G, bool trans_a, bool trans_b, float alpha,
                    float beta, cudaStream_t stream) {
  const int *m = dims, *n = dims + G, *k = dims + 2 * G;
  for (int g = 0; g < G; ++g)  // no grouped kernel for bf16 compute on fp32 data: one (bf16) matmul per group
    matmul(static_cast<float*>(const_cast<void*>(host_ptrs[g])), static_cast<const float*>(host_ptrs[G + g]),
           static_cast<const float*>(host_ptrs[2 * G + g]), m[g], n[g], k[g], trans_a, trans_b, alpha, beta, stream);
}
}  // namespace

// ---------------------------------------------------------------- matmul_bf16 (cuBLASLt)

namespace {

// Owns the descriptors of one cuBLASLt call.
struct LtCall {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t first = nullptr, second = nullptr, out = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtCall() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (out) cublasLtMatrixLayoutDestroy(out);
    if (second) cublasLtMatrixLayoutDestroy(second);
    if (first) cublasLtMatrixLayoutDestroy(first);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

void matmul_bf16(float* c, const __nv_bfloat16* a, const __nv_bfloat16* b, int M, int N, int K, bool trans_a,
                 bool trans_b, float alpha, float beta, cudaStream_t stream) {
  MOE_CHECK(M >= 0 && N >= 0 && K >= 0, "cuda::matmul_bf16: negative size M=" << M << " N=" << N << " K=" << K);
  if (M == 0 || N == 0) return;
  StreamContext& ctx = StreamContext::get(stream);
  // As matmul: row-major C[M,N] is column-major C^T[N,M] = op(B)^T op(A)^T, so b is the first operand. A layout
  // describes the stored (column-major) matrix before its op.
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  LtCall call;
  MOE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&call.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  MOE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(call.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_b, sizeof op_b));
  MOE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(call.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_a, sizeof op_a));
  MOE_CUBLAS_CHECK(trans_b ? cublasLtMatrixLayoutCreate(&call.first, CUDA_R_16BF, K, N, K)
                           : cublasLtMatrixLayoutCreate(&call.first, CUDA_R_16BF, N, K, N));
  MOE_CUBLAS_CHECK(trans_a ? cublasLtMatrixLayoutCreate(&call.second, CUDA_R_16BF, M, K, M)
                           : cublasLtMatrixLayoutCreate(&call.second, CUDA_R_16BF, K, M, K));
  MOE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&call.out, CUDA_R_32F, N, M, N));
  MOE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&call.pref));
  const size_t ws = StreamContext::kLtWorkspaceBytes;
  MOE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(call.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                        sizeof ws));
  // the pointers' real alignment (the heuristic otherwise assumes 256 bytes and may pick a kernel that needs it)
  const std::pair<cublasLtMatmulPreferenceAttributes_t, const void*> aligned[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c}};
  for (const auto& [attr, ptr] : aligned) {
    uint32_t bytes = 256;
    while (bytes > 1 && reinterpret_cast<uintptr_t>(ptr) % bytes != 0) bytes /= 2;
    MOE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(call.pref, attr, &bytes, sizeof bytes));
  }
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  MOE_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(ctx.lt(), call.op, call.first, call.second, call.out, call.out,
                                                  call.pref, 1, &heur, &found));
  MOE_CHECK(found > 0, "cuda::matmul_bf16: cuBLASLt has no algorithm for M=" << M << " N=" << N << " K=" << K
                                                                              << " trans_a=" << trans_a
                                                                              << " trans_b=" << trans_b);
  MOE_CUBLAS_CHECK(cublasLtMatmul(ctx.lt(), call.op, &alpha, b, call.first, a, call.second, &beta, c, call.out, c,
                                  call.out, &heur.algo, ctx.lt_workspace(), ws, stream));
}

// ---------------------------------------------------------------- linear layer

namespace {

// out[N,OC] += bias[OC]
__global__ void add_bias_kernel(float* __restrict__ out, const float* __restrict__ bias, int64_t total, int OC) {
  MOE_GRID_STRIDE(i, total) out[i] += bias[i % OC];
}

}  // namespace

void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC,
                    cudaStream_t stream) {
  matmul(out, inp, w, N, OC, IC, /*trans_a=*/false, /*trans_b=*/true, 1.0f, 0.0f, stream);
  const int64_t total = static_cast<int64_t>(N) * OC;
  if (bias && total > 0) {
    add_bias_kernel<<<detail::grid_for(total), detail::kBlock, 0, stream>>>(out, bias, total, OC);
    MOE_CUDA_CHECK(cudaGetLastError());
  }
}

void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w, int N,
                     int IC, int OC, cudaStream_t stream) {
  if (dinp) matmul(dinp, dout, w, N, IC, OC, false, false, 1.0f, 0.0f, stream);           // [N,OC] @ [OC,IC]
  if (dw) matmul(dw, dout, inp, OC, IC, N, /*trans_a=*/true, false, 1.0f, 1.0f, stream);  // [N,OC]^T @ [N,IC]
  if (dbias) detail::column_reduce(dbias, detail::ColumnReduce::kSum, dout, nullptr, nullptr, nullptr, N, OC, stream);
}

}  // namespace moe::cuda
