// CPU kernel tests (core/kernels/cpu/kernels.h):
//   *.VsTorch     forward outputs and every gradient against the float64 PyTorch oracle (tests/oracle/kernels.py),
//                 including the accumulate (+=) / write (=) conventions of the backward functions;
//   *.VsRef       the fast kernel against its plain-loop *_ref on the same inputs, at sizes that take the
//                 OpenMP paths;
//   *.FiniteDiff  the analytic backward against central differences of L = sum(out * dout) through the f32 forward;
//   edge cases    N = 1, T = 1 attention, huge logits, all targets ignored.
// One oracle process per test (importing torch costs ~1.5 s), several configurations chained per call.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "core/kernels/cpu/kernels.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

using namespace moe::cpu;
using Vec = std::vector<float>;
using Ids = std::vector<int32_t>;

constexpr double kTol = 1e-5;  // f32 kernel vs f64 oracle, relative to the reference's largest magnitude
constexpr float kSentinel = 1e30f;  // pre-fills outputs that must be written (=), so stale values show up

// One oracle job: its own subdirectory of a TempDir holding the .npy inputs and, afterwards, the outputs.
struct Job {
  std::string dir;
  std::vector<std::string> args;  // <op> <dir> [args]

  Job(const TempDir& td, const std::string& name, const std::string& op, std::vector<std::string> extra = {})
      : dir(td.file(name)) {
    std::filesystem::create_directories(dir);
    args = {op, dir};
    args.insert(args.end(), extra.begin(), extra.end());
  }
  void put(const std::string& name, const Vec& v, const Shape& shape) const {
    ASSERT_EQ(int64_t(v.size()), shape_numel(shape)) << name;
    write_npy(dir + "/" + name + ".npy", v.data(), shape);
  }
  void put(const std::string& name, const Ids& v, const Shape& shape) const {
    ASSERT_EQ(int64_t(v.size()), shape_numel(shape)) << name;
    write_npy(dir + "/" + name + ".npy", v.data(), shape);
  }
  // the oracle's array `name`, which must hold n values (a mismatch fails and returns NaNs of size n)
  Vec get(const std::string& name, size_t n) const {
    NpyArray a = read_npy(dir + "/" + name + ".npy");
    EXPECT_EQ(a.f.size(), n) << "oracle output " << name << " in " << dir;
    if (a.f.size() != n) return Vec(n, std::numeric_limits<float>::quiet_NaN());
    return a.f;
  }
};

// Runs all jobs in one oracle process.
bool run_jobs(const std::vector<const Job*>& jobs) {
  std::vector<std::string> args;
  for (const Job* j : jobs) {
    if (!args.empty()) args.push_back("+");
    args.insert(args.end(), j->args.begin(), j->args.end());
  }
  return run_oracle("kernels.py", args);
}

// Runs every job of `jobs`, in order, in one oracle process.
bool run_all(const std::vector<Job>& jobs) {
  std::vector<const Job*> ptrs;
  for (const Job& j : jobs) ptrs.push_back(&j);
  return run_jobs(ptrs);
}

std::string num(double x) {
  std::ostringstream o;
  o.precision(17);
  o << x;
  return o.str();
}

Vec sub(const Vec& a, const Vec& b) {
  Vec r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}

double dot(const float* a, const float* b, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += double(a[i]) * b[i];
  return s;
}
double dot(const Vec& a, const Vec& b) { return dot(a.data(), b.data(), a.size()); }

bool all_finite(const Vec& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

// Central differences of the scalar `loss` with respect to every element of x (perturbed in place, restored).
Vec fd_grad(Vec& x, const std::function<double()>& loss, float eps) {
  Vec g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float x0 = x[i], xp = x0 + eps, xm = x0 - eps;
    x[i] = xp;
    const double lp = loss();
    x[i] = xm;
    const double lm = loss();
    x[i] = x0;
    g[i] = static_cast<float>((lp - lm) / (double(xp) - double(xm)));
  }
  return g;
}

// Analytic vs finite-difference gradient: f32 forward, eps ~1e-3 -> about 1e-3 relative.
constexpr double kFdTol = 1e-3;

#define EXPECT_REL(ours, ref, tol) EXPECT_LE(max_rel_err(ours, ref), tol) << #ours " vs " #ref

// ================================================================== matmul
struct MatmulCase {
  int M, N, K;
  bool ta, tb;
  float alpha, beta;
};

void fill_operands(Rng& rng, const MatmulCase& c, Vec& a, Vec& b, Vec& c0) {
  a = randn(rng, int64_t(c.M) * c.K);
  b = randn(rng, int64_t(c.K) * c.N);
  c0 = randn(rng, int64_t(c.M) * c.N);
}

TEST(KernelMatmul, VsTorchAllTransposesAlphaBeta) {
  const std::vector<MatmulCase> cases = {
      {17, 33, 9, false, false, 1.0f, 0.0f}, {17, 33, 9, true, false, 1.0f, 0.0f},
      {17, 33, 9, false, true, 1.0f, 0.0f},  {17, 33, 9, true, true, 1.0f, 0.0f},
      {17, 33, 9, true, false, 0.5f, 2.0f},  {8, 5, 64, false, true, -1.5f, 0.25f},
      {1, 7, 3, true, true, 2.0f, 1.0f},     {9, 1, 1, false, false, 1.0f, -1.0f},
  };
  Rng rng(1);
  TempDir td;
  std::vector<Job> jobs;
  std::vector<Vec> as, bs, cs;
  for (size_t i = 0; i < cases.size(); ++i) {
    const MatmulCase& c = cases[i];
    Vec a, b, c0;
    fill_operands(rng, c, a, b, c0);
    jobs.emplace_back(td, "case" + std::to_string(i), "matmul",
                      std::vector<std::string>{c.ta ? "1" : "0", c.tb ? "1" : "0", num(c.alpha), num(c.beta)});
    jobs.back().put("a", a, c.ta ? Shape{c.K, c.M} : Shape{c.M, c.K});
    jobs.back().put("b", b, c.tb ? Shape{c.N, c.K} : Shape{c.K, c.N});
    jobs.back().put("c", c0, {c.M, c.N});
    as.push_back(a), bs.push_back(b), cs.push_back(c0);
  }
  ASSERT_TRUE(run_all(jobs));
  for (size_t i = 0; i < cases.size(); ++i) {
    const MatmulCase& c = cases[i];
    SCOPED_TRACE("case " + std::to_string(i) + ": M=" + std::to_string(c.M) + " N=" + std::to_string(c.N) +
                 " K=" + std::to_string(c.K) + " ta=" + std::to_string(c.ta) + " tb=" + std::to_string(c.tb));
    const Vec want = jobs[i].get("out", size_t(c.M) * c.N);
    // with beta == 0 the old contents of c must be ignored, even NaN
    Vec fast = c.beta == 0.0f ? Vec(cs[i].size(), std::numeric_limits<float>::quiet_NaN()) : cs[i];
    Vec ref = fast;
    matmul(fast.data(), as[i].data(), bs[i].data(), c.M, c.N, c.K, c.ta, c.tb, c.alpha, c.beta);
    matmul_ref(ref.data(), as[i].data(), bs[i].data(), c.M, c.N, c.K, c.ta, c.tb, c.alpha, c.beta);
    EXPECT_REL(fast, want, kTol);
    EXPECT_REL(ref, want, kTol);
  }
}

TEST(KernelMatmul, VsRef) {
  Rng rng(2);
  for (int ta = 0; ta < 2; ++ta) {
    for (int tb = 0; tb < 2; ++tb) {
      const MatmulCase c{67, 48, 130, bool(ta), bool(tb), 0.75f, 0.5f};
      Vec a, b, c0;
      fill_operands(rng, c, a, b, c0);
      Vec fast = c0, ref = c0;
      matmul(fast.data(), a.data(), b.data(), c.M, c.N, c.K, c.ta, c.tb, c.alpha, c.beta);
      matmul_ref(ref.data(), a.data(), b.data(), c.M, c.N, c.K, c.ta, c.tb, c.alpha, c.beta);
      EXPECT_REL(fast, ref, kTol) << " ta=" << ta << " tb=" << tb;
    }
  }
}

// The small-dimension kernels against the plain reference, called directly and through matmul_few_rows (which takes
// them exactly where matmul_takes_small says, and is plain matmul elsewhere): every row-block remainder (M 1..16),
// column tails (N % 4, N % 16, N % 64) and K tails (K % 16); beta 0 ignores c (NaN-filled) and beta 1 adds a product
// formed in full, so adding the same product onto itself doubles it exactly; sizes that take the OpenMP path too.
TEST(KernelMatmul, SmallDimensionVsRef) {
  Rng rng(3);
  const std::vector<std::pair<int, int>> NK = {{1, 1}, {3, 17}, {4, 16}, {5, 33}, {17, 15}, {67, 192}, {130, 48},
                                                {192, 512}, {1030, 300}};
  using Kernel = void (*)(float*, const float*, const float*, int, int, int, float);
  struct Variant {
    const char* name;
    Kernel kernel;
    bool ta, tb;
  };
  const Variant variants[] = {{"nt", matmul_nt_small, false, true},
                              {"nn", matmul_nn_small, false, false},
                              {"tn", matmul_tn_small, true, false}};
  int checked = 0;
  for (const Variant& v : variants) {
    int small_path = 0;  // shapes on which matmul took this kernel
    for (int small = 1; small <= 16; small += (small < 6 ? 1 : 5)) {
      for (auto [big1, big2] : NK) {
        // nt / nn: M small, N = big1, K = big2; tn: K small (the rows of a weight gradient), M = big1, N = big2
        const int M = v.ta ? big1 : small, N = v.ta ? big2 : big1, K = v.ta ? small : big2;
        SCOPED_TRACE(std::string(v.name) + " M=" + std::to_string(M) + " N=" + std::to_string(N) +
                     " K=" + std::to_string(K));
        const Vec a = randn(rng, int64_t(M) * K), b = randn(rng, int64_t(K) * N), c0 = randn(rng, int64_t(M) * N);
        Vec ref(c0.size()), direct(c0.size(), std::numeric_limits<float>::quiet_NaN()), via(direct);
        matmul_ref(ref.data(), a.data(), b.data(), M, N, K, v.ta, v.tb, 1.0f, 0.0f);
        v.kernel(direct.data(), a.data(), b.data(), M, N, K, 0.0f);
        matmul_few_rows(via.data(), a.data(), b.data(), M, N, K, v.ta, v.tb, 1.0f, 0.0f);
        Vec blas(c0.size());
        matmul(blas.data(), a.data(), b.data(), M, N, K, v.ta, v.tb, 1.0f, 0.0f);
        EXPECT_REL(direct, ref, kTol);
        EXPECT_REL(via, ref, kTol);
        if (matmul_takes_small(M, N, K, v.ta, v.tb, 1.0f, 0.0f)) {
          EXPECT_EQ(via, direct) << "matmul_few_rows did not take the small kernel";
          ++small_path;
        } else {
          EXPECT_EQ(via, blas) << "matmul_few_rows outside the small bounds is matmul";
        }
        Vec acc = c0, acc_ref = c0;
        v.kernel(acc.data(), a.data(), b.data(), M, N, K, 1.0f);
        matmul_ref(acc_ref.data(), a.data(), b.data(), M, N, K, v.ta, v.tb, 1.0f, 1.0f);
        EXPECT_REL(acc, acc_ref, kTol);
        Vec twice = direct;
        v.kernel(twice.data(), a.data(), b.data(), M, N, K, 1.0f);
        for (size_t i = 0; i < twice.size(); ++i) ASSERT_EQ(twice[i], 2.0f * direct[i]) << "element " << i;
        ++checked;
      }
    }
    EXPECT_GE(small_path, 10) << v.name;
  }
  EXPECT_EQ(checked, 3 * 8 * int(NK.size()));
  // a word expert's shapes (d_model 192, d_expert 512, a few rows) take them; other products keep sgemm
  EXPECT_TRUE(matmul_takes_small(3, 512, 192, false, true, 1.0f, 0.0f));   // forward
  EXPECT_TRUE(matmul_takes_small(5, 192, 512, false, false, 1.0f, 1.0f));  // input gradient, accumulated
  EXPECT_TRUE(matmul_takes_small(512, 192, 7, true, false, 1.0f, 1.0f));   // weight gradient
  EXPECT_FALSE(matmul_takes_small(2048, 512, 192, false, true, 1.0f, 0.0f));
  EXPECT_FALSE(matmul_takes_small(3, 512, 192, false, true, 0.5f, 0.0f));
  EXPECT_FALSE(matmul_takes_small(3, 512, 192, true, true, 1.0f, 0.0f));
}

// ================================================================== linear
TEST(KernelLinear, VsTorchWithAndWithoutBias) {
  const int N = 13, IC = 17, OC = 9;
  struct LinearData {
    bool with_bias;
    Vec x, w, bias, dout, dw0, db0;  // dw0, db0: existing gradients, which the backward accumulates into
  };
  Rng rng(3);
  TempDir td;
  std::vector<LinearData> data;
  std::vector<Job> jobs;
  for (bool with_bias : {true, false}) {
    data.push_back({with_bias, randn(rng, N * IC), randn(rng, OC * IC), randn(rng, OC), randn(rng, N * OC),
                    randn(rng, OC * IC), randn(rng, OC)});
    const LinearData& d = data.back();
    const std::string tag = with_bias ? "bias" : "nobias";
    jobs.emplace_back(td, tag, "linear", std::vector<std::string>{tag});
    jobs.back().put("x", d.x, {N, IC});
    jobs.back().put("w", d.w, {OC, IC});
    if (with_bias) jobs.back().put("b", d.bias, {OC});
    jobs.back().put("dout", d.dout, {N, OC});
  }
  ASSERT_TRUE(run_jobs({&jobs[0], &jobs[1]}));
  for (size_t i = 0; i < data.size(); ++i) {
    const LinearData& d = data[i];
    const Job& job = jobs[i];
    SCOPED_TRACE(d.with_bias ? "bias" : "no bias");
    const Vec want_out = job.get("out", N * OC), want_dx = job.get("dx", N * IC), want_dw = job.get("dw", OC * IC);
    const float* bptr = d.with_bias ? d.bias.data() : nullptr;
    Vec out(N * OC, kSentinel), dx(N * IC, kSentinel), dw = d.dw0, db = d.db0;
    linear_forward(out.data(), d.x.data(), d.w.data(), bptr, N, IC, OC);
    linear_backward(dx.data(), dw.data(), d.with_bias ? db.data() : nullptr, d.dout.data(), d.x.data(), d.w.data(),
                    N, IC, OC);
    EXPECT_REL(out, want_out, kTol);
    EXPECT_REL(dx, want_dx, kTol);
    EXPECT_REL(sub(dw, d.dw0), want_dw, kTol);
    if (d.with_bias) {
      EXPECT_REL(sub(db, d.db0), job.get("db", OC), kTol);
    } else {
      EXPECT_EQ(db, d.db0);
    }

    // the same through the references
    Vec out_r(N * OC), dx_r(N * IC), dw_r = d.dw0, db_r = d.db0;
    linear_forward_ref(out_r.data(), d.x.data(), d.w.data(), bptr, N, IC, OC);
    linear_backward_ref(dx_r.data(), dw_r.data(), d.with_bias ? db_r.data() : nullptr, d.dout.data(), d.x.data(),
                        d.w.data(), N, IC, OC);
    EXPECT_REL(out_r, want_out, kTol);
    EXPECT_REL(dx_r, want_dx, kTol);
    EXPECT_REL(sub(dw_r, d.dw0), want_dw, kTol);
    if (d.with_bias) {
      EXPECT_REL(sub(db_r, d.db0), job.get("db", OC), kTol);
    }

    // dinp == nullptr skips the input gradient and leaves the weight gradient unchanged
    Vec dw2 = d.dw0;
    linear_backward(nullptr, dw2.data(), nullptr, d.dout.data(), d.x.data(), d.w.data(), N, IC, OC);
    EXPECT_REL(dw2, dw, 1e-7);
  }
}

TEST(KernelLinear, VsRef) {
  Rng rng(4);
  // OC = 600 spans several dbias column blocks; N * OC crosses the OpenMP threshold
  for (auto [N, IC, OC] : {std::tuple{64, 32, 600}, std::tuple{1, 5, 3}, std::tuple{300, 64, 80}}) {
    SCOPED_TRACE("N=" + std::to_string(N) + " IC=" + std::to_string(IC) + " OC=" + std::to_string(OC));
    const Vec x = randn(rng, N * IC), w = randn(rng, OC * IC), bias = randn(rng, OC), dout = randn(rng, N * OC);
    const Vec dw0 = randn(rng, OC * IC), db0 = randn(rng, OC);
    Vec out(N * OC), out_r(N * OC), dx(N * IC), dx_r(N * IC), dw = dw0, dw_r = dw0, db = db0, db_r = db0;
    linear_forward(out.data(), x.data(), w.data(), bias.data(), N, IC, OC);
    linear_forward_ref(out_r.data(), x.data(), w.data(), bias.data(), N, IC, OC);
    linear_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), N, IC, OC);
    linear_backward_ref(dx_r.data(), dw_r.data(), db_r.data(), dout.data(), x.data(), w.data(), N, IC, OC);
    EXPECT_REL(out, out_r, kTol);
    EXPECT_REL(dx, dx_r, kTol);
    EXPECT_REL(sub(dw, dw0), sub(dw_r, dw0), kTol);
    EXPECT_REL(sub(db, db0), sub(db_r, db0), kTol);
  }
}

// ================================================================== embedding
TEST(KernelEmbedding, VsTorchRepeatedIds) {
  const int V = 11, C = 6;
  const Ids ids = {3, 1, 3, 3, 0, 10, 1, 5, 3};
  const int N = int(ids.size());
  Rng rng(5);
  const Vec wte = randn(rng, V * C), dout = randn(rng, N * C), dwte0 = randn(rng, V * C);
  TempDir td;
  Job job(td, "emb", "embedding");
  job.put("ids", ids, {N});
  job.put("wte", wte, {V, C});
  job.put("dout", dout, {N, C});
  ASSERT_TRUE(run_jobs({&job}));
  Vec out(N * C, kSentinel), dwte = dwte0;
  embedding_forward(out.data(), ids.data(), wte.data(), N, C);
  embedding_backward(dwte.data(), dout.data(), ids.data(), N, C);
  EXPECT_REL(out, job.get("out", N * C), kTol);
  EXPECT_REL(sub(dwte, dwte0), job.get("dwte", V * C), kTol);
}

TEST(KernelEmbedding, ParallelBackwardMatchesSerialScatter) {
  const int V = 7, C = 130, N = 300;  // few distinct ids: many collisions, N * C over the OpenMP threshold
  Rng rng(6);
  Ids ids(N);
  for (auto& i : ids) i = int32_t(rng.below(V));
  const Vec dout = randn(rng, N * C), dwte0 = randn(rng, V * C);
  Vec dwte = dwte0, want = dwte0;
  embedding_backward(dwte.data(), dout.data(), ids.data(), N, C);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) want[ids[n] * C + c] += dout[n * C + c];
  EXPECT_REL(dwte, want, 1e-6);
}

TEST(KernelEmbedding, NegativeIdIsRejected) {
  const Ids ids = {0, -1};
  Vec wte(8, 1.0f), out(8);
  EXPECT_THROW(embedding_forward(out.data(), ids.data(), wte.data(), 2, 4), Error);
}

// ================================================================== RMSNorm
struct NormData {
  int N, C;
  Vec x, w, b, dout, dw0, db0;
};

NormData make_norm(Rng& rng, int N, int C, float offset) {
  NormData d;
  d.N = N;
  d.C = C;
  d.x = randn(rng, int64_t(N) * C);
  for (auto& v : d.x) v = 2.0f * v + offset;
  d.w = randn(rng, C);
  for (auto& v : d.w) v = 1.0f + 0.3f * v;
  d.b = randn(rng, C, 0.5f);
  d.dout = randn(rng, int64_t(N) * C);
  d.dw0 = randn(rng, C);
  d.db0 = randn(rng, C);
  return d;
}

// One oracle job per case ("case<i>"): x, w, dout and, for layernorm, b.
std::vector<Job> norm_jobs(const TempDir& td, const std::vector<NormData>& data, const std::string& op, float eps) {
  std::vector<Job> jobs;
  for (size_t i = 0; i < data.size(); ++i) {
    const NormData& d = data[i];
    jobs.emplace_back(td, "case" + std::to_string(i), op, std::vector<std::string>{num(eps)});
    jobs.back().put("x", d.x, {d.N, d.C});
    jobs.back().put("w", d.w, {d.C});
    if (op == "layernorm") jobs.back().put("b", d.b, {d.C});
    jobs.back().put("dout", d.dout, {d.N, d.C});
  }
  return jobs;
}

TEST(KernelRmsNorm, VsTorch) {
  const float eps = 1e-5f;
  Rng rng(7);
  TempDir td;
  std::vector<NormData> data = {make_norm(rng, 5, 24, 0.0f), make_norm(rng, 1, 7, 0.5f)};  // incl. N = 1
  const std::vector<Job> jobs = norm_jobs(td, data, "rmsnorm", eps);
  ASSERT_TRUE(run_all(jobs));
  for (size_t i = 0; i < data.size(); ++i) {
    const NormData& d = data[i];
    const int N = d.N, C = d.C;
    SCOPED_TRACE("N=" + std::to_string(N) + " C=" + std::to_string(C));
    Vec out(N * C, kSentinel), rstd(N, kSentinel), dx(N * C, kSentinel), dw = d.dw0;
    rmsnorm_forward(out.data(), rstd.data(), d.x.data(), d.w.data(), N, C, eps);
    rmsnorm_backward(dx.data(), dw.data(), d.dout.data(), d.x.data(), d.w.data(), rstd.data(), N, C);
    EXPECT_REL(out, jobs[i].get("out", N * C), kTol);
    EXPECT_REL(rstd, jobs[i].get("rstd", N), kTol);
    EXPECT_REL(dx, jobs[i].get("dx", N * C), kTol);
    EXPECT_REL(sub(dw, d.dw0), jobs[i].get("dw", C), kTol);
  }
}

TEST(KernelRmsNorm, VsRef) {
  Rng rng(8);
  for (auto [N, C] : {std::pair{128, 192}, std::pair{1, 33}, std::pair{7, 5}}) {
    SCOPED_TRACE("N=" + std::to_string(N) + " C=" + std::to_string(C));
    NormData d = make_norm(rng, N, C, 0.3f);
    Vec out(N * C), rstd(N), out_r(N * C), rstd_r(N), dx(N * C), dx_r(N * C), dw = d.dw0, dw_r = d.dw0;
    rmsnorm_forward(out.data(), rstd.data(), d.x.data(), d.w.data(), N, C, 1e-5f);
    rmsnorm_forward_ref(out_r.data(), rstd_r.data(), d.x.data(), d.w.data(), N, C, 1e-5f);
    rmsnorm_backward(dx.data(), dw.data(), d.dout.data(), d.x.data(), d.w.data(), rstd.data(), N, C);
    rmsnorm_backward_ref(dx_r.data(), dw_r.data(), d.dout.data(), d.x.data(), d.w.data(), rstd_r.data(), N, C);
    EXPECT_REL(out, out_r, kTol);
    EXPECT_REL(rstd, rstd_r, kTol);
    EXPECT_REL(dx, dx_r, kTol);
    EXPECT_REL(sub(dw, d.dw0), sub(dw_r, d.dw0), kTol);
  }
}

TEST(KernelRmsNorm, FiniteDiff) {
  const int N = 3, C = 8;
  const float eps = 1e-5f;
  Rng rng(9);
  NormData d = make_norm(rng, N, C, 0.2f);
  Vec out(N * C), rstd(N), dx(N * C), dw(C, 0.0f);
  auto loss = [&] {
    rmsnorm_forward(out.data(), rstd.data(), d.x.data(), d.w.data(), N, C, eps);
    return dot(out, d.dout);
  };
  loss();
  rmsnorm_backward(dx.data(), dw.data(), d.dout.data(), d.x.data(), d.w.data(), rstd.data(), N, C);
  EXPECT_REL(dx, fd_grad(d.x, loss, 1e-3f), kFdTol);
  EXPECT_REL(dw, fd_grad(d.w, loss, 1e-3f), kFdTol);
}

// ================================================================== LayerNorm
TEST(KernelLayerNorm, VsTorch) {
  const float eps = 1e-5f;
  Rng rng(10);
  TempDir td;
  std::vector<NormData> data = {make_norm(rng, 5, 24, 3.0f), make_norm(rng, 1, 7, -1.0f)};  // incl. N = 1
  const std::vector<Job> jobs = norm_jobs(td, data, "layernorm", eps);
  ASSERT_TRUE(run_all(jobs));
  for (size_t i = 0; i < data.size(); ++i) {
    const NormData& d = data[i];
    const int N = d.N, C = d.C;
    SCOPED_TRACE("N=" + std::to_string(N) + " C=" + std::to_string(C));
    Vec out(N * C, kSentinel), mean(N, kSentinel), rstd(N, kSentinel), dx(N * C, kSentinel), dw = d.dw0,
        db = d.db0;
    layernorm_forward(out.data(), mean.data(), rstd.data(), d.x.data(), d.w.data(), d.b.data(), N, C, eps);
    layernorm_backward(dx.data(), dw.data(), db.data(), d.dout.data(), d.x.data(), d.w.data(), mean.data(),
                       rstd.data(), N, C);
    EXPECT_REL(out, jobs[i].get("out", N * C), kTol);
    EXPECT_REL(mean, jobs[i].get("mean", N), kTol);
    EXPECT_REL(rstd, jobs[i].get("rstd", N), kTol);
    EXPECT_REL(dx, jobs[i].get("dx", N * C), kTol);
    EXPECT_REL(sub(dw, d.dw0), jobs[i].get("dw", C), kTol);
    EXPECT_REL(sub(db, d.db0), jobs[i].get("db", C), kTol);
  }
}

TEST(KernelLayerNorm, VsRef) {
  Rng rng(11);
  for (auto [N, C] : {std::pair{128, 192}, std::pair{1, 33}, std::pair{7, 5}}) {
    SCOPED_TRACE("N=" + std::to_string(N) + " C=" + std::to_string(C));
    NormData d = make_norm(rng, N, C, 1.5f);
    Vec out(N * C), mean(N), rstd(N), out_r(N * C), mean_r(N), rstd_r(N), dx(N * C), dx_r(N * C);
    Vec dw = d.dw0, dw_r = d.dw0, db = d.db0, db_r = d.db0;
    layernorm_forward(out.data(), mean.data(), rstd.data(), d.x.data(), d.w.data(), d.b.data(), N, C, 1e-5f);
    layernorm_forward_ref(out_r.data(), mean_r.data(), rstd_r.data(), d.x.data(), d.w.data(), d.b.data(), N, C,
                          1e-5f);
    layernorm_backward(dx.data(), dw.data(), db.data(), d.dout.data(), d.x.data(), d.w.data(), mean.data(),
                       rstd.data(), N, C);
    layernorm_backward_ref(dx_r.data(), dw_r.data(), db_r.data(), d.dout.data(), d.x.data(), d.w.data(),
                           mean_r.data(), rstd_r.data(), N, C);
    EXPECT_REL(out, out_r, kTol);
    EXPECT_REL(mean, mean_r, kTol);
    EXPECT_REL(rstd, rstd_r, kTol);
    EXPECT_REL(dx, dx_r, kTol);
    EXPECT_REL(sub(dw, d.dw0), sub(dw_r, d.dw0), kTol);
    EXPECT_REL(sub(db, d.db0), sub(db_r, d.db0), kTol);
  }
}

TEST(KernelLayerNorm, FiniteDiff) {
  const int N = 3, C = 8;
  const float eps = 1e-5f;
  Rng rng(12);
  NormData d = make_norm(rng, N, C, 0.7f);
  Vec out(N * C), mean(N), rstd(N), dx(N * C), dw(C, 0.0f), db(C, 0.0f);
  auto loss = [&] {
    layernorm_forward(out.data(), mean.data(), rstd.data(), d.x.data(), d.w.data(), d.b.data(), N, C, eps);
    return dot(out, d.dout);
  };
  loss();
  layernorm_backward(dx.data(), dw.data(), db.data(), d.dout.data(), d.x.data(), d.w.data(), mean.data(),
                     rstd.data(), N, C);
  EXPECT_REL(dx, fd_grad(d.x, loss, 1e-3f), kFdTol);
  EXPECT_REL(dw, fd_grad(d.w, loss, 1e-3f), kFdTol);
  EXPECT_REL(db, fd_grad(d.b, loss, 1e-3f), kFdTol);
}

// ================================================================== RoPE
struct RopeCase {
  int B, T, nh, D, pos0;
  float theta;
};

TEST(KernelRope, VsTorch) {
  const std::vector<RopeCase> cases = {{2, 5, 3, 8, 7, 10000.0f}, {1, 4, 2, 16, 0, 500.0f}, {1, 1, 1, 4, 1000, 1e4f}};
  Rng rng(13);
  TempDir td;
  std::vector<Job> jobs;
  std::vector<Vec> xs, douts;
  for (size_t i = 0; i < cases.size(); ++i) {
    const RopeCase& c = cases[i];
    const Shape shape{c.B, c.T, c.nh, c.D};
    xs.push_back(randn(rng, shape_numel(shape)));
    douts.push_back(randn(rng, shape_numel(shape)));
    jobs.emplace_back(td, "case" + std::to_string(i), "rope", std::vector<std::string>{num(c.pos0), num(c.theta)});
    jobs.back().put("x", xs.back(), shape);
    jobs.back().put("dout", douts.back(), shape);
  }
  ASSERT_TRUE(run_jobs({&jobs[0], &jobs[1], &jobs[2]}));
  for (size_t i = 0; i < cases.size(); ++i) {
    const RopeCase& c = cases[i];
    SCOPED_TRACE("case " + std::to_string(i));
    Vec out = xs[i], dx = douts[i];
    rope_forward(out.data(), c.B, c.T, c.nh, c.D, c.pos0, c.theta);
    rope_backward(dx.data(), c.B, c.T, c.nh, c.D, c.pos0, c.theta);
    EXPECT_REL(out, jobs[i].get("out", out.size()), kTol);
    EXPECT_REL(dx, jobs[i].get("dx", dx.size()), kTol);
  }
}

TEST(KernelRope, FiniteDiffAndInverse) {
  const RopeCase c{2, 3, 2, 6, 5, 100.0f};
  const int64_t n = int64_t(c.B) * c.T * c.nh * c.D;
  Rng rng(14);
  Vec x = randn(rng, n), dout = randn(rng, n), y(n);
  auto loss = [&] {
    y = x;
    rope_forward(y.data(), c.B, c.T, c.nh, c.D, c.pos0, c.theta);
    return dot(y, dout);
  };
  Vec dx = dout;
  rope_backward(dx.data(), c.B, c.T, c.nh, c.D, c.pos0, c.theta);
  EXPECT_REL(dx, fd_grad(x, loss, 1e-3f), kFdTol);
  // the backward is the inverse rotation: forward then backward gives the input back
  Vec z = x;
  rope_forward(z.data(), c.B, c.T, c.nh, c.D, c.pos0, c.theta);
  rope_backward(z.data(), c.B, c.T, c.nh, c.D, c.pos0, c.theta);
  EXPECT_REL(z, x, 1e-6);
}

TEST(KernelRope, LargeBatchParallelMatchesPerPositionCalls) {
  // B*T*nh*D over the OpenMP threshold; each row must equal a single-position call at pos0 + t
  const int B = 3, T = 50, nh = 4, D = 32, pos0 = 11;
  Rng rng(15);
  Vec x = randn(rng, int64_t(B) * T * nh * D), y = x;
  rope_forward(y.data(), B, T, nh, D, pos0, 10000.0f);
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      const int64_t off = (int64_t(b) * T + t) * nh * D;
      Vec row(x.begin() + off, x.begin() + off + nh * D);
      rope_forward(row.data(), 1, 1, nh, D, pos0 + t, 10000.0f);
      ASSERT_EQ(max_rel_err(row.data(), y.data() + off, nh * D), 0.0) << "b=" << b << " t=" << t;
    }
  }
}

// ================================================================== attention
struct AttnCase {
  int B, T, H, Hkv, D;
  std::string name() const {
    return "B" + std::to_string(B) + "_T" + std::to_string(T) + "_H" + std::to_string(H) + "_Hkv" +
           std::to_string(Hkv) + "_D" + std::to_string(D);
  }
  int64_t nq() const { return int64_t(B) * T * H * D; }
  int64_t nkv() const { return int64_t(B) * T * Hkv * D; }
  int64_t natt() const { return int64_t(B) * H * T * T; }
};

struct AttnData {
  Vec q, k, v, dout;
};

AttnData make_attn(Rng& rng, const AttnCase& c) {
  return {randn(rng, c.nq()), randn(rng, c.nkv()), randn(rng, c.nkv()), randn(rng, c.nq())};
}

struct AttnOut {
  Vec out, att, dq, dk, dv;
};

AttnOut run_attn(const AttnCase& c, const AttnData& d, bool ref, bool scratch = true) {
  AttnOut o{Vec(c.nq(), kSentinel), Vec(c.natt(), kSentinel), Vec(c.nq(), kSentinel), Vec(c.nkv(), kSentinel),
            Vec(c.nkv(), kSentinel)};
  if (ref) {
    attention_forward_ref(o.out.data(), o.att.data(), d.q.data(), d.k.data(), d.v.data(), c.B, c.T, c.H, c.Hkv, c.D);
    attention_backward_ref(o.dq.data(), o.dk.data(), o.dv.data(), d.dout.data(), d.q.data(), d.k.data(), d.v.data(),
                           o.att.data(), c.B, c.T, c.H, c.Hkv, c.D);
  } else {
    Vec datt(c.natt(), kSentinel);
    attention_forward(o.out.data(), o.att.data(), d.q.data(), d.k.data(), d.v.data(), c.B, c.T, c.H, c.Hkv, c.D);
    attention_backward(o.dq.data(), o.dk.data(), o.dv.data(), scratch ? datt.data() : nullptr, d.dout.data(),
                       d.q.data(), d.k.data(), d.v.data(), o.att.data(), c.B, c.T, c.H, c.Hkv, c.D);
  }
  return o;
}

// MHA, GQA and MQA at two lengths, plus rope -> attention -> backward -> rope_backward chained as in the layer
// (the oracle applies rope as its own op; the attention kernel does not rotate).
TEST(KernelAttention, VsTorchMhaGqaMqaAndRopeChain) {
  const std::vector<AttnCase> cases = {{2, 7, 4, 4, 8}, {2, 7, 8, 2, 8},  {2, 7, 4, 1, 8},
                                       {2, 33, 4, 4, 16}, {2, 33, 8, 2, 16}, {2, 33, 4, 1, 16}};
  Rng rng(16);
  TempDir td;
  std::vector<Job> jobs;
  std::vector<AttnData> data;
  auto add_job = [&](const AttnCase& c, const std::string& dir, const std::string& op,
                     std::vector<std::string> extra) {
    data.push_back(make_attn(rng, c));
    jobs.emplace_back(td, dir, op, extra);
    jobs.back().put("q", data.back().q, {c.B, c.T, c.H, c.D});
    jobs.back().put("k", data.back().k, {c.B, c.T, c.Hkv, c.D});
    jobs.back().put("v", data.back().v, {c.B, c.T, c.Hkv, c.D});
    jobs.back().put("dout", data.back().dout, {c.B, c.T, c.H, c.D});
  };
  for (const AttnCase& c : cases) add_job(c, c.name(), "attention", {});
  const AttnCase rc{2, 9, 4, 2, 8};
  const int pos0 = 3;
  const float theta = 10000.0f;
  add_job(rc, "rope_chain", "rope_attention", {num(pos0), num(theta)});
  ASSERT_TRUE(run_all(jobs));

  for (size_t i = 0; i < cases.size(); ++i) {
    const AttnCase& c = cases[i];
    const Job& job = jobs[i];
    const Vec want_out = job.get("out", c.nq()), want_att = job.get("att", c.natt()), want_dq = job.get("dq", c.nq()),
              want_dk = job.get("dk", c.nkv()), want_dv = job.get("dv", c.nkv());
    for (bool ref : {false, true}) {
      SCOPED_TRACE(c.name() + (ref ? " (reference)" : " (fast)"));
      const AttnOut o = run_attn(c, data[i], ref);
      EXPECT_REL(o.out, want_out, kTol);
      EXPECT_REL(o.att, want_att, kTol);  // includes the zeros above the diagonal
      EXPECT_REL(o.dq, want_dq, kTol);
      EXPECT_REL(o.dk, want_dk, kTol);
      EXPECT_REL(o.dv, want_dv, kTol);
    }
  }

  // the chain, as core/layers.cpp runs it
  {
    const AttnCase& c = rc;
    const AttnData& d = data.back();
    const Job& job = jobs.back();
    SCOPED_TRACE("rope -> attention chain " + c.name());
    AttnData r = d;
    rope_forward(r.q.data(), c.B, c.T, c.H, c.D, pos0, theta);
    rope_forward(r.k.data(), c.B, c.T, c.Hkv, c.D, pos0, theta);
    AttnOut o = run_attn(c, r, false);
    rope_backward(o.dq.data(), c.B, c.T, c.H, c.D, pos0, theta);
    rope_backward(o.dk.data(), c.B, c.T, c.Hkv, c.D, pos0, theta);
    EXPECT_REL(o.out, job.get("out", c.nq()), kTol);
    EXPECT_REL(o.dq, job.get("dq", c.nq()), kTol);
    EXPECT_REL(o.dk, job.get("dk", c.nkv()), kTol);
    EXPECT_REL(o.dv, job.get("dv", c.nkv()), kTol);
  }
}

TEST(KernelAttention, VsRef) {
  // large enough for the OpenMP paths and several 32-row sgemm blocks (T = 40, 50, 64); also without scratch
  const std::vector<AttnCase> cases = {{2, 64, 6, 2, 32}, {3, 40, 4, 4, 16}, {2, 50, 4, 1, 64}, {1, 3, 2, 1, 4}};
  Rng rng(17);
  for (const AttnCase& c : cases) {
    SCOPED_TRACE(c.name());
    const AttnData d = make_attn(rng, c);
    const AttnOut f = run_attn(c, d, false), r = run_attn(c, d, true), g = run_attn(c, d, false, false);
    EXPECT_REL(f.out, r.out, kTol);
    EXPECT_REL(f.att, r.att, kTol);
    EXPECT_REL(f.dq, r.dq, kTol);
    EXPECT_REL(f.dk, r.dk, kTol);
    EXPECT_REL(f.dv, r.dv, kTol);
    EXPECT_EQ(f.dq, g.dq);
    EXPECT_EQ(f.dk, g.dk);
    EXPECT_EQ(f.dv, g.dv);
  }
}

TEST(KernelAttention, FiniteDiff) {
  for (const AttnCase& c : {AttnCase{1, 5, 4, 2, 4}, AttnCase{2, 4, 2, 1, 6}}) {
    SCOPED_TRACE(c.name());
    Rng rng(18);
    AttnData d = make_attn(rng, c);
    Vec out(c.nq()), att(c.natt());
    auto loss = [&] {
      attention_forward(out.data(), att.data(), d.q.data(), d.k.data(), d.v.data(), c.B, c.T, c.H, c.Hkv, c.D);
      return dot(out, d.dout);
    };
    const AttnOut o = run_attn(c, d, false);
    EXPECT_REL(o.dq, fd_grad(d.q, loss, 1e-3f), kFdTol);
    EXPECT_REL(o.dk, fd_grad(d.k, loss, 1e-3f), kFdTol);
    EXPECT_REL(o.dv, fd_grad(d.v, loss, 1e-3f), kFdTol);
  }
}

TEST(KernelAttention, SingleStepT1) {
  // T = 1: the only key is the query's own position, so out = v of the group's kv head, att = 1,
  // dq = dk = 0 (softmax over one element is constant) and dv = sum of the group's dout
  const AttnCase c{2, 1, 4, 2, 8};
  Rng rng(19);
  const AttnData d = make_attn(rng, c);
  for (bool ref : {false, true}) {
    SCOPED_TRACE(ref ? "reference" : "fast");
    const AttnOut o = run_attn(c, d, ref);
    for (int b = 0; b < c.B; ++b) {
      for (int h = 0; h < c.H; ++h) {
        const int g = h / (c.H / c.Hkv);
        EXPECT_EQ(o.att[b * c.H + h], 1.0f);
        for (int i = 0; i < c.D; ++i) {
          EXPECT_FLOAT_EQ(o.out[(b * c.H + h) * c.D + i], d.v[(b * c.Hkv + g) * c.D + i]);
          EXPECT_EQ(o.dq[(b * c.H + h) * c.D + i], 0.0f);
        }
      }
      for (int g = 0; g < c.Hkv; ++g) {
        for (int i = 0; i < c.D; ++i) {
          float want = 0;
          for (int h = g * 2; h < g * 2 + 2; ++h) want += d.dout[(b * c.H + h) * c.D + i];
          EXPECT_NEAR(o.dv[(b * c.Hkv + g) * c.D + i], want, 1e-6f);
          EXPECT_EQ(o.dk[(b * c.Hkv + g) * c.D + i], 0.0f);
        }
      }
    }
  }
}

TEST(KernelAttention, RejectsHeadsNotMultipleOfKvHeads) {
  Vec q(6 * 4), kv(4 * 4), out(6 * 4), att(6);
  EXPECT_THROW(attention_forward(out.data(), att.data(), q.data(), kv.data(), kv.data(), 1, 1, 6, 4, 4), Error);
}

// ================================================================== activations
// elementwise |a - b| <= tol |b| + abs_floor (for hand-picked values of very different magnitudes)
void expect_each_near(const Vec& a, const Vec& b, double tol, double abs_floor, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_LE(std::fabs(double(a[i]) - b[i]), tol * std::fabs(b[i]) + abs_floor) << what << "[" << i << "]";
}

TEST(KernelActivation, GeluAndSwigluVsTorch) {
  // bulk: an odd count over the OpenMP threshold (vector tails and the parallel path);
  // tails: hand-picked values checked one by one (kept out of the bulk so they do not set its error scale)
  const int64_t n = 20001;
  Rng rng(20);
  const Vec x = randn(rng, n, 2.0f), gate = randn(rng, n, 2.0f), up = randn(rng, n), dout = randn(rng, n);
  const Vec tx = {0.0f, 1e-4f, -1e-4f, 0.5f, -3.0f, 10.0f, -10.0f, 20.0f, -20.0f, 90.0f, -90.0f};
  const int64_t m = int64_t(tx.size());
  const Vec tup(m, 1.5f), tdout(m, 1.0f);
  TempDir td;
  Job gj(td, "gelu", "gelu"), sj(td, "swiglu", "swiglu"), gt(td, "gelu_tails", "gelu"),
      st(td, "swiglu_tails", "swiglu");
  gj.put("x", x, {n});
  gj.put("dout", dout, {n});
  sj.put("gate", gate, {n});
  sj.put("up", up, {n});
  sj.put("dout", dout, {n});
  gt.put("x", tx, {m});
  gt.put("dout", tdout, {m});
  st.put("gate", tx, {m});
  st.put("up", tup, {m});
  st.put("dout", tdout, {m});
  ASSERT_TRUE(run_jobs({&gj, &sj, &gt, &st}));

  Vec out(n, kSentinel), dx(n, kSentinel);
  gelu_forward(out.data(), x.data(), n);
  gelu_backward(dx.data(), dout.data(), x.data(), n);
  EXPECT_REL(out, gj.get("out", n), kTol);
  EXPECT_REL(dx, gj.get("dx", n), kTol);

  Vec sout(n, kSentinel), dgate(n, kSentinel), dup(n, kSentinel);
  swiglu_forward(sout.data(), gate.data(), up.data(), n);
  swiglu_backward(dgate.data(), dup.data(), dout.data(), gate.data(), up.data(), n);
  EXPECT_REL(sout, sj.get("out", n), kTol);
  EXPECT_REL(dgate, sj.get("dgate", n), kTol);
  EXPECT_REL(dup, sj.get("dup", n), kTol);

  Vec t1(m), t2(m), t3(m);
  gelu_forward(t1.data(), tx.data(), m);
  gelu_backward(t2.data(), tdout.data(), tx.data(), m);
  expect_each_near(t1, gt.get("out", m), kTol, 1e-7, "gelu tails");
  expect_each_near(t2, gt.get("dx", m), kTol, 1e-7, "gelu' tails");
  swiglu_forward(t1.data(), tx.data(), tup.data(), m);
  expect_each_near(t1, st.get("out", m), kTol, 1e-7, "swiglu tails");
  swiglu_backward(t2.data(), t3.data(), tdout.data(), tx.data(), tup.data(), m);
  expect_each_near(t2, st.get("dgate", m), kTol, 1e-7, "swiglu dgate tails");
  expect_each_near(t3, st.get("dup", m), kTol, 1e-7, "swiglu dup tails");
}

TEST(KernelActivation, GeluFiniteDiff) {
  const int n = 40;
  Rng rng(21);
  Vec x = randn(rng, n, 2.0f), dout = randn(rng, n), out(n), dx(n);
  auto loss = [&] {
    gelu_forward(out.data(), x.data(), n);
    return dot(out, dout);
  };
  gelu_backward(dx.data(), dout.data(), x.data(), n);
  EXPECT_REL(dx, fd_grad(x, loss, 1e-3f), kFdTol);
}

TEST(KernelActivation, SwigluFiniteDiff) {
  const int n = 40;
  Rng rng(22);
  Vec gate = randn(rng, n, 2.0f), up = randn(rng, n), dout = randn(rng, n), out(n), dgate(n), dup(n);
  auto loss = [&] {
    swiglu_forward(out.data(), gate.data(), up.data(), n);
    return dot(out, dout);
  };
  swiglu_backward(dgate.data(), dup.data(), dout.data(), gate.data(), up.data(), n);
  EXPECT_REL(dgate, fd_grad(gate, loss, 1e-3f), kFdTol);
  EXPECT_REL(dup, fd_grad(up, loss, 1e-3f), kFdTol);
}

// ================================================================== cross-entropy
TEST(KernelCrossEntropy, VsTorchWithIgnoredTargets) {
  struct CeCase {
    int N, V;
    Ids targets;
    float dloss;
  };
  Rng rng(23);
  std::vector<CeCase> cases = {{6, 37, {3, -1, 0, 36, -5, 3}, 1.7f}, {40, 1000, {}, 0.5f}};
  cases[1].targets.resize(40);
  for (auto& t : cases[1].targets) t = int32_t(rng.below(1000));
  cases[1].targets[7] = -100;
  TempDir td;
  std::vector<Job> jobs;
  std::vector<Vec> logits;
  for (size_t i = 0; i < cases.size(); ++i) {
    const CeCase& c = cases[i];
    logits.push_back(randn(rng, int64_t(c.N) * c.V, 3.0f));
    jobs.emplace_back(td, "case" + std::to_string(i), "cross_entropy", std::vector<std::string>{num(c.dloss)});
    jobs.back().put("logits", logits.back(), {c.N, c.V});
    jobs.back().put("targets", c.targets, {c.N});
  }
  ASSERT_TRUE(run_jobs({&jobs[0], &jobs[1]}));
  for (size_t i = 0; i < cases.size(); ++i) {
    const CeCase& c = cases[i];
    const int64_t NV = int64_t(c.N) * c.V;
    SCOPED_TRACE("N=" + std::to_string(c.N) + " V=" + std::to_string(c.V));
    Vec losses(c.N, kSentinel), probs(NV, kSentinel), dlogits(NV, kSentinel);
    const float loss = cross_entropy_forward(losses.data(), probs.data(), logits[i].data(), c.targets.data(), c.N, c.V);
    cross_entropy_backward(dlogits.data(), probs.data(), c.targets.data(), c.N, c.V, c.dloss);
    const Vec want_loss = jobs[i].get("loss", 1);
    EXPECT_NEAR(loss, want_loss[0], kTol * std::fabs(want_loss[0]));
    EXPECT_REL(losses, jobs[i].get("losses", c.N), kTol);
    EXPECT_REL(probs, jobs[i].get("probs", NV), kTol);
    EXPECT_REL(dlogits, jobs[i].get("dlogits", NV), kTol);
    for (int n = 0; n < c.N; ++n) {
      if (c.targets[n] >= 0) continue;
      EXPECT_EQ(losses[n], 0.0f) << "ignored row " << n;
      for (int j = 0; j < c.V; ++j) ASSERT_EQ(dlogits[int64_t(n) * c.V + j], 0.0f) << "ignored row " << n;
    }
    Vec losses_r(c.N), probs_r(NV);
    const float loss_r =
        cross_entropy_forward_ref(losses_r.data(), probs_r.data(), logits[i].data(), c.targets.data(), c.N, c.V);
    EXPECT_NEAR(loss_r, want_loss[0], kTol * std::fabs(want_loss[0]));
    EXPECT_REL(losses_r, jobs[i].get("losses", c.N), kTol);
    EXPECT_REL(probs_r, jobs[i].get("probs", NV), kTol);
  }
}

TEST(KernelCrossEntropy, VsRef) {
  const int N = 64, V = 300;
  Rng rng(24);
  const Vec logits = randn(rng, N * V, 4.0f);
  Ids targets(N);
  for (auto& t : targets) t = int32_t(rng.below(V));
  targets[5] = -1;
  Vec losses(N), probs(N * V), losses_r(N), probs_r(N * V);
  const float loss = cross_entropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), N, V);
  const float loss_r = cross_entropy_forward_ref(losses_r.data(), probs_r.data(), logits.data(), targets.data(), N, V);
  EXPECT_NEAR(loss, loss_r, kTol * std::fabs(loss_r));
  EXPECT_REL(losses, losses_r, kTol);
  EXPECT_REL(probs, probs_r, kTol);
}

TEST(KernelCrossEntropy, FiniteDiff) {
  const int N = 4, V = 7;
  const float dloss = 1.3f;
  Rng rng(25);
  Vec logits = randn(rng, N * V, 2.0f), losses(N), probs(N * V), dlogits(N * V);
  const Ids targets = {2, -1, 6, 0};
  auto loss = [&] {  // mean over the 3 kept rows, summed in double from the per-row losses
    cross_entropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), N, V);
    double s = 0;
    for (float l : losses) s += l;
    return s / 3 * dloss;
  };
  loss();
  cross_entropy_backward(dlogits.data(), probs.data(), targets.data(), N, V, dloss);
  EXPECT_REL(dlogits, fd_grad(logits, loss, 1e-3f), kFdTol);
}

TEST(KernelCrossEntropy, HugeLogitsStayFiniteAndAllIgnoredIsZero) {
  const int N = 2, V = 5;
  const Vec logits = {1e4f, 0.0f, -1e4f, 5e3f, 1e4f,  // two tied maxima
                      -1e4f, -1e4f, -1e4f, -1e4f, 1e4f};
  const Ids targets = {1, 4};
  Vec losses(N), probs(N * V), dlogits(N * V);
  const float loss = cross_entropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), N, V);
  cross_entropy_backward(dlogits.data(), probs.data(), targets.data(), N, V, 1.0f);
  ASSERT_TRUE(all_finite(losses) && all_finite(probs) && all_finite(dlogits) && std::isfinite(loss));
  EXPECT_NEAR(losses[0], 1e4 + std::log(2.0), 1e-2);  // -log(e^0 / (2 e^1e4))
  EXPECT_NEAR(losses[1], 0.0, 1e-6);
  EXPECT_NEAR(probs[0], 0.5, 1e-6);
  EXPECT_NEAR(probs[4], 0.5, 1e-6);
  EXPECT_NEAR(dlogits[1], -0.5, 1e-6);  // (p - 1) / 2 rows
  // every target ignored: mean loss 0 and zero gradient, no division by zero
  const Ids none = {-1, -1};
  EXPECT_EQ(cross_entropy_forward(losses.data(), probs.data(), logits.data(), none.data(), N, V), 0.0f);
  cross_entropy_backward(dlogits.data(), probs.data(), none.data(), N, V, 1.0f);
  for (float g : dlogits) EXPECT_EQ(g, 0.0f);
}

// ================================================================== elementwise helpers
TEST(KernelElementwise, AddScaleSumSquares) {
  const int64_t n = 100003;  // over the OpenMP threshold, odd
  Rng rng(26);
  const Vec a = randn(rng, n), b = randn(rng, n);
  Vec out(n), y = a;
  add(out.data(), a.data(), b.data(), n);
  add_inplace(y.data(), b.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(out[i], a[i] + b[i]) << i;
    ASSERT_EQ(y[i], a[i] + b[i]) << i;
  }
  y = a;
  scale_inplace(y.data(), -0.37f, n);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(y[i], a[i] * -0.37f) << i;
  double ss = 0;
  for (float v : a) ss += double(v) * v;
  EXPECT_NEAR(sum_squares(a.data(), n), ss, 1e-12 * ss);
  EXPECT_EQ(sum_squares(a.data(), 0), 0.0);
  const float small[3] = {1.0f, -2.0f, 3.0f};
  EXPECT_EQ(sum_squares(small, 3), 14.0);
}

}  // namespace
}  // namespace moe::test
