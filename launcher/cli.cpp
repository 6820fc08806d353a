#include "launcher/cli.h"

#include <mpi.h>

#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
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
#include "launcher/ckpt_tool.h"
#include "launcher/launch_env.h"
#include "comm/parallel.h"
#include "launcher/run_state.h"
#include "launcher/train.h"

namespace fs = std::filesystem;

namespace moe::launcher {
namespace {

const char* kUsage =
    "usage: moe <command> [options]\n"
    "commands:\n"
    "  train     --config FILE [--data-dir DIR] [--set path=value ...] [--resume]\n"
    "            train a model; writes the tokenizer and checkpoints under train.out_dir\n"
    "  generate  --checkpoint DIR [--prompt TEXT] [--set generate.temperature=0.8 ...]\n"
    "            sample text from a checkpoint (DIR: a step_<N> directory or a checkpoint root with `latest`)\n"
    "  eval      --checkpoint DIR [--data-dir DIR] [--set data.train_file=...]\n"
    "            validation loss of a checkpoint on its data split\n"
    "  config    --config FILE [--data-dir DIR] [--set path=value ...]\n"
    "            print the resolved config (defaults filled, overrides applied) and validate it\n"
    "  ckpt      inspect|verify|reshard|convert ...   checkpoint utilities (moe ckpt --help)\n"
    "            print the resolved config (defaults filled, overrides applied) and validate it\n"
    "options:\n"
    "  --set path=value   override any config field by path, e.g. --set model.d_model=256 (repeatable); a relative\n"
    "                     data path given here is relative to the working directory\n"
    "  --data-dir DIR     relative data paths (data.train_file, data.tokenizer_model) of the config file, or of the\n"
    "                     checkpoint's config for eval, are relative to DIR (default: the config file's directory;\n"
    "                     for eval: the working directory)\n"
    "  --threads N        OpenMP/OpenBLAS threads per rank (default: train.threads; 0 = the node's cores divided\n"
    "                     among the ranks on the node)\n"
    "  --loss-log FILE    train: append 'step loss' per step, the loss as an exact hex float (resume checks)\n"
    "  --metrics FILE     train: append one JSON line per logged step and per evaluation (loss, lr, grad norm,\n"
    "                     tokens/s, per-layer router loss, dropped fraction, per-expert load)\n";

struct Args {
  std::string command;
  std::string config;
  std::string data_dir;
  std::string checkpoint;
  std::string prompt;
  bool prompt_set = false;
  bool resume = false;
  int threads = -1;
  int ranks_on_node = 1;  // from the launcher: "all cores" is divided among the ranks of one node
  std::string loss_log;
  std::string metrics;
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
    else if (k == "--data-dir") a.data_dir = value("--data-dir");
    else if (k == "--checkpoint") a.checkpoint = value("--checkpoint");
    else if (k == "--prompt") { a.prompt = value("--prompt"); a.prompt_set = true; }
    else if (k == "--set") a.overrides.push_back(value("--set"));
    else if (k == "--resume") a.resume = true;
    else if (k == "--loss-log") a.loss_log = value("--loss-log");
    else if (k == "--metrics") a.metrics = value("--metrics");
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
  Config cfg = load_config_file(a.config, a.data_dir);
  for (const auto& o : a.overrides) apply_override(cfg, o);
  fill_defaults(cfg);
  return cfg;
}

// --threads, else the config's train.threads; 0 = this node's cores shared by the ranks on it (mpirun -np 2 on a
// 2-core machine: 1 thread each, not 2 ranks x 2 threads fighting over 2 cores)
int threads_for(const Args& a, int config_threads) {
  const int n = a.threads >= 0 ? a.threads : config_threads;
  if (n > 0) return n;
  const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  return std::max(1, cores / std::max(1, a.ranks_on_node));
}

int cmd_train(const Args& a, comm::Parallel& par) {
  Config cfg = resolve_config(a);
  TrainOptions opt{a.resume, set_num_threads(threads_for(a, cfg.train().threads())), a.ranks_on_node, a.loss_log,
                   a.metrics};
  return run_training(std::move(cfg), opt, par);
}

int cmd_generate(const Args& a) {
  LoadedModel lm = load_for_inference(a.checkpoint, a.overrides, a.data_dir);
  set_num_threads(threads_for(a, lm.cfg.train().threads()));
  std::string prompt = a.prompt_set ? a.prompt : "\n";
  std::vector<int32_t> ids = lm.tok->encode(prompt);
  MOE_CHECK(!ids.empty(), "--prompt '" << prompt << "' encodes to no tokens");
  std::vector<int32_t> out = generate(*lm.model, ids, lm.cfg.generate());
  std::cout << prompt << lm.tok->decode(out) << std::endl;
  return 0;
}

int cmd_eval(const Args& a) {
  LoadedModel lm = load_for_inference(a.checkpoint, a.overrides, a.data_dir);
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
    if (a.command != "train" && a.command != "help")
      MOE_CHECK(world == 1, "'moe " << a.command << "' runs on one rank (launched on " << world << ")");
    if (a.command == "train") {
      // the process groups come first: a layout error must reach every rank before any other work
      Config peek = resolve_config(a);
      auto world_comm = comm::Communicator::world();
      world_comm->set_deadline(peek.parallel().collective_timeout_s());  // inherited by the process groups
      comm::Parallel par(std::move(world_comm), std::max(peek.parallel().expert_parallel(), 1));
      rc = cmd_train(a, par);
    } else if (a.command == "generate") rc = cmd_generate(a);
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
