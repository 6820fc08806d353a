// `moe eval`: validation loss, overall and by target-token frequency bucket.
#include "launcher/eval.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <sstream>

#include "core/config.h"
#include "core/data.h"
#include "core/threads.h"
#include "core/trainer.h"
#include "launcher/run_state.h"

namespace moe::launcher {
namespace {

struct Bucket {
  int64_t lo, hi;  // frequency ranks [lo, hi], 1 = the most frequent token; hi < 0: no upper end
  double sum = 0;
  int64_t tokens = 0;
};

// rank[v]: 1 + the number of tokens more frequent than v in the training split (ties: lower id first)
std::vector<int64_t> frequency_ranks(const std::vector<int64_t>& count /*[V]*/) {
  const int V = static_cast<int>(count.size());
  std::vector<int64_t> rank(V);
  std::vector<int32_t> ids(V);
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return count[a] > count[b]; });
  for (int i = 0; i < V; ++i) rank[ids[i]] = i + 1;
  return rank;
}

// The whole validation split in windows of seq_len (batches of batch_size), each target token's loss into its bucket.
double bucketed_loss(Model& model, const Corpus& corpus, const Config& cfg, std::vector<Bucket>& buckets) {
  const int T = cfg.data().seq_len(), B = std::max(1, cfg.data().batch_size());
  const std::vector<int64_t> rank = frequency_ranks(corpus.train_counts);
  const int64_t windows = (static_cast<int64_t>(corpus.val.size()) - 1) / T;
  MOE_CHECK(windows > 0,
            "eval: the validation split has " << corpus.val.size() << " tokens, fewer than data.seq_len + 1");
  double total = 0;
  int64_t n_tok = 0;
  std::vector<int32_t> in, tg;
  for (int64_t w0 = 0; w0 < windows; w0 += B) {
    const int b = static_cast<int>(std::min<int64_t>(B, windows - w0));
    in.assign(corpus.val.begin() + w0 * T, corpus.val.begin() + (w0 + b) * T);
    tg.assign(corpus.val.begin() + w0 * T + 1, corpus.val.begin() + (w0 + b) * T + 1);
    model.forward(in.data(), tg.data(), b, T, false);
    const float* loss = model.token_losses();
    for (int64_t i = 0; i < int64_t(b) * T; ++i) {
      total += loss[i];
      ++n_tok;
      for (Bucket& k : buckets)
        if (rank[tg[i]] >= k.lo && (k.hi < 0 || rank[tg[i]] <= k.hi)) {
          k.sum += loss[i];
          ++k.tokens;
        }
    }
  }
  return total / n_tok;
}

void print_buckets(const std::vector<Bucket>& buckets, double overall, int64_t step) {
  std::printf("loss over the whole validation split by the target token's frequency rank in the training split:\n");
  std::ostringstream json;
  json << "{\"step\": " << step << ", \"val_loss\": " << overall << ", \"buckets\": [";
  for (size_t i = 0; i < buckets.size(); ++i) {
    const Bucket& k = buckets[i];
    std::ostringstream name;
    name << k.lo;
    if (k.hi < 0)
      name << "+";
    else
      name << "-" << k.hi;
    const double mean = k.tokens ? k.sum / k.tokens : 0.0;
    std::printf("  ranks %-10s %9lld tokens  loss %.4f\n", name.str().c_str(), static_cast<long long>(k.tokens), mean);
    json << (i ? ", " : "") << "{\"ranks\": \"" << name.str() << "\", \"tokens\": " << k.tokens << ", \"loss\": ";
    if (k.tokens)
      json << mean;
    else
      json << "null";
    json << "}";
  }
  json << "]}";
  std::printf("  all        %9s         loss %.4f\n%s\n", "", overall, json.str().c_str());
}

}  // namespace

int run_eval(const EvalOptions& o) {
  LoadedModel lm = load_for_inference(o.checkpoint, {o.overrides, o.data_dir});
  set_num_threads(o.threads >= 0 ? o.threads : lm.cfg.train().threads());
  validate_config(lm.cfg, true);
  Corpus corpus = load_corpus(*lm.tok, lm.cfg.data().train_file(), lm.cfg.data().val_fraction());
  Trainer trainer(lm.cfg, *lm.model, corpus);
  const float vl = trainer.evaluate();
  std::printf("checkpoint %s step %lld | val loss %.4f | unigram entropy %.4f\n", lm.dir.c_str(),
              static_cast<long long>(lm.manifest.step()), vl, corpus.unigram_entropy);
  if (!o.by_frequency) return 0;
  std::vector<Bucket> buckets = {{1, 16}, {17, 256}, {257, 4096}, {4097, -1}};
  const double overall = bucketed_loss(*lm.model, corpus, lm.cfg, buckets);
  print_buckets(buckets, overall, lm.manifest.step());
  return 0;
}

}  // namespace moe::launcher
