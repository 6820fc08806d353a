// The decode measurements shared by bench_serve (a checkpoint on the CPU) and bench_model (a random model on any
// device): the bytes a decode step must read (its bandwidth bound), the host's read bandwidth, and the engine's
// decode step alone
// (Model::forward_infer over a paged KV cache; no HTTP, no scheduling).
#pragma once
#include <algorithm>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cmath>
#include <ctime>
#include <vector>

#include "core/config.h"
#include "core/kv_cache.h"
#include "core/model.h"

namespace moe::bench {

// Bytes of f32 weights one decode step of `batch` sequences reads: per token the embedding row; once per step the
// norms, attention projections and FFNs (of an MoE layer the router and the experts the batch is expected to use:
// E (1 - (1 - k/E)^batch), k at batch 1; the one word expert per token of a word-expert layer), the final norm and
// the LM head.
inline double decode_weight_bytes(const proto::ModelConfig& m, int batch) {
  const double C = m.d_model(), D = C / m.n_heads(), H = m.n_heads(), Hkv = m.n_kv_heads(), V = m.vocab_size();
  const double mats = m.activation() == proto::SWIGLU ? 3 : 2;
  double f = batch * C + C + V * C;  // embedding rows, final norm, lm head
  for (int l = 0; l < m.n_layers(); ++l) {
    f += 2 * C + 2 * H * D * C + 2 * Hkv * D * C;
    switch (layer_ffn_kind(m, l)) {
      case proto::FFN_MOE: {
        const double E = m.moe().num_experts(), k = m.moe().top_k();
        const double used = E * (1 - std::pow(1 - k / E, batch));
        f += E * C + used * mats * m.moe().d_expert() * C;
        break;
      }
      case proto::FFN_WORD_EXPERT:
        f += batch * mats * m.word_experts().d_expert() * C;
        break;
      default:
        f += mats * m.d_ff() * C;
    }
  }
  return 4 * f;
}

// Bytes of keys and values one decode step of `batch` sequences at context `ctx` reads (f32).
inline double decode_kv_bytes(const proto::ModelConfig& m, int batch, double ctx) {
  return 4.0 * 2 * m.n_layers() * m.n_kv_heads() * (m.d_model() / m.n_heads()) * ctx * batch;
}

// read bandwidth in bytes/s: the best of 5 passes summing a 512 MiB buffer on `threads` threads
inline double read_bandwidth(int threads) {
  const size_t n = size_t(512) << 18;  // floats
  std::vector<float> buf(n, 1.0f);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    double sum = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sum)
    {
      const size_t nt = omp_get_num_threads(), t = omp_get_thread_num(), lo = n * t / nt, hi = n * (t + 1) / nt;
      float acc[64] = {};  // 4 independent 16-lane accumulators
      for (size_t i = lo; i + 64 <= hi; i += 64)
#pragma omp simd
        for (int j = 0; j < 64; ++j) acc[j] += buf[i + j];
      for (float a : acc) sum += a;
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (sum != double(n)) std::fprintf(stderr, "bandwidth: bad sum %g\n", sum);
    best = std::max(best, n * 4.0 / dt);
  }
  return best;
}

inline double process_cpu_seconds() {  // CPU time of the process, all threads
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

struct DecodeTiming {
  double seconds = 0;      // wall time per step
  double cpu_seconds = 0;  // CPU time of this process per step (every thread)
};

// Decode steps of `batch` sequences at context `ctx` (each first prefilled with ctx copies of one token; every step
// decodes one token per sequence at position ctx, so the context stays fixed): 10 warm-up steps, then the mean of
// max(20, 2000 / batch) steps. The model must be prepared for inference.
inline DecodeTiming time_decode_steps(Model& m, int batch, int ctx) {
  using clk = std::chrono::steady_clock;
  const int bs = 16, per = (m.config().max_seq_len() + bs - 1) / bs;
  KvCache cache(m.workspace().backend(), m.kv_dims(batch * per, bs));
  std::vector<std::vector<int32_t>> blocks(batch);
  for (int b = 0; b < batch; ++b)
    for (int j = 0; j < per; ++j) blocks[b].push_back(b * per + j);
  InferBatch ib;
  const std::vector<int32_t> prompt(ctx, 5);
  for (int b = 0; b < batch; ++b) ib.add(SeqChunk::of(prompt.data(), 0, ctx, true), blocks[b], bs);
  m.forward_infer(ib, cache);
  const int32_t tok = 7;
  DecodeTiming t;
  auto run = [&](int iters) {
    const auto t0 = clk::now();
    const double c0 = process_cpu_seconds();
    for (int i = 0; i < iters; ++i) {
      ib.clear();
      const int nb = std::min(ctx, kTokenContext);
      for (int b = 0; b < batch; ++b) ib.add({&tok, 1, ctx, prompt.data() + ctx - nb, nb, true, {}}, blocks[b], bs);
      m.forward_infer(ib, cache);
    }
    m.workspace().backend().sync();
    t.cpu_seconds = (process_cpu_seconds() - c0) / iters;
    t.seconds = std::chrono::duration<double>(clk::now() - t0).count() / iters;
  };
  run(10);
  run(std::max(20, 2000 / batch));
  return t;
}

}  // namespace moe::bench
