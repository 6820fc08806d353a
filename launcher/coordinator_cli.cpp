#include "launcher/coordinator_cli.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>

#include "core/error.h"
#include "core/json.h"
#include "launcher/coordinator.h"

namespace moe::launcher {
namespace {

const char* kUsage =
    "usage: moe coordinator <command> ...\n"
    "  run --config FILE [--set path=value ...] [--job-dir DIR] [--slots N | --hostfile FILE | --slurm]\n"
    "      [--min-world N] [--max-world N] [--threads N] [--max-restarts N] [--heartbeat-timeout S]\n"
    "      [--host ADDR] [--control-port P] [--http-port P] [--api-key-file FILE]\n"
    "                launch `moe train --resume` on the slots (mpirun on this host or --hostfile; srun inside a\n"
    "                Slurm allocation with --slurm) and keep it running: a rank that dies, hangs or stops sending\n"
    "                heartbeats stops the group, which is relaunched from the newest checkpoint on the world the\n"
    "                healthy slots allow (the global batch stays the same: micro-batches make up for fewer ranks);\n"
    "                exits 0 when train.steps are done, 1 after --max-restarts launches in a row without progress.\n"
    "                The job's state (secret, endpoint.json, events.jsonl, the ranks' logs) is in --job-dir\n"
    "                (default: train.out_dir/coordinator); a new coordinator of the same --job-dir resumes the job.\n"
    "                Dashboard: http://HOST:HTTP_PORT/ (JSON: /status), key: --api-key-file (Bearer or ?key=)\n"
    "  serve --checkpoint DIR --job-dir DIR [--replicas R] [--ranks-per-replica N] [--api-port P] [--set ...]\n"
    "      [--threads N] [--host ADDR] [--control-port P] [--http-port P] [--api-key-file FILE]\n"
    "                R replicas of `moe serve` (N ranks each, experts sharded over them) behind one OpenAI-\n"
    "                compatible endpoint on --api-port; a replica that fails is taken out of rotation (its\n"
    "                requests move to the others) and relaunched; runs until `moe coordinator shutdown`\n"
    "  status --job-dir DIR [--json]      the job: state, epoch, world, each rank's health and step, the events\n"
    "  checkpoint --job-dir DIR           every rank checkpoints at its next step boundary and goes on\n"
    "  slots N --job-dir DIR              the slots now usable: fewer shrinks the job at once (checkpoint, relaunch\n"
    "                                     on fewer ranks), more grows it at the next checkpoint\n"
    "  shutdown --job-dir DIR             checkpoint and stop the job; the coordinator exits\n"
    "defaults: --slots this host's cores (--slurm: SLURM_NTASKS), --min-world 1, --max-world the slots, --threads 1,\n"
    "--max-restarts 5, --heartbeat-timeout 1 (seconds), --host 127.0.0.1, ports 0 (any free port: the log and\n"
    "endpoint.json say which), --replicas 1, --ranks-per-replica 1\n";

// a bad command line: one line `error: ...` on stderr, exit code 2 (as the other commands)
struct UsageError : std::runtime_error {
  UsageError(const std::string& what, const std::string& where) : std::runtime_error(where + ": " + what) {}
};

int to_int(const std::string& opt, const std::string& v, int lo) {
  size_t used = 0;
  int n = 0;
  try {
    n = std::stoi(v, &used);
  } catch (...) {
    used = 0;
  }
  if (used == 0 || used != v.size() || n < lo)
    throw UsageError(opt + ": '" + v + "' is not an integer >= " + std::to_string(lo), "moe coordinator");
  return n;
}

double to_seconds(const std::string& opt, const std::string& v) {
  size_t used = 0;
  double d = 0;
  try {
    d = std::stod(v, &used);
  } catch (...) {
    used = 0;
  }
  if (used == 0 || used != v.size() || !(d > 0))
    throw UsageError(opt + ": '" + v + "' is not a positive number of seconds", "moe coordinator");
  return d;
}

struct Parsed {
  CoordinatorOptions o;
  std::string positional;
  bool json = false;
};

// the options each command takes
const std::map<std::string, std::vector<std::string>>& command_options() {
  static const std::vector<std::string> common = {"--set",          "--job-dir",           "--threads",
                                                  "--host",         "--control-port",      "--http-port",
                                                  "--api-key-file", "--heartbeat-timeout", "--max-restarts"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.end(), common.begin(), common.end());
    return extra;
  };
  static const std::map<std::string, std::vector<std::string>> k = {
      {"run", with({"--config", "--slots", "--hostfile", "--slurm", "--min-world", "--max-world"})},
      {"serve", with({"--checkpoint", "--replicas", "--ranks-per-replica", "--api-port"})},
      {"status", {"--job-dir", "--json"}},
      {"checkpoint", {"--job-dir"}},
      {"slots", {"--job-dir"}},
      {"shutdown", {"--job-dir"}},
  };
  return k;
}

Parsed parse(const std::string& cmd, int argc, char** argv) {
  const auto& allowed = command_options().at(cmd);
  Parsed p;
  CoordinatorOptions& o = p.o;
  o.serve = cmd == "serve";
  const std::map<std::string, std::function<void(const std::string&)>> setters = {
      {"--config", [&](const std::string& v) { o.config = v; }},
      {"--checkpoint", [&](const std::string& v) { o.checkpoint = v; }},
      {"--set", [&](const std::string& v) { o.overrides.push_back(v); }},
      {"--job-dir", [&](const std::string& v) { o.job_dir = v; }},
      {"--slots", [&](const std::string& v) { o.slots = to_int("--slots", v, 1); }},
      {"--hostfile", [&](const std::string& v) { o.hostfile = v; }},
      {"--min-world", [&](const std::string& v) { o.min_world = to_int("--min-world", v, 1); }},
      {"--max-world", [&](const std::string& v) { o.max_world = to_int("--max-world", v, 1); }},
      {"--threads", [&](const std::string& v) { o.threads = to_int("--threads", v, 1); }},
      {"--replicas", [&](const std::string& v) { o.replicas = to_int("--replicas", v, 1); }},
      {"--ranks-per-replica", [&](const std::string& v) { o.ranks_per_replica = to_int("--ranks-per-replica", v, 1); }},
      {"--max-restarts", [&](const std::string& v) { o.max_restarts = to_int("--max-restarts", v, 1); }},
      {"--heartbeat-timeout",
       [&](const std::string& v) { o.heartbeat_timeout_s = to_seconds("--heartbeat-timeout", v); }},
      {"--host", [&](const std::string& v) { o.host = v; }},
      {"--control-port", [&](const std::string& v) { o.control_port = to_int("--control-port", v, 0); }},
      {"--http-port", [&](const std::string& v) { o.http_port = to_int("--http-port", v, 0); }},
      {"--api-port", [&](const std::string& v) { o.api_port = to_int("--api-port", v, 0); }},
      {"--api-key-file", [&](const std::string& v) { o.api_key_file = v; }},
  };
  const std::string where = "moe coordinator " + cmd;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--", 0) != 0) {
      if (!p.positional.empty() || cmd != "slots")
        throw UsageError("unexpected argument '" + a + "'; see 'moe coordinator --help'", where);
      p.positional = a;
      continue;
    }
    if (std::find(allowed.begin(), allowed.end(), a) == allowed.end())
      throw UsageError("unknown option '" + a + "'; see 'moe coordinator --help'", where);
    if (a == "--slurm")
      o.slurm = true;
    else if (a == "--json")
      p.json = true;
    else if (i + 1 >= argc)
      throw UsageError("option " + a + " needs a value", where);
    else
      setters.at(a)(argv[++i]);
  }
  for (const auto& [port, name] :
       {std::pair{o.control_port, "--control-port"}, {o.http_port, "--http-port"}, {o.api_port, "--api-port"}})
    if (port > 65535) throw UsageError(std::string(name) + " " + std::to_string(port) + " is not a port", where);
  if (cmd == "run" && o.config.empty()) throw UsageError("needs --config FILE", where);
  if (cmd == "serve" && (o.checkpoint.empty() || o.job_dir.empty()))
    throw UsageError("needs --checkpoint DIR and --job-dir DIR", where);
  if (cmd != "run" && cmd != "serve" && o.job_dir.empty()) throw UsageError("needs --job-dir DIR", where);
  if (cmd == "slots" && p.positional.empty())
    throw UsageError("needs the number of slots: slots N --job-dir DIR", where);
  if (o.slurm + !o.hostfile.empty() + (o.slots > 0) > 1)
    throw UsageError("--slots, --hostfile and --slurm are alternatives: give one", where);
  if (o.max_world > 0 && o.max_world < o.min_world)
    throw UsageError("--max-world " + std::to_string(o.max_world) + " < --min-world " + std::to_string(o.min_world),
                     where);
  return p;
}

// ---- `status`: the /status document as text ----
std::string field_str(const JsonValue& v, const char* k) {
  const JsonValue* f = v.field(k);
  if (!f) return "-";
  if (f->kind == JsonValue::kString) return f->str;
  if (f->kind == JsonValue::kInt) return std::to_string(f->num);
  if (f->kind == JsonValue::kNumber) {
    char b[32];
    std::snprintf(b, sizeof b, "%.4g", f->dbl);
    return b;
  }
  return "-";
}

std::string clock_time(const JsonValue& v, const char* k) {
  const JsonValue* f = v.field(k);
  if (!f || !f->is_number()) return "-";
  const std::time_t t = static_cast<std::time_t>(f->dbl);
  char b[32];
  std::strftime(b, sizeof b, "%H:%M:%S", std::localtime(&t));
  return b;
}

void print_status(const JsonValue& s) {
  const JsonValue& job = *s.field("job");
  const JsonValue& world = *s.field("world");
  std::printf("job %s (%s %s): %s, epoch %s\n", field_str(job, "id").c_str(), field_str(job, "kind").c_str(),
              field_str(job, "config").c_str(), field_str(job, "state").c_str(), field_str(s, "epoch").c_str());
  std::printf("world %s (expert parallel %s, data parallel %s) on %s slot(s)\n", field_str(world, "size").c_str(),
              field_str(world, "expert_parallel").c_str(), field_str(world, "data_parallel").c_str(),
              field_str(world, "slots").c_str());
  std::printf("%-8s %-5s %-14s %-8s %-9s %-14s %8s %10s %10s %8s\n", "replica", "rank", "host", "pid", "health",
              "phase", "step", "loss", "tokens/s", "hb age");
  for (const JsonValue& r : s.field("ranks")->array)
    std::printf("%-8s %-5s %-14s %-8s %-9s %-14s %8s %10s %10s %8s\n", field_str(r, "replica").c_str(),
                field_str(r, "rank").c_str(), field_str(r, "host").c_str(), field_str(r, "pid").c_str(),
                field_str(r, "health").c_str(), field_str(r, "phase").c_str(), field_str(r, "step").c_str(),
                field_str(r, "loss").c_str(), field_str(r, "tokens_per_s").c_str(),
                field_str(r, "heartbeat_age_s").c_str());
  if (const JsonValue* reps = s.field("replicas"); reps && !reps->array.empty()) {
    std::printf("replicas:\n");
    for (const JsonValue& r : reps->array)
      std::printf("  %s %s %s (epoch %s, %s in flight)\n", field_str(r, "id").c_str(), field_str(r, "url").c_str(),
                  field_str(r, "health").c_str(), field_str(r, "epoch").c_str(), field_str(r, "in_flight").c_str());
  }
  std::printf("events:\n");
  for (const JsonValue& e : s.field("events")->array) {
    std::printf("  %s epoch %-3s %-8s %s", clock_time(e, "time").c_str(), field_str(e, "epoch").c_str(),
                field_str(e, "kind").c_str(), field_str(e, "cause").c_str());
    if (e.field("detection_s")) std::printf(" | detected in %s s", field_str(e, "detection_s").c_str());
    if (e.field("next_step_s")) std::printf(", next step after %s s", field_str(e, "next_step_s").c_str());
    if (e.field("steps_redone")) std::printf(", %s step(s) redone", field_str(e, "steps_redone").c_str());
    if (field_str(e, "world_after") != "0" && field_str(e, "world_before") != "0")
      std::printf(", world %s -> %s", field_str(e, "world_before").c_str(), field_str(e, "world_after").c_str());
    std::printf("\n");
  }
}

int admin(const Parsed& p, const std::string& cmd) {
  proto::Admin req;
  if (cmd == "status") req.set_kind(proto::Admin::STATUS);
  if (cmd == "checkpoint") req.set_kind(proto::Admin::CHECKPOINT);
  if (cmd == "shutdown") req.set_kind(proto::Admin::SHUTDOWN);
  if (cmd == "slots") {
    req.set_kind(proto::Admin::SET_SLOTS);
    req.set_slots(to_int("slots", p.positional, 1));
  }
  const proto::AdminReply r = coordinator_admin(p.o.job_dir, req);
  if (!r.ok()) {
    std::fprintf(stderr, "error: the coordinator refused: %s\n", r.message().c_str());
    return 1;
  }
  if (cmd != "status")
    std::printf("%s\n", r.message().c_str());
  else if (p.json)
    std::printf("%s\n", r.status_json().c_str());
  else
    print_status(parse_json(r.status_json(), "the coordinator's status"));
  return 0;
}

}  // namespace

const char* coordinator_usage() { return kUsage; }

int coordinator_cli_main(int argc, char** argv) {
  const std::string cmd = argc >= 2 ? argv[1] : "";
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::cout << kUsage;
    return 0;
  }
  try {
    if (!command_options().count(cmd))
      throw UsageError(cmd.empty() ? "missing command (run, serve, status, checkpoint, slots, shutdown)"
                                   : "unknown command '" + cmd + "' (run, serve, status, checkpoint, slots, shutdown)",
                       "moe coordinator");
    for (int i = 2; i < argc; ++i)
      if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
        std::cout << kUsage;
        return 0;
      }
    const Parsed p = parse(cmd, argc - 2, argv + 2);
    if (cmd == "run" || cmd == "serve") return run_coordinator(p.o);
    return admin(p, cmd);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}

}  // namespace moe::launcher
