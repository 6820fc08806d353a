#include "core/trainer.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "core/log.h"

namespace moe {

namespace {
std::string fmt_secs(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.1fs", s);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%dm%02ds", int(s) / 60, int(s) % 60);
  else std::snprintf(buf, sizeof buf, "%dh%02dm", int(s) / 3600, (int(s) % 3600) / 60);
  return buf;
}
// " | aux 0.012 | drop 1.2% | load 10..90" over the model's routed FFN layers (empty for dense models)
std::string router_summary(const std::vector<FfnStats>& stats, double router_loss) {
  int n = 0;
  double aux = 0, drop = 0;
  int64_t lo = INT64_MAX, hi = 0;
  for (const auto& s : stats) {
    if (!s.has_router) continue;
    ++n;
    aux += s.aux_loss;
    drop += s.dropped_fraction;
    lo = std::min(lo, s.load_min);
    hi = std::max(hi, s.load_max);
  }
  if (n == 0) return "";
  char buf[160];
  std::snprintf(buf, sizeof buf, " | router loss %.4f | aux %.3f | dropped %.1f%% | expert load %lld..%lld",
                router_loss, aux / n, 100.0 * drop / n, static_cast<long long>(lo), static_cast<long long>(hi));
  return buf;
}
}  // namespace

Trainer::Trainer(const Config& cfg, Model& model, const Corpus& corpus)
    : cfg_(cfg),
      model_(model),
      corpus_(corpus),
      opt_(model.params(), cfg.optimizer()),
      loader_(&corpus.train, cfg.data().batch_size(), cfg.data().seq_len(), cfg.train().seed() * 7919 + 1),
      val_(validation_batches(corpus.val, cfg.data().batch_size(), cfg.data().seq_len(), cfg.train().eval_batches())) {}

Batch shard_batch(const Batch& b, int rank, int count) {
  if (count == 1) return b;
  MOE_CHECK(b.B % count == 0, "batch of " << b.B << " sequences cannot be split over " << count << " ranks");
  Batch s;
  s.B = b.B / count;
  s.T = b.T;
  const size_t off = size_t(rank) * s.B * s.T, n = size_t(s.B) * s.T;
  s.inputs.assign(b.inputs.begin() + off, b.inputs.begin() + off + n);
  s.targets.assign(b.targets.begin() + off, b.targets.begin() + off + n);
  return s;
}

StepRecord Trainer::step(const Batch& global_batch, int step_index, const TrainHooks& hooks) {
  ParamStore& ps = model_.params();
  ps.zero_grad();
  const Batch batch = shard_batch(global_batch, hooks.shard_rank, hooks.shard_count);
  float loss = model_.forward(batch.inputs.data(), batch.targets.data(), batch.B, batch.T, true);
  const double router_loss = model_.extra_loss();
  if (hooks.mean_over_ranks) loss = static_cast<float>(hooks.mean_over_ranks(loss));
  MOE_CHECK(std::isfinite(loss), "training loss is " << loss << " at step " << step_index + 1
                                                     << " (diverged: lower optimizer.lr or set optimizer.grad_clip)");
  model_.backward();
  if (hooks.reduce_grads) hooks.reduce_grads(ps);
  const double norm = clip_grad_norm(ps, cfg_.optimizer().grad_clip(), hooks.sum_over_expert_group);
  const float lr = lr_at(cfg_.optimizer(), step_index, cfg_.train().steps());
  opt_.step(lr);
  return {step_index + 1, loss, lr, norm, router_loss};
}

float Trainer::evaluate(const TrainHooks& hooks) {
  double sum = 0;
  for (const Batch& gb : val_) {
    const Batch b = shard_batch(gb, hooks.shard_rank, hooks.shard_count);
    sum += model_.forward(b.inputs.data(), b.targets.data(), b.B, b.T, false);
  }
  sum /= val_.size();
  if (hooks.mean_over_ranks) sum = hooks.mean_over_ranks(sum);
  last_val_ = static_cast<float>(sum);
  return last_val_;
}

std::vector<StepRecord> Trainer::run(const TrainHooks& hooks, int start_step) {
  const int total = cfg_.train().steps();
  const int log_every = cfg_.train().log_every();
  const int eval_every = cfg_.train().eval_every();
  const int64_t tokens_per_step = int64_t(cfg_.data().batch_size()) * cfg_.data().seq_len();
  std::vector<StepRecord> records;
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  auto window_start = t0;
  int window_steps = 0;
  double window_loss = 0, window_router = 0;
  for (int s = start_step; s < total; ++s) {
    Batch batch = loader_.next();
    StepRecord r = step(batch, s, hooks);
    records.push_back(r);
    if (hooks.on_step) hooks.on_step(r);
    window_loss += r.loss;
    window_router += r.router_loss;
    ++window_steps;
    const bool last = r.step == total;
    const bool stop = hooks.should_stop && hooks.should_stop();
    if (r.step % log_every == 0 || last || stop) {
      const auto now = clock::now();
      const double elapsed = std::chrono::duration<double>(now - t0).count();
      const double window = std::chrono::duration<double>(now - window_start).count();
      const double tok_s = window > 0 ? tokens_per_step * window_steps / window : 0;
      const double eta = (r.step - start_step) > 0 ? elapsed / (r.step - start_step) * (total - r.step) : 0;
      if (hooks.print) {
        char line[256];
        std::snprintf(line, sizeof line,
                      "step %5d/%d | loss %.4f | lr %.2e | grad %.2f | %.0f tok/s | elapsed %s | eta %s", r.step,
                      total, window_loss / window_steps, r.lr, r.grad_norm, tok_s, fmt_secs(elapsed).c_str(),
                      fmt_secs(eta).c_str());
        std::string router = router_summary(model_.ffn_stats(), window_router / window_steps);
        MOE_INFO(line << router);
      }
      window_start = now;
      window_steps = 0;
      window_loss = 0;
      window_router = 0;
    }
    if ((eval_every > 0 && r.step % eval_every == 0) || last || stop) {
      const float vl = evaluate(hooks);
      if (hooks.print) {
        char line[128];
        std::snprintf(line, sizeof line, "eval  %5d | val loss %.4f | val ppl %.2f", r.step, vl, std::exp(vl));
        MOE_INFO(line);
      }
    }
    if (hooks.maybe_checkpoint) hooks.maybe_checkpoint(r.step, last || stop);
    if (stop) break;
  }
  return records;
}

std::vector<int32_t> generate(Model& model, const std::vector<int32_t>& prompt, const proto::GenerateConfig& g) {
  MOE_CHECK(!prompt.empty(), "generate: the prompt is empty (it needs at least one token)");
  const int max_T = model.config().max_seq_len();
  MOE_CHECK(static_cast<int>(prompt.size()) < max_T,
            "generate: prompt has " << prompt.size() << " tokens, model.max_seq_len is " << max_T);
  Model::KvCache cache = model.make_cache(max_T);
  Rng rng(g.seed());
  const int V = model.config().vocab_size();
  const float* logits = nullptr;
  for (int32_t t : prompt) logits = model.decode_step(cache, t);
  std::vector<int32_t> out;
  std::vector<float> p(V);
  std::vector<int> idx(V);
  for (int i = 0; i < g.max_new_tokens() && cache.len < max_T; ++i) {
    int next = 0;
    if (g.temperature() <= 0) {
      next = static_cast<int>(std::max_element(logits, logits + V) - logits);
    } else {
      std::iota(idx.begin(), idx.end(), 0);
      int k = (g.top_k() > 0 && g.top_k() < V) ? g.top_k() : V;
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                        [&](int a, int b) { return logits[a] > logits[b]; });
      const float mx = logits[idx[0]];
      double sum = 0;
      for (int j = 0; j < k; ++j) sum += (p[j] = std::exp((logits[idx[j]] - mx) / g.temperature()));
      double u = rng.uniform() * sum;
      next = idx[k - 1];
      for (int j = 0; j < k; ++j) {
        u -= p[j];
        if (u <= 0) {
          next = idx[j];
          break;
        }
      }
    }
    out.push_back(next);
    if (cache.len < max_T) logits = model.decode_step(cache, next);
  }
  return out;
}

}  // namespace moe
