// The CUDA backend (core/backend.h): one non-blocking stream per device; every op enqueues the moe::cuda:: kernel
// of the same name (kernels.cuh) on it. Memory: cudaMalloc / cudaFree, stream-ordered memset and copies;
// to_host / from_host, cross_entropy_forward and sum_squares synchronise the stream (they hand a value to the host).
// Use a device's backend while that device is current (one rank per GPU).
#include <algorithm>
#include <mutex>
#include <vector>

#include "core/backend.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/kernels.cuh"

namespace moe::cuda {
namespace {

// A host array of row indices in a stream-ordered device temporary, freed (stream-ordered) when this goes: the host
// array may change once the constructor returns (cudaMemcpyAsync from pageable memory has copied it by then).
class DeviceRows {
 public:
  DeviceRows(const int64_t* rows_host, int64_t n, cudaStream_t stream) : stream_(stream) {
    MOE_CUDA_CHECK(cudaMallocAsync(&rows_, sizeof(int64_t) * n, stream));
    MOE_CUDA_CHECK(cudaMemcpyAsync(rows_, rows_host, sizeof(int64_t) * n, cudaMemcpyHostToDevice, stream));
  }
  ~DeviceRows() { cudaFreeAsync(rows_, stream_); }
  DeviceRows(const DeviceRows&) = delete;
  DeviceRows& operator=(const DeviceRows&) = delete;
  const int64_t* get() const { return static_cast<const int64_t*>(rows_); }

 private:
  void* rows_ = nullptr;
  cudaStream_t stream_;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend() {
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    MOE_CUDA_CHECK(cudaMalloc(&scalars_, 2 * sizeof(double)));
  }
  // never destroyed: process-wide, and the CUDA runtime may already be torn down at exit

  Device device() const override { return Device::kCUDA; }
  const char* name() const override { return "cuda"; }

  void* alloc(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
    MOE_CHECK(e == cudaSuccess && p, "out of CUDA memory allocating " << bytes << " bytes: " << cudaGetErrorName(e)
                                                                      << " (" << cudaGetErrorString(e) << ")");
    return p;
  }
  void free(void* p) noexcept override {
    if (p) cudaFree(p);  // no throw; cudaFree waits for the work using p
  }
  void* alloc_host(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t e = cudaMallocHost(&p, bytes ? bytes : 256);
    MOE_CHECK(e == cudaSuccess && p, "out of page-locked host memory allocating " << bytes << " bytes: "
                                         << cudaGetErrorName(e) << " (" << cudaGetErrorString(e) << ")");
    return p;
  }
  void free_host(void* p) noexcept override {
    if (p) cudaFreeHost(p);
  }
  void memset0(void* p, size_t bytes) override {
    if (bytes) MOE_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_));
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes) MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  void to_host(void* host_dst, const void* src, size_t bytes) override {
    if (bytes) MOE_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    sync();
  }
  void from_host(void* dst, const void* host_src, size_t bytes) override {
    if (bytes) MOE_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
    sync();
  }
  void sync() override { MOE_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  void set_matmul_bf16(bool on) override { StreamContext::get(stream_).set_bf16(on); }
  bool matmul_bf16() const override { return StreamContext::get(stream_).bf16(); }
  void matmul(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b, float alpha,
              float beta) override {
    cuda::matmul(c, a, b, M, N, K, trans_a, trans_b, alpha, beta, stream_);
  }
  void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC) override {
    cuda::linear_forward(out, inp, w, bias, N, IC, OC, stream_);
  }
  void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w, int N,
                       int IC, int OC) override {
    cuda::linear_backward(dinp, dw, dbias, dout, inp, w, N, IC, OC, stream_);
  }

  void matmul_grouped(const GemmGroup* groups, int G, bool trans_a, bool trans_b, float alpha, float beta) override;

  void embedding_forward(float* out, const int32_t* ids, const float* wte, int N, int C) override {
    cuda::embedding_forward(out, ids, wte, N, C, stream_);
  }
  void embedding_backward(float* dwte, const float* dout, const int32_t* ids, int N, int C) override {
    cuda::embedding_backward(dwte, dout, ids, N, C, stream_);
  }

  void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) override {
    cuda::rmsnorm_forward(out, rstd, inp, w, N, C, eps, stream_);
  }
  void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd,
                        int N, int C) override {
    cuda::rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, C, stream_);
  }
  void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N,
                         int C, float eps) override {
    cuda::layernorm_forward(out, mean, rstd, inp, w, b, N, C, eps, stream_);
  }
  void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                          const float* mean, const float* rstd, int N, int C) override {
    cuda::layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C, stream_);
  }

  void rope_forward(float* x, int B, int T, int nh, int D, int pos0, float theta) override {
    cuda::rope_forward(x, B, T, nh, D, pos0, theta, stream_);
  }
  void rope_backward(float* dx, int B, int T, int nh, int D, int pos0, float theta) override {
    cuda::rope_backward(dx, B, T, nh, D, pos0, theta, stream_);
  }

  void attention_forward(float* out, float* att, const float* q, const float* k, const float* v, int B, int T, int H,
                         int Hkv, int D) override {
    cuda::attention_forward(out, att, q, k, v, B, T, H, Hkv, D, stream_);
  }
  void attention_backward(float* dq, float* dk, float* dv, float* datt_scratch, const float* dout, const float* q,
                          const float* k, const float* v, const float* att, int B, int T, int H, int Hkv,
                          int D) override;
  // the inference layout on the GPU is the plain [OC,IC] layout (the warp-per-output kernel reads rows of w)
  void linear_rows(float* out, const float* inp, const float* packed, const float* bias, int N, int IC,
                   int OC) override {
    cuda::linear_rows(out, inp, packed, bias, N, IC, OC, stream_);
  }
  int64_t packed_rows_floats(int IC, int OC) override { return int64_t(IC) * OC; }
  void pack_rows(float* packed, const float* w, int IC, int OC) override {
    copy(packed, w, sizeof(float) * size_t(IC) * OC);
  }
  void rope_rows(float* x, const int32_t* pos, const float* cs, int N, int nh, int D) override {
    cuda::rope_rows(x, pos, cs, N, nh, D, stream_);
  }
  void scatter_rows(float* dst, const float* src, const int32_t* idx, int N, int C) override {
    cuda::scatter_rows(dst, src, idx, N, C, stream_);
  }
  void attention_paged(float* out, const float* q, const float* k_pool, const float* v_pool, const int32_t* pos,
                       const int32_t* table, const int32_t* table_start, int block_size, int N, int H, int Hkv,
                       int D) override {
    cuda::attention_paged(out, q, k_pool, v_pool, pos, table, table_start, block_size, N, H, Hkv, D, stream_);
  }
  // SparQ attention has no CUDA kernels yet: the model keeps no SparQ tables on this backend and the server
  // refuses SparQ requests (ModelInfo::sparq), so these are never called
  bool has_sparq() const override { return false; }
  void value_sums_paged(float*, const float*, const int32_t*, const int32_t*, const int32_t*, int, int, int,
                        int) override {
    MOE_THROW("value_sums_paged: SparQ attention is not implemented on the CUDA backend");
  }
  void scatter_columns(float*, const float*, const int32_t*, int, int, int, int) override {
    MOE_THROW("scatter_columns: SparQ attention is not implemented on the CUDA backend");
  }
  void attention_sparq(float*, const float*, const float*, const float*, const float*, const float*, const int32_t*,
                       const int32_t*, const int32_t*, const int32_t*, int, int, int, int, int) override {
    MOE_THROW("attention_sparq: SparQ attention is not implemented on the CUDA backend");
  }

  void gelu_forward(float* out, const float* inp, int64_t N) override { cuda::gelu_forward(out, inp, N, stream_); }
  void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t N) override {
    cuda::gelu_backward(dinp, dout, inp, N, stream_);
  }
  void swiglu_forward(float* out, const float* gate, const float* up, int64_t NF) override {
    cuda::swiglu_forward(out, gate, up, NF, stream_);
  }
  void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up,
                       int64_t NF) override {
    cuda::swiglu_backward(dgate, dup, dout, gate, up, NF, stream_);
  }

  float cross_entropy_forward(float* losses, float* probs, const float* logits, const int32_t* targets, int N,
                              int V) override;
  void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets, int N, int V,
                              float dloss) override {
    cuda::cross_entropy_backward(dlogits, probs, targets, N, V, dloss, stream_);
  }

  void add_inplace(float* y, const float* x, int64_t n) override { cuda::add_inplace(y, x, n, stream_); }
  void add(float* out, const float* a, const float* b, int64_t n) override { cuda::add(out, a, b, n, stream_); }
  void scale_inplace(float* y, float s, int64_t n) override { cuda::scale_inplace(y, s, n, stream_); }
  double sum_squares(const float* x, int64_t n) override;
  void mul(float* out, const float* a, const float* b, int64_t n) override { cuda::mul(out, a, b, n, stream_); }
  void gather_rows(float* out, const float* x, const int32_t* slot, const float* gate, int R, int k, int C) override {
    cuda::gather_rows(out, x, slot, gate, R, k, C, stream_);
  }
  void combine_rows(float* out, const float* y, const int32_t* row, const float* gate, int N, int k, int C,
                    bool accumulate) override {
    cuda::combine_rows(out, y, row, gate, N, k, C, accumulate, stream_);
  }
  void row_dots(float* dot, const float* a, const float* y, const int32_t* row, int N, int k, int C) override {
    cuda::row_dots(dot, a, y, row, N, k, C, stream_);
  }
  void adamw(float* w, const float* g, float* m, float* v, int64_t n, const cpu::AdamWHyper& h, float bc1,
             float bc2) override {
    cuda::adamw(w, g, m, v, n, h, bc1, bc2, stream_);
  }
  void adamw_rows(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows_host,
                  int64_t n_rows, int64_t row_size, const cpu::AdamWHyper& h) override;
  void zero_rows(float* x, const int64_t* rows_host, int64_t n_rows, int64_t row_size) override {
    if (n_rows <= 0) return;
    DeviceRows rows(rows_host, n_rows, stream_);
    cuda::zero_rows(x, rows.get(), n_rows, row_size, stream_);
  }
  void scale_rows(float* x, float s, const int64_t* rows_host, int64_t n_rows, int64_t row_size) override {
    if (n_rows <= 0) return;
    DeviceRows rows(rows_host, n_rows, stream_);
    cuda::scale_rows(x, s, rows.get(), n_rows, row_size, stream_);
  }
  void router_topk(const cpu::RouterDims& d, int32_t* choice, float* gate, float* score, double* lse, double* stats,
                   const float* logits, const float* bias) override {
    cuda::router_topk(d, choice, gate, score, lse, stats, logits, bias, stream_);
  }
  void router_logits_grad(const cpu::RouterDims& d, float* dlogits, const float* logits, const double* lse,
                          const int32_t* choice, const int32_t* row, const float* dgate, const float* f,
                          double aux_scale, double z_scale) override {
    cuda::router_logits_grad(d, dlogits, logits, lse, choice, row, dgate, f, aux_scale, z_scale, stream_);
  }
  double sum_squares_rows(const float* x, const int64_t* rows_host, int64_t n_rows, int64_t row_size) override;

 private:
  cudaStream_t stream_ = nullptr;
  void* scalars_ = nullptr;  // [2] doubles: the device results of cross_entropy_forward and sum_squares
  std::mutex scalar_mu_;     // one host caller at a time reads a scalar back
  // matmul_grouped: the groups' pointers (c, a, b arrays of [G]) in device memory, grown as needed
  void* group_ptrs_ = nullptr;
  size_t group_ptrs_bytes_ = 0;
};

// The non-empty groups' pointers go to the device, their shapes stay on the host; one cuBLAS grouped GEMM. The copy
// is stream-ordered (a later call's copy waits for this GEMM); from pageable memory it returns once the source is
// staged, so the host arrays may be reused at once.
void CudaBackend::matmul_grouped(const GemmGroup* groups, int G, bool trans_a, bool trans_b, float alpha,
                                 float beta) {
  int n = 0;
  for (int g = 0; g < G; ++g) n += groups[g].m > 0 && groups[g].n > 0;
  if (n == 0) return;
  // the arrays cuBLAS reads: [c..., a..., b...] and [m..., n..., k...] over the non-empty groups
  std::vector<const void*> ptrs(3 * size_t(n));
  std::vector<int> dims(3 * size_t(n));
  for (int g = 0, i = 0; g < G; ++g) {
    const GemmGroup& q = groups[g];
    if (q.m <= 0 || q.n <= 0) continue;
    ptrs[i] = q.c, ptrs[n + i] = q.a, ptrs[2 * n + i] = q.b;
    dims[i] = q.m, dims[n + i] = q.n, dims[2 * n + i] = q.k;
    ++i;
  }
  const size_t bytes = sizeof(void*) * ptrs.size();
  if (bytes > group_ptrs_bytes_) {
    const size_t grown = std::max(bytes, 2 * group_ptrs_bytes_);
    void* p = alloc(grown);  // first: on failure the old array stays
    free(group_ptrs_);       // (cudaFree waits for the work still reading it)
    group_ptrs_ = p;
    group_ptrs_bytes_ = grown;
  }
  MOE_CUDA_CHECK(cudaMemcpyAsync(group_ptrs_, ptrs.data(), bytes, cudaMemcpyHostToDevice, stream_));
  cuda::matmul_grouped(static_cast<void**>(group_ptrs_), ptrs.data(), dims.data(), n, trans_a, trans_b, alpha, beta,
                       stream_);
}

// The GPU kernel needs datt_scratch[B,H,T,T]; without one (allowed on the CPU) a stream-ordered temporary is used.
void CudaBackend::attention_backward(float* dq, float* dk, float* dv, float* datt_scratch, const float* dout,
                                     const float* q, const float* k, const float* v, const float* att, int B, int T,
                                     int H, int Hkv, int D) {
  if (datt_scratch) {
    cuda::attention_backward(dq, dk, dv, datt_scratch, dout, q, k, v, att, B, T, H, Hkv, D, stream_);
    return;
  }
  const size_t bytes = sizeof(float) * size_t(B) * H * T * T;
  void* tmp = nullptr;  // [B,H,T,T]
  MOE_CUDA_CHECK(cudaMallocAsync(&tmp, bytes ? bytes : 256, stream_));
  try {
    cuda::attention_backward(dq, dk, dv, static_cast<float*>(tmp), dout, q, k, v, att, B, T, H, Hkv, D, stream_);
  } catch (...) {
    cudaFreeAsync(tmp, stream_);
    throw;
  }
  MOE_CUDA_CHECK(cudaFreeAsync(tmp, stream_));
}

float CudaBackend::cross_entropy_forward(float* losses, float* probs, const float* logits, const int32_t* targets,
                                         int N, int V) {
  std::lock_guard<std::mutex> lock(scalar_mu_);
  float* mean = static_cast<float*>(scalars_);  // [1]
  cuda::cross_entropy_forward(losses, probs, mean, logits, targets, N, V, stream_);
  float host = 0.0f;
  to_host(&host, mean, sizeof(float));
  return host;
}

void CudaBackend::adamw_rows(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows_host,
                             int64_t n_rows, int64_t row_size, const cpu::AdamWHyper& h) {
  if (n_rows <= 0) return;
  DeviceRows rows(rows_host, n_rows, stream_);
  cuda::adamw_rows(w, g, m, v, row_t, rows.get(), n_rows, row_size, h, stream_);
}

double CudaBackend::sum_squares_rows(const float* x, const int64_t* rows_host, int64_t n_rows, int64_t row_size) {
  if (n_rows <= 0) return 0.0;
  std::lock_guard<std::mutex> lock(scalar_mu_);
  double* out = static_cast<double*>(scalars_) + 1;  // [1]
  {
    DeviceRows rows(rows_host, n_rows, stream_);
    cuda::sum_squares_rows(out, x, rows.get(), n_rows, row_size, stream_);
  }
  double host = 0.0;
  to_host(&host, out, sizeof(double));
  return host;
}

double CudaBackend::sum_squares(const float* x, int64_t n) {
  std::lock_guard<std::mutex> lock(scalar_mu_);
  double* out = static_cast<double*>(scalars_) + 1;  // [1]
  cuda::sum_squares(out, x, n, stream_);
  double host = 0.0;
  to_host(&host, out, sizeof(double));
  return host;
}

}  // namespace

Backend& cuda_backend() {
  static std::mutex mu;
  static std::vector<CudaBackend*> per_device;  // [device count]; the backends are never destroyed
  int dev = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  if (per_device.size() <= size_t(dev)) per_device.resize(dev + 1, nullptr);
  if (!per_device[dev]) per_device[dev] = new CudaBackend();
  return *per_device[dev];
}

}  // namespace moe::cuda
