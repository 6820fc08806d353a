// The CPU backend: every op is the moe::cpu:: kernel of the same name (core/kernels/cpu/kernels.h), memory is
// 64-byte aligned host memory (core/host_alloc.h), and everything completes before returning (sync is a no-op).
#include "core/backend.h"

#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "core/host_alloc.h"
#include "core/kernels/cpu/kernels.h"

namespace moe {
namespace {

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::kCPU; }
  const char* name() const override { return "cpu"; }

  void* alloc(size_t bytes) override { return host_alloc(bytes ? bytes : 64); }
  void free(void* p) noexcept override { std::free(p); }
  void memset0(void* p, size_t bytes) override {
    if (bytes) std::memset(p, 0, bytes);
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memmove(dst, src, bytes);
  }
  void to_host(void* host_dst, const void* src, size_t bytes) override { copy(host_dst, src, bytes); }
  void from_host(void* dst, const void* host_src, size_t bytes) override { copy(dst, host_src, bytes); }
  void sync() override {}

  void matmul(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b, float alpha,
              float beta) override {
    cpu::matmul(c, a, b, M, N, K, trans_a, trans_b, alpha, beta);
  }
  void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC) override {
    cpu::linear_forward(out, inp, w, bias, N, IC, OC);
  }
  void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w, int N,
                       int IC, int OC) override {
    cpu::linear_backward(dinp, dw, dbias, dout, inp, w, N, IC, OC);
  }
  void matmul_few_rows(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b,
                       float alpha, float beta) override {
    cpu::matmul_few_rows(c, a, b, M, N, K, trans_a, trans_b, alpha, beta);
  }

  void embedding_forward(float* out, const int32_t* ids, const float* wte, int N, int C) override {
    cpu::embedding_forward(out, ids, wte, N, C);
  }
  void embedding_backward(float* dwte, const float* dout, const int32_t* ids, int N, int C) override {
    cpu::embedding_backward(dwte, dout, ids, N, C);
  }

  void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) override {
    cpu::rmsnorm_forward(out, rstd, inp, w, N, C, eps);
  }
  void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd,
                        int N, int C) override {
    cpu::rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, C);
  }
  void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N,
                         int C, float eps) override {
    cpu::layernorm_forward(out, mean, rstd, inp, w, b, N, C, eps);
  }
  void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                          const float* mean, const float* rstd, int N, int C) override {
    cpu::layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
  }

  void rope_forward(float* x, int B, int T, int nh, int D, int pos0, float theta) override {
    cpu::rope_forward(x, B, T, nh, D, pos0, theta);
  }
  void rope_backward(float* dx, int B, int T, int nh, int D, int pos0, float theta) override {
    cpu::rope_backward(dx, B, T, nh, D, pos0, theta);
  }

  void attention_forward(float* out, float* att, const float* q, const float* k, const float* v, int B, int T, int H,
                         int Hkv, int D) override {
    cpu::attention_forward(out, att, q, k, v, B, T, H, Hkv, D);
  }
  void attention_backward(float* dq, float* dk, float* dv, float* datt_scratch, const float* dout, const float* q,
                          const float* k, const float* v, const float* att, int B, int T, int H, int Hkv,
                          int D) override {
    cpu::attention_backward(dq, dk, dv, datt_scratch, dout, q, k, v, att, B, T, H, Hkv, D);
  }
  void linear_rows(float* out, const float* inp, const float* packed, const float* bias, int N, int IC,
                   int OC) override {
    cpu::linear_rows(out, inp, packed, bias, N, IC, OC);
  }
  int64_t packed_rows_floats(int IC, int OC) override { return cpu::packed_rows_floats(IC, OC); }
  void pack_rows(float* packed, const float* w, int IC, int OC) override { cpu::pack_rows(packed, w, IC, OC); }
  void rope_rows(float* x, const int32_t* pos, const float* cs, int N, int nh, int D) override {
    cpu::rope_rows(x, pos, cs, N, nh, D);
  }
  void scatter_rows(float* dst, const float* src, const int32_t* idx, int N, int C) override {
    cpu::scatter_rows(dst, src, idx, N, C);
  }
  void attention_paged(float* out, const float* q, const float* k_pool, const float* v_pool, const int32_t* pos,
                       const int32_t* table, const int32_t* table_start, int block_size, int N, int H, int Hkv,
                       int D) override {
    cpu::attention_paged(out, q, k_pool, v_pool, pos, table, table_start, block_size, N, H, Hkv, D);
  }
  bool has_sparq() const override { return true; }
  void value_sums_paged(float* v_sums, const float* v_pool, const int32_t* pos, const int32_t* table,
                        const int32_t* table_start, int block_size, int N, int Hkv, int D) override {
    cpu::value_sums_paged(v_sums, v_pool, pos, table, table_start, block_size, N, Hkv, D);
  }
  void scatter_columns(float* k_cols, const float* k, const int32_t* slots, int block_size, int N, int Hkv,
                       int D) override {
    cpu::scatter_columns(k_cols, k, slots, block_size, N, Hkv, D);
  }
  void attention_sparq(float* out, const float* q, const float* k_pool, const float* v_pool, const float* v_sums,
                       const float* k_cols, const int32_t* pos, const int32_t* table, const int32_t* table_start,
                       const int32_t* rk, int block_size, int N, int H, int Hkv, int D) override {
    cpu::attention_sparq(out, q, k_pool, v_pool, v_sums, k_cols, pos, table, table_start, rk, block_size, N, H, Hkv,
                         D);
  }

  void gelu_forward(float* out, const float* inp, int64_t N) override { cpu::gelu_forward(out, inp, N); }
  void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t N) override {
    cpu::gelu_backward(dinp, dout, inp, N);
  }
  void swiglu_forward(float* out, const float* gate, const float* up, int64_t NF) override {
    cpu::swiglu_forward(out, gate, up, NF);
  }
  void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up,
                       int64_t NF) override {
    cpu::swiglu_backward(dgate, dup, dout, gate, up, NF);
  }

  float cross_entropy_forward(float* losses, float* probs, const float* logits, const int32_t* targets, int N,
                              int V) override {
    return cpu::cross_entropy_forward(losses, probs, logits, targets, N, V);
  }
  void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets, int N, int V,
                              float dloss) override {
    cpu::cross_entropy_backward(dlogits, probs, targets, N, V, dloss);
  }

  void add_inplace(float* y, const float* x, int64_t n) override { cpu::add_inplace(y, x, n); }
  void add(float* out, const float* a, const float* b, int64_t n) override { cpu::add(out, a, b, n); }
  void scale_inplace(float* y, float s, int64_t n) override { cpu::scale_inplace(y, s, n); }
  double sum_squares(const float* x, int64_t n) override { return cpu::sum_squares(x, n); }
  void mul(float* out, const float* a, const float* b, int64_t n) override { cpu::mul(out, a, b, n); }
  void gather_rows(float* out, const float* x, const int32_t* slot, const float* gate, int R, int k, int C) override {
    cpu::gather_rows(out, x, slot, gate, R, k, C);
  }
  void combine_rows(float* out, const float* y, const int32_t* row, const float* gate, int N, int k, int C,
                    bool accumulate) override {
    cpu::combine_rows(out, y, row, gate, N, k, C, accumulate);
  }
  void row_dots(float* dot, const float* a, const float* y, const int32_t* row, int N, int k, int C) override {
    cpu::row_dots(dot, a, y, row, N, k, C);
  }
  void zero_rows(float* x, const int64_t* rows_host, int64_t n_rows, int64_t row_size) override {
    cpu::zero_rows(x, rows_host, n_rows, row_size);
  }
  void scale_rows(float* x, float s, const int64_t* rows_host, int64_t n_rows, int64_t row_size) override {
    cpu::scale_rows(x, s, rows_host, n_rows, row_size);
  }
  void router_topk(const cpu::RouterDims& d, int32_t* choice, float* gate, float* score, double* lse, double* stats,
                   const float* logits, const float* bias) override {
    cpu::router_topk(d, choice, gate, score, lse, stats, logits, bias);
  }
  void router_logits_grad(const cpu::RouterDims& d, float* dlogits, const float* logits, const double* lse,
                          const int32_t* choice, const int32_t* row, const float* dgate, const float* f,
                          double aux_scale, double z_scale) override {
    cpu::router_logits_grad(d, dlogits, logits, lse, choice, row, dgate, f, aux_scale, z_scale);
  }
  double sum_squares_rows(const float* x, const int64_t* rows_host, int64_t n_rows, int64_t row_size) override {
    return cpu::sum_squares_rows(x, rows_host, n_rows, row_size);
  }
  void adamw(float* w, const float* g, float* m, float* v, int64_t n, const cpu::AdamWHyper& h, float bc1,
             float bc2) override {
    cpu::adamw(w, g, m, v, n, h, bc1, bc2);
  }
  void adamw_rows(float* w, const float* g, float* m, float* v, int32_t* row_t, const int64_t* rows_host,
                  int64_t n_rows, int64_t row_size, const cpu::AdamWHyper& h) override {
    cpu::adamw_rows(w, g, m, v, row_t, rows_host, n_rows, row_size, h);
  }
};

}  // namespace

void Backend::set_matmul_bf16(bool on) {
  MOE_CHECK(!on, "bf16 GEMMs are not available on the " << name() << " backend (model.matmul_precision = MATMUL_BF16 "
                                                         "needs model.device = DEVICE_CUDA)");
}

void Backend::matmul_grouped(const GemmGroup* groups, int G, bool trans_a, bool trans_b, float alpha, float beta) {
  for (int g = 0; g < G; ++g) {
    const GemmGroup& q = groups[g];
    if (q.m > 0 && q.n > 0) matmul(q.c, q.a, q.b, q.m, q.n, q.k, trans_a, trans_b, alpha, beta);
  }
}

void* Backend::alloc_host(size_t bytes) { return host_alloc(bytes ? bytes : 64); }
void Backend::free_host(void* p) noexcept { std::free(p); }

Backend& cpu_backend() {
  static CpuBackend be;
  return be;
}

Backend& backend_for(Device d) {
  if (d == Device::kCPU) return cpu_backend();
#ifdef MOE_HAVE_CUDA
  MOE_CHECK(cuda_available(),
            "model.device = cuda: no CUDA device is visible (check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES)");
  cuda_bind_device();  // (the backend's stream and handles belong to this process's GPU)
  return cuda::cuda_backend();
#else
  MOE_THROW("model.device = " << device_name(d)
                              << ": this build has no CUDA support: configure with nvcc present (-DMOE_CUDA=ON)");
#endif
}

}  // namespace moe
