// Word-expert table tests (experts/word_experts.h):
//   WordExperts.VsTorch              forward, dx and table gradients of both activations against the float64
//                                    PyTorch oracle (tests/oracle/word_experts.py); unused rows' gradients exactly 0,
//                                    touched rows = experts of non-empty groups; backward accumulates (+=);
//   WordExperts.AdamWTouchesOnlyUsedRows  a 65,536-expert table trained with AdamW: unused rows bit-identical with
//                                    zero moments and step counts, used rows moved, loss decreases;
//   WordExperts.FewRowKernelsMatchDenseSlots  a row-sparse table at shapes that take the small-dimension kernels
//                                    (Backend::matmul_few_rows) against the same slots as dense params (sgemm):
//                                    y, dx and gradients within float reassociation;
//   WordExperts.FrozenTable          a frozen table (Param::frozen) trained with AdamW, weight decay and clipping
//                                    for several steps: values bit-for-bit unchanged, no gradient, no touched rows,
//                                    no moments, while a bias beside it moves; dx bit-for-bit the unfrozen table's;
//                                    freezing one matrix leaves the other two's gradients bit-for-bit as unfrozen;
//   WordExperts.StepCostIndependentOfTableSize  forward+backward+zero_grad+AdamW at E = 1,024 vs 131,072;
//   WordExperts.RejectsBadGroups     malformed group layouts throw moe::Error.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <limits>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/grouped_ffn.h"
#include "core/kernels/cpu/kernels.h"
#include "core/optimizer.h"
#include "core/params.h"
#include "experts/moe_layer.h"
#include "experts/word_experts.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

using experts::WordExpertDims;
using experts::WordExpertTable;
using Vec = std::vector<float>;
using I64 = std::vector<int64_t>;

constexpr double kTol = 1e-5;       // f32 vs f64 oracle, relative to the reference's largest magnitude
constexpr float kSentinel = 1e30f;  // pre-fills outputs that must be written (=)

I64 offsets_of(const I64& sizes) {
  I64 off{0};
  for (int64_t s : sizes) off.push_back(off.back() + s);
  return off;
}

// The table's params in a fixed order with their oracle names.
std::vector<std::pair<std::string, Param*>> tables(const WordExpertTable& t) {
  std::vector<std::pair<std::string, Param*>> r;
  if (t.w_gate()) r.push_back({"w_gate", t.w_gate()});
  r.push_back({"w_up", t.w_up()});
  r.push_back({"w_down", t.w_down()});
  return r;
}

proto::OptimizerConfig adamw_config(float weight_decay) {
  proto::OptimizerConfig oc;
  oc.set_beta1(0.9f);
  oc.set_beta2(0.95f);
  oc.set_eps(1e-8f);
  oc.set_weight_decay(weight_decay);
  return oc;
}

// ------------------------------------------------------------------ vs PyTorch
struct OracleCase {
  proto::Activation act;
  std::string name;
};

TEST(WordExperts, VsTorch) {
  const int64_t E = 40;
  const int C = 32, F = 16;
  // distinct experts in no particular order, first and last row of the table, one empty group (expert 25),
  // a single-row group; rows * F * C = 54 * 512 takes the OpenMP path
  const I64 group_experts{17, 3, 39, 0, 25, 8};
  const I64 sizes{5, 1, 4, 33, 0, 11};
  const I64 offsets = offsets_of(sizes);
  const int64_t G = group_experts.size(), rows = offsets.back();
  const std::set<int64_t> used{17, 3, 39, 0, 8};

  const std::vector<OracleCase> cases{{proto::SWIGLU, "swiglu"}, {proto::GELU, "gelu"}};
  TempDir td;
  Rng rng(1234);
  std::vector<std::string> args;
  struct Result {
    ParamStore ps;
    Workspace ws{cpu_backend()};
    std::unique_ptr<WordExpertTable> table;
    Vec x, dy, y, dx;
    std::string dir;
  };
  std::vector<std::unique_ptr<Result>> results;
  for (const auto& c : cases) {
    auto r = std::make_unique<Result>();
    r->dir = td.file(c.name);
    std::filesystem::create_directories(r->dir);
    r->table = std::make_unique<WordExpertTable>(r->ps, r->ws, "we", WordExpertDims{E, C, F, c.act});
    fill_weights(r->ps, rng, 0.3f, 0.2f);
    r->x = randn(rng, rows * C);
    r->dy = randn(rng, rows * C);
    r->y.assign(rows * C, kSentinel);
    r->dx.assign(rows * C, kSentinel);
    r->table->forward(r->y.data(), r->x.data(), group_experts.data(), offsets.data(), G);
    r->table->backward(r->dx.data(), r->dy.data());

    write_npy(r->dir + "/x.npy", r->x.data(), {rows, C});
    write_npy(r->dir + "/dy.npy", r->dy.data(), {rows, C});
    std::vector<int32_t> e32(group_experts.begin(), group_experts.end()), o32(offsets.begin(), offsets.end());
    write_npy(r->dir + "/experts.npy", e32.data(), {G});
    write_npy(r->dir + "/offsets.npy", o32.data(), {G + 1});
    for (auto& [name, p] : tables(*r->table)) write_npy(r->dir + "/" + name + ".npy", p->value.f32(), p->value.shape());
    if (!args.empty()) args.push_back("+");
    args.push_back(c.name);
    args.push_back(r->dir);
    results.push_back(std::move(r));
  }
  ASSERT_TRUE(run_oracle("word_experts.py", args));

  for (size_t ci = 0; ci < cases.size(); ++ci) {
    SCOPED_TRACE(cases[ci].name);
    Result& r = *results[ci];
    auto get = [&](const std::string& name, size_t n) {
      NpyArray a = read_npy(r.dir + "/" + name + ".npy");
      EXPECT_EQ(a.f.size(), n) << name;
      if (a.f.size() != n) a.f.assign(n, std::numeric_limits<float>::quiet_NaN());
      return a.f;
    };
    std::ostringstream errs;
    const double err_y = max_rel_err(r.y, get("y", rows * C)), err_dx = max_rel_err(r.dx, get("dx", rows * C));
    errs << "y " << err_y << ", dx " << err_dx;
    EXPECT_LT(err_y, kTol) << "y";
    EXPECT_LT(err_dx, kTol) << "dx";
    for (auto& [name, p] : tables(*r.table)) {
      SCOPED_TRACE(name);
      EXPECT_TRUE(p->row_sparse);
      EXPECT_TRUE(p->expert_sharded);
      EXPECT_EQ(p->value.dim(0), E);
      const int64_t rs = p->row_size();
      ASSERT_EQ(rs, int64_t(F) * C);
      const Vec ref = get("d" + name, E * rs);
      const float* g = p->grad.f32();
      Vec mine_used, ref_used;
      for (int64_t e = 0; e < E; ++e) {
        if (used.count(e)) {
          mine_used.insert(mine_used.end(), g + e * rs, g + (e + 1) * rs);
          ref_used.insert(ref_used.end(), ref.begin() + e * rs, ref.begin() + (e + 1) * rs);
        } else {
          for (int64_t j = 0; j < rs; ++j) ASSERT_EQ(g[e * rs + j], 0.0f) << "unused row " << e << " element " << j;
        }
      }
      const double err = max_rel_err(mine_used, ref_used);
      errs << ", d" << name << " " << err;
      EXPECT_LT(err, kTol) << "d" << name << " (used rows)";
      EXPECT_EQ(std::set<int64_t>(p->touched.begin(), p->touched.end()), used) << "touched rows";
      for (int64_t e = 0; e < E; ++e) EXPECT_EQ(p->touched_mask[e], used.count(e) ? 1 : 0) << "row " << e;
    }

    std::cout << "[ WordExperts ] " << cases[ci].name << " max rel err vs torch: " << errs.str() << "\n";

    // a second forward/backward of the same batch accumulates: every gradient doubles exactly; y, dx unchanged
    std::vector<Vec> before;
    for (auto& [name, p] : tables(*r.table)) before.emplace_back(p->grad.f32(), p->grad.f32() + p->grad.numel());
    Vec y2(rows * C, kSentinel), dx2(rows * C, kSentinel);
    r.table->forward(y2.data(), r.x.data(), group_experts.data(), offsets.data(), G);
    r.table->backward(dx2.data(), r.dy.data());
    EXPECT_EQ(y2, r.y);
    EXPECT_EQ(dx2, r.dx);
    size_t ti = 0;
    for (auto& [name, p] : tables(*r.table)) {
      const Vec& b = before[ti++];
      for (int64_t i = 0; i < p->grad.numel(); ++i) ASSERT_EQ(p->grad.f32()[i], 2.0f * b[i]) << name << " at " << i;
      EXPECT_EQ(p->touched.size(), used.size()) << name;
    }
    r.ps.zero_grad();
    for (auto& [name, p] : tables(*r.table)) {
      EXPECT_TRUE(p->touched.empty());
      EXPECT_EQ(cpu::sum_squares(p->grad.f32(), p->grad.numel()), 0.0) << name;
    }
  }
}

// ------------------------------------------------------------------ lazy AdamW on a big table
struct Batch {
  I64 experts, offsets;
  Vec x, target;
  int64_t rows() const { return offsets.back(); }
};

Batch make_batch(Rng& rng, I64 experts, const I64& sizes, int C) {
  Batch b;
  b.experts = std::move(experts);
  b.offsets = offsets_of(sizes);
  b.x = randn(rng, b.rows() * C);
  b.target = randn(rng, b.rows() * C, 0.5f);
  return b;
}

// loss = 0.5 sum (y - target)^2; fills dy = y - target
double loss_of(WordExpertTable& t, const Batch& b, Vec& y, Vec& dy) {
  const int C = t.dims().d_model;
  y.assign(b.rows() * C, kSentinel);
  dy.resize(b.rows() * C);
  t.forward(y.data(), b.x.data(), b.experts.data(), b.offsets.data(), int64_t(b.experts.size()));
  double loss = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    dy[i] = y[i] - b.target[i];
    loss += 0.5 * double(dy[i]) * dy[i];
  }
  return loss;
}

TEST(WordExperts, AdamWTouchesOnlyUsedRows) {
  const int64_t E = 65536;
  // 65,536 x 16 floats = 4 MiB per tensor: 3 tables x (value, grad, m, v, initial copy) = 60 MiB
  const int C = 4, F = 4;
  ParamStore ps;
  Workspace ws{cpu_backend()};
  WordExpertTable table(ps, ws, "mowe", WordExpertDims{E, C, F, proto::SWIGLU});
  Rng rng(7);
  fill_weights(ps, rng, 0.5f, 0.5f);
  std::vector<Tensor> init;
  for (auto& [name, p] : tables(table)) init.push_back(p->value.clone());

  // two batches sharing experts 12345 and 65535; expert 4242 only ever appears in an empty group
  std::vector<Batch> batches;
  batches.push_back(make_batch(rng, {0, 65535, 12345, 40000, 4242, 777}, {3, 1, 8, 2, 0, 5}, C));
  batches.push_back(make_batch(rng, {31000, 12345, 65535, 9}, {4, 2, 6, 1}, C));
  std::vector<int> uses(E, 0);  // steps in which each row was used (test-side bookkeeping)

  AdamW opt(ps, adamw_config(/*weight_decay=*/0.1f));
  Vec y, dy, dx;
  std::vector<double> first(batches.size()), last(batches.size());
  const int steps = 20;
  for (int s = 0; s < steps; ++s) {
    const Batch& b = batches[s % 2];
    const double loss = loss_of(table, b, y, dy);
    if (s < 2) first[s % 2] = loss;
    dx.assign(b.rows() * C, kSentinel);
    table.backward(dx.data(), dy.data());
    for (size_t g = 0; g < b.experts.size(); ++g)
      if (b.offsets[g + 1] > b.offsets[g]) ++uses[b.experts[g]];
    opt.step(0.02f);
    ps.zero_grad();
  }
  for (size_t i = 0; i < batches.size(); ++i) {
    last[i] = loss_of(table, batches[i], y, dy);
    std::cout << "[ WordExperts ] batch " << i << " loss " << first[i] << " -> " << last[i] << "\n";
    EXPECT_LT(last[i], 0.7 * first[i]) << "batch " << i;
  }

  int64_t n_used = 0;
  size_t pi = 0;
  for (auto& [name, p] : tables(table)) {
    SCOPED_TRACE(name);
    const int64_t rs = p->row_size();
    const float* w = p->value.f32();
    const float* w0 = init[pi].f32();
    size_t slot = 0;
    while (ps.all()[slot] != p) ++slot;
    const float* m = opt.m()[slot].f32();
    const float* v = opt.v()[slot].f32();
    const int32_t* rt = opt.row_t()[slot].i32();
    EXPECT_TRUE(p->touched.empty());
    int64_t bad_unused = 0, bad_used = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = e * rs;
      if (uses[e] == 0) {
        const float* g = p->grad.f32() + o;
        bool same = std::memcmp(w + o, w0 + o, rs * sizeof(float)) == 0 && rt[e] == 0;
        for (int64_t j = 0; j < rs; ++j) same = same && m[o + j] == 0.0f && v[o + j] == 0.0f && g[j] == 0.0f;
        bad_unused += !same;
      } else {
        n_used += (pi == 0);
        bool moved = false;
        for (int64_t j = 0; j < rs; ++j) moved = moved || w[o + j] != w0[o + j];
        bad_used += !moved;
        EXPECT_EQ(rt[e], uses[e]) << "lazy step count of row " << e;
      }
    }
    EXPECT_EQ(bad_unused, 0) << "unused rows changed (value, moments, step count or grad)";
    EXPECT_EQ(bad_used, 0) << "used rows that did not move";
    ++pi;
  }
  EXPECT_EQ(n_used, 7);  // 0 65535 12345 40000 777 31000 9 (4242 was only ever in an empty group)
}

// ------------------------------------------------------------------ the small-dimension kernels in the table
TEST(WordExperts, FewRowKernelsMatchDenseSlots) {
  const int64_t S = 12;
  const int C = 64, F = 96;  // >= 64: groups of 1-6 rows take every small kernel, 9-40 rows some, 70 none
  const I64 slots{4, 0, 11, 7, 2, 9, 5};
  const I64 sizes{1, 3, 6, 9, 17, 40, 70};
  const I64 offsets = offsets_of(sizes);
  const int64_t rows = offsets.back(), G = int64_t(slots.size());
  struct Setup {
    ParamStore ps;
    Workspace ws{cpu_backend()};
    FfnWeights w;
    std::unique_ptr<GroupedFfn> ffn;
  };
  Setup sparse, dense;
  for (Setup* st : {&sparse, &dense}) {
    const bool rs = st == &sparse;
    auto add = [&](const char* name, const Shape& shape) {
      return rs ? st->ps.add_expert(name, shape, true, Init::kNormal, 0, /*row_sparse=*/true)
                : st->ps.add(name, shape, true);
    };
    st->w = {add("w_gate", {S, F, C}), add("w_up", {S, F, C}), nullptr, add("w_down", {S, C, F}), nullptr};
    Rng rng(77);
    fill_weights(st->ps, rng, 0.2f, 0.2f);
    st->ffn = std::make_unique<GroupedFfn>(st->ws, C, F, proto::SWIGLU, st->w);
  }
  Rng rng(78);
  const Vec x = randn(rng, rows * C), dy = randn(rng, rows * C);
  Vec y[2], dx[2];
  int i = 0;
  for (Setup* st : {&sparse, &dense}) {
    y[i].assign(rows * C, kSentinel);
    dx[i].assign(rows * C, kSentinel);
    st->ffn->forward(y[i].data(), x.data(), slots.data(), offsets.data(), G);
    st->ffn->backward(dx[i].data(), dy.data());
    ++i;
  }
  EXPECT_LT(max_rel_err(y[0], y[1]), kTol);
  EXPECT_LT(max_rel_err(dx[0], dx[1]), kTol);
  for (auto [a, b] : {std::pair{sparse.w.w_gate, dense.w.w_gate}, {sparse.w.w_up, dense.w.w_up},
                      {sparse.w.w_down, dense.w.w_down}}) {
    const Vec ga(a->grad.f32(), a->grad.f32() + a->grad.numel()), gb(b->grad.f32(), b->grad.f32() + b->grad.numel());
    EXPECT_LT(max_rel_err(ga, gb), kTol) << a->name;
    EXPECT_EQ(a->touched.size(), slots.size()) << a->name;
  }
  // the small kernels did run: the row-sparse results are not bit for bit sgemm's
  EXPECT_NE(y[0], y[1]);
}

// ------------------------------------------------------------------ frozen tables
// b: a live param beside the table, given the gradient of a bias added to y (db = sum over rows of dy)
void add_bias_grad(Param& b, const Vec& dy, int C) {
  for (size_t i = 0; i < dy.size(); ++i) b.grad.f32()[i % C] += dy[i];
}

TEST(WordExperts, FrozenTable) {
  const int64_t E = 50;
  const int C = 16, F = 8;
  struct Setup {
    ParamStore ps;
    Workspace ws{cpu_backend()};
    std::unique_ptr<WordExpertTable> table;
    Param* bias = nullptr;
  };
  // frozen: every matrix frozen; live: none (never stepped, so its weights stay those of the frozen one);
  // half: only w_down frozen
  Setup frozen, live, half;
  for (Setup* s : {&frozen, &live, &half}) {
    s->table = std::make_unique<WordExpertTable>(s->ps, s->ws, "we", WordExpertDims{E, C, F, proto::SWIGLU});
    s->bias = s->ps.add("bias", {C}, /*decay=*/false, Init::kZeros);
    Rng rng(31);
    fill_weights(s->ps, rng, 0.4f, 0.3f);
  }
  for (auto& [name, p] : tables(*frozen.table)) p->frozen = true;
  half.table->w_down()->frozen = true;
  std::vector<Tensor> init;
  for (auto& [name, p] : tables(*frozen.table)) init.push_back(p->value.clone());

  Rng rng(5);
  std::vector<Batch> batches;
  batches.push_back(make_batch(rng, {3, 49, 17, 0}, {4, 1, 6, 2}, C));
  batches.push_back(make_batch(rng, {17, 8, 3}, {3, 5, 2}, C));
  AdamW opt(frozen.ps, adamw_config(/*weight_decay=*/0.1f));
  const Vec bias0(frozen.bias->value.f32(), frozen.bias->value.f32() + C);
  Vec y, dy, dx_frozen, dx_live, dx_half;
  for (int s = 0; s < 6; ++s) {
    const Batch& b = batches[s % 2];
    for (Setup* st : {&frozen, &live, &half}) st->ps.zero_grad();
    loss_of(*frozen.table, b, y, dy);
    dx_frozen.assign(b.rows() * C, kSentinel);
    frozen.table->backward(dx_frozen.data(), dy.data());
    add_bias_grad(*frozen.bias, dy, C);
    // the same batch and dy through the unfrozen tables (weights equal to the frozen table's)
    for (Setup* st : {&live, &half}) {
      Vec y_other(b.rows() * C, kSentinel);
      st->table->forward(y_other.data(), b.x.data(), b.experts.data(), b.offsets.data(), int64_t(b.experts.size()));
      EXPECT_EQ(y_other, y) << "step " << s;
      Vec& dx = st == &live ? dx_live : dx_half;
      dx.assign(b.rows() * C, kSentinel);
      st->table->backward(dx.data(), dy.data());
    }
    EXPECT_EQ(dx_frozen, dx_live) << "dx through the frozen table, step " << s;
    EXPECT_EQ(dx_half, dx_live) << "dx with w_down frozen, step " << s;
    // no weight gradient, no touched rows: the norm is the bias's alone
    for (auto& [name, p] : tables(*frozen.table)) {
      EXPECT_TRUE(p->touched.empty()) << name;
      EXPECT_EQ(cpu::sum_squares(p->grad.f32(), p->grad.numel()), 0.0) << name;
    }
    const double norm = grad_norm(frozen.ps);
    EXPECT_DOUBLE_EQ(norm * norm, cpu::sum_squares(frozen.bias->grad.f32(), C)) << "step " << s;
    // half: w_gate and w_up exactly the live table's gradients; w_down none
    for (Param* p : {half.table->w_gate(), half.table->w_up()}) {
      const Param* q = live.ps.find(p->name);
      ASSERT_EQ(std::memcmp(p->grad.f32(), q->grad.f32(), p->grad.nbytes()), 0) << p->name << ", step " << s;
      EXPECT_EQ(p->touched.size(), b.experts.size());
    }
    EXPECT_TRUE(half.table->w_down()->touched.empty());
    EXPECT_EQ(cpu::sum_squares(half.table->w_down()->grad.f32(), half.table->w_down()->grad.numel()), 0.0);
    opt.step(0.05f, clip_scale(norm, 0.5));
  }
  size_t i = 0, slot = 0;
  for (auto& [name, p] : tables(*frozen.table)) {
    SCOPED_TRACE(name);
    EXPECT_EQ(std::memcmp(p->value.f32(), init[i++].f32(), p->value.nbytes()), 0) << "frozen values changed";
    while (frozen.ps.all()[slot] != p) ++slot;
    EXPECT_EQ(cpu::sum_squares(opt.m()[slot].f32(), p->value.numel()), 0.0) << "first moment";
    EXPECT_EQ(cpu::sum_squares(opt.v()[slot].f32(), p->value.numel()), 0.0) << "second moment";
    for (int64_t e = 0; e < E; ++e) ASSERT_EQ(opt.row_t()[slot].i32()[e], 0) << "step count of row " << e;
  }
  int moved = 0;
  for (int c = 0; c < C; ++c) moved += frozen.bias->value.f32()[c] != bias0[c];
  EXPECT_EQ(moved, C) << "the live bias beside the frozen table did not train";
}

// ------------------------------------------------------------------ step cost vs table size
TEST(WordExperts, StepCostIndependentOfTableSize) {
  const int C = 8, F = 4;
  const int64_t sizes_E[2] = {1024, 131072};  // GELU: 2 tables of 16 MiB at E=131,072; x4 with grads and moments
  Rng rng(99);
  // 8 experts below 1,024 (the same in both tables), 1..4 rows each: a step of tens of microseconds, so that even
  // one pass over one table (a 16 MiB memset, ~0.3 ms) would show as a ratio well above 3
  I64 group_experts, sizes;
  std::set<int64_t> seen;
  while (group_experts.size() < 8) {
    const int64_t e = int64_t(rng.below(1024));
    if (!seen.insert(e).second) continue;
    group_experts.push_back(e);
    sizes.push_back(1 + int64_t(rng.below(4)));
  }
  const I64 offsets = offsets_of(sizes);
  const int64_t rows = offsets.back(), G = group_experts.size();
  const Vec x = randn(rng, rows * C), dy = randn(rng, rows * C);

  struct Setup {
    ParamStore ps;
    Workspace ws{cpu_backend()};
    std::unique_ptr<WordExpertTable> table;
    std::unique_ptr<AdamW> opt;
  };
  Setup s[2];
  for (int i = 0; i < 2; ++i) {
    s[i].table = std::make_unique<WordExpertTable>(s[i].ps, s[i].ws, "mowe", WordExpertDims{sizes_E[i], C, F, proto::GELU});
    // the values do not change the cost; a random init of 8M values would take longer than the measurement
    for (auto& [name, p] : tables(*s[i].table)) p->value.fill_(0.05f);
    s[i].opt = std::make_unique<AdamW>(s[i].ps, adamw_config(0.1f));
  }
  Vec y(rows * C), dx(rows * C);
  auto step = [&](Setup& st) {
    const auto t0 = std::chrono::steady_clock::now();
    st.table->forward(y.data(), x.data(), group_experts.data(), offsets.data(), G);
    st.table->backward(dx.data(), dy.data());
    st.opt->step(1e-3f);
    st.ps.zero_grad();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  // One thread: the guard is about work, and on a loaded machine (ctest -j, builds beside it) the fork/join of a
  // 2-thread region can stall for a whole scheduler slice, which swamps a sub-millisecond step.
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  for (int w = 0; w < 3; ++w)
    for (auto& st : s) step(st);
  // interleaved, so background load hits both sizes alike; median of each
  const int reps = 31;
  std::vector<double> t[2];
  for (int r = 0; r < reps; ++r)
    for (int i = 0; i < 2; ++i) t[i].push_back(step(s[i]));
  omp_set_num_threads(threads);
  double med[2];
  for (int i = 0; i < 2; ++i) {
    std::sort(t[i].begin(), t[i].end());
    med[i] = t[i][reps / 2];
  }
  const double ratio = med[1] / med[0];
  std::cout << "[ WordExperts ] step (fwd+bwd+AdamW+zero_grad, " << G << " experts, " << rows << " rows): E=1024 "
            << med[0] * 1e6 << " us, E=131072 " << med[1] * 1e6 << " us, ratio " << ratio << "\n";
  RecordProperty("step_us_E1024", std::to_string(med[0] * 1e6));
  RecordProperty("step_us_E131072", std::to_string(med[1] * 1e6));
  EXPECT_LT(ratio, 3.0) << "step cost grows with the table size";
}

// ------------------------------------------------------------------ malformed layouts
TEST(WordExperts, RejectsBadGroups) {
  ParamStore ps;
  Workspace ws{cpu_backend()};
  WordExpertTable t(ps, ws, "we", WordExpertDims{10, 4, 2, proto::GELU});
  Vec x(8 * 4, 1.0f), y(8 * 4), dx(8 * 4);
  EXPECT_THROW(t.backward(dx.data(), x.data()), Error);  // no forward yet
  const I64 off{0, 3, 8};
  const I64 dup{2, 2}, out_of_range{2, 10}, negative{-1, 2};
  EXPECT_THROW(t.forward(y.data(), x.data(), dup.data(), off.data(), 2), Error);
  EXPECT_THROW(t.forward(y.data(), x.data(), out_of_range.data(), off.data(), 2), Error);
  EXPECT_THROW(t.forward(y.data(), x.data(), negative.data(), off.data(), 2), Error);
  const I64 ok{2, 7}, bad_start{1, 3, 8}, decreasing{0, 5, 3};
  EXPECT_THROW(t.forward(y.data(), x.data(), ok.data(), bad_start.data(), 2), Error);
  EXPECT_THROW(t.forward(y.data(), x.data(), ok.data(), decreasing.data(), 2), Error);
  EXPECT_NO_THROW(t.forward(y.data(), x.data(), ok.data(), off.data(), 2));
  EXPECT_THROW(WordExpertTable(ps, ws, "bad", WordExpertDims{0, 4, 2, proto::GELU}), Error);
  EXPECT_THROW(WordExpertTable(ps, ws, "we", WordExpertDims{10, 4, 2, proto::GELU}), Error);  // names taken
}

}  // namespace
}  // namespace moe::test

// ================================================================== placement of logical experts on table rows
namespace moe::test {
namespace {
using Placement = proto::WordExpertConfig::Placement;

TEST(WordExperts, PlacementIsABalancedPermutationIndependentOfRanks) {
  for (Placement pl : {proto::WordExpertConfig::PLACEMENT_INTERLEAVED,
                       proto::WordExpertConfig::PLACEMENT_MULTIPLICATIVE})
    for (int64_t E : {1, 2, 6, 7, 64, 96, 1000, 1024, 131072}) {
      std::vector<uint8_t> seen(E, 0);
      for (int64_t l = 0; l < E; ++l) {
        const int64_t r = experts::word_expert_row(l, E, pl);
        ASSERT_TRUE(r >= 0 && r < E && !seen[r]) << "E " << E << " logical " << l << " -> " << r;
        seen[r] = 1;
      }
    }
  // the format-1 (multiplicative) placement is unchanged: checkpoints written with it still load correctly
  EXPECT_EQ(experts::word_expert_row(1, 1024, proto::WordExpertConfig::PLACEMENT_MULTIPLICATIVE), 633);
  EXPECT_EQ(experts::word_expert_row(3, 1024, proto::WordExpertConfig::PLACEMENT_MULTIPLICATIVE), (3 * 633) % 1024);
  // interleaved: every P consecutive logical experts land on P different ranks (power-of-two P up to 64), the
  // 1024 most frequent are split evenly, and they occupy 64 runs of 16 consecutive rows (dense, not scattered)
  const int64_t E = 131072;
  auto row = [&](int64_t l) { return experts::word_expert_row(l, E, proto::WordExpertConfig::PLACEMENT_INTERLEAVED); };
  for (int64_t P : {2, 4, 8, 16, 32, 64}) {
    const int64_t block = E / P;
    for (int64_t start = 0; start < 1024; start += P) {
      std::set<int64_t> ranks;
      for (int64_t l = start; l < start + P; ++l) ranks.insert(row(l) / block);
      EXPECT_EQ(int64_t(ranks.size()), P) << "P " << P << " logical experts from " << start;
    }
  }
  std::vector<int64_t> rows;
  for (int64_t l = 0; l < 1024; ++l) rows.push_back(row(l));
  std::sort(rows.begin(), rows.end());
  int runs = 1;
  for (size_t i = 1; i < rows.size(); ++i) runs += rows[i] != rows[i - 1] + 1;
  EXPECT_EQ(runs, 64);
  EXPECT_NE(error_of([] { experts::word_expert_row(5, 4, proto::WordExpertConfig::PLACEMENT_INTERLEAVED); })
                .find("outside"), std::string::npos);
  EXPECT_NE(error_of([] { experts::word_expert_row(0, 4, proto::WordExpertConfig::PLACEMENT_UNSET); })
                .find("placement"), std::string::npos);
}

}  // namespace
}  // namespace moe::test
