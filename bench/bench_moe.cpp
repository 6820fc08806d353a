// MoE benchmarks, one table per run (run under mpirun at 1 and 2 ranks):
//  1. MoE layer forward+backward time split into route / permute / all-to-all / regroup / expert GEMM / combine
//     (d_model 512, 8 experts, top-2, 4096 tokens in the global batch), and the dispatch overhead
//     (everything but expert GEMM and all-to-all) as a fraction of the layer time;
//  2. all-to-all bandwidth of our communicator vs raw MPI_Alltoallv of the same bytes;
//  3. expert GEMM (ExpertBank) vs raw cblas_sgemm of the same FLOPs;
//  4. word-expert step time (forward + backward + zero_grad + AdamW) at 1k, 16k and 128k experts, and at 128k
//     with the rows scattered (the multiplicative placement of format-1 checkpoints);
//  5. a word-expert layer vs a dense FFN of the same active FLOPs per token (dense d_ff = d_expert: a word expert
//     is one SwiGLU FFN per token, k = 1), each trained one step at a time as the trainer does (zero_grad,
//     forward, backward, global gradient norm, AdamW with clipping at 1.0 folded in: what a training step costs),
//     side by side in one run, tokens routed by a vocabulary router from Zipf(1) word frequencies; tokens/s of
//     each, their ratio, and the word layer's split (one rank);
//  6. the small-dimension matmul kernels (core/kernels/cpu/small_matmul.cpp) vs sgemm on a word expert's shapes,
//     M = 1..32 rows, at d_model --wd-d_model and each --wd-d_expert (the bounds of matmul_takes_small come from it).
// usage: mpirun -np N bench_moe [--section 1..6 (default all)] [--tokens 4096] [--d_model 512] [--experts 8]
//        [--d_expert 1024] [--iters 3] [--word-sizes 1024,16384,131072] [--word-scattered 1]
//        sections 5, 6: [--wd-tokens 2048] [--wd-d_model 192] [--wd-experts 256,4096,65536,1048576]
//        [--wd-d_expert 16,64,512] [--wd-vocab 32768] [--wd-mem-gib 4] [--wd-reps 9] [--wd-cpu-clock 0]
#include <cblas.h>
#include <mpi.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/grouped_ffn.h"
#include "core/kernels/cpu/kernels.h"
#include "core/optimizer.h"
#include "core/params.h"
#include "core/threads.h"
#include "experts/moe_layer.h"
#include "comm/parallel.h"

using namespace moe;
using clk = std::chrono::steady_clock;

namespace {
double now_s() { return std::chrono::duration<double>(clk::now().time_since_epoch()).count(); }

double max_over_ranks(double v) {
  double m = v;
  MPI_Allreduce(&v, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return m;
}

proto::ModelConfig layer_config(int C, int E, int F, int k) {
  proto::ModelConfig m;
  m.set_d_model(C);
  m.set_d_ff(F);
  m.set_vocab_size(1024);
  m.set_n_layers(1);
  m.set_n_heads(1);
  m.set_init_std(0.02f);
  auto* e = m.mutable_moe();
  e->set_num_experts(E);
  e->set_top_k(k);
  e->set_d_expert(F);
  e->set_capacity_factor(1.25f);
  e->set_aux_loss_coef(0.01f);
  return m;
}

std::vector<int> parse_list(const char* c) {  // "1,2,3"
  std::vector<int> v;
  while (*c) {
    v.push_back(std::atoi(c));
    while (*c && *c != ',') ++c;
    if (*c == ',') ++c;
  }
  return v;
}

// ------------------------------------------------------------ 5. word experts vs a dense FFN (training step)
// The clock of section 5: wall time, or this process's CPU time (--wd-cpu-clock 1), which on a shared machine
// does not count the time the process waits for a core (with one thread it is the step's own time; with several
// it also counts threads spinning at barriers).
using Clock = double (*)();
double cpu_s() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct WordVsDenseOpts {
  int tokens = 2048, C = 192, vocab = 32768, reps = 9;
  Clock clock = now_s;
  double mem_gib = 4;  // tables needing more (value, grad, AdamW m and v) are skipped
  std::vector<int> experts{256, 4096, 65536, 1048576}, d_expert{16, 64, 512};
};

// Zipf(1) word frequencies over `vocab` ids (the router's corpus counts) and N token ids drawn from them.
struct ZipfTokens {
  std::vector<int64_t> counts;  // [vocab]
  std::vector<int32_t> ids;     // [N]
};
ZipfTokens zipf_tokens(int vocab, int N, uint64_t seed) {
  ZipfTokens z;
  std::vector<double> cdf(vocab);
  double sum = 0;
  for (int i = 0; i < vocab; ++i) cdf[i] = sum += 1.0 / (i + 1);
  z.counts.resize(vocab);
  for (int i = 0; i < vocab; ++i) z.counts[i] = std::llround(1e9 / (i + 1));
  Rng rng(seed);
  z.ids.resize(N);
  for (auto& t : z.ids) {
    const auto it = std::lower_bound(cdf.begin(), cdf.end(), rng.uniform() * sum);
    t = static_cast<int32_t>(std::min<int64_t>(it - cdf.begin(), vocab - 1));
  }
  return z;
}

// One FFN unit with its parameters and AdamW, trained one step at a time on fixed inputs as the trainer does.
struct TrainedUnit {
  ParamStore ps;
  Workspace ws{cpu_backend()};
  std::unique_ptr<FfnUnit> unit;
  std::unique_ptr<AdamW> opt;
  // seconds of: zero_grad, forward, backward, global gradient norm, AdamW with the clipping (max norm 1) folded in
  std::array<double, 5> step(Clock clock, const FfnContext& ctx, float* y, const float* x, float* dx, const float* dy,
                             int N) {
    std::array<double, 5> t{};
    double s = clock();
    auto lap = [&](int i) {
      const double e = clock();
      t[i] = e - s;
      s = e;
    };
    ps.zero_grad();
    lap(0);
    unit->forward(ctx, y, x, N);
    lap(1);
    unit->backward(ctx, dx, dy, N);
    lap(2);
    const double norm = grad_norm(ps);
    lap(3);
    opt->step(1e-3f, clip_scale(norm, 1.0));  // as the trainer does
    lap(4);
    return t;
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// GB/s of a stream with AdamW's access pattern (read g, w, m, v; write w, m, v: 28 bytes per element) over 4 x 64
// MiB, all threads: the memory bandwidth the optimizer's pass over the used rows is bound by.
double update_gbps() {
  const int64_t n = int64_t(16) << 20;
  std::vector<float> w(n, 1.0f), g(n, 0.5f), m(n, 0.0f), v(n, 0.0f);
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const double s = now_s();
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      m[i] = 0.9f * m[i] + 0.1f * g[i];
      v[i] = 0.95f * v[i] + 0.05f * g[i] * g[i];
      w[i] -= 1e-3f * (m[i] / (v[i] + 1.0f) + 0.1f * w[i]);
    }
    best = std::min(best, now_s() - s);
  }
  return 28.0 * n / best * 1e-9 + 0 * w[n / 2];
}

// The word layer's groups as WordExpertFfn forms them on one rank: experts (rows of the table) ascending, with
// their row offsets; ids routed by the vocabulary router and placed by the interleaved placement.
void word_groups(const router::VocabRouter& vr, const std::vector<int32_t>& ids, int E, std::vector<int64_t>& experts,
                 std::vector<int64_t>& offsets) {
  std::vector<int64_t> rows;
  for (int32_t t : ids)
    rows.push_back(experts::word_expert_row(vr.expert_of(t), E, proto::WordExpertConfig::PLACEMENT_INTERLEAVED));
  std::sort(rows.begin(), rows.end());
  experts.clear();
  offsets.assign(1, 0);
  for (size_t i = 0; i < rows.size(); ++i) {
    if (i == 0 || rows[i] != rows[i - 1]) {
      experts.push_back(rows[i]);
      offsets.push_back(offsets.back());
    }
    ++offsets.back();
  }
}

// Grouped FFN phases of the word table on its own (forward, backward_data, backward_weights), medians in seconds.
std::array<double, 3> word_ffn_split(Clock clock, ParamStore& ps, int C, int F, const std::vector<int64_t>& experts,
                                     const std::vector<int64_t>& offsets, const std::vector<float>& x,
                                     const std::vector<float>& dy, int reps) {
  Workspace ws{cpu_backend()};
  FfnWeights w{ps.find("we.experts.w_gate"), ps.find("we.experts.w_up"), nullptr, ps.find("we.experts.w_down")};
  GroupedFfn ffn(ws, C, F, proto::SWIGLU, w);
  std::vector<float> y(x.size()), dx(x.size());
  std::vector<double> t[3];
  for (int r = 0; r <= reps; ++r) {
    ps.zero_grad();
    double s = clock(), e;
    ffn.forward(y.data(), x.data(), experts.data(), offsets.data(), int64_t(experts.size()));
    e = clock(), t[0].push_back(e - s), s = e;
    ffn.backward_data(dx.data(), dy.data());
    e = clock(), t[1].push_back(e - s), s = e;
    ffn.backward_weights();
    t[2].push_back(clock() - s);
  }
  return {median(t[0]), median(t[1]), median(t[2])};
}

std::unique_ptr<TrainedUnit> word_unit(const WordVsDenseOpts& o, int E, int F, const ZipfTokens& z) {
  proto::ModelConfig wc;
  wc.set_d_model(o.C);
  wc.set_vocab_size(o.vocab);
  wc.set_activation(proto::SWIGLU);
  wc.mutable_word_experts()->set_num_experts(E);
  wc.mutable_word_experts()->set_d_expert(F);
  // as the demo (192 word experts + 64 shared of 256): 3/4 of the table for the most frequent words
  wc.mutable_word_experts()->set_num_frequent(E > o.vocab ? o.vocab : E - E / 4);
  wc.mutable_word_experts()->set_placement(proto::WordExpertConfig::PLACEMENT_INTERLEAVED);
  auto u = std::make_unique<TrainedUnit>();
  u->unit = std::make_unique<experts::WordExpertFfn>(u->ps, u->ws, "we", wc, nullptr, &z.counts);
  return u;
}

void word_vs_dense_case(const WordVsDenseOpts& o, int E, int F, const ZipfTokens& z, double gbps) {
  const int C = o.C, N = o.tokens;
  const double gib = double(E) * 3 * C * F * 4 * 4 / (1 << 30);
  char name[64];
  std::snprintf(name, sizeof name, "%d x d_expert %d", E, F);
  if (gib > o.mem_gib) {
    std::printf("%-22s skipped: the table needs %.1f GiB (value, grad, m, v) > --wd-mem-gib %.1f\n", name, gib,
                o.mem_gib);
    return;
  }
  proto::OptimizerConfig oc;
  oc.set_lr(1e-3f), oc.set_beta1(0.9f), oc.set_beta2(0.95f), oc.set_eps(1e-8f), oc.set_weight_decay(0.1f);
  auto dense = std::make_unique<TrainedUnit>();
  dense->unit = std::make_unique<DenseFfn>(dense->ps, dense->ws, "dense", C, F, proto::SWIGLU);
  auto word = word_unit(o, E, F, z);
  for (TrainedUnit* u : {dense.get(), word.get()}) {
    init_params(u->ps, 5, 0.02f, 0.01f);
    u->opt = std::make_unique<AdamW>(u->ps, oc);
  }
  Rng rng(17);
  std::vector<float> x(size_t(N) * C), dy(x.size()), y(x.size()), dx(x.size());
  for (auto& v : x) v = rng.normal();
  for (auto& v : dy) v = rng.normal() * 0.01f;
  FfnContext ctx;
  ctx.token_ids = z.ids.data();
  std::vector<double> td, tw, ph[5];
  for (int r = 0; r <= o.reps; ++r) {  // round robin, the first round is warm-up
    const auto a = dense->step(o.clock, ctx, y.data(), x.data(), dx.data(), dy.data(), N);
    const auto b = word->step(o.clock, ctx, y.data(), x.data(), dx.data(), dy.data(), N);
    if (r == 0) continue;
    td.push_back(a[0] + a[1] + a[2] + a[3] + a[4]);
    tw.push_back(b[0] + b[1] + b[2] + b[3] + b[4]);
    for (int i = 0; i < 5; ++i) ph[i].push_back(b[i]);
  }
  router::VocabRouter vr = router::VocabRouter::build(z.counts, E, E > o.vocab ? o.vocab : E - E / 4);
  std::vector<int64_t> ex, off;
  word_groups(vr, z.ids, E, ex, off);
  const auto split = word_ffn_split(o.clock, word->ps, C, F, ex, off, x, dy, o.reps);
  const double d = median(td), w = median(tw);
  const double touched = double(ex.size()) * 3 * C * F, floor_s = touched * 28 / (gbps * 1e9);
  std::printf("%-22s %10.0f %10.0f %7.3fx %7zu %9.2f %9.2f %7.3fx\n", name, N / d, N / w, d / w, ex.size(), w * 1e3,
              floor_s * 1e3, std::min(1.0, d / floor_s));
  std::printf("%-22s %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f\n", "  split ms", median(ph[0]) * 1e3,
              (median(ph[1]) - split[0]) * 1e3, split[0] * 1e3, split[1] * 1e3, split[2] * 1e3,
              (median(ph[2]) - split[1] - split[2]) * 1e3, median(ph[3]) * 1e3, median(ph[4]) * 1e3);
}

void word_vs_dense(const WordVsDenseOpts& o) {
  const ZipfTokens z = zipf_tokens(o.vocab, o.tokens, 23);
  const double gbps = update_gbps();
  std::printf(
      "\nword-expert layer vs dense FFN (SwiGLU, d_model %d, dense d_ff = d_expert, %d tokens, Zipf(1) over "
      "%d words; AdamW-pattern stream %.1f GB/s; %s)\n",
      o.C, o.tokens, o.vocab, gbps, o.clock == now_s ? "wall clock" : "process CPU time");
  std::printf("%-22s %10s %10s %8s %7s %9s %9s %8s\n", "experts x d_expert", "dense t/s", "word t/s", "ratio", "used",
              "word ms", "floor ms", "bound");
  std::printf("%-22s %8s %8s %8s %8s %8s %8s %8s %8s\n", "", "zero", "route", "ffn fwd", "ffn dX", "ffn dW", "unroute",
              "norm", "AdamW");
  for (int E : o.experts)
    for (int F : o.d_expert) word_vs_dense_case(o, E, F, z, gbps);
  std::printf(
      "(ratio = word tok/s / dense tok/s; used = experts that got tokens; floor = AdamW's 28 bytes per used\n"
      " parameter at the AdamW-pattern stream bandwidth; bound = the ratio if the word step took only that floor)\n");
}

// ------------------------------------------------------------ 6. small-dimension matmul kernels vs sgemm
// The three products of a word expert's group of M rows against its weights (C = d_model, F = d_expert), over
// `slots` different weight matrices (as many experts: the weights come from memory, not cache), one thread:
// forward x[M,C] W[F,C]^T (nt), input gradient g[M,F] W[F,C] (nn), weight gradient dW[F,C] += g[M,F]^T x[M,C]
// (tn). GB/s of weight traffic (tn reads and writes dW); ours / sgemm > 1 where the small kernel wins.
void small_matmul_vs_sgemm(int C, int F, const std::vector<int>& rows) {
  const int slots = std::max(8, int((int64_t(256) << 20) / (int64_t(F) * C * 4)));  // ~256 MiB of weights
  std::vector<float> W(size_t(slots) * F * C), x(size_t(64) * std::max(C, F)), g(x.size()), out(x.size());
  Rng rng(29);
  for (auto& v : W) v = rng.normal() * 0.01f;
  for (auto& v : x) v = rng.normal();
  for (auto& v : g) v = rng.normal();
  const double bytes = double(W.size()) * 4;
  std::printf(
      "\nsmall-row matmul, d_model %d, d_expert %d, %d weight matrices (%.0f MiB), 1 thread: GB/s of weight "
      "traffic\n%-6s %9s %9s %7s %9s %9s %7s %9s %9s %7s\n",
      C, F, slots, bytes / (1 << 20), "rows", "nt sgemm", "nt ours", "ratio", "nn sgemm", "nn ours", "ratio",
      "tn sgemm", "tn ours", "ratio");
  const int threads = omp_get_max_threads();
  set_num_threads(1);
  for (int M : rows) {
    const int64_t FC = int64_t(F) * C;
    const float *xp = x.data(), *gp = g.data();
    float* op = out.data();
    auto w = [&](int q) { return W.data() + q * FC; };
    const std::array<std::function<void()>, 6> fns{
        [&] {
          for (int q = 0; q < slots; ++q)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, F, C, 1, xp, C, w(q), C, 0, op, F);
        },
        [&] {
          for (int q = 0; q < slots; ++q) cpu::matmul_nt_small(op, xp, w(q), M, F, C, 0);
        },
        [&] {
          for (int q = 0; q < slots; ++q)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, C, F, 1, gp, F, w(q), C, 0, op, C);
        },
        [&] {
          for (int q = 0; q < slots; ++q) cpu::matmul_nn_small(op, gp, w(q), M, C, F, 0);
        },
        [&] {
          for (int q = 0; q < slots; ++q)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, F, C, M, 1, gp, F, xp, C, 1, w(q), C);
        },
        [&] {
          for (int q = 0; q < slots; ++q) cpu::matmul_tn_small(w(q), gp, xp, F, C, M, 1);
        }};
    double best[6] = {1e30, 1e30, 1e30, 1e30, 1e30, 1e30};
    for (int r = 0; r < 5; ++r)  // round robin, best of 5
      for (int i = 0; i < 6; ++i) {
        const double s = now_s();
        fns[i]();
        best[i] = std::min(best[i], now_s() - s);
      }
    auto gbps = [&](int i) { return (i >= 4 ? 2 : 1) * bytes / best[i] * 1e-9; };
    std::printf("%-6d %9.1f %9.1f %6.2fx %9.1f %9.1f %6.2fx %9.1f %9.1f %6.2fx\n", M, gbps(0), gbps(1),
                best[0] / best[1], gbps(2), gbps(3), best[2] / best[3], gbps(4), gbps(5), best[4] / best[5]);
  }
  set_num_threads(threads);
}
}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int tokens = 4096, C = 512, E = 8, F = 1024, iters = 3, k = 2, threads = 0, section = 0, word_scattered = 1;
  std::vector<int> word_sizes = {1024, 16384, 131072};
  WordVsDenseOpts wd;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    int v = std::atoi(argv[i + 1]);
    if (a == "--tokens") tokens = v;
    else if (a == "--d_model") C = v;
    else if (a == "--experts") E = v;
    else if (a == "--d_expert") F = v;
    else if (a == "--iters") iters = v;
    else if (a == "--threads") threads = v;
    else if (a == "--section") section = v;
    else if (a == "--word-scattered") word_scattered = v;
    else if (a == "--word-sizes") word_sizes = parse_list(argv[i + 1]);  // section 4 (the first is the baseline)
    else if (a == "--wd-tokens") wd.tokens = v;
    else if (a == "--wd-d_model") wd.C = v;
    else if (a == "--wd-vocab") wd.vocab = v;
    else if (a == "--wd-reps") wd.reps = v;
    else if (a == "--wd-mem-gib") wd.mem_gib = std::atof(argv[i + 1]);
    else if (a == "--wd-cpu-clock") wd.clock = v ? cpu_s : now_s;
    else if (a == "--wd-experts") wd.experts = parse_list(argv[i + 1]);
    else if (a == "--wd-d_expert") wd.d_expert = parse_list(argv[i + 1]);
  }
  int world_n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world_n);
  comm::Parallel par(comm::Communicator::world(), /*expert_parallel=*/world_n);
  const int W = par.size(), rank = par.rank();
  const int nt = set_num_threads(threads);
  const int N = tokens / W;  // this rank's tokens
  const bool lead = rank == 0;
  if (lead)
    std::printf("bench_moe: %d rank(s) x %d thread(s); d_model %d, %d experts (top-%d, cf 1.25), d_expert %d, "
                "%d tokens (%d per rank)\n", W, nt, C, E, k, F, tokens, N);

  Rng rng(3 + rank);
  // ------------------------------------------------------------ 1. MoE layer split
  if (section == 0 || section == 1) {
  proto::ModelConfig cfg = layer_config(C, E, F, k);
  ParamStore ps;
  Workspace ws{cpu_backend()};
  experts::MoeFfn layer(ps, ws, "moe", cfg, par.expert_group(), 1);
  for (Param* p : ps.all())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.f32()[i] = rng.normal() * 0.02f;
  std::vector<float> x(size_t(N) * C), y(x.size()), dy(x.size()), dx(x.size());
  for (auto& v : x) v = rng.normal();
  for (auto& v : dy) v = rng.normal();
  FfnContext ctx;
  auto run_layer = [&] {
    layer.forward(ctx, y.data(), x.data(), N);
    layer.backward(ctx, dx.data(), dy.data(), N);
  };
  run_layer();
  layer.reset_timings();
  MPI_Barrier(MPI_COMM_WORLD);
  double t0 = now_s();
  for (int i = 0; i < iters; ++i) run_layer();
  // per-rank phase times; the table shows rank 0's split and the worst rank's dispatch overhead (waiting for a
  // slower peer inside the all-to-all counts as all-to-all)
  const double total = (now_s() - t0) / iters;
  auto& dt = layer.dispatcher().timings();
  const double route = layer.route_seconds() / iters;
  const double permute = dt.permute / iters;
  const double a2a = dt.all_to_all / iters;
  const double regroup = dt.regroup / iters;
  const double expert = layer.expert_seconds() / iters;
  const double combine = layer.combine_seconds() / iters;
  const double overhead_share = max_over_ranks((total - expert - a2a) / total);
  const double total_max = max_over_ranks(total);
  if (lead) {
    std::printf("\n%-44s %10s %8s\n", "MoE layer fwd+bwd (rank 0)", "ms", "share");
    auto row = [&](const char* n, double s) { std::printf("%-44s %10.2f %7.1f%%\n", n, s * 1e3, 100 * s / total); };
    row("route (router GEMM, softmax, top-k, losses)", route);
    row("permute (gather rows by expert)", permute);
    row("all-to-all (counts + rows, both ways)", a2a);
    row("regroup (source-major <-> expert-major)", regroup);
    row("expert GEMM (ExpertBank fwd+bwd)", expert);
    row("combine (unpermute * gates fwd+bwd, permute bwd)", combine);
    row("total", total);
    std::printf("%-44s %10.2f\n", "total, slowest rank", total_max * 1e3);
    std::printf("%-44s %9.1f%%   (target <= 15%%)\n", "dispatch overhead (total-expert-a2a), worst rank",
                100 * overhead_share);
  }
  }  // section 1

  // ------------------------------------------------------------ 2. all-to-all vs raw MPI
  if (W > 1 && (section == 0 || section == 2)) {
    const int64_t rows_per_peer = N * k / W;
    std::vector<int64_t> counts(W, rows_per_peer);
    std::vector<float> send(size_t(rows_per_peer) * W * C, 1.0f), recv(send.size());
    std::vector<int> ic(W, static_cast<int>(rows_per_peer * C)), id(W);
    for (int r = 0; r < W; ++r) id[r] = static_cast<int>(r * rows_per_peer * C);
    // round robin over the three variants, best of 5 rounds of 10 calls each: no variant gets the cold start
    const int reps = 10;
    auto timed = [&](auto&& f) {
      MPI_Barrier(MPI_COMM_WORLD);
      double s = now_s();
      for (int i = 0; i < reps; ++i) f();
      return max_over_ranks((now_s() - s) / reps);
    };
    auto f_ours = [&] { par.world().all_to_all_v(send.data(), counts.data(), recv.data(), counts.data(), C); };
    auto f_raw = [&] {
      MPI_Alltoallv(send.data(), ic.data(), id.data(), MPI_FLOAT, recv.data(), ic.data(), id.data(), MPI_FLOAT,
                    MPI_COMM_WORLD);
    };
    auto f_raw_nb = [&] {
      MPI_Request req;
      MPI_Ialltoallv(send.data(), ic.data(), id.data(), MPI_FLOAT, recv.data(), ic.data(), id.data(), MPI_FLOAT,
                     MPI_COMM_WORLD, &req);
      MPI_Wait(&req, MPI_STATUS_IGNORE);
    };
    double ours = 1e30, raw = 1e30, raw_nb = 1e30;
    for (int round = 0; round < 5; ++round) {
      ours = std::min(ours, timed(f_ours));
      raw = std::min(raw, timed(f_raw));
      raw_nb = std::min(raw_nb, timed(f_raw_nb));
    }
    const double bytes = double(send.size()) * 4;
    if (lead) {
      std::printf("\n%-44s %10s %10s %8s\n", "all-to-all, same bytes per rank", "GB/s", "ms", "ratio");
      std::printf("%-44s %10.2f %10.3f %7.2fx\n", "ours (Communicator::all_to_all_v)", bytes / ours * 1e-9, ours * 1e3,
                  raw / ours);
      std::printf("%-44s %10.2f %10.3f %7.2fx\n", "raw MPI_Alltoallv", bytes / raw * 1e-9, raw * 1e3, 1.0);
      std::printf("%-44s %10.2f %10.3f %7.2fx\n", "raw MPI_Ialltoallv + MPI_Wait", bytes / raw_nb * 1e-9,
                  raw_nb * 1e3, raw / raw_nb);
      std::printf("(%.1f MiB sent per rank per call)\n", bytes / 1048576);
    }
  }

  // ------------------------------------------------------------ 3. expert GEMM vs raw sgemm (local, rank 0 shape)
  if (section == 0 || section == 3) {
    const int El = E / par.ep_size();
    const int64_t rows_total = int64_t(N) * k;  // about what this rank's experts receive
    std::vector<int64_t> off(El + 1);
    for (int e = 0; e <= El; ++e) off[e] = rows_total * e / El;
    ParamStore bps;
    Workspace bws{cpu_backend()};
    experts::ExpertBank bank(bps, bws, "bank", experts::ExpertBankDims{El, C, F, proto::SWIGLU});
    for (Param* p : bps.all())
      for (int64_t i = 0; i < p->value.numel(); ++i) p->value.f32()[i] = rng.normal() * 0.02f;
    std::vector<float> bx(size_t(rows_total) * C), by(bx.size()), bdy(bx.size()), bdx(bx.size());
    for (auto& v : bx) v = rng.normal();
    for (auto& v : bdy) v = rng.normal();
    // the same FLOPs as raw sgemm calls: 3 GEMMs of [rows_e, C] x [C, F] per expert
    std::vector<float> h(size_t(rows_total) * F), w(size_t(F) * C);
    for (auto& v : w) v = rng.normal();
    auto raw_fwd = [&] {
      for (int e = 0; e < El; ++e) {
        const int m = static_cast<int>(off[e + 1] - off[e]);
        const float* xe = bx.data() + off[e] * C;
        float* he = h.data() + off[e] * F;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, F, C, 1, xe, C, w.data(), C, 0, he, F);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, F, C, 1, xe, C, w.data(), C, 0, he, F);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, C, F, 1, he, F, w.data(), C, 0,
                    by.data() + off[e] * C, C);
      }
    };
    // interleaved, best of each
    double fwd = 1e30, raw = 1e30;
    for (int r = 0; r < iters + 2; ++r) {
      double s = now_s();
      bank.forward(by.data(), bx.data(), off.data());
      fwd = std::min(fwd, now_s() - s);
      s = now_s();
      raw_fwd();
      raw = std::min(raw, now_s() - s);
    }
    const double flops = 3.0 * 2.0 * rows_total * C * F;
    if (lead) {
      std::printf("\n%-44s %10s %10s %8s\n", "expert FFN forward (rank 0)", "GF/s", "ms", "ratio");
      std::printf("%-44s %10.1f %10.2f %7.2fx\n", "ExpertBank (SwiGLU, one GEMM per expert)", flops / fwd * 1e-9,
                  fwd * 1e3, raw / fwd);
      std::printf("%-44s %10.1f %10.2f %7.2fx\n", "raw cblas_sgemm, same shapes", flops / raw * 1e-9, raw * 1e3, 1.0);
    }
  }

  // ------------------------------------------------------------ 4. word experts: step time vs table size
  if (section == 0 || section == 4) {
    const int Cw = 32, Fw = 16, Nw = tokens / W, V = 1024;
    std::vector<int32_t> ids(Nw);
    Rng tr(11 + rank);
    for (auto& t : ids) t = static_cast<int32_t>(tr.below(V));
    std::vector<int64_t> counts(V);
    for (int i = 0; i < V; ++i) counts[i] = V - i;
    std::vector<float> wx(size_t(Nw) * Cw), wy(wx.size()), wdy(wx.size()), wdx(wx.size());
    for (auto& v : wx) v = tr.normal();
    for (auto& v : wdy) v = tr.normal();
    if (lead) std::printf("\n%-44s %10s %8s\n", "word-expert layer step (fwd+bwd+AdamW)", "ms", "vs first");
    struct Table {
      int E;
      bool scattered;  // the multiplicative placement: the same rows scattered over the whole table
      ParamStore ps;
      Workspace ws{cpu_backend()};
      std::unique_ptr<experts::WordExpertFfn> layer;
      std::unique_ptr<AdamW> opt;
      std::vector<double> times;
      std::vector<double> phases[4];  // rank 0: zero_grad, forward, backward, AdamW
    };
    std::vector<std::unique_ptr<Table>> tables;
    proto::OptimizerConfig oc;
    oc.set_lr(1e-3f); oc.set_beta1(0.9f); oc.set_beta2(0.95f); oc.set_eps(1e-8f);
    // the configured sizes with the default (interleaved) placement, then the largest with the multiplicative
    // one of format-1 checkpoints, which scatters the same frequent experts over the whole table (the memory
    // system's cost of scattered rows, shown side by side)
    std::vector<std::pair<int, bool>> cases;
    for (int Ew : word_sizes) cases.push_back({Ew, false});
    if (word_scattered && !word_sizes.empty()) cases.push_back({word_sizes.back(), true});
    for (auto [Ew, scattered] : cases) {
      auto t = std::make_unique<Table>();
      t->E = Ew;
      t->scattered = scattered;
      proto::ModelConfig wc;
      wc.set_d_model(Cw);
      wc.set_vocab_size(V);
      wc.set_activation(proto::SWIGLU);
      wc.mutable_word_experts()->set_num_experts(Ew);
      wc.mutable_word_experts()->set_d_expert(Fw);
      wc.mutable_word_experts()->set_num_frequent(V);  // every token its own expert: the same routing at every size
      wc.mutable_word_experts()->set_placement(scattered ? proto::WordExpertConfig::PLACEMENT_MULTIPLICATIVE
                                                         : proto::WordExpertConfig::PLACEMENT_INTERLEAVED);
      t->layer = std::make_unique<experts::WordExpertFfn>(t->ps, t->ws, "we", wc, par.expert_group(), &counts);
      t->opt = std::make_unique<AdamW>(t->ps, oc);
      tables.push_back(std::move(t));
    }
    FfnContext wctx;
    wctx.token_ids = ids.data();
    // one step, with the phase times (this rank) in ph: zero_grad, forward, backward, AdamW
    auto step = [&](Table& t, double ph[4]) {
      double s = now_s(), e;
      t.ps.zero_grad();
      e = now_s(); ph[0] = e - s; s = e;
      t.layer->forward(wctx, wy.data(), wx.data(), Nw);
      e = now_s(); ph[1] = e - s; s = e;
      t.layer->backward(wctx, wdx.data(), wdy.data(), Nw);
      e = now_s(); ph[2] = e - s; s = e;
      t.opt->step(1e-3f);
      ph[3] = now_s() - s;
    };
    for (int rep = 0; rep < 33; ++rep)  // round robin over the sizes: the same machine state for each
      for (auto& t : tables) {
        MPI_Barrier(MPI_COMM_WORLD);
        const double s = now_s();
        double ph[4];
        step(*t, ph);
        const double total = max_over_ranks(now_s() - s);
        if (rep >= 2) {
          t->times.push_back(total);
          for (int i = 0; i < 4; ++i) t->phases[i].push_back(ph[i]);
        }
      }
    double base = 0;
    for (auto& t : tables) {
      std::sort(t->times.begin(), t->times.end());
      const double med = t->times[t->times.size() / 2];
      if (base == 0) base = med;
      if (lead) {
        char name[96];
        std::snprintf(name, sizeof name, "%d experts%s (d %d, d_expert %d, %d tokens)", t->E,
                      t->scattered ? " scattered" : "", Cw, Fw, Nw * W);
        std::printf("%-58s %10.3f %7.2fx   %s\n", name, med * 1e3, med / base,
                    t->scattered ? "(multiplicative placement)" : "(target <= 1.2x)");
      }
    }
    if (lead) std::printf("%-58s %10s %10s %10s %10s\n", "  split, rank 0 (median ms)", "zero_grad", "forward",
                          "backward", "AdamW");
    for (auto& t : tables) {
      double m[4];
      for (int i = 0; i < 4; ++i) {
        std::sort(t->phases[i].begin(), t->phases[i].end());
        m[i] = t->phases[i][t->phases[i].size() / 2] * 1e3;
      }
      if (lead) {
        char name[96];
        std::snprintf(name, sizeof name, "  %d experts%s", t->E, t->scattered ? " scattered" : "");
        std::printf("%-58s %10.3f %10.3f %10.3f %10.3f\n", name, m[0], m[1], m[2], m[3]);
      }
    }
  }
  // ------------------------------------------------------------ 5. word experts vs a dense FFN (one rank)
  if (section == 0 || section == 5) {
    if (W == 1) word_vs_dense(wd);
    else if (lead) std::printf("\nsection 5 runs on one rank (it compares one rank's layers); skipped\n");
  }
  // ------------------------------------------------------------ 6. small-row matmul kernels vs sgemm (rank 0)
  if ((section == 0 || section == 6) && lead)
    for (int Fk : wd.d_expert) small_matmul_vs_sgemm(wd.C, Fk, {1, 2, 4, 6, 8, 12, 16, 24, 32});
  MPI_Finalize();
  return 0;
}
