#include "launcher/cli.h"

#include <mpi.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "core/config.h"
#include "core/data.h"
#include "core/log.h"
#include "core/model.h"
#include "core/threads.h"
#include "core/trainer.h"
#include "launcher/model_state.h"

namespace fs = std::filesystem;

namespace moe::launcher {
namespace {

const char* kUsage =
    "usage: moe <command> [options]\n"
    "commands:\n"
    "  train     --config FILE [--set path=value ...] [--resume]\n"
    "            train a model; writes the tokenizer and checkpoints under train.out_dir\n"
    "  generate  --checkpoint DIR [--prompt TEXT] [--set generate.temperature=0.8 ...]\n"
    "            sample text from a checkpoint (DIR: a step_<N> directory or a checkpoint root with `latest`)\n"
    "  eval      --checkpoint DIR [--set data.train_file=...]\n"
    "            validation loss of a checkpoint on its data split\n"
    "  config    --config FILE [--set path=value ...]\n"
    "            print the resolved config (defaults filled, overrides applied) and validate it\n"
    "options:\n"
    "  --set path=value   override any config field by path, e.g. --set model.d_model=256 (repeatable)\n"
    "  --threads N        OpenMP/OpenBLAS threads (default: train.threads, 0 = all cores)\n";

struct Args {
  std::string command;
  std::string config;
  std::string checkpoint;
  std::string prompt;
  bool prompt_set = false;
  bool resume = false;
  int threads = -1;
  std::vector<std::string> overrides;
};

Args parse_args(int argc, char** argv) {
  Args a;
  MOE_CHECK(argc >= 2, "missing command\n" << kUsage);
  a.command = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string k = argv[i];
    auto value = [&](const char* name) -> std::string {
      MOE_CHECK(i + 1 < argc, "option " << name << " needs a value");
      return argv[++i];
    };
    if (k == "--config") a.config = value("--config");
    else if (k == "--checkpoint") a.checkpoint = value("--checkpoint");
    else if (k == "--prompt") { a.prompt = value("--prompt"); a.prompt_set = true; }
    else if (k == "--set") a.overrides.push_back(value("--set"));
    else if (k == "--resume") a.resume = true;
    else if (k == "--threads") {
      std::string v = value("--threads");
      try { a.threads = std::stoi(v); } catch (...) { MOE_THROW("--threads: '" << v << "' is not an integer"); }
    } else if (k == "-h" || k == "--help") { a.command = "help"; }
    else MOE_THROW("unknown option '" << k << "' for 'moe " << a.command << "'\n" << kUsage);
  }
  return a;
}

Config resolve_config(const Args& a) {
  MOE_CHECK(!a.config.empty(), "'moe " << a.command << "' needs --config FILE");
  Config cfg = load_config_file(a.config);
  for (const auto& o : a.overrides) apply_override(cfg, o);
  fill_defaults(cfg);
  return cfg;
}

volatile std::sig_atomic_t g_stop_signal = 0;
void on_signal(int sig) { g_stop_signal = sig; }

// Tokenizer: the configured model, or one trained from the corpus into out_dir (reused when present).
std::string prepare_tokenizer(const Config& cfg) {
  if (!cfg.data().tokenizer_model().empty()) return cfg.data().tokenizer_model();
  const std::string path = cfg.train().out_dir() + "/tokenizer.model";
  if (!fs::exists(path)) {
    fs::create_directories(cfg.train().out_dir());
    MOE_INFO("training a " << cfg.data().tokenizer_type() << " tokenizer (" << cfg.data().tokenizer_vocab_size()
                           << " pieces) on " << cfg.data().train_file() << " -> " << path);
    Tokenizer::train(cfg.data().train_file(), path, cfg.data().tokenizer_vocab_size(), cfg.data().tokenizer_type(),
                     cfg.train().threads());
  }
  return path;
}

int cmd_train(const Args& a) {
  Config cfg = resolve_config(a);
  validate_config(cfg, /*needs_data=*/true);
  const int threads = set_num_threads(a.threads >= 0 ? a.threads : cfg.train().threads());
  const std::string ckpt_root = cfg.train().out_dir() + "/checkpoints";

  int start_step = 0;
  std::string resume_dir;
  if (a.resume && fs::exists(ckpt_root + "/latest")) resume_dir = ckpt_root;
  Tokenizer tok(prepare_tokenizer(cfg));
  if (cfg.model().vocab_size() == 0) cfg.mutable_model()->set_vocab_size(tok.vocab_size());
  MOE_CHECK(cfg.model().vocab_size() == tok.vocab_size(),
            "config field model.vocab_size = " << cfg.model().vocab_size() << " does not match the tokenizer's "
                                               << tok.vocab_size() << " pieces (set it to 0 to take it from the tokenizer)");
  Corpus corpus = load_corpus(tok, cfg.data().train_file(), cfg.data().val_fraction());
  Model model(cfg.model());
  model.init_weights(cfg.train().seed());
  Trainer trainer(cfg, model, corpus);

  if (!resume_dir.empty()) {
    const std::string dir = ckpt::resolve(resume_dir);
    proto::Manifest m = ckpt::read_manifest(dir);
    ckpt::Reader reader(dir, m);
    restore_state(reader, model.params(), &trainer.optimizer(), 0);
    trainer.optimizer().set_t(m.optimizer_t());
    MOE_CHECK(m.loader_rng_size() == 4, "checkpoint " << dir << ": manifest has no data-loader state");
    trainer.loader().set_state({m.loader_rng(0), m.loader_rng(1), m.loader_rng(2), m.loader_rng(3)});
    start_step = static_cast<int>(m.step());
    MOE_INFO("resumed from " << dir << " at step " << start_step);
  } else if (a.resume) {
    MOE_INFO("--resume: no checkpoint under " << ckpt_root << ", starting fresh");
  }
  {
    std::ofstream f(cfg.train().out_dir() + "/config.txt");
    f << config_to_text(cfg);
  }
  MOE_INFO("model: " << cfg.model().n_layers() << " layers, d_model " << cfg.model().d_model() << ", heads "
                     << cfg.model().n_heads() << "/" << cfg.model().n_kv_heads() << " (q/kv), vocab "
                     << cfg.model().vocab_size() << ", " << model.params().numel() << " parameters");
  MOE_INFO("data: " << corpus.train.size() << " train / " << corpus.val.size()
                    << " val tokens; unigram entropy (context-free baseline) " << corpus.unigram_entropy
                    << " nats; threads " << threads);

  std::signal(SIGTERM, on_signal);
  std::signal(SIGUSR1, on_signal);
  std::signal(SIGINT, on_signal);
  TrainHooks hooks;
  hooks.should_stop = [] { return g_stop_signal != 0; };
  hooks.maybe_checkpoint = [&](int step, bool final) {
    const int every = cfg.checkpoint().every();
    if (!final && !(every > 0 && step % every == 0)) return;
    ckpt::SaveRequest req;
    req.config = &cfg;
    req.step = step;
    req.tensors = collect_state(model.params(), &trainer.optimizer(), {}, [](const Tensor& t) { return t; });
    req.optimizer_t = trainer.optimizer().t();
    req.loader_rng = trainer.loader().state();
    req.tokenizer_blob = &tok.serialized();
    req.keep_last = cfg.checkpoint().keep_last();
    const std::string dir = ckpt::save(ckpt_root, req);
    MOE_INFO("checkpoint " << dir);
  };
  if (start_step >= cfg.train().steps()) {
    MOE_INFO("nothing to do: checkpoint step " << start_step << " >= train.steps " << cfg.train().steps());
    return 0;
  }
  trainer.run(hooks, start_step);
  if (g_stop_signal) {
    MOE_INFO("stopped by signal " << g_stop_signal << " after checkpointing");
    return 3;  // requeue code for batch scripts
  }
  return 0;
}

struct LoadedModel {
  Config cfg;
  std::string dir;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<Model> model;
  proto::Manifest manifest;
};

LoadedModel load_from_checkpoint(const Args& a) {
  MOE_CHECK(!a.checkpoint.empty(), "'moe " << a.command << "' needs --checkpoint DIR");
  LoadedModel lm;
  lm.dir = ckpt::resolve(a.checkpoint);
  lm.manifest = ckpt::read_manifest(lm.dir);
  lm.cfg = lm.manifest.config();
  for (const auto& o : a.overrides) apply_override(lm.cfg, o);
  fill_defaults(lm.cfg);
  validate_config(lm.cfg, false);
  MOE_CHECK(!lm.manifest.tokenizer_file().empty(), "checkpoint " << lm.dir << " has no tokenizer");
  lm.tok = std::make_unique<Tokenizer>(lm.dir + "/" + lm.manifest.tokenizer_file());
  lm.model = std::make_unique<Model>(lm.cfg.model());
  ckpt::Reader reader(lm.dir, lm.manifest);
  restore_state(reader, lm.model->params(), nullptr, 0);
  return lm;
}

int cmd_generate(const Args& a) {
  LoadedModel lm = load_from_checkpoint(a);
  set_num_threads(a.threads >= 0 ? a.threads : lm.cfg.train().threads());
  std::string prompt = a.prompt_set ? a.prompt : "\n";
  std::vector<int32_t> ids = lm.tok->encode(prompt);
  MOE_CHECK(!ids.empty(), "--prompt '" << prompt << "' encodes to no tokens");
  std::vector<int32_t> out = generate(*lm.model, ids, lm.cfg.generate());
  std::cout << prompt << lm.tok->decode(out) << std::endl;
  return 0;
}

int cmd_eval(const Args& a) {
  LoadedModel lm = load_from_checkpoint(a);
  set_num_threads(a.threads >= 0 ? a.threads : lm.cfg.train().threads());
  validate_config(lm.cfg, true);
  Corpus corpus = load_corpus(*lm.tok, lm.cfg.data().train_file(), lm.cfg.data().val_fraction());
  Trainer trainer(lm.cfg, *lm.model, corpus);
  const float vl = trainer.evaluate();
  std::printf("checkpoint %s step %lld | val loss %.4f | unigram entropy %.4f\n", lm.dir.c_str(),
              static_cast<long long>(lm.manifest.step()), vl, corpus.unigram_entropy);
  return 0;
}

int cmd_config(const Args& a) {
  Config cfg = resolve_config(a);
  validate_config(cfg, false);
  std::cout << config_to_text(cfg);
  return 0;
}

}  // namespace

int run_cli(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  log::set_rank(rank, world);
  int rc = 0;
  try {
    Args a = parse_args(argc, argv);
    MOE_CHECK(world == 1 || a.command != "train",
              "'moe train' on " << world << " ranks: multi-rank (data x expert parallel) training is not "
                                << "available in this build; run it on one rank");
    if (a.command == "train") rc = cmd_train(a);
    else if (a.command == "generate") rc = cmd_generate(a);
    else if (a.command == "eval") rc = cmd_eval(a);
    else if (a.command == "config") rc = cmd_config(a);
    else if (a.command == "help" || a.command == "--help" || a.command == "-h") std::cout << kUsage;
    else MOE_THROW("unknown command '" << a.command << "'\n" << kUsage);
  } catch (const Error& e) {
    std::fprintf(stderr, "%serror: %s (%s)\n", world > 1 ? ("[rank " + std::to_string(rank) + "] ").c_str() : "",
                 e.what(), e.where().c_str());
    std::fflush(stderr);
    if (world > 1) MPI_Abort(MPI_COMM_WORLD, 1);  // never leave the other ranks waiting
    rc = 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    std::fflush(stderr);
    if (world > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    rc = 1;
  }
  MPI_Finalize();
  return rc;
}

}  // namespace moe::launcher
