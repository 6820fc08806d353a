// Router tests (router/router.h):
//   RouterLearned   forward (logits, probs, top-k, capacity drops, gates, aux loss, z-loss) and backward (dx, dW
//                   including the aux-loss and z-loss terms, jitter) against the float64 PyTorch oracle
//                   tests/oracle/router.py, softmax and sigmoid, k = 1 (Switch), 2 (GShard), 3; jitter determinism;
//                   the += convention; empty batches, non-finite logits
//   RouterCapacity  rigged logits (W = identity, x = the logits): all tokens to one expert, empty experts,
//                   slot-major drop order, dropless mode, tie-break, distinct experts per token
//   RouterPlan      permute / unpermute_combine round trip, their backward vs finite differences, stats, validation
//   RouterVocab     MoWE table: frequent tokens get their own experts, determinism, coverage, save/load, errors
//   RouterHash      spread over experts, determinism
//   RouterConfig    clear moe::Error for impossible configurations (E < k, E <= 0, ...)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "router/router.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

using namespace moe::router;
using Vec = std::vector<float>;
using Ids = std::vector<int32_t>;

constexpr double kTol = 1e-5;  // f32 router vs f64 oracle, relative to the reference's largest magnitude

#define EXPECT_REL(ours, ref, tol) EXPECT_LE(max_rel_err(ours, ref), tol) << #ours " vs " #ref

std::string num(double x) {
  std::ostringstream o;
  o.precision(17);
  o << x;
  return o.str();
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += double(a[i]) * b[i];
  return s;
}

// Expects `fn` to throw moe::Error whose message contains `needle`.
void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected moe::Error containing '" << needle << "'";
  } catch (const moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

// A router whose logits are exactly x: C = E and W = identity.
struct Rigged {
  int E;
  Vec w;
  LearnedRouter router;
  Rigged(int E_, int k, LearnedRouterOptions o) : E(E_), w(size_t(E_) * E_, 0.0f), router(E_, k, E_, o) {
    for (int e = 0; e < E; ++e) w[size_t(e) * E + e] = 1.0f;
  }
  RouterOutput route(const Vec& logits) {
    return router.forward(logits.data(), w.data(), int(logits.size()) / E, /*training=*/true);
  }
};

LearnedRouterOptions opts(double cf, bool dropless = false) {
  LearnedRouterOptions o;
  o.capacity_factor = cf;
  o.dropless = dropless;
  return o;
}

// ================================================================== learned router vs torch
struct LearnedCase {
  const char* name;
  ScoreFn score;
  int k, E;
  double cf;  // <= 0: dropless
  bool normalize;
  float aux, z, scale, jitter;
  bool zero_dgate;  // isolate the aux / z-loss gradients
  float bias;       // > 0: bias balancing with a selection bias ~ N(0, bias^2) (0: off)
};

void run_learned_cases(const std::vector<LearnedCase>& cases, uint64_t seed) {
  const int N = 40, C = 12;
  Rng rng(seed);
  TempDir td;
  std::vector<std::string> args;
  struct Run {
    std::string dir;
    RouterOutput out;
    Vec dx, dw, logits, probs, noise;
    Ids choice;
  };
  std::vector<Run> runs;
  for (const LearnedCase& c : cases) {
    const Vec x = randn(rng, N * C), w = randn(rng, c.E * C, 0.6f);
    Vec dgate = randn(rng, N * c.k);
    if (c.zero_dgate) std::fill(dgate.begin(), dgate.end(), 0.0f);
    LearnedRouterOptions o;
    o.score = c.score;
    o.dropless = c.cf <= 0;
    o.capacity_factor = c.cf > 0 ? c.cf : 1.0;
    o.normalize_topk = c.normalize;
    o.aux_loss_coef = c.aux;
    o.z_loss_coef = c.z;
    o.jitter_eps = c.jitter;
    o.seed = seed + 17;
    o.bias_balancing = c.bias > 0;
    const Vec bias = c.bias > 0 ? randn(rng, c.E, c.bias) : Vec{};
    LearnedRouter router(c.E, c.k, C, o);
    if (c.bias > 0) router.set_bias(bias);
    Run r;
    r.out = router.forward(x.data(), w.data(), N, /*training=*/true);
    r.dx.assign(N * C, 0.0f);
    r.dw.assign(c.E * C, 0.0f);
    router.backward(r.dx.data(), r.dw.data(), dgate.data(), w.data(), c.scale);
    r.logits = router.logits();
    r.probs = router.probs();
    r.noise = router.jitter_noise();
    r.choice = router.topk_experts();
    EXPECT_EQ(r.noise.empty(), c.jitter == 0.0f) << c.name;

    r.dir = td.file(c.name);
    std::filesystem::create_directories(r.dir);
    write_npy(r.dir + "/x.npy", x.data(), {N, C});
    write_npy(r.dir + "/w.npy", w.data(), {c.E, C});
    write_npy(r.dir + "/dgate.npy", dgate.data(), {N, c.k});
    if (!r.noise.empty()) write_npy(r.dir + "/noise.npy", r.noise.data(), {N, C});
    if (c.bias > 0) {
      write_npy(r.dir + "/bias.npy", bias.data(), {c.E});
      // the case must move the selection: the same router without the bias chooses differently
      o.bias_balancing = false;
      LearnedRouter plain(c.E, c.k, C, o);
      plain.forward(x.data(), w.data(), N, true);
      EXPECT_NE(plain.topk_experts(), r.choice) << c.name << ": the bias did not change the selection";
    }
    if (!args.empty()) args.push_back("+");
    args.insert(args.end(), {r.dir, c.score == ScoreFn::kSoftmax ? "softmax" : "sigmoid", std::to_string(c.k),
                             c.cf > 0 ? num(c.cf) : "dropless", c.normalize ? "1" : "0", num(c.aux), num(c.z),
                             num(c.scale)});
    runs.push_back(std::move(r));
  }
  ASSERT_TRUE(run_oracle("router.py", args));

  for (size_t i = 0; i < cases.size(); ++i) {
    const LearnedCase& c = cases[i];
    const Run& r = runs[i];
    SCOPED_TRACE(c.name);
    auto get = [&](const char* name) { return read_npy(r.dir + "/" + name + ".npy"); };
    EXPECT_REL(r.logits, get("logits").f, kTol);
    EXPECT_REL(r.probs, get("probs").f, kTol);
    EXPECT_EQ(r.choice, get("choice").i);
    EXPECT_EQ(r.out.plan.expert, get("expert").i);
    EXPECT_EQ(r.out.plan.position, get("position").i);
    EXPECT_EQ(r.out.plan.capacity, get("capacity").i.at(0));
    EXPECT_REL(r.out.plan.gate, get("gate").f, kTol);
    EXPECT_REL(Vec{r.out.aux_loss}, get("aux").f, kTol);
    EXPECT_REL(Vec{r.out.z_loss}, get("z").f, kTol);
    EXPECT_NEAR(r.out.loss, c.aux * r.out.aux_loss + c.z * r.out.z_loss, 1e-6);
    EXPECT_REL(r.dx, get("dx").f, kTol);
    EXPECT_REL(r.dw, get("dw").f, kTol);
    if (c.cf > 0 && c.cf < 1) {
      EXPECT_GT(r.out.plan.num_dropped(), 0) << "case meant to drop tokens";
    }
  }
}

// One oracle process for all configurations (importing torch costs ~1.5 s).
TEST(RouterLearned, SoftmaxAndSigmoidVsTorch) {
  const auto S = ScoreFn::kSoftmax, G = ScoreFn::kSigmoid;
  run_learned_cases(
      {
          // name, score, k, E, capacity factor (<= 0: dropless), normalize, aux, z, loss scale, jitter, zero dgate,
          // bias scale
          {"switch_k1", S, 1, 6, 1.0, true, 0.01f, 0.001f, 1.0f, 0.0f, false, 0.0f},
          {"switch_k1_drops", S, 1, 4, 0.5, true, 0.1f, 0.01f, 1.0f, 0.0f, false, 0.0f},
          {"gshard_k2", S, 2, 6, 1.25, true, 0.02f, 0.005f, 0.5f, 0.0f, false, 0.0f},
          {"k2_drops_jitter", S, 2, 5, 0.6, true, 0.05f, 0.01f, 1.0f, 0.1f, false, 0.0f},
          {"k3_dropless_raw", S, 3, 6, 0.0, false, 0.01f, 0.001f, 1.0f, 0.0f, false, 0.0f},
          {"k3_capacity_norm", S, 3, 7, 0.8, true, 0.0f, 0.0f, 1.0f, 0.0f, false, 0.0f},
          {"aux_only", S, 2, 6, 1.0, true, 1.0f, 0.0f, 1.0f, 0.0f, true, 0.0f},
          {"z_only", S, 2, 6, 1.0, true, 0.0f, 1.0f, 2.0f, 0.0f, true, 0.0f},
          {"sig_k1", G, 1, 6, 1.0, true, 0.01f, 0.001f, 1.0f, 0.0f, false, 0.0f},
          {"sig_k2_norm", G, 2, 6, 1.25, true, 0.05f, 0.01f, 1.0f, 0.0f, false, 0.0f},
          {"sig_k2_raw_drops", G, 2, 4, 0.5, false, 0.05f, 0.01f, 1.0f, 0.0f, false, 0.0f},
          {"sig_k3_dropless_jitter", G, 3, 6, 0.0, true, 0.02f, 0.002f, 0.25f, 0.2f, false, 0.0f},
          {"sig_aux_only", G, 2, 6, 1.0, true, 1.0f, 0.0f, 1.0f, 0.0f, true, 0.0f},
          {"sig_z_only", G, 1, 6, 1.0, true, 0.0f, 1.0f, 1.0f, 0.0f, true, 0.0f},
          // selection bias (bias balancing): choice on score + bias, gates and backward without it
          {"bias_k2", S, 2, 6, 1.0, true, 0.01f, 0.001f, 1.0f, 0.0f, false, 0.2f},
          {"bias_k1_drops", S, 1, 4, 0.5, true, 0.1f, 0.01f, 1.0f, 0.0f, false, 0.2f},
          {"bias_k3_raw_dropless", S, 3, 7, 0.0, false, 0.01f, 0.001f, 1.0f, 0.0f, false, 0.1f},
          {"bias_sig_k2", G, 2, 6, 1.25, true, 0.05f, 0.01f, 1.0f, 0.0f, false, 0.3f},
          {"bias_sig_k1_jitter", G, 1, 6, 0.8, true, 0.02f, 0.002f, 0.5f, 0.1f, false, 0.3f},
          {"bias_sig_aux_only", G, 2, 6, 1.0, true, 1.0f, 0.0f, 1.0f, 0.0f, true, 0.3f},
      },
      11);
}

TEST(RouterLearned, BackwardAccumulatesAndNullOutputsAreSkipped) {
  const int N = 20, C = 8, E = 4, k = 2;
  Rng rng(5);
  const Vec x = randn(rng, N * C), w = randn(rng, E * C), dgate = randn(rng, N * k);
  LearnedRouterOptions o;
  o.aux_loss_coef = 0.1f;
  o.z_loss_coef = 0.01f;
  LearnedRouter router(E, k, C, o);
  router.forward(x.data(), w.data(), N, true);
  Vec dx(N * C, 0.0f), dw(E * C, 0.0f);
  router.backward(dx.data(), dw.data(), dgate.data(), w.data());
  const Vec dx0 = randn(rng, N * C), dw0 = randn(rng, E * C);
  Vec dx1 = dx0, dw1 = dw0;
  router.backward(dx1.data(), dw1.data(), dgate.data(), w.data());
  for (int i = 0; i < N * C; ++i) EXPECT_NEAR(dx1[i], dx0[i] + dx[i], 1e-5) << i;
  for (int i = 0; i < E * C; ++i) EXPECT_NEAR(dw1[i], dw0[i] + dw[i], 1e-5) << i;
  Vec dw2(E * C, 0.0f);
  router.backward(nullptr, dw2.data(), dgate.data(), w.data());  // frozen input
  EXPECT_EQ(dw2, dw);
  Vec dx2(N * C, 0.0f);
  router.backward(dx2.data(), nullptr, dgate.data(), w.data());  // frozen router
  EXPECT_EQ(dx2, dx);
}

TEST(RouterLearned, JitterIsSeededAndTrainingOnly) {
  const int N = 16, C = 8, E = 4;
  Rng rng(6);
  const Vec x = randn(rng, N * C), w = randn(rng, E * C);
  LearnedRouterOptions o;
  o.jitter_eps = 0.3f;
  o.seed = 99;
  LearnedRouter a(E, 2, C, o), b(E, 2, C, o);
  const RouterOutput ra = a.forward(x.data(), w.data(), N, true);
  const RouterOutput rb = b.forward(x.data(), w.data(), N, true);
  EXPECT_EQ(a.jitter_noise(), b.jitter_noise());
  EXPECT_EQ(ra.plan.gate, rb.plan.gate);
  EXPECT_EQ(ra.plan.expert, rb.plan.expert);
  for (float v : a.jitter_noise()) {
    EXPECT_GE(v, 0.7f);
    EXPECT_LE(v, 1.3f);
  }
  // the stream advances per call; another seed gives other noise
  const Vec first = a.jitter_noise();
  a.forward(x.data(), w.data(), N, true);
  EXPECT_NE(a.jitter_noise(), first);
  o.seed = 100;
  LearnedRouter c(E, 2, C, o);
  c.forward(x.data(), w.data(), N, true);
  EXPECT_NE(c.jitter_noise(), first);
  // evaluation: no noise, logits of the clean input
  LearnedRouter d(E, 2, C, o), clean(E, 2, C, LearnedRouterOptions{});
  d.forward(x.data(), w.data(), N, false);
  clean.forward(x.data(), w.data(), N, true);
  EXPECT_TRUE(d.jitter_noise().empty());
  EXPECT_EQ(d.logits(), clean.logits());
}

TEST(RouterLearned, EmptyBatchAndNonFiniteLogits) {
  const int C = 8, E = 4;
  const Vec w(E * C, 0.1f);
  LearnedRouterOptions o;
  o.aux_loss_coef = 0.1f;
  o.z_loss_coef = 0.1f;
  LearnedRouter router(E, 2, C, o);
  const RouterOutput out = router.forward(nullptr, w.data(), 0, true);
  EXPECT_EQ(out.plan.rows(), 0);
  EXPECT_EQ(out.plan.capacity, 0);
  EXPECT_EQ(out.aux_loss, 0.0f);
  EXPECT_EQ(out.z_loss, 0.0f);
  EXPECT_EQ(out.plan.dropped_fraction(), 0.0);
  router.backward(nullptr, nullptr, nullptr, w.data());  // nothing to do, no throw

  Rigged r(3, 1, opts(1.0));
  expect_error([&] { r.route({0.0f, std::numeric_limits<float>::quiet_NaN(), 1.0f}); }, "not finite");
  expect_error([&] { r.router.backward(nullptr, nullptr, nullptr, nullptr); }, "before forward");  // failed forward
}

// ================================================================== capacity and top-k edge cases
TEST(RouterCapacity, AllTokensToOneExpert) {
  const int N = 16, E = 4;
  Vec logits(N * E, 0.0f);
  for (int n = 0; n < N; ++n) logits[n * E + 0] = 5.0f;
  Rigged r(E, 1, opts(1.0));
  const RouterOutput out = r.route(logits);
  const DispatchPlan& p = out.plan;
  ASSERT_EQ(p.capacity, 4);  // ceil(1 * 16 * 1.0 / 4)
  const float p0 = r.router.probs()[0];
  for (int n = 0; n < N; ++n) {
    SCOPED_TRACE(n);
    EXPECT_EQ(r.router.topk_experts()[n], 0);
    EXPECT_EQ(p.expert[n], n < 4 ? 0 : -1);
    EXPECT_EQ(p.position[n], n < 4 ? n : -1);
    EXPECT_EQ(p.gate[n], n < 4 ? p0 : 0.0f);  // k = 1: raw prob (Switch), even with normalize_topk
  }
  EXPECT_EQ(p.counts, (Ids{4, 0, 0, 0}));
  EXPECT_EQ(p.expert_offsets, (Ids{0, 4, 4, 4, 4}));
  EXPECT_EQ(p.order, (Ids{0, 1, 2, 3}));
  EXPECT_EQ(p.num_dropped(), 12);
  EXPECT_DOUBLE_EQ(p.dropped_fraction(), 0.75);
  EXPECT_EQ(p.load_min(), 0);
  EXPECT_EQ(p.load_max(), 4);
  // the load-balancing loss sees the pre-drop routing: f = (1, 0, 0, 0) -> aux = E * P_0
  EXPECT_NEAR(out.aux_loss, E * p0, 1e-6);

  Rigged dl(E, 1, opts(1.0, /*dropless=*/true));
  const DispatchPlan q = dl.route(logits).plan;
  EXPECT_EQ(q.capacity, -1);
  EXPECT_EQ(q.num_dropped(), 0);
  EXPECT_EQ(q.counts, (Ids{16, 0, 0, 0}));
  for (int n = 0; n < N; ++n) EXPECT_EQ(q.position[n], n);
}

TEST(RouterCapacity, EmptyExpertsPermuteRoundTrip) {
  const int N = 6, E = 5, C = 3;
  // tokens go to experts 3, 0, 3, 0, 3, 0 only: experts 1, 2, 4 stay empty
  Vec logits(N * E, 0.0f);
  for (int n = 0; n < N; ++n) logits[n * E + (n % 2 ? 0 : 3)] = 4.0f;
  Rigged r(E, 1, opts(1.0, true));
  const DispatchPlan p = r.route(logits).plan;
  EXPECT_EQ(p.counts, (Ids{3, 0, 0, 3, 0}));
  EXPECT_EQ(p.expert_offsets, (Ids{0, 3, 3, 3, 6, 6}));
  EXPECT_EQ(p.order, (Ids{1, 3, 5, 0, 2, 4}));
  EXPECT_EQ(p.load_min(), 0);
  EXPECT_EQ(p.load_max(), 3);
  Rng rng(7);
  const Vec x = randn(rng, N * C);
  Vec rows(p.rows() * C), back(N * C);
  p.permute(rows.data(), x.data(), C);
  for (int r2 = 0; r2 < p.rows(); ++r2)
    for (int c = 0; c < C; ++c) EXPECT_EQ(rows[r2 * C + c], x[p.order[r2] * C + c]);
  p.unpermute_combine(back.data(), rows.data(), C);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) EXPECT_FLOAT_EQ(back[n * C + c], p.gate[n] * x[n * C + c]);
}

TEST(RouterCapacity, SlotMajorDropOrder) {
  // E = 3, k = 2, N = 4, cf = 0.75: capacity ceil(2 * 4 * 0.75 / 3) = 2.
  //   token: 1st, 2nd choice      slot 0 pass                      slot 1 pass
  //   0:     e0,  e1              e0 pos 0                         e1 full -> dropped (despite token 0 first)
  //   1:     e1,  e2              e1 pos 0                         e2 pos 1
  //   2:     e1,  e2              e1 pos 1                         e2 full -> dropped
  //   3:     e2,  e0              e2 pos 0                         e0 pos 1
  const int E = 3;
  const Vec logits = {3, 2, 0, /**/ 0, 3, 2, /**/ 0, 3, 2, /**/ 2, 0, 3};
  Rigged r(E, 2, opts(0.75));
  const RouterOutput out = r.route(logits);
  const DispatchPlan& p = out.plan;
  ASSERT_EQ(p.capacity, 2);
  EXPECT_EQ(r.router.topk_experts(), (Ids{0, 1, 1, 2, 1, 2, 2, 0}));
  EXPECT_EQ(p.expert, (Ids{0, -1, 1, 2, 1, -1, 2, 0}));
  EXPECT_EQ(p.position, (Ids{0, -1, 0, 1, 1, -1, 0, 1}));
  EXPECT_EQ(p.counts, (Ids{2, 2, 2}));
  // rows within an expert go by token index, not by position: expert 2 holds token 1 (position 1) before token 3
  EXPECT_EQ(p.order, (Ids{0, 7, 2, 4, 3, 6}));
  EXPECT_EQ(p.row_of_slot, (Ids{0, -1, 2, 4, 3, -1, 5, 1}));
  // gates were normalised over both choices before dropping: token 0 keeps p0 / (p0 + p1) < 1
  const Vec& pr = r.router.probs();
  EXPECT_NEAR(p.gate[0], pr[0] / (pr[0] + pr[1]), 1e-6);
  EXPECT_LT(p.gate[0], 0.99f);
  EXPECT_EQ(p.gate[1], 0.0f);
  EXPECT_DOUBLE_EQ(p.dropped_fraction(), 0.25);
}

TEST(RouterCapacity, CapacityFormula) {
  EXPECT_EQ(expert_capacity(16, 1, 4, 1.0), 4);
  EXPECT_EQ(expert_capacity(16, 2, 4, 1.25), 10);
  EXPECT_EQ(expert_capacity(10, 1, 4, 1.0), 3);          // ceil(2.5)
  EXPECT_EQ(expert_capacity(100, 1, 11, 1.1f), 10);       // float 1.1 is 1.10000002: still 10, not 11
  EXPECT_EQ(expert_capacity(0, 2, 4, 1.0), 0);
  EXPECT_EQ(expert_capacity(7, 1, 8, 0.01), 1);
  expect_error([] { expert_capacity(4, 1, 4, 0.0); }, "capacity_factor");
}

TEST(RouterCapacity, TieBreakLowerExpertWinsAndExpertsAreDistinct) {
  // all-equal logits, k = E: every token gets experts 0, 1, 2 in that order, gates 1/3
  Rigged r(3, 3, opts(1.0, true));
  const DispatchPlan p = r.route(Vec(4 * 3, 0.0f)).plan;
  for (int n = 0; n < 4; ++n)
    for (int j = 0; j < 3; ++j) {
      EXPECT_EQ(p.expert[n * 3 + j], j);
      EXPECT_NEAR(p.gate[n * 3 + j], 1.0f / 3, 1e-7);
    }
  // partial ties: [1, 2, 2, 0] -> top-2 = (1, 2), top-1 = 1
  Rigged r2(4, 2, opts(1.0, true));
  EXPECT_EQ(r2.route({1, 2, 2, 0}).plan.expert, (Ids{1, 2}));
  Rigged r1(4, 1, opts(1.0, true));
  EXPECT_EQ(r1.route({1, 2, 2, 0}).plan.expert, (Ids{1}));
  // random logits with many duplicates, k = 4 of 5: the k experts of a token are always distinct
  Rng rng(8);
  Vec logits(50 * 5);
  for (auto& v : logits) v = float(rng.below(3));
  Rigged r4(5, 4, opts(1.0, true));
  const DispatchPlan q = r4.route(logits).plan;
  for (int n = 0; n < 50; ++n) {
    std::set<int> s(q.expert.begin() + n * 4, q.expert.begin() + n * 4 + 4);
    EXPECT_EQ(s.size(), 4u) << n;
    for (int j = 0; j + 1 < 4; ++j) {  // descending logits, ties ascending expert id
      const int a = q.expert[n * 4 + j], b = q.expert[n * 4 + j + 1];
      EXPECT_TRUE(logits[n * 5 + a] > logits[n * 5 + b] || (logits[n * 5 + a] == logits[n * 5 + b] && a < b));
    }
  }
}

// ================================================================== selection bias (bias balancing)
LearnedRouterOptions bias_opts(float rate, bool on = true) {
  LearnedRouterOptions o = opts(1.0, /*dropless=*/true);
  o.bias_balancing = on;
  o.bias_update_rate = rate;
  return o;
}

TEST(RouterBias, UpdateMovesEachBiasByExactlyTheRate) {
  for (float rate : {1e-3f, 0.25f}) {
    SCOPED_TRACE(rate);
    LearnedRouter r(4, 2, 8, bias_opts(rate));
    EXPECT_EQ(r.bias(), Vec(4, 0.0f));
    // mean 5: over -> -rate, under -> +rate, exactly at the mean -> unchanged
    const std::vector<double> a = {10, 2, 5, 3};
    r.update_bias(a.data());
    EXPECT_EQ(r.bias(), (Vec{-rate, rate, 0.0f, rate}));
    const std::vector<double> tie = {7, 7, 7, 7};
    r.update_bias(tie.data());
    EXPECT_EQ(r.bias(), (Vec{-rate, rate, 0.0f, rate}));
    const std::vector<double> b = {0, 20, 0, 0};
    r.update_bias(b.data());
    EXPECT_EQ(r.bias(), (Vec{-rate + rate, rate - rate, rate, rate + rate}));
    const std::vector<double> none(4, 0.0);  // nothing routed: every expert at the mean
    r.update_bias(none.data());
    EXPECT_EQ(r.bias(), (Vec{0.0f, 0.0f, rate, 2 * rate}));
  }
  LearnedRouter zero(3, 1, 4, bias_opts(0.0f));
  const std::vector<double> l = {9, 0, 0};
  zero.update_bias(l.data());
  EXPECT_EQ(zero.bias(), Vec(3, 0.0f));
}

TEST(RouterBias, ErrorsNameTheProblem) {
  LearnedRouter off(4, 2, 8, bias_opts(0.1f, /*on=*/false));
  const std::vector<double> l = {1, 2, 3, 4};
  expect_error([&] { off.update_bias(l.data()); }, "bias balancing is off");
  LearnedRouter on(4, 2, 8, bias_opts(0.1f));
  const std::vector<double> neg = {1, -2, 3, 4};
  expect_error([&] { on.update_bias(neg.data()); }, "load of expert 1");
  expect_error([&] { on.set_bias(Vec(3, 0.0f)); }, "3 values for 4 experts");
  expect_error([&] { on.set_bias({0, 0, std::numeric_limits<float>::infinity(), 0}); }, "expert 2 is not finite");
  expect_error([] { LearnedRouter(4, 2, 8, bias_opts(-1.0f)); }, "bias_update_rate");
}

// Rigged logits: the bias picks the experts, the gates stay the unbiased scores of the picked experts.
TEST(RouterBias, SelectsOnScorePlusBiasGatesWithoutIt) {
  const Vec logits = {2, 1, 0, -1, /**/ 0, 0, 3, 0};
  const Vec bias = {0, 0, 1, 0};
  for (ScoreFn score : {ScoreFn::kSoftmax, ScoreFn::kSigmoid}) {
    SCOPED_TRACE(score == ScoreFn::kSoftmax ? "softmax" : "sigmoid");
    LearnedRouterOptions o = bias_opts(0.1f);
    o.score = score;
    LearnedRouterOptions off = o;
    off.bias_balancing = false;
    Rigged r(4, 2, o), plain(4, 2, off);
    r.router.set_bias(bias);
    plain.router.set_bias(bias);  // ignored without bias balancing
    const DispatchPlan a = r.route(logits).plan, b = plain.route(logits).plan;
    const Vec& p = r.router.probs();
    EXPECT_EQ(b.expert, (Ids{0, 1, 2, 0}));  // by logit
    EXPECT_EQ(a.expert, (Ids{2, 0, 2, 0}));  // token 0: p2 + 1 > p0 > p1; token 1: p0 + 0 ties p1, p3: lower id
    EXPECT_EQ(r.router.probs(), plain.router.probs());
    // gates: the selected UNBIASED scores, normalised over the k choices
    EXPECT_NEAR(a.gate[0], p[2] / (p[2] + p[0]), 1e-6);
    EXPECT_NEAR(a.gate[1], p[0] / (p[2] + p[0]), 1e-6);
    EXPECT_NEAR(a.gate[2], p[6] / (p[6] + p[4]), 1e-6);
    EXPECT_NEAR(a.gate[0] + a.gate[1], 1.0, 1e-6);
    // the aux loss's routing fraction counts the biased choice
    EXPECT_EQ(r.router.expert_fraction(), (Vec{0.5f, 0.0f, 0.5f, 0.0f}));
    // inference (not training) selects the same way
    const DispatchPlan inf = r.router.forward(logits.data(), r.w.data(), 2, /*training=*/false).plan;
    EXPECT_EQ(inf.expert, a.expert);
    EXPECT_EQ(inf.gate, a.gate);
  }
  // k = 1 (Switch): the gate is the raw score of the biased choice
  Rigged s(4, 1, bias_opts(0.1f));
  s.router.set_bias(bias);
  const DispatchPlan q = s.route({2, 1, 0, -1}).plan;
  EXPECT_EQ(q.expert, (Ids{2}));
  EXPECT_EQ(q.gate[0], s.router.probs()[2]);
}

// ================================================================== permute / combine
DispatchPlan random_plan(int N, int k, int E, double cf, uint64_t seed) {
  Rng rng(seed);
  const int C = 6;
  const Vec x = randn(rng, N * C), w = randn(rng, E * C);
  LearnedRouter router(E, k, C, opts(cf, cf <= 0));
  return router.forward(x.data(), w.data(), N, true).plan;
}

TEST(RouterPlan, LayoutAndRoundTrip) {
  const int N = 30, C = 5;
  for (double cf : {0.0, 0.7}) {
    SCOPED_TRACE(cf);
    const DispatchPlan p = random_plan(N, 2, 4, cf, 9);
    if (cf > 0) {
      EXPECT_GT(p.num_dropped(), 0);
    }
    // rows of an expert are contiguous and go by token index
    for (int e = 0; e < 4; ++e) {
      EXPECT_EQ(p.expert_offsets[e + 1] - p.expert_offsets[e], p.counts[e]);
      for (int r = p.expert_offsets[e]; r < p.expert_offsets[e + 1]; ++r) {
        EXPECT_EQ(p.expert[p.order[r]], e);
        EXPECT_EQ(p.row_of_slot[p.order[r]], r);
        if (r > p.expert_offsets[e]) {
          EXPECT_LT(p.order[r - 1] / 2, p.order[r] / 2);
        }
      }
    }
    Rng rng(10);
    const Vec x = randn(rng, N * C);
    Vec rows(p.rows() * C), out(N * C);
    p.permute(rows.data(), x.data(), C);
    p.unpermute_combine(out.data(), rows.data(), C);  // identity experts: out = (sum of kept gates) x
    for (int n = 0; n < N; ++n) {
      const float g = p.gate[n * 2] + p.gate[n * 2 + 1];
      if (cf <= 0) {
        EXPECT_NEAR(g, 1.0f, 1e-6);  // dropless, normalised: exact round trip
      }
      for (int c = 0; c < C; ++c) EXPECT_NEAR(out[n * C + c], g * x[n * C + c], 1e-6);
    }
  }
}

TEST(RouterPlan, BackwardVsFiniteDifferences) {
  const int N = 12, C = 4, k = 2;
  DispatchPlan p = random_plan(N, k, 3, 0.8, 11);
  ASSERT_GT(p.num_dropped(), 0);
  const int R = p.rows();
  Rng rng(12);
  Vec x = randn(rng, N * C), y = randn(rng, R * C);
  const Vec dout_tok = randn(rng, N * C), dout_rows = randn(rng, R * C);
  const float eps = 1e-2f;

  // unpermute_combine: L = <out, dout_tok>, bilinear in (y, gate)
  auto loss_combine = [&] {
    Vec out(N * C);
    p.unpermute_combine(out.data(), y.data(), C);
    return dot(out, dout_tok);
  };
  Vec dy(R * C, 1e30f), dgate(N * k, 1e30f);  // written, not accumulated
  p.unpermute_combine_backward(dy.data(), dgate.data(), dout_tok.data(), y.data(), C);
  for (int i = 0; i < R * C; ++i) {
    const float y0 = y[i];
    y[i] = y0 + eps;
    const double lp = loss_combine();
    y[i] = y0 - eps;
    const double lm = loss_combine();
    y[i] = y0;
    EXPECT_NEAR(dy[i], (lp - lm) / (2 * eps), 1e-3) << "dy " << i;
  }
  for (int s = 0; s < N * k; ++s) {
    if (p.expert[s] < 0) {
      EXPECT_EQ(dgate[s], 0.0f) << "dropped slot " << s;
      continue;
    }
    const float g0 = p.gate[s];
    p.gate[s] = g0 + eps;
    const double lp = loss_combine();
    p.gate[s] = g0 - eps;
    const double lm = loss_combine();
    p.gate[s] = g0;
    EXPECT_NEAR(dgate[s], (lp - lm) / (2 * eps), 1e-3) << "dgate " << s;
  }

  // permute: L = <rows, dout_rows>, linear in x; permute_backward accumulates
  auto loss_permute = [&] {
    Vec rows(R * C);
    p.permute(rows.data(), x.data(), C);
    return dot(rows, dout_rows);
  };
  const Vec dx0 = randn(rng, N * C);
  Vec dx = dx0;
  p.permute_backward(dx.data(), dout_rows.data(), C);
  for (int i = 0; i < N * C; ++i) {
    const float x0 = x[i];
    x[i] = x0 + eps;
    const double lp = loss_permute();
    x[i] = x0 - eps;
    const double lm = loss_permute();
    x[i] = x0;
    EXPECT_NEAR(dx[i] - dx0[i], (lp - lm) / (2 * eps), 1e-3) << "dx " << i;
  }
}

TEST(RouterPlan, ValidationRejectsInconsistentPlans) {
  DispatchPlan p;
  p.reset(2, 1, 2, -1);
  p.expert = {0, 0};
  p.gate = {1, 1};
  p.position = {0, 0};
  expect_error([&] { p.build_permutation(); }, "positions must be distinct");
  p.position = {0, 1};
  p.build_permutation();
  EXPECT_EQ(p.counts, (Ids{2, 0}));
  p.capacity = 1;
  expect_error([&] { p.build_permutation(); }, "capacity");
  p.capacity = -1;
  p.expert = {0, 2};
  expect_error([&] { p.build_permutation(); }, "outside");
  p.reset(1, 2, 3, -1);
  p.expert = {1, 1};
  p.gate = {0.5f, 0.5f};
  p.position = {0, 1};
  expect_error([&] { p.build_permutation(); }, "two slots");
  expect_error([] { make_top1_plan(Ids{0, 5}.data(), 2, 3); }, "outside");
}

// A compact plan (word-expert tables) lists only the experts used and otherwise equals the dense plan: the same
// rows in the same order, the same counts at the global ids, the same permute / combine results.
TEST(RouterPlan, CompactTop1PlanEqualsDensePlan) {
  const int N = 300, E = 1 << 17, C = 5;
  Rng rng(21);
  Ids ids(N);
  for (auto& e : ids) e = int32_t(rng.below(40)) * 3271 % E;  // 40 distinct experts scattered over a big table
  ids[7] = E - 1;
  ids[8] = 0;
  const DispatchPlan d = make_top1_plan(ids.data(), N, E);
  const DispatchPlan c = make_top1_plan_compact(ids.data(), N, E);
  ASSERT_FALSE(c.global_expert.empty());
  EXPECT_TRUE(std::is_sorted(c.global_expert.begin(), c.global_expert.end()));
  EXPECT_EQ(std::set<int32_t>(ids.begin(), ids.end()).size(), c.global_expert.size());
  EXPECT_EQ(c.global_num_experts(), E);
  EXPECT_EQ(int(c.counts.size()), c.num_experts);  // O(experts used), not O(E)
  EXPECT_EQ(c.order, d.order);
  EXPECT_EQ(c.row_of_slot, d.row_of_slot);
  for (int i = 0; i < c.num_experts; ++i) {
    EXPECT_EQ(c.counts[i], d.counts[c.global_id(i)]);
    EXPECT_EQ(c.expert_offsets[i], d.expert_offsets[c.global_id(i)]);
  }
  for (int n = 0; n < N; ++n) EXPECT_EQ(c.global_id(c.expert[n]), ids[n]);
  EXPECT_EQ(c.load_min(), 0);  // most experts of the table got nothing
  EXPECT_EQ(c.load_max(), d.load_max());
  Vec x(size_t(N) * C), pd(x.size()), pc(x.size()), od(x.size()), oc(x.size());
  for (auto& v : x) v = rng.normal();
  d.permute(pd.data(), x.data(), C);
  c.permute(pc.data(), x.data(), C);
  EXPECT_EQ(pd, pc);
  d.unpermute_combine(od.data(), pd.data(), C);
  c.unpermute_combine(oc.data(), pc.data(), C);
  EXPECT_EQ(od, oc);
  // every expert of a small table used: nothing left out, so load_min is the real minimum
  const Ids all = {2, 0, 1, 2, 1};
  const DispatchPlan f = make_top1_plan_compact(all.data(), 5, 3);
  EXPECT_EQ(f.global_expert, (Ids{0, 1, 2}));
  EXPECT_EQ(f.load_min(), 1);
  // an empty batch and a bad id
  const DispatchPlan z = make_top1_plan_compact(nullptr, 0, E);
  EXPECT_EQ(z.rows(), 0);
  expect_error([] { make_top1_plan_compact(Ids{0, 5}.data(), 2, 3); }, "token 1 routed to expert 5 outside");
}

// ================================================================== vocabulary router
TEST(RouterVocab, FrequentTokensGetOwnExperts) {
  const int V = 200, E = 10, W = 4;
  std::vector<int64_t> counts(V);
  Rng rng(13);
  for (auto& c : counts) c = int64_t(rng.below(50));
  counts[17] = 1000, counts[3] = 900, counts[150] = 900, counts[42] = 800;  // 3 and 150 tie: lower id first
  const VocabRouter vr = VocabRouter::build(counts, E, W);
  ASSERT_EQ(vr.vocab_size(), V);
  EXPECT_EQ(vr.expert_of(17), 0);
  EXPECT_EQ(vr.expert_of(3), 1);
  EXPECT_EQ(vr.expert_of(150), 2);
  EXPECT_EQ(vr.expert_of(42), 3);
  std::vector<int> load(E, 0);
  for (int v = 0; v < V; ++v) {
    const int e = vr.table()[v];
    ASSERT_GE(e, 0);
    ASSERT_LT(e, E);
    if (v != 17 && v != 3 && v != 150 && v != 42) {
      EXPECT_GE(e, W) << "token " << v << " took a word expert";
      EXPECT_EQ(e, W + int(mix64(uint64_t(v)) % (E - W)));
    }
    ++load[e];
  }
  for (int e = W; e < E; ++e) EXPECT_GT(load[e], 10) << "shared expert " << e;  // the hash spreads the rest

  // deterministic
  EXPECT_EQ(VocabRouter::build(counts, E, W).table(), vr.table());

  // route: k = 1, gate 1, dropless, every token routed
  const Ids ids = {17, 3, 0, 199, 17, 150};
  const DispatchPlan p = vr.route(ids.data(), int(ids.size()));
  EXPECT_EQ(p.k, 1);
  EXPECT_EQ(p.capacity, -1);
  EXPECT_EQ(p.num_dropped(), 0);
  for (size_t n = 0; n < ids.size(); ++n) {
    EXPECT_EQ(p.expert[n], vr.expert_of(ids[n]));
    EXPECT_EQ(p.gate[n], 1.0f);
  }
  EXPECT_EQ(p.counts[0], 2);
  EXPECT_EQ(p.position[4], 1);
  expect_error([&] { vr.route(Ids{200}.data(), 1); }, "outside the vocabulary");
  expect_error([&] { vr.route(Ids{-1}.data(), 1); }, "outside the vocabulary");
}

TEST(RouterVocab, SaveLoadRoundTripAndErrors) {
  std::vector<int64_t> counts = {5, 0, 9, 0, 1, 7};
  const VocabRouter vr = VocabRouter::build(counts, 4, 2);
  EXPECT_EQ(vr.expert_of(2), 0);
  EXPECT_EQ(vr.expert_of(5), 1);
  const VocabRouter back = VocabRouter::load(vr.save(), 4, 2);
  EXPECT_EQ(back.table(), vr.table());
  EXPECT_EQ(back.num_word_experts(), 2);
  expect_error([] { VocabRouter::load({0, 4}, 4, 2); }, "outside [0, 4)");
  expect_error([] { VocabRouter::load({}, 4, 2); }, "empty");
  // unseen tokens never get word experts: 4 seen tokens, W = 5 -> word experts 0..3 used, expert 4 stays empty
  const VocabRouter few = VocabRouter::build(counts, 8, 5);
  EXPECT_EQ(few.expert_of(2), 0);
  EXPECT_EQ(few.expert_of(5), 1);
  EXPECT_EQ(few.expert_of(0), 2);
  EXPECT_EQ(few.expert_of(4), 3);
  for (int v : {1, 3}) EXPECT_GE(few.expert_of(v), 5);
  // W = E leaves no shared expert: fine only if every token has a word expert
  EXPECT_NO_THROW(VocabRouter::build({3, 2, 1}, 3, 3));
  expect_error([&] { VocabRouter::build(counts, 4, 4); }, "no shared expert");
  expect_error([&] { VocabRouter::build(counts, 4, 5); }, "num_word_experts");
  expect_error([&] { VocabRouter::build(counts, 0, 0); }, "number of experts");
  expect_error([] { VocabRouter::build({}, 4, 1); }, "vocabulary size");
  expect_error([] { VocabRouter::build({1, -2}, 4, 1); }, "negative count");
}

// ================================================================== hash router
TEST(RouterHash, SpreadAndDeterminism) {
  EXPECT_EQ(mix64(0), 0u);
  EXPECT_NE(mix64(1), mix64(2));
  const int E = 8, N = 8000;
  const HashRouter hr(E);
  Ids ids(N);
  for (int n = 0; n < N; ++n) ids[n] = n;
  const DispatchPlan p = hr.route(ids.data(), N);
  EXPECT_EQ(p.num_dropped(), 0);
  EXPECT_EQ(p.capacity, -1);
  for (int e = 0; e < E; ++e) {
    EXPECT_GT(p.counts[e], 900) << e;
    EXPECT_LT(p.counts[e], 1100) << e;
  }
  for (int n = 0; n < N; ++n) {
    ASSERT_EQ(p.expert[n], hr.expert_of(n));
    ASSERT_EQ(p.gate[n], 1.0f);
  }
  EXPECT_EQ(HashRouter(E).route(ids.data(), N).expert, p.expert);
  expect_error([&] { hr.route(Ids{-3}.data(), 1); }, "negative id");
}

// ================================================================== configuration errors
TEST(RouterConfig, ImpossibleConfigurationsThrowClearErrors) {
  expect_error([] { LearnedRouter(2, 3, 8); }, "top-k 3 must lie in [1, number of experts 2]");
  expect_error([] { LearnedRouter(0, 1, 8); }, "number of experts must be >= 1");
  expect_error([] { LearnedRouter(-4, 1, 8); }, "number of experts must be >= 1");
  expect_error([] { LearnedRouter(4, 0, 8); }, "top-k 0");
  expect_error([] { LearnedRouter(4, 1, 0); }, "channels");
  expect_error([] { LearnedRouter(4, 1, 8, opts(0.0)); }, "capacity_factor");
  EXPECT_NO_THROW(LearnedRouter(4, 1, 8, opts(0.0, /*dropless=*/true)));
  LearnedRouterOptions o;
  o.jitter_eps = 1.0f;
  expect_error([&] { LearnedRouter(4, 1, 8, o); }, "jitter_eps");
  o = {};
  o.aux_loss_coef = -1;
  expect_error([&] { LearnedRouter(4, 1, 8, o); }, "aux_loss_coef");
  expect_error([] { HashRouter(0); }, "number of experts");
  LearnedRouter r(4, 1, 8);
  expect_error([&] { r.backward(nullptr, nullptr, nullptr, nullptr); }, "before forward");
}

}  // namespace
}  // namespace moe::test
