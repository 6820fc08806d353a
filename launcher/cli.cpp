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
#include "launcher/ckpt_tool.h"
#include "launcher/coordinator_cli.h"
#include "launcher/eval.h"
#include "launcher/launch_env.h"
#include "comm/parallel.h"
#include "launcher/run_state.h"
#include "launcher/serve.h"
#include "launcher/train.h"

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
    {"--resume", "",
     "continue from the newest checkpoint (train.out_dir/checkpoints/latest); without one the run\n"
     "starts fresh, or from --set train.init_from=CKPT (a new run from a checkpoint's weights and\n"
     "model config: fine-tuning, GQA uptraining; step 0, fresh AdamW state and data loader)"},
    {"--threads", "N",
     "OpenMP/OpenBLAS threads per rank (default: train.threads; 0 = the node's cores divided\n"
     "among the ranks on the node)"},
    {"--loss-log", "FILE", "append 'step loss' per step, the loss as an exact hex float (resume checks)"},
    {"--metrics", "FILE",
     "append one JSON line per logged step and per evaluation (loss, lr, grad norm, tokens/s,\n"
     "per-layer router loss, dropped fraction, per-expert load; format in core/metrics.h)"},
    {"--tensorboard", "DIR",
     "write TensorBoard event files of the logged steps and evaluations into DIR (the metrics\n"
     "stream's scalars, and per-expert load histograms)"},
    {"--data-dir", "DIR",
     "relative data paths (data.train_file, data.tokenizer_model) of the config file, or of the\n"
     "checkpoint's config for eval, are relative to DIR (default: the config file's directory;\n"
     "for eval: the working directory); --set paths stay relative to the working directory"},
    {"--api-key-file", "FILE",
     "the API key clients must send (Authorization: Bearer KEY): the first line of FILE\n"
     "(overrides serving.api_key_file; without either the API is open to whoever reaches\n"
     "serving.host)"},
    {"--by-frequency", "",
     "also the loss over the whole validation split by the frequency rank of the target token in the\n"
     "training split (ranks 1-16, 17-256, 257-4096, rarer), then the same as one JSON line"},
    {"--print-ids", "",
     "also print on stderr the token ids (prompt, then continuation) on one line, and on the next the\n"
     "log-probability of each generated token (log-softmax of the logits, before temperature/top-k)"},
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
      {"train",
       "--config FILE [--set path=value ...] [--resume] [--threads N] [--metrics FILE] [--tensorboard DIR] "
       "[--loss-log FILE]",
       "train a model; writes the tokenizer and checkpoints under train.out_dir (several ranks: mpirun / srun)",
       {"--config", "--data-dir", "--set", "--resume", "--threads", "--metrics", "--tensorboard", "--loss-log"},
       "--config"},
      {"generate", "--checkpoint DIR [--prompt TEXT] [--set generate.temperature=0.8 ...] [--threads N]",
       "sample text from a checkpoint; prints the prompt and its continuation, decoded together",
       {"--checkpoint", "--prompt", "--set", "--threads", "--print-ids"}, "--checkpoint"},
      {"serve", "--checkpoint DIR [--set serving.port=8000 ...] [--api-key-file FILE] [--threads N]",
       "serve a checkpoint over an OpenAI-compatible HTTP API (several ranks: mpirun; experts sharded over them)",
       {"--checkpoint", "--set", "--api-key-file", "--threads"}, "--checkpoint"},
      {"eval", "--checkpoint DIR [--data-dir DIR] [--set data.train_file=...] [--threads N] [--by-frequency]",
       "validation loss of a checkpoint on its data split (dropless: the same at any world size)",
       {"--checkpoint", "--data-dir", "--set", "--threads", "--by-frequency"}, "--checkpoint"},
      {"config", "--config FILE [--data-dir DIR] [--set path=value ...]",
       "print the resolved config (defaults filled, overrides applied) and validate it",
       {"--config", "--data-dir", "--set"}, "--config"},
  };
  return k;
}
constexpr const char* kKnownCommands = "train, generate, serve, eval, config, ckpt, coordinator";

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
       "  coordinator run|serve|status|checkpoint|slots|shutdown ...\n"
       "            supervise a training or serving job: restarts after failures, resizing, a dashboard\n"
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
  std::string data_dir;
  std::string checkpoint;
  std::string prompt;
  bool prompt_set = false;
  bool resume = false;
  bool print_ids = false;
  bool by_frequency = false;
  std::string api_key_file;
  int threads = -1;
  int ranks_on_node = 1;  // from the launcher: "all cores" is divided among the ranks of one node
  std::string loss_log;
  std::string metrics;
  std::string tensorboard;
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
    if (!a.help_topic.empty() && a.help_topic != "ckpt" && a.help_topic != "coordinator" &&
        !find_command(a.help_topic))
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
    else if (k == "--data-dir") a.data_dir = value();
    else if (k == "--checkpoint") a.checkpoint = value();
    else if (k == "--prompt") { a.prompt = value(); a.prompt_set = true; }
    else if (k == "--set") a.overrides.push_back(value());
    else if (k == "--resume") a.resume = true;
    else if (k == "--print-ids") a.print_ids = true;
    else if (k == "--by-frequency") a.by_frequency = true;
    else if (k == "--api-key-file") a.api_key_file = value();
    else if (k == "--loss-log") a.loss_log = value();
    else if (k == "--metrics") a.metrics = value();
    else if (k == "--tensorboard") a.tensorboard = value();
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

// the config file, the overrides, the model of train.init_from (model_diff: how it differs from the file's), defaults
Config resolve_config(const Args& a, std::string* model_diff = nullptr) {
  MOE_CHECK(!a.config.empty(), "'moe " << a.command << "' needs --config FILE");
  Config cfg = load_config_file(a.config, a.data_dir);
  for (const auto& o : a.overrides) apply_override(cfg, o);
  const std::string diff = take_init_model(cfg, a.overrides);
  if (model_diff) *model_diff = diff;
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
  std::string model_diff;
  Config cfg = resolve_config(a, &model_diff);
  if (par.rank() == 0 && !model_diff.empty())
    MOE_INFO("train.init_from " << cfg.train().init_from()
                                << ": the model is the checkpoint's; it differs from the config file's in\n"
                                << model_diff);
  TrainOptions opt{a.resume, set_num_threads(threads_for(a, cfg.train().threads())), a.ranks_on_node, a.loss_log,
                   a.metrics, a.tensorboard};
  return run_training(std::move(cfg), opt, par);
}

int cmd_generate(const Args& a) {
  // the thread count before loading: the model's config is the checkpoint's
  set_num_threads(threads_for(a, 0));
  return run_generate({a.checkpoint, a.overrides, a.prompt_set ? a.prompt : "\n", a.print_ids});
}

int cmd_serve(const Args& a, comm::Communicator& world) {
  set_num_threads(threads_for(a, 0));
  return run_serve({a.checkpoint, a.overrides, a.api_key_file}, world);
}

int cmd_eval(const Args& a) { return run_eval({a.checkpoint, a.overrides, a.data_dir, a.threads, a.by_frequency}); }

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
  if (argc >= 2 && std::string(argv[1]) == "coordinator") {  // starts the ranks itself: no MPI here
    try {
      return coordinator_cli_main(argc - 1, argv + 1);
    } catch (const Error& e) {
      std::fprintf(stderr, "error: %s (%s)\n", e.what(), e.where().c_str());
      return 1;
    }
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
    cuda_pick_device([launch](int gpus) { return select_device(launch, gpus); });
    if (argc >= 2 && std::string(argv[1]) == "ckpt") {  // checkpoint utilities: own argument parsing
      MOE_CHECK(world == 1, "'moe ckpt' runs on one rank (launched on " << world << ")");
      rc = ckpt_tool_main(argc - 1, argv + 1);
      MPI_Finalize();
      return rc;
    }
    Args a = parse_args(argc, argv);
    a.ranks_on_node = launch.local_size;
    if (a.command == "help") {
      if (a.help_topic == "coordinator") {
        if (rank == 0) std::cout << coordinator_usage();
      } else if (a.help_topic == "ckpt") {
        char* help_argv[] = {argv[0], const_cast<char*>("--help"), nullptr};
        rc = ckpt_tool_main(2, help_argv);
      } else if (rank == 0) {
        std::cout << (a.help_topic.empty() ? general_usage() : command_usage(*find_command(a.help_topic)));
      }
      MPI_Finalize();
      return rc;
    }
    if (a.command != "train" && a.command != "serve")
      MOE_CHECK(world == 1, "'moe " << a.command << "' runs on one rank (launched on " << world << ")");
    if (a.command == "train") {
      // the process groups come first: a layout error must reach every rank before any other work
      Config peek = resolve_config(a);
      auto world_comm = comm::Communicator::world();
      world_comm->set_deadline(peek.parallel().collective_timeout_s());  // inherited by the process groups
      comm::Parallel par(std::move(world_comm), std::max(peek.parallel().expert_parallel(), 1), tensor_world(peek));
      rc = cmd_train(a, par);
    } else if (a.command == "serve") {
      auto world_comm = comm::Communicator::world();
      rc = cmd_serve(a, *world_comm);
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
