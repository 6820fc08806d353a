// Benchmark: (1) GEMM GFLOP/s of our matmul/linear kernels vs raw cblas_sgemm at the model's shapes;
// (2) training tokens/s of the reference model vs the same model in PyTorch eager (tests/oracle/model.py bench),
// same threads, same batch. Prints one table with ratios measured side by side in this run.
//
// usage: bench_train [--threads N] [--iters N] [--config FILE] [--python /usr/bin/python3] [--oracle DIR]
#include <cblas.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/kernels/cpu/kernels.h"
#include "core/model.h"
#include "experts/build_model.h"
#include "core/optimizer.h"
#include "core/threads.h"
#include "core/trainer.h"

using namespace moe;
using clk = std::chrono::steady_clock;

namespace {

double seconds_since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

template <typename F>
double time_best(F&& f, int iters) {  // best of 2 repetitions of `iters` calls, seconds per call
  double best = 1e30;
  for (int r = 0; r < 2; ++r) {
    auto t0 = clk::now();
    for (int i = 0; i < iters; ++i) f();
    best = std::min(best, seconds_since(t0) / iters);
  }
  return best;
}

std::string run_capture(const std::string& cmd) {
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return "";
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int rc = pclose(p);
  return rc == 0 ? out : "";
}

double json_number(const std::string& js, const std::string& key) {
  auto p = js.find("\"" + key + "\":");
  if (p == std::string::npos) return -1;
  return std::atof(js.c_str() + p + key.size() + 3);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, iters = 10;
  std::string config_path, python = "/usr/bin/python3";
  std::string oracle = std::string(MOE_SOURCE_DIR) + "/tests/oracle";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--threads") threads = std::atoi(argv[i + 1]);
    else if (k == "--iters") iters = std::atoi(argv[i + 1]);
    else if (k == "--config") config_path = argv[i + 1];
    else if (k == "--python") python = argv[i + 1];
    else if (k == "--oracle") oracle = argv[i + 1];
    else { std::fprintf(stderr, "unknown option %s\n", k.c_str()); return 2; }
  }
  set_num_threads(threads);

  // Reference model: the README demo's architecture unless --config is given.
  proto::ModelConfig m;
  int B = 16, T = 128;
  if (!config_path.empty()) {
    Config c = load_config_file(config_path);
    fill_defaults(c);
    m = c.model();
    B = c.data().batch_size();
    T = c.data().seq_len();
  } else {
    m.set_d_model(192); m.set_n_layers(4); m.set_n_heads(6); m.set_n_kv_heads(2); m.set_d_ff(512);
    m.set_max_seq_len(T); m.set_rope_theta(10000); m.set_norm_eps(1e-5f); m.set_init_std(0.02f);
  }
  if (m.vocab_size() == 0) m.set_vocab_size(1024);
  const int N = B * T, C = m.d_model(), F = m.d_ff(), V = m.vocab_size();
  const int HD = m.d_model() / m.n_heads() * m.n_kv_heads();

  std::printf("bench_train: threads %d, model d_model %d layers %d heads %d/%d d_ff %d vocab %d, batch %dx%d\n",
              threads, C, m.n_layers(), m.n_heads(), m.n_kv_heads(), F, V, B, T);

  // ---------------------------------------------------------------- GEMM
  std::printf("\n%-34s %12s %12s %8s\n", "GEMM (M x N x K)", "ours GF/s", "sgemm GF/s", "ratio");
  struct Shape3 { const char* what; int M, Nn, K; };
  std::vector<Shape3> shapes = {{"qkv/out proj  N x C x C", N, C, C}, {"kv proj       N x HDkv x C", N, HD, C},
                                {"ffn up        N x F x C", N, F, C}, {"ffn down      N x C x F", N, C, F},
                                {"lm head       N x V x C", N, V, C}};
  Rng rng(1);
  for (const auto& s : shapes) {
    std::vector<float> a(size_t(s.M) * s.K), w(size_t(s.Nn) * s.K), c1(size_t(s.M) * s.Nn), c2(c1.size());
    for (auto& x : a) x = rng.normal();
    for (auto& x : w) x = rng.normal();
    const double flops = 2.0 * s.M * s.Nn * s.K;
    const int it = std::max(3, static_cast<int>(2e10 / flops));
    // interleaved repetitions, best of each: both sides see the same machine state
    double t_ours = 1e30, t_raw = 1e30;
    for (int r = 0; r < 5; ++r) {
      t_ours = std::min(t_ours, time_best([&] { cpu::linear_forward(c1.data(), a.data(), w.data(), nullptr, s.M, s.K, s.Nn); }, it));
      t_raw = std::min(t_raw, time_best([&] {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.M, s.Nn, s.K, 1.0f, a.data(), s.K, w.data(), s.K, 0.0f,
                    c2.data(), s.Nn);
      }, it));
    }
    std::printf("%-34s %12.1f %12.1f %7.2fx\n", s.what, flops / t_ours * 1e-9, flops / t_raw * 1e-9, t_raw / t_ours);
  }

  // ---------------------------------------------------------------- training step
  Config mc;
  *mc.mutable_model() = m;
  auto owned = experts::build_model(mc);
  Model& model = *owned;
  proto::OptimizerConfig oc;
  oc.set_lr(1e-3f); oc.set_beta1(0.9f); oc.set_beta2(0.95f); oc.set_eps(1e-8f); oc.set_weight_decay(0.1f);
  AdamW opt(model.params(), oc);
  std::vector<int32_t> in(N), tg(N);
  for (int i = 0; i < N; ++i) { in[i] = static_cast<int32_t>(rng.below(V)); tg[i] = static_cast<int32_t>(rng.below(V)); }
  auto step = [&] {
    model.params().zero_grad();
    model.forward(in.data(), tg.data(), B, T);
    model.backward();
    clip_grad_norm(model.params(), 1.0);
    opt.step(1e-3f);
  };
  step();
  step();
  auto t0 = clk::now();
  for (int i = 0; i < iters; ++i) step();
  const double ours = seconds_since(t0) / iters;

  std::ofstream js("/tmp/bench_train_model.json");
  js << "{\"vocab_size\": " << V << ", \"d_model\": " << C << ", \"n_layers\": " << m.n_layers()
     << ", \"n_heads\": " << m.n_heads() << ", \"n_kv_heads\": " << m.n_kv_heads() << ", \"d_ff\": " << F
     << ", \"activation\": \"" << proto::Activation_Name(m.activation()) << "\", \"norm\": \""
     << proto::NormKind_Name(m.norm()) << "\", \"tie_embeddings\": " << (m.tie_embeddings() ? "true" : "false")
     << ", \"batch_size\": " << B << ", \"seq_len\": " << T << ", \"threads\": " << threads
     << ", \"iters\": " << iters << ", \"warmup\": 2}";
  js.close();
  const std::string env = "OMP_NUM_THREADS=" + std::to_string(threads) + " OPENBLAS_NUM_THREADS=" + std::to_string(threads);
  const std::string out = run_capture(env + " '" + python + "' '" + oracle + "/model.py' bench /tmp/bench_train_model.json");
  const double torch_ms = json_number(out, "step_ms");

  std::printf("\n%-34s %12s %12s %8s\n", "training step (fwd+bwd+clip+AdamW)", "ms/step", "tokens/s", "vs torch");
  std::printf("%-34s %12.1f %12.0f %7.2fx\n", "ours (C++, OpenBLAS + OpenMP)", ours * 1e3, N / ours,
              torch_ms > 0 ? torch_ms / (ours * 1e3) : 0.0);
  if (torch_ms > 0)
    std::printf("%-34s %12.1f %12.0f %7.2fx\n", "PyTorch eager (same model/threads)", torch_ms, N / (torch_ms * 1e-3), 1.0);
  else
    std::printf("PyTorch reference did not run (%s %s/model.py bench): install python3-torch\n", python.c_str(),
                oracle.c_str());
  return torch_ms > 0 ? 0 : 1;
}
