#include "launcher/cli.h"

#include <mpi.h>

#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "comm/communicator.h"
#include "core/config.h"
#include "core/data.h"
#include "core/log.h"
#include "core/model.h"
#include "core/threads.h"
#include "core/trainer.h"
#include "experts/moe_layer.h"
#include "launcher/ckpt_save.h"
#include "launcher/ckpt_tool.h"
#include "launcher/launch_env.h"
#include "launcher/model_state.h"
#include "launcher/parallel.h"

namespace fs = std::filesystem;

namespace moe::launcher {
namespace {

// ---- command line: the commands, their options and help texts ----
// A bad command line (unknown command or option, a missing or malformed option value) is a UsageError: one line
// `error: ...` on stderr and exit code 2. Every other failure is a moe::Error: `error: what (where)`, exit 1.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct OptionDoc {
  const char* name;
  const char* arg;  // "" for a flag
  const char* help;
};
const OptionDoc kOptions[] = {
    {"--config", "FILE", "the run config (protobuf text, proto/config.proto; examples in deploy/configs/)"},
    {"--checkpoint", "DIR", "a step_<N> checkpoint directory, or a checkpoint root whose `latest` names one"},
    {"--prompt", "TEXT", "the text to continue (default: a newline)"},
    {"--set", "path=value", "override a config field by path, e.g. --set model.d_model=256 (repeatable)"},
    {"--resume", "", "continue from the newest checkpoint (train.out_dir/checkpoints/latest)"},
    {"--threads", "N",
     "OpenMP/OpenBLAS threads per rank (default: train.threads; 0 = the node's cores divided\n"
     "among the ranks on the node)"},
    {"--loss-log", "FILE", "append 'step loss' per step, the loss as an exact hex float (resume checks)"},
    {"--print-ids", "", "also print the token ids (prompt, then continuation) as one line on stderr"},
};

struct CommandSpec {
  const char* name;
  const char* synopsis;
  const char* summary;
  std::vector<std::string> options;
  const char* required;  // the option the command cannot run without
};
const std::vector<CommandSpec>& commands() {
  static const std::vector<CommandSpec> k = {
      {"train", "--config FILE [--set path=value ...] [--resume] [--threads N] [--loss-log FILE]",
       "train a model; writes the tokenizer and checkpoints under train.out_dir (several ranks: mpirun / srun)",
       {"--config", "--set", "--resume", "--threads", "--loss-log"}, "--config"},
      {"generate", "--checkpoint DIR [--prompt TEXT] [--set generate.temperature=0.8 ...] [--threads N]",
       "sample text from a checkpoint; prints the prompt and its continuation, decoded together",
       {"--checkpoint", "--prompt", "--set", "--threads", "--print-ids"}, "--checkpoint"},
      {"eval", "--checkpoint DIR [--set data.train_file=...] [--threads N]",
       "validation loss of a checkpoint on its data split", {"--checkpoint", "--set", "--threads"}, "--checkpoint"},
      {"config", "--config FILE [--set path=value ...]",
       "print the resolved config (defaults filled, overrides applied) and validate it", {"--config", "--set"},
       "--config"},
  };
  return k;
}
constexpr const char* kKnownCommands = "train, generate, eval, config, ckpt";

const CommandSpec* find_command(const std::string& name) {
  for (const auto& c : commands())
    if (name == c.name) return &c;
  return nullptr;
}

std::string general_usage() {
  std::ostringstream o;
  o << "usage: moe <command> [options]\n"
       "commands:\n";
  for (const auto& c : commands()) {
    o << "  " << c.name << std::string(10 - std::strlen(c.name), ' ') << c.synopsis << "\n";
    o << "            " << c.summary << "\n";
  }
  o << "  ckpt      inspect|verify|reshard|convert ...\n"
       "            checkpoint utilities\n"
       "'moe <command> --help' (or 'moe help <command>') lists a command's options.\n";
  return o.str();
}

std::string command_usage(const CommandSpec& c) {
  std::ostringstream o;
  o << "usage: moe " << c.name << " " << c.synopsis << "\n" << c.summary << "\noptions:\n";
  auto item = [&](const std::string& head, const std::string& help) {
    o << "  " << head << std::string(head.size() < 19 ? 19 - head.size() : 1, ' ');
    for (char ch : help) o << ch << (ch == '\n' ? std::string(21, ' ') : "");
    o << "\n";
  };
  for (const auto& name : c.options)
    for (const auto& d : kOptions)
      if (name == d.name) item(std::string(d.name) + (*d.arg ? std::string(" ") + d.arg : ""), d.help);
  item("-h, --help", "print this help");
  return o.str();
}

std::string unknown_command(const std::string& cmd) {
  return "unknown command '" + cmd + "' (known: " + kKnownCommands + "); see 'moe --help'";
}

struct Args {
  std::string command;
  std::string help_topic;  // command "help": the command whose help to print ("" = the general usage)
  std::string config;
  std::string checkpoint;
  std::string prompt;
  bool prompt_set = false;
  bool resume = false;
  bool print_ids = false;
  int threads = -1;
  int ranks_on_node = 1;  // from the launcher: "all cores" is divided among the ranks of one node
  std::string loss_log;
  std::vector<std::string> overrides;
};

// `moe --help`, `moe help [command]` and `moe <command> --help` (anywhere on the line) give command "help".
Args parse_args(int argc, char** argv) {
  Args a;
  if (argc < 2) throw UsageError(std::string("missing command (known: ") + kKnownCommands + "); see 'moe --help'");
  a.command = argv[1];
  if (a.command == "help" || a.command == "--help" || a.command == "-h") {
    a.command = "help";
    if (argc >= 3) a.help_topic = argv[2];
    if (!a.help_topic.empty() && a.help_topic != "ckpt" && !find_command(a.help_topic))
      throw UsageError(unknown_command(a.help_topic));
    return a;
  }
  const CommandSpec* spec = find_command(a.command);
  if (!spec) throw UsageError(unknown_command(a.command));
  const std::string hint = "; see 'moe " + a.command + " --help'";
  for (int i = 2; i < argc; ++i)
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      a.help_topic = a.command;
      a.command = "help";
      return a;
    }
  for (int i = 2; i < argc; ++i) {
    std::string k = argv[i];
    if (std::find(spec->options.begin(), spec->options.end(), k) == spec->options.end())
      throw UsageError((k.rfind("-", 0) == 0 ? "unknown option '" : "unexpected argument '") + k + "' for 'moe " +
                       a.command + "'" + hint);
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError("option " + k + " of 'moe " + a.command + "' needs a value" + hint);
      return argv[++i];
    };
    if (k == "--config") a.config = value();
    else if (k == "--checkpoint") a.checkpoint = value();
    else if (k == "--prompt") { a.prompt = value(); a.prompt_set = true; }
    else if (k == "--set") a.overrides.push_back(value());
    else if (k == "--resume") a.resume = true;
    else if (k == "--print-ids") a.print_ids = true;
    else if (k == "--loss-log") a.loss_log = value();
    else if (k == "--threads") {
      std::string v = value();
      size_t used = 0;
      try { a.threads = std::stoi(v, &used); } catch (...) { used = 0; }
      if (used == 0 || used != v.size() || a.threads < 0)
        throw UsageError("--threads: '" + v + "' is not a non-negative integer" + hint);
    }
  }
  const std::string& need = spec->required;
  if ((need == "--config" && a.config.empty()) || (need == "--checkpoint" && a.checkpoint.empty()))
    throw UsageError("'moe " + a.command + "' needs " + need + (need == "--config" ? " FILE" : " DIR") + hint);
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
std::string prepare_tokenizer(const Config& cfg, Parallel& par) {
  if (!cfg.data().tokenizer_model().empty()) return cfg.data().tokenizer_model();
  const std::string path = cfg.train().out_dir() + "/tokenizer.model";
  // rank 0 trains it (once per run directory); the others wait for it
  const bool need = !fs::exists(path);
  if (need && par.rank() == 0) {
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

std::vector<int64_t> token_counts(const Corpus& c, int V) {
  std::vector<int64_t> counts(V, 0);
  for (int32_t t : c.train) ++counts[t];
  return counts;
}

// --threads, else the config's train.threads; 0 = this node's cores shared by the ranks on it (mpirun -np 2 on a
// 2-core machine: 1 thread each, not 2 ranks x 2 threads fighting over 2 cores)
int threads_for(const Args& a, int config_threads) {
  const int n = a.threads >= 0 ? a.threads : config_threads;
  if (n > 0) return n;
  const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  return std::max(1, cores / std::max(1, a.ranks_on_node));
}

int cmd_train(const Args& a, Parallel& par) {
  Config cfg = resolve_config(a);
  validate_config(cfg, /*needs_data=*/true);
  MOE_CHECK(cfg.data().batch_size() % par.size() == 0,
            "config field data.batch_size = " << cfg.data().batch_size() << ": must be divisible by the world size "
                                              << par.size() << " (each rank trains on an equal share)");
  const int threads = set_num_threads(threads_for(a, cfg.train().threads()));
  const std::string ckpt_root = cfg.train().out_dir() + "/checkpoints";
  const bool lead = par.rank() == 0;

  Tokenizer tok(prepare_tokenizer(cfg, par));
  if (cfg.model().vocab_size() == 0) cfg.mutable_model()->set_vocab_size(tok.vocab_size());
  MOE_CHECK(cfg.model().vocab_size() == tok.vocab_size(),
            "config field model.vocab_size = " << cfg.model().vocab_size() << " does not match the tokenizer's "
                                               << tok.vocab_size() << " pieces (set it to 0 to take it from the tokenizer)");
  Corpus corpus = load_corpus(tok, cfg.data().train_file(), cfg.data().val_fraction());
  const std::vector<int64_t> counts = token_counts(corpus, tok.vocab_size());

  // a checkpoint to resume from (its routing tables are needed to build the model)
  std::string resume_dir;
  proto::Manifest manifest;
  std::unique_ptr<ckpt::Reader> reader;
  if (a.resume && fs::exists(ckpt_root + "/latest")) {
    resume_dir = ckpt::resolve(ckpt_root);
    manifest = ckpt::read_manifest(resume_dir);
    reader = std::make_unique<ckpt::Reader>(resume_dir, manifest);
    // the stored tables keep the row placement they were trained with, whatever the config file says
    const auto& saved = manifest.config().model().word_experts();
    if (cfg.model().has_word_experts() && saved.placement() != cfg.model().word_experts().placement()) {
      if (lead)
        MOE_INFO("--resume: model.word_experts.placement " << proto::WordExpertConfig::Placement_Name(saved.placement())
                                                          << " taken from the checkpoint");
      cfg.mutable_model()->mutable_word_experts()->set_placement(saved.placement());
    }
  }
  experts::FfnBuildContext fctx;
  fctx.ep = par.expert_group();
  fctx.token_counts = &counts;
  fctx.seed = cfg.train().seed();
  if (reader) fctx.routing_tables = read_routing_tables(*reader, manifest);
  Model model(cfg.model(), experts::make_ffn_factory(fctx));
  model.init_weights(cfg.train().seed());
  experts::init_expert_weights(model, cfg.train().seed());
  Trainer trainer(cfg, model, corpus);

  int start_step = 0;
  if (reader) {
    restore_state(*reader, model.params(), &trainer.optimizer(), par.ep_rank());
    trainer.optimizer().set_t(manifest.optimizer_t());
    MOE_CHECK(manifest.loader_rng_size() == 4, "checkpoint " << resume_dir << ": manifest has no data-loader state");
    trainer.loader().set_state({manifest.loader_rng(0), manifest.loader_rng(1), manifest.loader_rng(2),
                                manifest.loader_rng(3)});
    start_step = static_cast<int>(manifest.step());
    const int routers = static_cast<int>(router_rng_states(model).size());
    const int restored = restore_router_rng(model, manifest);
    if (lead) MOE_INFO("resumed from " << resume_dir << " at step " << start_step);
    if (lead && restored < routers && cfg.model().moe().jitter_eps() > 0)
      MOE_INFO("checkpoint has no router jitter RNG state for "
               << routers - restored << " learned router(s): their noise restarts from the seed");
  } else if (a.resume) {
    if (lead) MOE_INFO("--resume: no checkpoint under " << ckpt_root << ", starting fresh");
  }
  if (lead) {
    // leftovers of an interrupted save (a crash or kill while writing): never loaded, removed here
    for (const std::string& n : ckpt::remove_stale_saves(ckpt_root))
      MOE_INFO("removed " << ckpt_root << "/" << n << " (an incomplete checkpoint from an interrupted save)");
    fs::create_directories(cfg.train().out_dir());
    std::ofstream f(cfg.train().out_dir() + "/config.txt");
    f << config_to_text(cfg);
    MOE_INFO("model: " << cfg.model().n_layers() << " layers, d_model " << cfg.model().d_model() << ", heads "
                       << cfg.model().n_heads() << "/" << cfg.model().n_kv_heads() << " (q/kv), vocab "
                       << cfg.model().vocab_size() << ", " << model.params().numel() << " parameters on rank 0");
    MOE_INFO("parallel: world " << par.size() << " = data " << par.dp_size() << " x expert " << par.ep_size()
                                << "; threads per rank " << threads);
    MOE_INFO("data: " << corpus.train.size() << " train / " << corpus.val.size()
                      << " val tokens; unigram entropy (context-free baseline) " << corpus.unigram_entropy << " nats");
  }

  std::signal(SIGTERM, on_signal);
  std::signal(SIGUSR1, on_signal);
  std::signal(SIGINT, on_signal);
  TrainHooks hooks;
  hooks.print = lead;
  hooks.shard_rank = par.rank();
  hooks.shard_count = par.size();
  if (par.size() > 1) {
    hooks.mean_over_ranks = [&](double v) { return par.mean(v); };
    hooks.reduce_grads = [&](ParamStore& ps) { par.reduce_grads(ps); };
    hooks.sum_over_expert_group = [&](double v) { return par.sum_expert_group(v); };
  }
  // Fault injection for tests of the failure path: MOE_FAULT_RANK=r MOE_FAULT_STEP=s makes rank r throw at step s.
  const char* fault_rank = std::getenv("MOE_FAULT_RANK");
  const char* fault_step = std::getenv("MOE_FAULT_STEP");
  int step_seen = start_step;
  hooks.should_stop = [&] {
    ++step_seen;
    if (fault_rank && fault_step && std::atoi(fault_rank) == par.rank() && std::atoi(fault_step) == step_seen)
      MOE_THROW("injected fault (MOE_FAULT_RANK=" << fault_rank << ", MOE_FAULT_STEP=" << fault_step << ")");
    return par.any(g_stop_signal != 0);
  };
  // Checkpoints: every rank writes its own part (launcher/ckpt_save.h); with checkpoint.async the writes run in
  // the background and are committed by the first step after every rank's writer finished (or by the next save,
  // or by the final save at the end / on a stop signal, which is synchronous).
  CheckpointSaver saver(par, {ckpt_root, cfg.checkpoint().async(), cfg.checkpoint().keep_last(),
                              SaveFault::from_env(), {}});
  // the snapshot buffers, allocated now rather than in the first save's step (only the final save, which is
  // synchronous, is taken when checkpoint.every is 0)
  if (cfg.checkpoint().async() && cfg.checkpoint().every() > 0)
    saver.prepare(collect_local_state(model.params(), &trainer.optimizer(), experts::routing_tables(model)));
  auto log_commit = [&](const std::string& dir) {
    if (lead && !dir.empty()) MOE_INFO("checkpoint " << dir);
  };
  hooks.maybe_checkpoint = [&](int step, bool final) {
    log_commit(saver.poll());  // collective while an asynchronous save is pending
    const int every = cfg.checkpoint().every();
    if (!final && !(every > 0 && step % every == 0)) return;
    if (lead && saver.pending())
      MOE_INFO("waiting for the background checkpoint to finish before the checkpoint of step " << step);
    log_commit(saver.finish());  // the previous save first: never two in flight
    ckpt::SaveRequest base;
    base.config = &cfg;
    base.step = step;
    base.optimizer_t = trainer.optimizer().t();
    base.loader_rng = trainer.loader().state();
    base.router_rng = router_rng_states(model);
    base.tokenizer_blob = &tok.serialized();
    base.world_size = par.size();
    SaveState st;
    st.step = step;
    st.tensors = collect_local_state(model.params(), &trainer.optimizer(), experts::routing_tables(model));
    st.manifest = ckpt::base_manifest(base);
    st.tokenizer_blob = &tok.serialized();
    const std::string dir = saver.save(std::move(st), /*wait=*/final);
    if (dir.empty()) {
      if (lead) MOE_INFO("checkpoint of step " << step << ": writing in the background");
    } else {
      log_commit(dir);
    }
  };
  std::ofstream loss_log;
  if (!a.loss_log.empty() && lead) {
    loss_log.open(a.loss_log, std::ios::app);
    MOE_CHECK(loss_log.good(), "--loss-log: cannot open '" << a.loss_log << "'");
    hooks.on_step = [&](const StepRecord& r) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%d %a\n", r.step, static_cast<double>(r.loss));
      loss_log << buf << std::flush;
    };
  }
  if (start_step >= cfg.train().steps()) {
    if (lead) MOE_INFO("nothing to do: checkpoint step " << start_step << " >= train.steps " << cfg.train().steps());
    return 0;
  }
  trainer.run(hooks, start_step);
  log_commit(saver.finish());  // (the final save is synchronous; this only guards against a pending one)
  if (g_stop_signal || par.any(false)) {
    if (lead) MOE_INFO("stopped by a signal after checkpointing");
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
  // a single-rank model holds every expert: the checkpoint stores expert tensors with their global shapes
  lm.cfg.mutable_parallel()->set_expert_parallel(1);
  ckpt::Reader reader(lm.dir, lm.manifest);
  experts::FfnBuildContext fctx;
  fctx.routing_tables = read_routing_tables(reader, lm.manifest);
  lm.model = std::make_unique<Model>(lm.cfg.model(), experts::make_ffn_factory(fctx));
  restore_state(reader, lm.model->params(), nullptr, 0);
  return lm;
}

int cmd_generate(const Args& a) {
  LoadedModel lm = load_from_checkpoint(a);
  set_num_threads(threads_for(a, lm.cfg.train().threads()));
  std::string prompt = a.prompt_set ? a.prompt : "\n";
  std::vector<int32_t> ids = lm.tok->encode(prompt);
  MOE_CHECK(!ids.empty(), "--prompt '" << prompt << "' encodes to no tokens");
  std::vector<int32_t> all = ids;
  const std::vector<int32_t> out = generate(*lm.model, ids, lm.cfg.generate());
  all.insert(all.end(), out.begin(), out.end());
  // decoded as one sequence: the continuation decoded alone would lose its leading space ("looked atthe")
  std::cout << lm.tok->decode(all) << std::endl;
  if (a.print_ids) {
    for (size_t i = 0; i < all.size(); ++i) std::cerr << (i ? " " : "") << all[i];
    std::cerr << std::endl;
  }
  return 0;
}

int cmd_eval(const Args& a) {
  LoadedModel lm = load_from_checkpoint(a);
  set_num_threads(threads_for(a, lm.cfg.train().threads()));
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
  // srun without PMIx makes Open MPI abort inside MPI_Init: catch that launch mistake first, with the fix
  try {
    check_launch_before_mpi();
  } catch (const Error& e) {
    std::fprintf(stderr, "error: %s (%s)\n", e.what(), e.where().c_str());
    return 1;
  }
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  log::set_rank(rank, world);
  int rc = 0;
  try {
    const LaunchInfo launch = detect_launch(rank, world);
    check_launch_environment(launch);
    if (argc >= 2 && std::string(argv[1]) == "ckpt") {  // checkpoint utilities: own argument parsing
      MOE_CHECK(world == 1, "'moe ckpt' runs on one rank (launched on " << world << ")");
      rc = ckpt_tool_main(argc - 1, argv + 1);
      MPI_Finalize();
      return rc;
    }
    Args a = parse_args(argc, argv);
    a.ranks_on_node = launch.local_size;
    if (a.command == "help") {
      if (a.help_topic == "ckpt") {
        char* help_argv[] = {argv[0], const_cast<char*>("--help"), nullptr};
        rc = ckpt_tool_main(2, help_argv);
      } else if (rank == 0) {
        std::cout << (a.help_topic.empty() ? general_usage() : command_usage(*find_command(a.help_topic)));
      }
      MPI_Finalize();
      return rc;
    }
    if (a.command != "train")
      MOE_CHECK(world == 1, "'moe " << a.command << "' runs on one rank (launched on " << world << ")");
    if (a.command == "train") {
      // the process groups come first: a layout error must reach every rank before any other work
      Config peek = resolve_config(a);
      auto world_comm = comm::Communicator::world();
      world_comm->set_deadline(peek.parallel().collective_timeout_s());  // inherited by the process groups
      Parallel par(std::move(world_comm), std::max(peek.parallel().expert_parallel(), 1));
      rc = cmd_train(a, par);
    } else if (a.command == "generate") rc = cmd_generate(a);
    else if (a.command == "eval") rc = cmd_eval(a);
    else if (a.command == "config") rc = cmd_config(a);
    else throw UsageError(unknown_command(a.command));  // parse_args only returns known commands
  } catch (const UsageError& e) {  // every rank parsed the same command line: no abort, rank 0 reports
    if (rank == 0) std::fprintf(stderr, "error: %s\n", e.what());
    rc = 2;
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
