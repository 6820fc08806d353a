// One MoE language model on one device, randomly initialised (issue 12 item 6), in two sections:
//  train:  training throughput and model FLOPs utilisation: full training steps (forward, backward, gradient
//          clipping, AdamW) on random tokens, timed after 2 warm-up steps;
//  decode: the engine's decode step (Model::forward_infer over a paged KV cache) at batch 1 and 64 (--batches) and
//          context --context, against the bandwidth bound: the bytes the step must read (bench/decode_steps.h:
//          f32 weights the batch uses, its keys and values) over the measured bandwidth: a GPU's copy bandwidth
//          (best of 5 copies of 1 GiB, read + written bytes over the time), the CPU's read bandwidth on the bench's
//          threads (bench_serve's). Lines "DECODE batch=B ... ratio R target 0.60".
// Default model: d_model 2048, 8 layers, 16 query / 4 KV heads, every FFN an MoE of 8 SwiGLU experts (d_expert
// 5632) with top-2 routing (dropless), vocabulary 32000, batch 8 x 1024 tokens.
//
// Model FLOPs per token (the convention of the Megatron / PaLM MFU figures: matmul FLOPs only, full attention,
// backward = 2 x forward): 6 x (the matmul weights a token uses: attention projections, router, its top-k experts,
// LM head) + 12 x layers x context x d_model (attention scores and values). MFU = those FLOPs per second over the
// peak: --peak-tflops, default 989 for CUDA with bf16 GEMMs (H100/H200 SXM, dense bf16), 67 for CUDA fp32; on the
// CPU only the achieved TFLOP/s is printed unless --peak-tflops is given. Line "MFU <ratio> target 0.35".
// usage: bench_model [--section train|decode|all] [--device cuda|cpu] [--bf16 1] [--d-model 2048] [--layers 8]
//                    [--heads 16] [--kv-heads 4] [--experts 8] [--top-k 2] [--d-expert 5632] [--vocab 32000]
//                    [--batch 8] [--seq 1024] [--steps 5] [--threads N] [--peak-tflops X] [--context 512]
//                    [--batches 1,64]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

#include "bench/decode_steps.h"
#include "core/backend.h"
#include "core/config.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "core/rng.h"
#include "core/threads.h"
#include "experts/build_model.h"

using namespace moe;
using clk = std::chrono::steady_clock;

namespace {

struct Options {
  std::string device = "cuda", section = "all", batches = "1,64";
  int context = 512;
  int bf16 = 1, d_model = 2048, layers = 8, heads = 16, kv_heads = 4, experts = 8, top_k = 2, d_expert = 5632;
  int vocab = 32000, batch = 8, seq = 1024, steps = 5, threads = 0;
  double peak_tflops = 0;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    int* ints[] = {&o.bf16, &o.d_model, &o.layers, &o.heads, &o.kv_heads, &o.experts, &o.top_k, &o.d_expert,
                   &o.vocab, &o.batch, &o.seq, &o.steps, &o.threads, &o.context};
    const char* names[] = {"--bf16", "--d-model", "--layers", "--heads", "--kv-heads", "--experts", "--top-k",
                           "--d-expert", "--vocab", "--batch", "--seq", "--steps", "--threads", "--context"};
    bool found = false;
    for (size_t j = 0; j < std::size(names); ++j)
      if (k == names[j]) *ints[j] = std::atoi(v.c_str()), found = true;
    if (k == "--device") o.device = v, found = true;
    if (k == "--section") o.section = v, found = true;
    if (k == "--batches") o.batches = v, found = true;
    if (k == "--peak-tflops") o.peak_tflops = std::atof(v.c_str()), found = true;
    if (!found) {
      std::fprintf(stderr, "bench_mfu: unknown option %s\n", k.c_str());
      std::exit(2);
    }
  }
  return o;
}

Config make_config(const Options& o) {
  Config c;
  proto::ModelConfig& m = *c.mutable_model();
  m.set_vocab_size(o.vocab);
  m.set_d_model(o.d_model);
  m.set_n_layers(o.layers);
  m.set_n_heads(o.heads);
  m.set_n_kv_heads(o.kv_heads);
  m.set_d_ff(o.d_expert);
  m.set_max_seq_len(o.seq);
  m.set_activation(proto::SWIGLU);
  m.add_ffn_pattern(proto::FFN_MOE);
  m.mutable_moe()->set_num_experts(o.experts);
  m.mutable_moe()->set_top_k(o.top_k);
  m.mutable_moe()->set_d_expert(o.d_expert);
  m.mutable_moe()->set_dropless(true);
  m.mutable_moe()->set_aux_loss_coef(0.01f);
  m.set_device(o.device == "cuda" ? proto::DEVICE_CUDA : proto::DEVICE_CPU);
  m.set_matmul_precision(o.device == "cuda" && o.bf16 ? proto::MATMUL_BF16 : proto::MATMUL_FP32);
  c.mutable_optimizer()->set_lr(1e-4f);
  c.mutable_train()->set_steps(o.steps + 2);
  c.mutable_data()->set_batch_size(o.batch);
  c.mutable_data()->set_seq_len(o.seq);
  fill_defaults(c);
  return c;
}

// matmul weights one token uses (attention projections, router, top-k experts, LM head)
double active_matmul_params(const proto::ModelConfig& m) {
  const double C = m.d_model(), D = C / m.n_heads(), Hkv = m.n_kv_heads(), F = m.moe().d_expert();
  const double attn = 2 * C * C + 2 * Hkv * D * C;
  const double ffn = m.moe().num_experts() * C + m.moe().top_k() * 3 * F * C;
  return m.n_layers() * (attn + ffn) + double(m.vocab_size()) * C;
}

double peak_tflops(const Options& o) {
  if (o.peak_tflops > 0) return o.peak_tflops;
  if (o.device == "cuda") return o.bf16 ? 989.0 : 67.0;
  return 0;
}

void train_section(const Options& o, const Config& cfg, Model* model) {
  AdamW opt(model->params(), cfg.optimizer());
  const int B = o.batch, T = o.seq, N = B * T;
  Rng rng(1);
  std::vector<int32_t> in(N), tg(N);
  for (int i = 0; i < N; ++i) {
    in[i] = static_cast<int32_t>(rng.below(o.vocab));
    tg[i] = static_cast<int32_t>(rng.below(o.vocab));
  }
  Backend& be = backend_for(model->params().device());
  double loss = 0;
  auto step = [&] {
    model->params().zero_grad();
    loss = model->forward(in.data(), tg.data(), B, T) + model->extra_loss();
    model->backward();
    clip_grad_norm(model->params(), 1.0);
    opt.step(cfg.optimizer().lr());
    be.sync();
  };
  std::printf("train: %.1f M parameters (%.1f M active matmul weights per token), batch %d x %d\n",
              model->params().numel() * 1e-6, active_matmul_params(cfg.model()) * 1e-6, B, T);
  step();
  step();
  const auto t0 = clk::now();
  for (int i = 0; i < o.steps; ++i) step();
  const double s = std::chrono::duration<double>(clk::now() - t0).count() / o.steps;
  const double flops_per_token =
      6 * active_matmul_params(cfg.model()) + 12.0 * o.layers * T * static_cast<double>(o.d_model);
  const double tflops = flops_per_token * N / s * 1e-12, peak = peak_tflops(o);
  std::printf("step %.1f ms, %.0f tokens/s, loss %.4f, model FLOPs %.4g GFLOP/token, %.4g TFLOP/s\n", s * 1e3, N / s,
              loss, flops_per_token * 1e-9, tflops);
  if (peak > 0)
    std::printf("MFU %.3f target 0.35 (peak %.4g TFLOP/s)\n", tflops / peak, peak);
  else
    std::printf("MFU n/a (no peak for %s: give --peak-tflops)\n", o.device.c_str());
}

// bytes/s of a device's memory: best of 5 copies of 1 GiB (read + written bytes over the time)
double copy_bandwidth(Backend& be) {
  const size_t bytes = size_t(1) << 30;
  void* a = be.alloc(bytes);
  void* b = be.alloc(bytes);
  be.memset0(a, bytes);
  be.sync();
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = clk::now();
    be.copy(b, a, bytes);
    be.sync();
    best = std::max(best, 2.0 * bytes / std::chrono::duration<double>(clk::now() - t0).count());
  }
  be.free(a);
  be.free(b);
  return best;
}

void decode_section(const Options& o, const Config& cfg, Model* model) {
  model->prepare_inference();
  Backend& be = model->workspace().backend();
  const bool host = be.device() == Device::kCPU;
  const double bw = host ? bench::read_bandwidth(omp_get_max_threads()) : copy_bandwidth(be);
  std::printf("decode: context %d, %s bandwidth %.1f GB/s\n", o.context, host ? "read" : "copy", bw * 1e-9);
  std::stringstream ss(o.batches);
  for (std::string b; std::getline(ss, b, ',');) {
    const int B = std::atoi(b.c_str());
    if (B <= 0) continue;
    const bench::DecodeTiming t = bench::time_decode_steps(*model, B, o.context);
    const double bytes = bench::decode_weight_bytes(cfg.model(), B) + bench::decode_kv_bytes(cfg.model(), B, o.context);
    const double bound = B * bw / bytes, got = B / t.seconds;
    std::printf("DECODE batch=%d ms_per_step=%.3f tokens_per_s=%.1f bound_tokens_per_s=%.1f (%.1f MiB per step) "
                "ratio %.3f target 0.60\n",
                B, t.seconds * 1e3, got, bound, bytes / (1 << 20), got / bound);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  if (o.threads > 0) set_num_threads(o.threads);
  try {
    const Config cfg = make_config(o);
    validate_config(cfg, /*needs_data=*/false);
    MOE_CHECK(o.section == "all" || o.section == "train" || o.section == "decode",
              "--section " << o.section << ": must be train, decode or all");
    MOE_CHECK(o.context + 1 <= o.seq, "--context " << o.context << " must be below --seq " << o.seq);
    std::printf("bench_model: %s%s, d_model %d, %d layers, heads %d/%d, %d experts top-%d d_expert %d, vocab %d\n",
                o.device.c_str(), o.device == "cuda" ? (o.bf16 ? " bf16 GEMMs" : " fp32 GEMMs") : "", o.d_model,
                o.layers, o.heads, o.kv_heads, o.experts, o.top_k, o.d_expert, o.vocab);
    // one model for both sections (weights drawn once): the decode section packs it for inference after training
    auto model = experts::build_model(cfg, {.inference = o.section == "decode"});  // (no CUDA device: its error)
    if (o.section != "decode") train_section(o, cfg, model.get());
    if (o.section != "train") decode_section(o, cfg, model.get());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_model: %s\n", e.what());
    return 1;
  }
  return 0;
}
