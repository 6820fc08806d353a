#include "launcher/train.h"

#include <google/protobuf/util/message_differencer.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>

#include "checkpoints/checkpoint.h"
#include "checkpoints/convert.h"
#include "checkpoints/naming.h"
#include "core/data.h"
#include "core/log.h"
#include "core/metrics.h"
#include "core/trainer.h"
#include "experts/build_model.h"
#include "checkpoints/saver.h"
#include "launcher/run_state.h"
#include "launcher/control_client.h"
#include "launcher/stop_control.h"
#include "launcher/tensorboard.h"

namespace fs = std::filesystem;

namespace moe::launcher {
namespace {

// Tokenizer: the configured model, or one trained from the corpus into out_dir (reused when present).
std::string prepare_tokenizer(const Config& cfg, comm::Parallel& par) {
  if (!cfg.data().tokenizer_model().empty()) return cfg.data().tokenizer_model();
  const std::string path = cfg.train().out_dir() + "/tokenizer.model";
  // rank 0 trains it (once per run directory); the others wait for it
  if (!fs::exists(path) && par.rank() == 0) {
    fs::create_directories(cfg.train().out_dir());
    MOE_INFO("training a " << cfg.data().tokenizer_type() << " tokenizer (" << cfg.data().tokenizer_vocab_size()
                           << " pieces) on " << cfg.data().train_file() << " -> " << path);
    Tokenizer::train(cfg.data().train_file(), path + ".tmp.model", cfg.data().tokenizer_vocab_size(),
                     cfg.data().tokenizer_type(), cfg.train().threads());
    fs::rename(path + ".tmp.model", path);
    fs::remove(path + ".tmp.vocab");
  }
  par.world().barrier();
  return path;
}

void check_world(const Config& cfg, int world) {
  MOE_CHECK(cfg.data().batch_size() % world == 0,
            "config field data.batch_size = " << cfg.data().batch_size() << ": must be divisible by the world size "
                                              << world << " (each rank trains on an equal share)");
}

void set_vocab(Config& cfg, const Tokenizer& tok) {
  if (cfg.model().vocab_size() == 0) cfg.mutable_model()->set_vocab_size(tok.vocab_size());
  MOE_CHECK(cfg.model().vocab_size() == tok.vocab_size(),
            "config field model.vocab_size = " << cfg.model().vocab_size() << " does not match the tokenizer's "
                                               << tok.vocab_size() << " pieces (set it to 0 to take it from the tokenizer)");
}

// The checkpoint a run starts from: with `--resume` its own newest (train.out_dir/checkpoints/latest: parameters,
// optimizer and loader state, step), else train.init_from (a new run: weights and routing tables only); none: a
// fresh initialisation.
struct Start {
  std::string dir;
  proto::Manifest manifest;
  std::unique_ptr<ckpt::Reader> reader;
  RunState state;
  bool init = false;  // from train.init_from: step 0, fresh AdamW state and data loader
  explicit operator bool() const { return reader != nullptr; }
};

bool has_optimizer_state(const proto::Manifest& m) {
  return std::any_of(m.tensors().begin(), m.tensors().end(),
                     [](const proto::TensorEntry& e) { return ckpt::is_optim_key(e.name()); });
}

// Every parameter tensor of the checkpoint (if any) against the model of the config, before the model is
// allocated: a mismatch names the tensor and both shapes.
void check_shapes(const Config& cfg, const Start& s) {
  if (!s) return;
  std::map<std::string, Shape> have;
  for (const auto& e : s.manifest.tensors())
    if (ckpt::is_param_key(e.name())) have[ckpt::parse_key(e.name()).name] = Shape(e.shape().begin(), e.shape().end());
  const std::vector<std::string> p = ckpt::param_problems(cfg, have, s.state.units.tables, "checkpoint " + s.dir);
  const char* hint = s.init ? " (train.init_from: the model section is the checkpoint's; a --set model.* override "
                              "must keep every tensor shape)"
                            : " (--resume: the model config must be the one the run was trained with)";
  MOE_CHECK(p.empty(), p.front() << (p.size() > 1 ? " (and " + std::to_string(p.size() - 1) + " more)" : "") << hint);
}

Start open_start(bool resume, const std::string& root, Config& cfg, bool lead) {
  Start s;
  const std::string& init = cfg.train().init_from();
  const bool own = resume && fs::exists(root + "/latest");
  if (resume && !own && lead)
    MOE_INFO("--resume: no checkpoint under " << root
                                              << (init.empty() ? ", starting fresh" : ", from train.init_from"));
  if (!own && init.empty()) return s;
  s.init = !own;
  s.dir = ckpt::resolve(own ? root : init);
  s.manifest = ckpt::read_manifest(s.dir);
  MOE_CHECK(s.init || has_optimizer_state(s.manifest),
            "--resume: checkpoint " << s.dir << " has no optimizer state (a converted or imported checkpoint): "
                                    << "start a new run from it with --set train.init_from=" << s.dir
                                    << " and another train.out_dir");
  s.reader = std::make_unique<ckpt::Reader>(s.dir, s.manifest);
  s.state = RunState::read(*s.reader, s.manifest);
  // the stored tables keep the row placement they were trained with, whatever the config file says
  const auto saved = s.manifest.config().model().word_experts().placement();
  if (cfg.model().has_word_experts() && saved != cfg.model().word_experts().placement()) {
    if (lead)
      MOE_INFO("model.word_experts.placement " << proto::WordExpertConfig::Placement_Name(saved)
                                               << " taken from the checkpoint");
    cfg.mutable_model()->mutable_word_experts()->set_placement(saved);
  }
  return s;
}

// Loads the checkpoint's tensors and state into the model and trainer; returns the step to start from.
int apply_start(Start& s, const Config& cfg, Model& model, Trainer& trainer, bool lead) {
  if (!s) return 0;
  if (s.init) {
    restore_state(*s.reader, model.params(), nullptr);
    UnitState tables;  // the routing tables the weights were trained with; router RNGs start from the seed
    tables.tables = s.state.units.tables;
    model.restore_unit_state(tables);
    if (lead)
      MOE_INFO("train.init_from: weights and routing tables of " << s.dir << " (step " << s.state.step
                                                                 << " of its run); step 0 of " << cfg.train().steps()
                                                                 << ", fresh AdamW state and data loader");
    return 0;
  }
  restore_state(*s.reader, model.params(), &trainer.optimizer());
  MOE_CHECK(s.manifest.loader_rng_size() == 4, "checkpoint " << s.dir << ": manifest has no data-loader state");
  const int missing = s.state.restore(model, trainer.optimizer(), trainer.loader());
  if (lead) MOE_INFO("resumed from " << s.dir << " at step " << s.state.step);
  if (lead && missing > 0 && cfg.model().moe().jitter_eps() > 0)
    MOE_INFO("checkpoint has no router jitter RNG state for " << missing
                                                              << " learned router(s): their noise restarts from the seed");
  return static_cast<int>(s.state.step);
}

void announce(const Config& cfg, const Model& model, const comm::Parallel& par, int threads, const Corpus& corpus,
              const std::string& root) {
  // leftovers of an interrupted save (a crash or kill while writing): never loaded, removed here
  for (const std::string& n : ckpt::remove_stale_saves(root))
    MOE_INFO("removed " << root << "/" << n << " (an incomplete checkpoint from an interrupted save)");
  fs::create_directories(cfg.train().out_dir());
  std::ofstream(cfg.train().out_dir() + "/config.txt") << config_to_text(cfg);
  const auto& m = cfg.model();
  MOE_INFO("model: " << m.n_layers() << " layers, d_model " << m.d_model() << ", heads " << m.n_heads() << "/"
                     << m.n_kv_heads() << " (q/kv), vocab " << m.vocab_size() << ", " << model.params().numel()
                     << " parameters on rank 0");
  const char* tensors = par.has_tensor_groups()                ? "nccl"
                        : m.device() == proto::DEVICE_CUDA ? "mpi (host-staged)"
                                                           : "mpi";
  MOE_INFO("parallel: world " << par.size() << " = data " << par.dp_size() << " x expert " << par.ep_size()
                              << "; threads per rank " << threads << "; tensors over " << tensors);
  MOE_INFO("data: " << corpus.train.size() << " train / " << corpus.val.size()
                    << " val tokens; unigram entropy (context-free baseline) " << corpus.unigram_entropy << " nats");
}

// Checkpoints of the run: every rank writes its own part (checkpoints/saver.h); with checkpoint.async the writes
// run in the background and are committed by the first step after every rank's writer finished (or by the next
// save, or by the final save at the end / on a stop signal, which is synchronous).
class Checkpoints {
 public:
  Checkpoints(const Config& cfg, comm::Parallel& par, const Tokenizer& tok, const Model& model, const Trainer& trainer,
              const std::string& root)
      : cfg_(cfg), par_(par), tok_(tok), model_(model), trainer_(trainer),
        saver_(par, {root, cfg.checkpoint().async(), cfg.checkpoint().keep_last(), ckpt::SaveFault::from_env(), {}}) {
    // the snapshot buffers, allocated now rather than in the first save's step (only the final save, which is
    // synchronous, is taken when checkpoint.every is 0)
    if (cfg.checkpoint().async() && cfg.checkpoint().every() > 0) saver_.prepare(tensors(capture(0)));
  }
  // after step `step`: the periodic checkpoint, the final one, or one asked for now (`forced`)
  void on_step(int step, bool final, bool forced = false) {
    log_commit(saver_.poll());  // collective while an asynchronous save is pending
    const int every = cfg_.checkpoint().every();
    if (!final && !forced && !(every > 0 && step % every == 0)) return;
    if (lead() && saver_.pending())
      MOE_INFO("waiting for the background checkpoint to finish before the checkpoint of step " << step);
    log_commit(saver_.finish());  // the previous save first: never two in flight
    const RunState rs = capture(step);
    ckpt::SaveState st;
    st.step = step;
    st.tensors = tensors(rs);
    ckpt::SaveRequest base;
    base.config = &cfg_;
    base.world_size = par_.size();
    base.tokenizer_blob = &tok_.serialized();
    st.manifest = ckpt::base_manifest(base);
    rs.to_manifest(st.manifest);
    st.tokenizer_blob = &tok_.serialized();
    const std::string dir = saver_.save(std::move(st), /*wait=*/final);
    if (dir.empty() && lead()) MOE_INFO("checkpoint of step " << step << ": writing in the background");
    log_commit(dir);
  }
  void finish() { log_commit(saver_.finish()); }
  int64_t last_committed() const { return committed_; }  // the step of the newest committed checkpoint (0: none)

 private:
  bool lead() const { return par_.rank() == 0; }
  void log_commit(const std::string& dir) {
    if (dir.empty()) return;
    committed_ = std::atoll(dir.substr(dir.rfind("step_") + 5).c_str());
    if (lead()) MOE_INFO("checkpoint " << dir);
  }
  int64_t committed_ = 0;
  RunState capture(int step) const {
    return RunState::capture(step, model_, trainer_.optimizer(), trainer_.loader());
  }
  // this rank's parameters and optimizer state, then the run state's routing tables
  std::vector<ckpt::LocalTensor> tensors(const RunState& rs) const {
    std::vector<ckpt::LocalTensor> t = collect_local_state(model_.params(), &trainer_.optimizer());
    for (ckpt::LocalTensor& r : rs.tensors()) t.push_back(std::move(r));
    return t;
  }
  const Config& cfg_;
  comm::Parallel& par_;
  const Tokenizer& tok_;
  const Model& model_;
  const Trainer& trainer_;
  ckpt::CheckpointSaver saver_;
};

// What the lead rank reports: the progress line, the exact loss log, the metrics stream, TensorBoard events.
struct Reports {
  std::ofstream loss_log;
  MetricsSink metrics;
  TensorBoardWriter tensorboard;
  Reports(const TrainOptions& opt, bool lead) {
    if (!lead) return;
    if (!opt.loss_log.empty()) {
      loss_log.open(opt.loss_log, std::ios::app);
      MOE_CHECK(loss_log.good(), "--loss-log: cannot open '" << opt.loss_log << "'");
    }
    if (!opt.metrics.empty()) metrics = MetricsSink(opt.metrics);
    if (!opt.tensorboard.empty()) tensorboard = TensorBoardWriter(opt.tensorboard);
  }
  void hook(TrainHooks& h, bool lead) {
    if (!lead) return;
    if (loss_log.is_open())
      h.on_step = [this](const StepRecord& r) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%d %a\n", r.step, static_cast<double>(r.loss));
        loss_log << buf << std::flush;
      };
    h.on_log = [this](const LogRecord& r) {
      MOE_INFO(progress_line(r));
      metrics.write(train_record(r));
      tensorboard.write(r);
    };
    h.on_eval = [this](const EvalRecord& r) {
      char line[128];
      std::snprintf(line, sizeof line, "eval  %5d | val loss %.4f | val ppl %.2f", r.step, r.val_loss,
                    std::exp(r.val_loss));
      MOE_INFO(line);
      metrics.write(eval_record(r));
      tensorboard.write(r);
    };
  }
};

// What the coordinator sees of this rank (when one launched it): phase, step, loss, speed, the newest checkpoint and
// (rank 0) the per-expert loads of the last logged step, published for the heartbeats of the control client.
class CoordinatorLink {
 public:
  explicit CoordinatorLink(comm::Parallel& par) : client_(ControlClient::from_env(par.rank(), par.size())) {
    set_phase(proto::PHASE_LOADING);
  }
  ControlClient* client() { return client_.get(); }
  void set_resumed_step(int step) { hb_.set_resumed_step(step); }
  void set_phase(proto::Phase p) {
    hb_.set_phase(p);
    publish();
  }
  // chains into the hooks: every step and every logged step update the heartbeat
  void hook(TrainHooks& h, const Checkpoints& ckpts) {
    if (!client_) return;
    auto step = h.on_step;
    auto log = h.on_log;
    h.on_step = [this, step, &ckpts](const StepRecord& r) {
      if (step) step(r);
      const auto now = std::chrono::steady_clock::now();
      if (hb_.step() > 0) {
        const double dt = std::chrono::duration<double>(now - last_).count();
        hb_.set_step_time_s(hb_.step_time_s() > 0 ? 0.8 * hb_.step_time_s() + 0.2 * dt : dt);
      }
      last_ = now;
      hb_.set_step(r.step);
      hb_.set_loss(r.loss);
      hb_.set_checkpoint_step(ckpts.last_committed());
      publish();
    };
    h.on_log = [this, log](const LogRecord& r) {
      if (log) log(r);
      hb_.set_tokens_per_s(r.tokens_per_s);
      hb_.clear_expert_layers();
      hb_.clear_expert_tokens();
      for (size_t l = 0; l < r.layers.size(); ++l) {
        if (r.layers[l].expert_load.empty()) continue;
        hb_.add_expert_layers(static_cast<int32_t>(l));
        hb_.set_experts(static_cast<int32_t>(r.layers[l].expert_load.size()));
        for (int64_t x : r.layers[l].expert_load) hb_.add_expert_tokens(x);
      }
    };
  }

 private:
  void publish() {
    if (client_) client_->publish(hb_);
  }
  std::unique_ptr<ControlClient> client_;
  proto::Heartbeat hb_;
  std::chrono::steady_clock::time_point last_;
};

TrainHooks parallel_hooks(comm::Parallel& par) {
  TrainHooks h;
  h.shard_rank = par.rank();
  h.shard_count = par.size();
  if (par.size() == 1) return h;
  h.mean_over_ranks = [&par](double v) { return par.mean(v); };
  h.reduce_grads = [&par](ParamStore& ps) { par.reduce_grads(ps); };
  h.sum_over_expert_group = [&par](double v) { return par.sum_expert_group(v); };
  // router statistics of logged steps over the world (every rank logs the same steps)
  h.sum_over_ranks = [&par](std::vector<double>& v) { par.world().all_reduce_sum(v.data(), v.size()); };
  return h;
}

}  // namespace

std::string take_init_model(Config& cfg, const std::vector<std::string>& overrides) {
  const std::string& init = cfg.train().init_from();
  if (init.empty()) return "";
  MOE_CHECK(fs::exists(init), "config field train.init_from = '" << init << "': no such checkpoint directory");
  Config file = cfg;
  *cfg.mutable_model() = ckpt::read_manifest(ckpt::resolve(init)).config().model();
  for (const std::string& o : overrides)
    if (o.rfind("model.", 0) == 0) apply_override(cfg, o);
  // the differences that matter: both with their defaults filled, a vocabulary size of 0 (from the tokenizer) aside
  Config now = cfg;
  fill_defaults(file);
  fill_defaults(now);
  if (file.model().vocab_size() == 0) file.mutable_model()->set_vocab_size(now.model().vocab_size());
  std::string diff;
  {  // (the reporter writes `diff` out when the differencer is destroyed)
    google::protobuf::util::MessageDifferencer d;
    d.ReportDifferencesToString(&diff);
    d.Compare(file.model(), now.model());
  }
  while (!diff.empty() && diff.back() == '\n') diff.pop_back();
  return diff;
}

int run_training(Config cfg, const TrainOptions& opt, comm::Parallel& par) {
  validate_config(cfg, /*needs_data=*/true);
  check_world(cfg, par.size());
  experts::check_device(cfg.model());
  experts::check_memory(cfg, par.size(), opt.ranks_on_node, "training");
  const bool lead = par.rank() == 0;
  CoordinatorLink link(par);  // (connects now when a coordinator launched this rank: it sees the loading)
  const std::string root = cfg.train().out_dir() + "/checkpoints";
  Start start_ckpt = open_start(opt.resume, root, cfg, lead);
  // from a checkpoint: its own tokenizer (an imported model brings its own); else the configured or trained one
  Tokenizer tok(start_ckpt && !start_ckpt.manifest.tokenizer_file().empty()
                    ? start_ckpt.dir + "/" + start_ckpt.manifest.tokenizer_file()
                    : prepare_tokenizer(cfg, par));
  set_vocab(cfg, tok);
  check_shapes(cfg, start_ckpt);  // (with the vocabulary size known)
  Corpus corpus = load_corpus(tok, cfg.data().train_file(), cfg.data().val_fraction());
  const std::vector<int32_t> classes = word_classes(tok);
  // (a checkpoint's unit state, routing tables included, is restored by apply_start, once)
  auto model = experts::build_model(cfg, {.ep = par.expert_group(),
                                          .ep_rows = par.expert_rows_group(),
                                          .token_counts = &corpus.train_counts,
                                          .corpus = &corpus.train,
                                          .word_classes = &classes});
  Trainer trainer(cfg, *model, corpus);
  const int start = apply_start(start_ckpt, cfg, *model, trainer, lead);
  if (lead) announce(cfg, *model, par, opt.threads, corpus, root);
  if (start >= cfg.train().steps()) {
    if (lead) MOE_INFO("nothing to do: checkpoint step " << start << " >= train.steps " << cfg.train().steps());
    link.set_phase(proto::PHASE_DONE);
    return 0;
  }
  link.set_resumed_step(start);
  StopControl stop(par, link.client());
  Checkpoints ckpts(cfg, par, tok, *model, trainer, root);
  Reports reports(opt, lead);
  TrainHooks hooks = parallel_hooks(par);
  reports.hook(hooks, lead);
  link.hook(hooks, ckpts);
  hooks.should_stop = [&stop](int step) { return stop.should_stop(step); };
  hooks.maybe_checkpoint = [&](int step, bool final) { ckpts.on_step(step, final, stop.checkpoint_now()); };
  link.set_phase(proto::PHASE_TRAINING);
  const RunOutcome out = trainer.run(hooks, start);
  ckpts.finish();  // (the final save is synchronous; this only guards against a pending one)
  link.set_phase(proto::PHASE_DONE);
  if (!out.stopped) return 0;
  if (lead)
    MOE_INFO("stopped by a signal after checkpointing step "
             << out.last_step << (link.client() ? " (or by the coordinator)" : "") << "; exit code 3 (requeue)");
  return 3;
}

}  // namespace moe::launcher
