// SparQ attention at long context (bench/RESULTS.md "SparQ attention"), for a checkpoint trained at a long context
// and a list of (r, k) settings, each beside full attention in the same run:
//  1. K/V bytes read per generated token at the prompt length (the formula: see kv_bytes);
//  2. teacher-forced validation loss through the inference path: windows of max_seq_len tokens of the validation
//     split, every position a SparQ decode row (a chunk's SparQ rows are exactly one-token-at-a-time decode rows:
//     tests/unit/test_sparq.cpp), and the share of positions whose argmax equals full attention's;
//  3. greedy agreement: prompts of --prompt-len validation tokens (full attention, as the server's prefill), then
//     --gen greedy tokens with full attention; per setting the SparQ argmax at each generated position given full
//     attention's prefix (teacher forced), and SparQ's own greedy tokens (free running) position by position;
//  4. decode speed: --batch sequences at context --prompt-len, decode steps of every setting interleaved
//     (Model::forward_infer, tokens/s of thread CPU time: run it with --threads 1), and the attention op alone on
//     one layer's cache (attention_paged vs attention_sparq, with the key columns and with components gathered from
//     the key rows); the best of --reps interleaved runs of --iters steps each.
// usage: bench_sparq --checkpoint DIR --settings r:k,r:k,... [--windows 4] [--prompts 16] [--prompt-len 1000]
//                    [--gen 24] [--batch 1,8] [--threads 1] [--iters 20] [--reps 7] [--data FILE]
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <string>
#include <utility>
#include <vector>

#include "core/data.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/threads.h"
#include "launcher/run_state.h"

namespace {

// Seconds of CPU time of the calling thread: with --threads 1 every kernel runs on it, and on a shared machine this
// leaves out the time other processes hold the core (cache interference stays in).
double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct Options {
  std::string ckpt, data = std::string(MOE_SOURCE_DIR) + "/../shared/data/tinyshakespeare.txt";
  std::vector<moe::SparqKnobs> settings;  // (r, k); the first row of every table is full attention
  int windows = 4, prompts = 16, prompt_len = 1000, gen = 24, threads = 1, iters = 20, reps = 7;
  std::vector<int> batches = {1, 8};
};

std::string name(const moe::SparqKnobs& s) {
  return s.r == 0 ? std::string("full") : "r=" + std::to_string(s.r) + " k=" + std::to_string(s.k);
}

// ---------------------------------------------------------------- 1. bytes
// f32 bytes of keys and values one generated token at context S reads, over every layer and kv head. Full
// attention: every key and value row (2 S D). SparQ: r components of every key (by column: S r), k key rows and k
// value rows (2 k D), the mean value from one prefix-sum row and the rows of the last, partial block.
double kv_bytes(const moe::proto::ModelConfig& m, const moe::SparqKnobs& s, int S, int block_size) {
  const double D = m.d_model() / m.n_heads(), per = 4.0 * m.n_layers() * m.n_kv_heads();
  if (s.r == 0 || S <= s.k) return per * 2 * S * D;
  const int last_block_rows = (S - 1) % block_size + 1;
  return per * (double(S) * s.r + 2.0 * s.k * D + (1 + last_block_rows) * D);
}

// ---------------------------------------------------------------- the model over a paged cache
// One sequence's cache: blocks of 16 positions, 0..max_seq_len, key columns kept.
struct OneSeq {
  static constexpr int kBlock = 16;
  moe::Model& m;
  moe::KvCache cache;
  std::vector<int32_t> blocks;
  explicit OneSeq(moe::Model& model, int seqs = 1) : m(model), cache(model.workspace().backend(), dims(model, seqs)) {}
  static moe::KvCacheDims dims(moe::Model& model, int seqs) {
    moe::KvCacheDims d = model.kv_dims(seqs * per(model), kBlock);
    d.key_columns = true;
    return d;
  }
  static int per(moe::Model& model) { return (model.config().max_seq_len() + kBlock - 1) / kBlock; }
  std::vector<int32_t> table(int seq) const {
    std::vector<int32_t> t;
    for (int j = 0; j < per(m); ++j) t.push_back(seq * per(m) + j);
    return t;
  }
  // the logits [n, V] of every row of toks[n] at positions pos0.. with knobs sq
  std::vector<int32_t> hist;  // the tokens run so far, by position (the rows' earlier tokens for add)
  std::vector<float> run(const int32_t* toks, int n, int pos0, const moe::SparqKnobs& sq) {
    hist.resize(pos0);
    hist.insert(hist.end(), toks, toks + n);
    moe::InferBatch b;
    b.add(moe::SeqChunk::of(hist.data(), pos0, n, false, sq), table(0), kBlock);
    for (int i = 0; i < n; ++i) b.logit_rows.push_back(i);
    const float* lg = m.forward_infer(b, cache);
    const int V = m.config().vocab_size();
    std::vector<float> out(size_t(n) * V);
    m.workspace().backend().to_host(out.data(), lg, sizeof(float) * out.size());
    return out;
  }
};

int argmax(const float* x, int V) { return static_cast<int>(std::max_element(x, x + V) - x); }

double nll(const float* z, int V, int target) {
  double mx = z[0], sum = 0;
  for (int i = 1; i < V; ++i) mx = std::max(mx, double(z[i]));
  for (int i = 0; i < V; ++i) sum += std::exp(z[i] - mx);
  return std::log(sum) - (z[target] - mx);
}

// ---------------------------------------------------------------- 2. teacher-forced loss
// mean NLL over all positions and over the second half of each window; share of argmax equal to full's
void loss_table(moe::Model& m, const std::vector<int32_t>& val, const Options& o) {
  const int W = m.config().max_seq_len(), V = m.config().vocab_size();
  MOE_CHECK(int64_t(val.size()) > W + 1, "bench_sparq: validation split too short for a window");
  std::vector<std::vector<int>> full_argmax(o.windows);
  std::printf("teacher-forced validation loss (%d windows of %d tokens, every position decoded)\n", o.windows, W);
  std::printf("  %-16s %10s %14s %16s\n", "setting", "loss", "loss pos>=512", "argmax = full");
  std::vector<moe::SparqKnobs> all = {{}};
  all.insert(all.end(), o.settings.begin(), o.settings.end());
  for (const moe::SparqKnobs& s : all) {
    double sum = 0, sum_late = 0;
    int64_t n = 0, n_late = 0, agree = 0;
    for (int w = 0; w < o.windows; ++w) {
      const int64_t off = (int64_t(val.size()) - W - 1) * w / std::max(1, o.windows - 1);
      OneSeq seq(m);
      const std::vector<float> lg = seq.run(val.data() + off, W, 0, s);
      for (int t = 0; t < W; ++t) {
        const double l = nll(lg.data() + int64_t(t) * V, V, val[off + t + 1]);
        sum += l, ++n;
        if (t >= 512) sum_late += l, ++n_late;
        const int a = argmax(lg.data() + int64_t(t) * V, V);
        if (s.r == 0) full_argmax[w].push_back(a);
        agree += a == full_argmax[w][t];
      }
    }
    std::printf("  %-16s %10.4f %14.4f %15.2f%%\n", name(s).c_str(), sum / n, sum_late / n_late, 100.0 * agree / n);
    std::printf("LOSS %s loss=%.5f loss_late=%.5f argmax_agree=%.4f\n", name(s).c_str(), sum / n, sum_late / n_late,
                double(agree) / n);
  }
}

// ---------------------------------------------------------------- 3. greedy agreement
struct Agreement {
  int64_t forced = 0, free = 0, total = 0, prefix = 0;  // prefix: generated tokens before the first difference
};

// one prompt: full attention's greedy tokens, then for every setting the teacher-forced and free-running tokens
void agree_one(OneSeq& seq, const int32_t* prompt, const Options& o, std::vector<Agreement>& acc) {
  const int P = o.prompt_len, G = o.gen, V = seq.m.config().vocab_size();
  std::vector<float> lg = seq.run(prompt, P, 0, {});  // the prefill: full attention for every setting
  std::vector<int32_t> full = {argmax(lg.data() + int64_t(P - 1) * V, V)};
  for (int i = 1; i < G; ++i) full.push_back(argmax(seq.run(&full[i - 1], 1, P + i - 1, {}).data(), V));
  for (size_t si = 0; si < o.settings.size(); ++si) {
    const moe::SparqKnobs s{o.settings[si].r, o.settings[si].k, P};
    const std::vector<float> forced = seq.run(full.data(), G - 1, P, s);  // positions P.. : decode rows
    std::vector<int32_t> mine = {full[0]};
    for (int i = 1; i < G; ++i) mine.push_back(argmax(seq.run(&mine[i - 1], 1, P + i - 1, s).data(), V));
    Agreement& a = acc[si];
    bool same = true;
    for (int i = 1; i < G; ++i) {
      a.forced += argmax(forced.data() + int64_t(i - 1) * V, V) == full[i];
      a.free += mine[i] == full[i];
      same = same && mine[i] == full[i];
      a.prefix += same;
      ++a.total;
    }
  }
}

void agreement_table(moe::Model& m, const std::vector<int32_t>& val, const Options& o) {
  MOE_CHECK(o.prompt_len + o.gen <= m.config().max_seq_len() && o.gen >= 2,
            "bench_sparq: --prompt-len " << o.prompt_len << " + --gen " << o.gen << " must fit max_seq_len");
  std::vector<Agreement> acc(o.settings.size());
  OneSeq seq(m);
  for (int p = 0; p < o.prompts; ++p) {
    const int64_t off = (int64_t(val.size()) - o.prompt_len) * p / std::max(1, o.prompts - 1);
    agree_one(seq, val.data() + off, o, acc);
  }
  std::printf(
      "greedy agreement with full attention (%d prompts of %d tokens, %d generated tokens each; the first "
      "comes from the prefill, %lld SparQ-decoded tokens per setting)\n",
      o.prompts, o.prompt_len, o.gen, static_cast<long long>(acc.empty() ? 0 : acc[0].total));
  std::printf("  %-16s %16s %16s %22s\n", "setting", "teacher-forced", "free-running", "same prefix (tokens)");
  for (size_t si = 0; si < acc.size(); ++si) {
    const Agreement& a = acc[si];
    std::printf("  %-16s %15.2f%% %15.2f%% %22.1f\n", name(o.settings[si]).c_str(), 100.0 * a.forced / a.total,
                100.0 * a.free / a.total, double(a.prefix) / o.prompts);
    std::printf("AGREE %s forced=%.4f free=%.4f prefix=%.2f\n", name(o.settings[si]).c_str(),
                double(a.forced) / a.total, double(a.free) / a.total, double(a.prefix) / o.prompts);
  }
}

// ---------------------------------------------------------------- 4. speed
// B sequences of validation text prefilled to context ctx; then decode steps at position ctx (rewritten each step)
struct DecodeBench {
  moe::Model& m;
  OneSeq seqs;
  int B, ctx;
  std::vector<const int32_t*> prompts;  // [B] each sequence's prompt (ctx tokens)
  DecodeBench(moe::Model& model, const std::vector<int32_t>& val, int B_, int ctx_)
      : m(model), seqs(model, B_), B(B_), ctx(ctx_) {
    for (int b = 0; b < B; ++b) {
      moe::InferBatch batch;
      prompts.push_back(val.data() + int64_t(b) * 997 % (val.size() - ctx));
      batch.add(moe::SeqChunk::of(prompts.back(), 0, ctx, true), seqs.table(b), OneSeq::kBlock);
      m.forward_infer(batch, seqs.cache);
    }
  }
  double step_s(const moe::SparqKnobs& s, int iters) {
    moe::InferBatch batch;
    const int32_t tok = 7;
    const double t0 = cpu_now();
    for (int i = 0; i < iters; ++i) {
      batch.clear();
      const int nb = std::min(ctx, moe::kTokenContext);
      for (int b = 0; b < B; ++b)
        batch.add({&tok, 1, ctx, prompts[b] + ctx - nb, nb, true, {s.r, s.k, 0}}, seqs.table(b), OneSeq::kBlock);
      m.forward_infer(batch, seqs.cache);
    }
    return (cpu_now() - t0) / iters;
  }
};

// the attention op alone on layer 0's cache: B rows at position ctx, random queries; columns: with the key columns
double attention_s(DecodeBench& d, const moe::SparqKnobs& s, bool columns, int iters) {
  const moe::proto::ModelConfig& c = d.m.config();
  const int H = c.n_heads(), Hkv = c.n_kv_heads(), D = c.d_model() / H;
  moe::Rng rng(5);
  std::vector<float> q(size_t(d.B) * H * D), out(q.size());
  for (float& x : q) x = rng.normal();
  std::vector<int32_t> pos(d.B, d.ctx), table, start, rk;
  for (int b = 0; b < d.B; ++b) {
    start.push_back(static_cast<int32_t>(table.size()));
    const std::vector<int32_t> t = d.seqs.table(b);
    table.insert(table.end(), t.begin(), t.end());
    rk.insert(rk.end(), {s.r, s.k});
  }
  const moe::KvLayer kv = d.seqs.cache.layer(0);
  moe::Backend& be = d.m.workspace().backend();
  const double t0 = cpu_now();
  for (int i = 0; i < iters; ++i) {
    if (s.r == 0)
      be.attention_paged(out.data(), q.data(), kv.keys, kv.values, pos.data(), table.data(), start.data(),
                         OneSeq::kBlock, d.B, H, Hkv, D);
    else
      be.attention_sparq(out.data(), q.data(), kv.keys, kv.values, kv.value_sums, columns ? kv.key_columns : nullptr,
                         pos.data(), table.data(), start.data(), rk.data(), OneSeq::kBlock, d.B, H, Hkv, D);
  }
  return (cpu_now() - t0) / iters;
}

void speed_table(moe::Model& m, const std::vector<int32_t>& val, const Options& o) {
  std::vector<moe::SparqKnobs> all = {{}};
  all.insert(all.end(), o.settings.begin(), o.settings.end());
  for (int B : o.batches) {
    DecodeBench d(m, val, B, o.prompt_len);
    const int n = static_cast<int>(all.size());
    std::vector<double> step(n, 1e30), att(n, 1e30), gather(n, 1e30);
    for (int rep = 0; rep < o.reps; ++rep)  // interleaved; the best of each
      for (int i = 0; i < n; ++i) {
        step[i] = std::min(step[i], d.step_s(all[i], o.iters));
        att[i] = std::min(att[i], attention_s(d, all[i], true, o.iters * 4));
        if (all[i].r > 0) gather[i] = std::min(gather[i], attention_s(d, all[i], false, o.iters * 4));
      }
    std::printf("decode speed, batch %d at context %d (%d thread(s); thread CPU time, best of %d interleaved runs)\n",
                B, o.prompt_len, o.threads, o.reps);
    std::printf("  %-16s %10s %10s %8s %14s %8s %16s\n", "setting", "ms/step", "tokens/s", "vs full", "attention us",
                "vs full", "gathered K us");
    for (int i = 0; i < n; ++i) {
      std::printf("  %-16s %10.3f %10.1f %7.2fx %14.1f %7.2fx", name(all[i]).c_str(), step[i] * 1e3, B / step[i],
                  step[0] / step[i], att[i] * 1e6, att[0] / att[i]);
      if (all[i].r > 0)
        std::printf(" %16.1f\n", gather[i] * 1e6);
      else
        std::printf(" %16s\n", "-");
      std::printf("SPEED B=%d %s step_ms=%.4f tok_s=%.1f attn_us=%.2f gather_us=%.2f\n", B, name(all[i]).c_str(),
                  step[i] * 1e3, B / step[i], att[i] * 1e6, all[i].r > 0 ? gather[i] * 1e6 : 0.0);
    }
  }
}

std::vector<int> ints(const std::string& s) {
  std::vector<int> out;
  size_t i = 0;
  while (i < s.size()) {
    const size_t j = s.find(',', i);
    out.push_back(std::stoi(s.substr(i, j - i)));
    i = j == std::string::npos ? s.size() : j + 1;
  }
  return out;
}

int* int_option(Options& o, const std::string& a) {
  const std::pair<const char*, int*> table[] = {
      {"--windows", &o.windows}, {"--prompts", &o.prompts}, {"--prompt-len", &o.prompt_len},
      {"--gen", &o.gen},         {"--threads", &o.threads}, {"--iters", &o.iters},
      {"--reps", &o.reps}};
  for (const auto& [name, x] : table)
    if (a == name) return x;
  return nullptr;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--checkpoint") {
      o.ckpt = v;
    } else if (a == "--settings") {
      for (size_t p = 0; p < v.size();) {
        const size_t c = v.find(':', p), e = std::min(v.find(',', p), v.size());
        MOE_CHECK(c != std::string::npos && c < e, "--settings " << v << ": want r:k,r:k,...");
        o.settings.push_back({std::stoi(v.substr(p, c - p)), std::stoi(v.substr(c + 1, e - c - 1)), 0});
        p = e + 1;
      }
    } else if (int* x = int_option(o, a)) {
      *x = std::stoi(v);
    } else if (a == "--batch") {
      o.batches = ints(v);
    } else if (a == "--data") {
      o.data = v;
    } else {
      MOE_THROW("bench_sparq: unknown option " << a);
    }
  }
  MOE_CHECK(!o.ckpt.empty() && !o.settings.empty(), "bench_sparq: --checkpoint DIR and --settings r:k,... needed");
  return o;
}

void run(const Options& o) {
  moe::set_num_threads(o.threads);
  moe::launcher::LoadOptions lo;
  lo.inference = true;
  moe::launcher::LoadedModel lm = moe::launcher::load_for_inference(o.ckpt, lo);
  moe::Model& m = *lm.model;
  m.prepare_inference();
  const moe::Corpus corpus = moe::load_corpus(*lm.tok, o.data, lm.cfg.data().val_fraction());
  const moe::proto::ModelConfig& c = m.config();
  std::printf("model: d_model %d, %d layers, %d query / %d kv heads of %d, max_seq_len %d; %zu validation tokens\n",
              c.d_model(), c.n_layers(), c.n_heads(), c.n_kv_heads(), c.d_model() / c.n_heads(), c.max_seq_len(),
              corpus.val.size());
  std::printf("K/V bytes read per generated token at context %d (all layers and kv heads, f32)\n", o.prompt_len);
  std::vector<moe::SparqKnobs> all = {{}};
  all.insert(all.end(), o.settings.begin(), o.settings.end());
  for (const moe::SparqKnobs& s : all) {
    const double b = kv_bytes(c, s, o.prompt_len, OneSeq::kBlock), full = kv_bytes(c, {}, o.prompt_len, 16);
    std::printf("  %-16s %12.0f bytes  %6.3f of full\n", name(s).c_str(), b, b / full);
    std::printf("BYTES %s bytes=%.0f ratio=%.4f\n", name(s).c_str(), b, b / full);
  }
  loss_table(m, corpus.val, o);
  agreement_table(m, corpus.val, o);
  speed_table(m, corpus.val, o);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 0;
  try {
    run(parse(argc, argv));
  } catch (const moe::Error& e) {
    std::fprintf(stderr, "error: %s (%s)\n", e.what(), e.where().c_str());
    rc = 1;
  }
  MPI_Finalize();
  return rc;
}
