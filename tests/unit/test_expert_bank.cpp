// Expert FFN bank tests (experts/expert_bank.h):
//   ExpertBank.VsTorch              forward and every gradient against the float64 PyTorch oracle
//                                   (tests/oracle/experts.py): SwiGLU and GELU, E = 1 and E = 8, uneven rows per
//                                   expert including empty experts (their grads stay exactly 0);
//   ExpertBank.MatchesDenseFfn      E = 1 with DenseFfn's weights is DenseFfn (same math); experts in parallel
//                                   (many small experts, 4 threads) and in series (1 thread) both match one DenseFfn
//                                   per expert, over steps of changing size (buffer reuse);
//   ExpertBank.GroupedScheduleMatchesPerGroup  the device's schedule (grouped GEMMs) run on the CPU equals the
//                                   group-by-group one: SwiGLU, biased GELU, a row-sparse table;
//   ExpertBank.BackwardConventions  grads +=, y and dx =, empty experts' grads untouched bit for bit, one backward
//                                   per forward, bad offsets rejected, zero rows a no-op;
//   ExpertBank.ParamsAndInit        names, shapes, flags, first rows; init_params draws rows by global expert id
//                                   (independent of E, thread count, and of the expert-parallel split).
// One oracle process for the whole file (importing torch costs ~1.5 s).
#include <gtest/gtest.h>

#include <omp.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/grouped_ffn.h"
#include "core/layers.h"
#include "core/params.h"
#include "core/threads.h"
#include "experts/expert_bank.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

using experts::ExpertBank;
using experts::ExpertBankDims;
using Vec = std::vector<float>;

constexpr double kTol = 1e-5;        // f32 bank vs f64 oracle, relative to the reference's largest magnitude
constexpr double kSameMath = 1e-6;   // f32 vs f32 doing the same BLAS calls (normally bit-identical)
constexpr float kSentinel = 1e30f;   // pre-fills outputs that must be written (=)

const char* act_name(proto::Activation a) { return a == proto::SWIGLU ? "SWIGLU" : "GELU"; }

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

// Sets the OpenMP/OpenBLAS thread count for one scope, restoring the previous count after.
class ThreadScope {
 public:
  explicit ThreadScope(int n) : prev_(omp_get_max_threads()) { set_num_threads(n); }
  ~ThreadScope() { set_num_threads(prev_); }

 private:
  int prev_;
};

// A bank with random weights (biases random too, so their gradients are tested), random x and dy.
struct BankCase {
  ParamStore ps;
  Workspace ws{cpu_backend()};
  std::unique_ptr<ExpertBank> bank;
  ExpertBankDims dims;
  std::vector<int64_t> counts, offsets;
  int64_t rows = 0;
  Vec x, dy;  // [rows,C]

  BankCase(proto::Activation act, int C, int F, std::vector<int64_t> counts_, uint64_t seed)
      : dims{static_cast<int>(counts_.size()), C, F, act}, counts(std::move(counts_)) {
    bank = std::make_unique<ExpertBank>(ps, ws, "blk", dims);
    Rng rng(seed);
    fill_weights(ps, rng, 0.3f, 0.2f);
    for (const char* b : {"blk.b_up", "blk.b_down"})
      if (Param* p = ps.find(b)) {
        Vec v = randn(rng, p->value.numel(), 0.1f);
        std::copy(v.begin(), v.end(), p->value.f32());
      }
    offsets = offsets_of(counts);
    rows = offsets.back();
    x = randn(rng, rows * C);
    dy = randn(rng, rows * C);
  }
  Param& p(const std::string& name) { return ps.get("blk." + name); }
  std::vector<std::string> param_names() const {
    if (dims.activation == proto::SWIGLU) return {"w_gate", "w_up", "w_down"};
    return {"w_up", "b_up", "w_down", "b_down"};
  }
  // forward + backward from zeroed grads; y, dx pre-filled with the sentinel
  void run(Vec& y, Vec& dx) {
    ps.zero_grad();
    y.assign(rows * dims.d_model, kSentinel);
    dx.assign(rows * dims.d_model, kSentinel);
    bank->forward(y.data(), x.data(), offsets.data());
    bank->backward(dx.data(), dy.data());
  }
};

Vec values(const Param& p) { return p.value.to_float_vector(); }
Vec grads(const Param& p) { return p.grad.to_float_vector(); }

// ================================================================== against PyTorch
TEST(ExpertBank, VsTorch) {
  struct Case {
    proto::Activation act;
    int C, F;
    std::vector<int64_t> counts;
  };
  const std::vector<Case> cases = {
      {proto::SWIGLU, 16, 24, {5, 0, 13, 1, 0, 7, 3, 9}},
      {proto::GELU, 16, 24, {5, 0, 13, 1, 0, 7, 3, 9}},
      {proto::SWIGLU, 12, 20, {0, 4, 0, 0, 17, 2, 6, 0}},  // first and last experts empty
      {proto::GELU, 12, 20, {0, 4, 0, 0, 17, 2, 6, 0}},
      {proto::SWIGLU, 16, 40, {11}},  // E = 1
      {proto::GELU, 16, 40, {11}},
  };
  TempDir td;
  std::vector<std::unique_ptr<BankCase>> setups;
  std::vector<Vec> ys(cases.size()), dxs(cases.size());
  std::vector<std::string> args;
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    setups.push_back(std::make_unique<BankCase>(c.act, c.C, c.F, c.counts, 100 + i));
    BankCase& s = *setups.back();
    s.run(ys[i], dxs[i]);
    const std::string dir = td.file("job" + std::to_string(i));
    std::filesystem::create_directories(dir);
    const int64_t E = c.counts.size();
    write_npy(dir + "/x.npy", s.x.data(), {s.rows, c.C});
    write_npy(dir + "/dy.npy", s.dy.data(), {s.rows, c.C});
    std::vector<int32_t> off32(s.offsets.begin(), s.offsets.end());
    write_npy(dir + "/offsets.npy", off32.data(), {E + 1});
    for (const std::string& n : s.param_names())
      write_npy(dir + "/" + n + ".npy", values(s.p(n)).data(), s.p(n).value.shape());
    if (!args.empty()) args.push_back("+");
    args.insert(args.end(), {dir, act_name(c.act)});
  }
  ASSERT_TRUE(run_oracle("experts.py", args));

  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    BankCase& s = *setups[i];
    SCOPED_TRACE(std::string(act_name(c.act)) + " E=" + std::to_string(c.counts.size()) + " job" + std::to_string(i));
    const std::string dir = td.file("job" + std::to_string(i));
    auto ref = [&](const std::string& name, size_t n) {
      NpyArray a = read_npy(dir + "/" + name + ".npy");
      EXPECT_EQ(a.f.size(), n) << "oracle output " << name;
      if (a.f.size() != n) a.f.assign(n, std::numeric_limits<float>::quiet_NaN());
      return a.f;
    };
    EXPECT_LE(max_rel_err(ys[i], ref("y", ys[i].size())), kTol) << "y";
    EXPECT_LE(max_rel_err(dxs[i], ref("dx", dxs[i].size())), kTol) << "dx";
    for (const std::string& n : s.param_names()) {
      const Vec g = grads(s.p(n));
      const Vec r = ref("d" + n, g.size());
      const int64_t per = g.size() / c.counts.size();  // one expert's slice
      for (size_t e = 0; e < c.counts.size(); ++e) {
        const float* ge = g.data() + e * per;
        if (c.counts[e] == 0) {
          int nonzero = 0;
          for (int64_t k = 0; k < per; ++k) nonzero += ge[k] != 0.0f;
          EXPECT_EQ(nonzero, 0) << "d" << n << " of empty expert " << e;
        } else {
          EXPECT_LE(max_rel_err(ge, r.data() + e * per, per), kTol) << "d" << n << " expert " << e;
        }
      }
    }
  }
}

// ================================================================== E = 1 is DenseFfn
void one_expert_is_dense_ffn() {
  for (proto::Activation act : {proto::SWIGLU, proto::GELU}) {
    SCOPED_TRACE(act_name(act));
    const int C = 24, F = 56;
    BankCase s(act, C, F, {37}, 7);
    ParamStore dps;
    Workspace dws{cpu_backend()};
    DenseFfn dense(dps, dws, "ffn", C, F, act);
    for (const std::string& n : s.param_names()) {
      Param& dp = dps.get("ffn." + n);
      ASSERT_EQ(dp.value.numel(), s.p(n).value.numel()) << n;
      const Vec v = values(s.p(n));
      std::copy(v.begin(), v.end(), dp.value.f32());
    }
    Vec y, dx;
    s.run(y, dx);
    const int N = static_cast<int>(s.rows);
    Vec dy_dense(N * C), dx_dense(N * C);
    dps.zero_grad();
    FfnContext ctx;
    dense.forward(ctx, dy_dense.data(), s.x.data(), N);
    EXPECT_LE(max_rel_err(y, dy_dense), kSameMath) << "y";
    dense.backward(ctx, dx_dense.data(), s.dy.data(), N);
    EXPECT_LE(max_rel_err(dx, dx_dense), kSameMath) << "dx";
    for (const std::string& n : s.param_names())
      EXPECT_LE(max_rel_err(grads(s.p(n)), grads(dps.get("ffn." + n))), kSameMath) << "d" << n;
  }
}

// ================================================================== both threading paths vs one DenseFfn per expert
// Many small experts: with 4 threads the bank runs experts in parallel, with 1 thread in series. Two steps of
// different sizes (the second smaller) also exercise the reuse of the activation buffers.
void threading_paths_match_dense_ffns() {
  for (proto::Activation act : {proto::SWIGLU, proto::GELU}) {
    const int C = 32, F = 64, E = 16;  // every expert's GEMM small enough for the parallel path
    ParamStore ps;
    Workspace ws{cpu_backend()};
    ExpertBank bank(ps, ws, "blk", {E, C, F, act});
    Rng rng(11);
    fill_weights(ps, rng, 0.4f, 0.3f);
    const std::vector<std::string> names =
        act == proto::SWIGLU ? std::vector<std::string>{"w_gate", "w_up", "w_down"}
                             : std::vector<std::string>{"w_up", "b_up", "w_down", "b_down"};
    for (const char* b : {"blk.b_up", "blk.b_down"})
      if (Param* p = ps.find(b)) {
        Vec v = randn(rng, p->value.numel(), 0.1f);
        std::copy(v.begin(), v.end(), p->value.f32());
      }
    // the reference: one DenseFfn per expert holding that expert's slices
    std::vector<std::unique_ptr<ParamStore>> dps;
    std::vector<std::unique_ptr<DenseFfn>> dense;
    for (int e = 0; e < E; ++e) {
      dps.push_back(std::make_unique<ParamStore>());
      dense.push_back(std::make_unique<DenseFfn>(*dps.back(), ws, "ffn", C, F, act));
      for (const std::string& n : names) {
        Param& src = ps.get("blk." + n);
        Param& dst = dps.back()->get("ffn." + n);
        const int64_t per = src.value.numel() / E;
        std::copy(src.value.f32() + e * per, src.value.f32() + (e + 1) * per, dst.value.f32());
      }
    }
    for (int step = 0; step < 2; ++step) {
      std::vector<int64_t> counts(E);
      for (int e = 0; e < E; ++e) counts[e] = (e % 5 == 3) ? 0 : int64_t(rng.below(step == 0 ? 64 : 20));
      const std::vector<int64_t> off = offsets_of(counts);
      const int64_t rows = off.back();
      const Vec x = randn(rng, rows * C), dy = randn(rng, rows * C);
      // reference
      Vec y_ref(rows * C), dx_ref(rows * C);
      std::vector<Vec> g_ref(names.size());
      for (size_t k = 0; k < names.size(); ++k) g_ref[k].assign(ps.get("blk." + names[k]).value.numel(), 0.0f);
      for (int e = 0; e < E; ++e) {
        const int n = static_cast<int>(counts[e]);
        if (n == 0) continue;
        dps[e]->zero_grad();
        FfnContext ctx;
        dense[e]->forward(ctx, y_ref.data() + off[e] * C, x.data() + off[e] * C, n);
        dense[e]->backward(ctx, dx_ref.data() + off[e] * C, dy.data() + off[e] * C, n);
        for (size_t k = 0; k < names.size(); ++k) {
          const Param& g = dps[e]->get("ffn." + names[k]);
          std::copy(g.grad.f32(), g.grad.f32() + g.grad.numel(), g_ref[k].data() + e * g.grad.numel());
        }
      }
      // the parallel path repeated: a race on shared scratch shows up only now and then
      for (int threads : {4, 4, 4, 4, 1}) {
        SCOPED_TRACE(std::string(act_name(act)) + " step " + std::to_string(step) + " threads " +
                     std::to_string(threads));
        ThreadScope ts(threads);
        ps.zero_grad();
        Vec y(rows * C, kSentinel), dx(rows * C, kSentinel);
        bank.forward(y.data(), x.data(), off.data());
        bank.backward(dx.data(), dy.data());
        ASSERT_LE(max_rel_err(y, y_ref), kSameMath) << "y";
        ASSERT_LE(max_rel_err(dx, dx_ref), kSameMath) << "dx";
        for (size_t k = 0; k < names.size(); ++k)
          ASSERT_LE(max_rel_err(grads(ps.get("blk." + names[k])), g_ref[k]), kSameMath) << "d" << names[k];
      }
    }
  }
}

// ================================================================== accumulate / write conventions
void backward_accumulates() {
  for (proto::Activation act : {proto::SWIGLU, proto::GELU}) {
    SCOPED_TRACE(act_name(act));
    const std::vector<int64_t> counts = {3, 0, 6, 0, 2};
    BankCase s(act, 10, 14, counts, 21);
    Vec y0, dx0;
    s.run(y0, dx0);  // G: the grads from zero
    std::vector<Vec> g0, pre;
    Rng rng(5);
    for (const std::string& n : s.param_names()) {
      g0.push_back(grads(s.p(n)));
      pre.push_back(randn(rng, s.p(n).grad.numel()));
      std::copy(pre.back().begin(), pre.back().end(), s.p(n).grad.f32());
    }
    Vec y(s.rows * 10, kSentinel), dx(s.rows * 10, kSentinel);
    s.bank->forward(y.data(), s.x.data(), s.offsets.data());
    s.bank->backward(dx.data(), s.dy.data());
    EXPECT_EQ(y, y0);    // written, not accumulated
    EXPECT_EQ(dx, dx0);  // written
    EXPECT_THROW(s.bank->backward(dx.data(), s.dy.data()), Error);  // activations consumed
    const auto names = s.param_names();
    for (size_t k = 0; k < names.size(); ++k) {
      const Vec g = grads(s.p(names[k]));
      const int64_t per = g.size() / counts.size();
      for (size_t e = 0; e < counts.size(); ++e)
        for (int64_t j = e * per; j < int64_t(e + 1) * per; ++j) {
          if (counts[e] == 0) {
            ASSERT_EQ(g[j], pre[k][j]) << "d" << names[k] << " of empty expert " << e << " touched";
          } else {
            ASSERT_NEAR(g[j], pre[k][j] + g0[k][j], 1e-5 * (1 + std::fabs(pre[k][j]))) << "d" << names[k];
          }
        }
    }
  }
}

// ================================================================== parameters, init, errors
void registers_params() {
  ParamStore sw, ge;
  Workspace ws{cpu_backend()};
  ExpertBank a(sw, ws, "l0.experts", {4, 6, 10, proto::SWIGLU});
  ExpertBank b(ge, ws, "l1.experts", {3, 6, 10, proto::GELU, /*first_expert=*/3});
  EXPECT_EQ(a.dims().num_local_experts, 4);
  EXPECT_EQ(b.dims().activation, proto::GELU);
  ASSERT_EQ(sw.all().size(), 3u);
  EXPECT_EQ(sw.get("l0.experts.w_gate").value.shape(), (Shape{4, 10, 6}));
  EXPECT_EQ(sw.get("l0.experts.w_up").value.shape(), (Shape{4, 10, 6}));
  EXPECT_EQ(sw.get("l0.experts.w_down").value.shape(), (Shape{4, 6, 10}));
  ASSERT_EQ(ge.all().size(), 4u);
  EXPECT_EQ(ge.find("l1.experts.w_gate"), nullptr);
  EXPECT_EQ(ge.get("l1.experts.w_up").value.shape(), (Shape{3, 10, 6}));
  EXPECT_EQ(ge.get("l1.experts.b_up").value.shape(), (Shape{3, 10}));
  EXPECT_EQ(ge.get("l1.experts.w_down").value.shape(), (Shape{3, 6, 10}));
  EXPECT_EQ(ge.get("l1.experts.b_down").value.shape(), (Shape{3, 6}));
  for (ParamStore* ps : {&sw, &ge})
    for (const Param* p : ps->all()) {
      EXPECT_TRUE(p->expert_sharded) << p->name;
      EXPECT_EQ(p->first_row, ps == &sw ? 0 : 3) << p->name;
      EXPECT_EQ(p->decay, p->value.ndim() == 3) << p->name;  // matrices decay, biases do not
    }
}

// init_params draws expert rows by GLOBAL expert id: a rank holding experts 3..5 gets exactly rows 3..5 of a
// rank holding all six, whatever the thread count; matrices get the requested spread, biases 0.
void init_weights_per_expert() {
  const int C = 32, F = 48;
  auto init = [&](int E, int threads, int first) {
    ThreadScope ts(threads);
    auto ps = std::make_unique<ParamStore>();
    Workspace ws{cpu_backend()};
    ExpertBank bank(*ps, ws, "b", {E, C, F, proto::GELU, first});
    ps->get("b.b_up").value.fill_(1.0f);
    init_params(*ps, 99, 0.02f, 0.01f);
    EXPECT_EQ(ps->get("b.b_up").value.to_float_vector(), Vec(E * F, 0.0f)) << "biases zeroed";
    return ps;
  };
  auto three = init(3, 1, 0), six = init(6, 4, 0), last_three = init(3, 2, 3);
  const int64_t FC = int64_t(F) * C;
  for (const char* n : {"b.w_up", "b.w_down"}) {
    const Vec a = three->get(n).value.to_float_vector(), b = six->get(n).value.to_float_vector();
    const Vec a2 = last_three->get(n).value.to_float_vector();
    EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin())) << n;
    EXPECT_TRUE(std::equal(a2.begin(), a2.end(), b.begin() + 3 * FC)) << n;
    EXPECT_NE(Vec(b.begin(), b.begin() + FC), Vec(b.begin() + FC, b.begin() + 2 * FC)) << n;
    double ss = 0, sum = 0;
    for (float v : b) ss += double(v) * v, sum += v;
    const double want = std::string(n) == "b.w_up" ? 0.02 : 0.01;
    EXPECT_NEAR(std::sqrt(ss / b.size()), want, 0.05 * want) << n;
    EXPECT_NEAR(sum / b.size(), 0.0, 0.05 * want) << n;
  }
  // SwiGLU also fills w_gate (its own stream: not a copy of w_up)
  ParamStore ps;
  Workspace ws{cpu_backend()};
  ExpertBank sw(ps, ws, "s", {2, C, F, proto::SWIGLU});
  init_params(ps, 3, 0.5f, 0.5f);
  EXPECT_NE(ps.get("s.w_gate").value.to_float_vector(), ps.get("s.w_up").value.to_float_vector());
  EXPECT_NE(ps.get("s.w_gate").value.to_float_vector(), Vec(2 * FC, 0.0f));
}

void rejects_bad_input() {
  ParamStore ps;
  Workspace ws{cpu_backend()};
  EXPECT_THROW(ExpertBank(ps, ws, "z", {0, 4, 4, proto::SWIGLU}), Error);
  ExpertBank bank(ps, ws, "b", {3, 4, 5, proto::SWIGLU});
  Vec x(40, 1.0f), y(40), dx(40);
  const int64_t bad_start[] = {1, 2, 3, 4};
  const int64_t decreasing[] = {0, 5, 3, 8};
  EXPECT_THROW(bank.forward(y.data(), x.data(), bad_start), Error);
  EXPECT_THROW(bank.forward(y.data(), x.data(), decreasing), Error);
  EXPECT_THROW(bank.backward(dx.data(), x.data()), Error);  // no forward yet
  // no rows at all: nothing to do, grads stay zero
  const int64_t empty[] = {0, 0, 0, 0};
  ps.zero_grad();
  bank.forward(y.data(), x.data(), empty);
  bank.backward(dx.data(), x.data());
  for (const Param* p : ps.all())
    for (float g : p->grad.to_float_vector()) ASSERT_EQ(g, 0.0f) << p->name;
}

// ================================================================== the grouped-GEMM schedule (a GPU's) on the CPU
// The schedule a device runs (one grouped GEMM per weight matrix, the activations over all rows, the biases as a row
// gather-add and a grouped GEMM of ones) computes what the group-by-group one computes: y, dx and every gradient
// within float rounding (different summation orders), for SwiGLU experts, biased GELU experts, and a row-sparse
// table (word experts: the same slots touched). Groups in shuffled slot order, with an empty one.
void grouped_schedule_matches_per_group() {
  const int C = 12, F = 20;
  const std::vector<int64_t> slots = {5, 0, 3, 6, 2}, counts = {7, 1, 0, 11, 4};
  const std::vector<int64_t> offsets = offsets_of(counts);
  const int64_t rows = offsets.back();
  struct Variant {
    proto::Activation act;
    bool biases, row_sparse;
  };
  for (const Variant& v : {Variant{proto::SWIGLU, false, false}, Variant{proto::GELU, true, false},
                           Variant{proto::SWIGLU, false, true}}) {
    ParamStore ps;
    Workspace ws{cpu_backend()};
    FfnWeights w;
    auto add = [&](const char* name, Shape shape) {
      return ps.add_expert(name, shape, true, Init::kNormal, 0, v.row_sparse && shape.size() == 3);
    };
    if (v.act == proto::SWIGLU) w.w_gate = add("w_gate", {8, F, C});
    w.w_up = add("w_up", {8, F, C});
    w.w_down = add("w_down", {8, C, F});
    if (v.biases) {
      w.b_up = add("b_up", {8, F});
      w.b_down = add("b_down", {8, C});
    }
    Rng rng(31);
    for (Param* p : ps.all()) {
      const Vec r = randn(rng, p->value.numel(), 0.3f);
      std::copy(r.begin(), r.end(), p->value.f32());
    }
    const Vec x = randn(rng, rows * C), dy = randn(rng, rows * C);
    GroupedFfn ffn(ws, C, F, v.act, w);
    std::map<std::string, Vec> got[2];
    std::vector<int64_t> touched[2];
    for (int k = 0; k < 2; ++k) {
      ffn.set_schedule(k == 0 ? GroupedFfn::Schedule::kPerGroup : GroupedFfn::Schedule::kGrouped);
      ps.zero_grad();
      Vec y(rows * C, kSentinel), dx(rows * C, kSentinel);
      ffn.forward(y.data(), x.data(), slots.data(), offsets.data(), static_cast<int64_t>(slots.size()));
      ffn.backward(dx.data(), dy.data());
      got[k]["y"] = y;
      got[k]["dx"] = dx;
      for (const Param* p : ps.all()) got[k][p->name] = grads(*p);
      touched[k] = w.w_up->touched;
      std::sort(touched[k].begin(), touched[k].end());
    }
    const std::string what = std::string(act_name(v.act)) + (v.biases ? " with biases" : "") +
                             (v.row_sparse ? " row-sparse" : "");
    for (const auto& [name, ref] : got[0]) EXPECT_LE(max_rel_err(got[1].at(name), ref), kTol) << what << ": " << name;
    EXPECT_EQ(touched[1], touched[0]) << what;
    if (v.row_sparse) {
      EXPECT_EQ(touched[1], (std::vector<int64_t>{0, 2, 5, 6})) << what;
    }
  }
}

// Few test processes: each start of unit_tests costs ~0.4 s here, and the suite must stay under 5 s.
TEST(ExpertBank, MatchesDenseFfn) {
  one_expert_is_dense_ffn();
  threading_paths_match_dense_ffns();
}

TEST(ExpertBank, GroupedScheduleMatchesPerGroup) { grouped_schedule_matches_per_group(); }

TEST(ExpertBank, BackwardConventions) {
  backward_accumulates();
  rejects_bad_input();
}

TEST(ExpertBank, ParamsAndInit) {
  registers_params();
  init_weights_per_expert();
}

}  // namespace
}  // namespace moe::test
