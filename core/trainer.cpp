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
  // the share in micro-batches, their gradients accumulated with weight 1/k (train.micro_batch_size)
  const int mb = cfg_.train().micro_batch_size() > 0 ? std::min(cfg_.train().micro_batch_size(), batch.B) : batch.B;
  MOE_CHECK(batch.B % mb == 0, "config field train.micro_batch_size = " << mb << ": must divide this rank's "
                                                                        << batch.B << " sequences of the batch");
  const int k = batch.B / mb;
  double loss = 0, router_loss = 0;
  for (int c = 0; c < k; ++c) {
    const size_t off = size_t(c) * mb * batch.T;
    loss += model_.forward(batch.inputs.data() + off, batch.targets.data() + off, mb, batch.T, true) / double(k);
    router_loss += model_.extra_loss() / k;
    MOE_CHECK(std::isfinite(loss), "training loss is " << loss << " at step " << step_index + 1
                                                       << " (diverged: lower optimizer.lr or set optimizer.grad_clip)");
    model_.backward(1.0f / static_cast<float>(k));
  }
  if (hooks.mean_over_ranks) loss = hooks.mean_over_ranks(loss);
  if (hooks.reduce_grads) hooks.reduce_grads(ps);
  // clipping folded into the update (AdamW::step with the scale): the same result as clip_grad_norm, one pass less
  const double norm = grad_norm(ps, hooks.sum_over_expert_group);
  const float lr = lr_at(cfg_.optimizer(), step_index, cfg_.train().steps());
  opt_.step(lr, clip_scale(norm, cfg_.optimizer().grad_clip()));
  model_.after_optimizer_step(hooks.sum_over_ranks);  // e.g. the routers' balancing bias, from the world's loads
  return {step_index + 1, static_cast<float>(loss), lr, norm, router_loss};
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

std::string progress_line(const LogRecord& r) {
  char line[256];
  std::snprintf(line, sizeof line, "step %5d/%d | loss %.4f | lr %.2e | grad %.2f | %.0f tok/s | elapsed %s | eta %s",
                r.step, r.total, r.loss, r.lr, r.grad_norm, r.tokens_per_s, fmt_secs(r.elapsed_s).c_str(),
                fmt_secs(r.eta_s).c_str());
  int n = 0;
  double aux = 0, drop = 0, overload = 0;
  int64_t lo = INT64_MAX, hi = 0;
  for (const FfnStats& s : r.layers) {
    if (!s.has_router) continue;
    ++n;
    aux += s.aux_loss;
    drop += s.dropped_fraction;
    lo = std::min(lo, s.load_min);
    hi = std::max(hi, s.load_max);
    overload = std::max(overload, max_overload(s.expert_routed));
  }
  if (n == 0) return line;
  char router[192];
  std::snprintf(router, sizeof router, " | router loss %.4f | aux %.3f | dropped %.1f%% | expert load %lld..%lld",
                r.router_loss, aux / n, 100.0 * drop / n, static_cast<long long>(lo), static_cast<long long>(hi));
  std::string out = std::string(line) + router;
  if (overload > 0) {  // the worst layer's routed max/mean load (learned MoE layers)
    std::snprintf(router, sizeof router, " | overload %.2f", overload);
    out += router;
  }
  return out;
}

// The record of a logged step: window means, and the last step's per-layer router statistics. With
// hooks.sum_over_ranks (collective: every rank logs the same steps) the per-layer scalars become means over the
// ranks and the per-expert loads (kept and routed) sums; the min/max loads stay this rank's (as the progress line
// always showed).
LogRecord Trainer::log_record(int step, int start_step, const std::vector<StepRecord>& window, double window_s,
                              double elapsed_s, const TrainHooks& hooks) {
  const int total = cfg_.train().steps();
  LogRecord r{step, total, 0, 0, window.back().lr, window.back().grad_norm, 0, elapsed_s, 0, {}, model_.ffn_stats()};
  for (const StepRecord& s : window) {
    r.loss += s.loss / window.size();
    r.router_loss += s.router_loss / window.size();
  }
  const double tokens = double(cfg_.data().batch_size()) * cfg_.data().seq_len() * window.size();
  r.tokens_per_s = window_s > 0 ? tokens / window_s : 0;
  r.eta_s = step > start_step ? elapsed_s / (step - start_step) * (total - step) : 0;
  for (int l = 0; l < model_.n_layers(); ++l) r.layer_router_loss.push_back(model_.ffn(l).extra_loss());
  if (!hooks.sum_over_ranks) return r;
  // [L] losses, [L] aux, [L] dropped, then every expert load, then every routed load
  std::vector<double> v = r.layer_router_loss;
  for (const FfnStats& s : r.layers) v.push_back(s.aux_loss);
  for (const FfnStats& s : r.layers) v.push_back(s.dropped_fraction);
  for (const FfnStats& s : r.layers) v.insert(v.end(), s.expert_load.begin(), s.expert_load.end());
  for (const FfnStats& s : r.layers) v.insert(v.end(), s.expert_routed.begin(), s.expert_routed.end());
  hooks.sum_over_ranks(v);
  const double ranks = hooks.shard_count;
  size_t k = 0;
  for (double& x : r.layer_router_loss) x = v[k++] / ranks;
  for (FfnStats& s : r.layers) s.aux_loss = v[k++] / ranks;
  for (FfnStats& s : r.layers) s.dropped_fraction = v[k++] / ranks;
  for (FfnStats& s : r.layers)
    for (int64_t& x : s.expert_load) x = std::llround(v[k++]);
  for (FfnStats& s : r.layers)
    for (int64_t& x : s.expert_routed) x = std::llround(v[k++]);
  return r;
}

RunOutcome Trainer::run(const TrainHooks& hooks, int start_step) {
  const int total = cfg_.train().steps();
  const int log_every = cfg_.train().log_every();
  const int eval_every = cfg_.train().eval_every();
  RunOutcome out;
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  auto window_start = t0;
  std::vector<StepRecord> window;
  for (int s = start_step; s < total; ++s) {
    Batch batch = loader_.next();
    StepRecord r = step(batch, s, hooks);
    out.records.push_back(r);
    out.last_step = r.step;
    if (hooks.on_step) hooks.on_step(r);
    window.push_back(r);
    const bool last = r.step == total;
    // agreed by every rank (a signal during the last step changes nothing: the run is complete)
    out.stopped = hooks.should_stop && hooks.should_stop(r.step) && !last;
    if (r.step % log_every == 0 || last || out.stopped) {
      const auto now = clock::now();
      const double elapsed = std::chrono::duration<double>(now - t0).count();
      const double win = std::chrono::duration<double>(now - window_start).count();
      const LogRecord rec = log_record(r.step, start_step, window, win, elapsed, hooks);
      if (hooks.on_log) hooks.on_log(rec);
      window_start = now;
      window.clear();
    }
    if ((eval_every > 0 && r.step % eval_every == 0) || last || out.stopped) {
      const float vl = evaluate(hooks);
      if (hooks.on_eval) hooks.on_eval({r.step, vl});
    }
    if (hooks.maybe_checkpoint) hooks.maybe_checkpoint(r.step, last || out.stopped);
    if (out.stopped) break;
  }
  return out;
}

}  // namespace moe
