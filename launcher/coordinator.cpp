#include "launcher/coordinator.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <utility>  // (before Asio: Boost 1.74 needs std::exchange declared)

#include "core/config.h"
#include "core/error.h"
#include "core/json.h"
#include "core/log.h"
#include "launcher/control_client.h"
#include "launcher/control_server.h"
#include "launcher/control_wire.h"
#include "launcher/coordinator_http.h"
#include "launcher/replica_proxy.h"
#include "launcher/train.h"
#include "launcher/worker_group.h"
#include "serve/http_server.h"

namespace fs = std::filesystem;
namespace net = boost::asio;

namespace moe::launcher {

// ------------------------------------------------------------------------------------------------ layout
Layout choose_layout(int slots, int min_world, int max_world, int batch_size, const std::vector<int>& experts,
                     int preferred_ep, int max_share) {
  const int hi = max_world > 0 ? std::min(slots, max_world) : slots;
  auto ep_fits = [&](int ep, int w) {
    if (ep < 1 || w % ep) return false;
    for (int e : experts)
      if (e % ep) return false;
    return true;
  };
  for (int w = hi; w >= std::max(1, min_world); --w) {
    if (batch_size > 0 && batch_size % w) continue;
    int ep = ep_fits(preferred_ep, w) ? preferred_ep : 0;
    for (int d = w; d >= 1 && ep == 0; --d)
      if (ep_fits(d, w)) ep = d;
    if (ep == 0) continue;
    Layout l{w, ep, 0};
    const int share = batch_size > 0 ? batch_size / w : 0;
    if (max_share > 0 && share > max_share) {  // the largest divisor of the share within max_share
      for (int m = max_share; m >= 1 && l.micro_batch == 0; --m)
        if (share % m == 0) l.micro_batch = m;
    }
    return l;
  }
  return {};
}

int hostfile_slots(const std::string& path) {
  std::ifstream f(path);
  MOE_CHECK(f, "cannot read the hostfile '" << path << "'");
  int total = 0, lineno = 0;
  for (std::string line; std::getline(f, line);) {
    ++lineno;
    line = line.substr(0, line.find('#'));
    std::istringstream words(line);
    std::string host, w;
    if (!(words >> host)) continue;
    int slots = 1;
    while (words >> w) {
      if (w.rfind("slots=", 0) != 0) continue;
      size_t used = 0;
      try {
        slots = std::stoi(w.substr(6), &used);
      } catch (...) {
        used = 0;
      }
      MOE_CHECK(used > 0 && used == w.size() - 6 && slots > 0,
                "hostfile " << path << " line " << lineno << ": '" << w << "' is not slots=N with N >= 1");
    }
    total += slots;
  }
  MOE_CHECK(total > 0, "the hostfile '" << path << "' names no host");
  return total;
}

namespace {

using Clock = std::chrono::steady_clock;
double secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }
// a Unix time to the millisecond (a JSON number's default 9 digits would round it to 10 s)
std::string unix_time_json(double t) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3f", t);
  return b;
}
double unix_now() { return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count(); }

// What the coordinator needs of a training config: the batch, the experts, the layout it asks for, the steps.
struct JobFacts {
  int batch_size = 0, steps = 0, preferred_ep = 1, micro_batch = 0;
  std::vector<int> experts;
  std::string out_dir;
};

JobFacts train_facts(const CoordinatorOptions& o) {
  Config cfg = load_config_file(o.config);
  for (const auto& a : o.overrides) apply_override(cfg, a);
  take_init_model(cfg, o.overrides);  // the experts of a run from train.init_from are its checkpoint's
  fill_defaults(cfg);
  validate_config(cfg, /*needs_data=*/true);
  JobFacts f;
  f.batch_size = cfg.data().batch_size();
  f.steps = cfg.train().steps();
  f.preferred_ep = cfg.parallel().expert_parallel();
  f.micro_batch = cfg.train().micro_batch_size();
  f.out_dir = cfg.train().out_dir();
  const auto& m = cfg.model();
  for (int l = 0; l < std::min(m.n_layers(), std::max(1, m.ffn_pattern_size())); ++l) {
    if (layer_ffn_kind(m, l) == proto::FFN_MOE) f.experts.push_back(m.moe().num_experts());
    if (layer_ffn_kind(m, l) == proto::FFN_WORD_EXPERT) f.experts.push_back(m.word_experts().num_experts());
  }
  return f;
}

// --slurm: the allocation's tasks; --hostfile: the sum of its slots; else this host's cores
int default_slots(const CoordinatorOptions& o) {
  if (!o.hostfile.empty()) return hostfile_slots(o.hostfile);
  const char* n = std::getenv("SLURM_NTASKS");
  MOE_CHECK(!o.slurm || (n && std::atoi(n) > 0), "--slurm: SLURM_NTASKS is not set (run inside an allocation: sbatch "
                                                 "or salloc)");
  return o.slurm ? std::atoi(n) : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

std::string self_exe() {
  std::error_code ec;
  const fs::path p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("moe") : p.string();
}

std::string host_name() {
  char h[256] = {};
  ::gethostname(h, sizeof h - 1);
  return h;
}

int free_port() {  // an ephemeral port for a replica's HTTP server (bound, read, released)
  net::io_context io;
  net::ip::tcp::acceptor a(io, net::ip::tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  return a.local_endpoint().port();
}

// One line of events.jsonl. detection_s: seconds from the failed rank's last sign of life (its last heartbeat) to the
// coordinator acting on it, an upper bound of the detection latency; next_step_s: from then to the first step (or,
// serving, every rank ready) of the relaunched group; steps_redone: steps past the checkpoint it resumed from.
struct Event {
  double time = 0;
  int64_t epoch = 0;
  std::string kind, cause;
  double detection_s = -1, next_step_s = -1;
  int64_t steps_redone = -1;
  int world_before = 0, world_after = 0;
  int replica = -1;
  JsonObject json() const {
    JsonObject j;
    j.json("time", unix_time_json(time)).num("epoch", epoch).str("kind", kind).str("cause", cause);
    if (detection_s >= 0) j.num("detection_s", detection_s);
    if (next_step_s >= 0) j.num("next_step_s", next_step_s);
    if (steps_redone >= 0) j.num("steps_redone", steps_redone);
    j.num("world_before", int64_t(world_before)).num("world_after", int64_t(world_after));
    if (replica >= 0) j.num("replica", int64_t(replica));
    return j;
  }
};

// ": <the last `error:` line of the log>", or "" (why a launch failed, for the event and the log)
std::string last_error(const std::string& log) {
  std::ifstream f(log);
  std::string line, last;
  while (std::getline(f, line))
    if (const size_t at = line.find("error: "); at != std::string::npos) last = line.substr(at + 7);
  if (last.size() > 300) last = last.substr(0, 300) + "...";
  return last.empty() ? "" : ": " + last;
}

struct Member {
  int session = -1;
  int64_t pid = 0;
  std::string host;
  proto::Heartbeat hb;
  bool have_hb = false, connected = true;
  Clock::time_point last_hb, last_progress;
};

// A failure being recovered: when it was detected and how far the group had got.
struct Recovery {
  Clock::time_point detected;
  int64_t failed_step = 0;
  size_t event = 0;  // its entry in the event log (filled in at the next step)
};

// One supervised worker group: the training group, or one serving replica.
struct Group {
  int id = 0;
  int64_t epoch = 0;
  std::unique_ptr<WorkerGroup> proc;
  Layout layout;
  std::map<int, Member> members;  // by rank
  enum State { kIdle, kStarting, kRunning, kStopping, kBackoff, kDone, kFailed } state = kIdle;
  // what follows once the processes of a stop under way are gone
  enum AfterStop { kNone, kRecover, kFinished, kShutDown, kRelaunch } after_stop = kNone;
  std::optional<Event> failure;  // kRecover: the failure's event, recorded once the launch's output is complete
  Clock::time_point launched, next_launch, stop_asked;
  int launches_without_progress = 0;
  bool planned = false;  // the stop under way was asked for (a resize, a shutdown)
  std::optional<Recovery> recovery;
  int port = 0;     // serving: its HTTP port
  std::string log;  // the launch's output
  int64_t max_step = 0;
};

const char* state_name(Group::State s) {
  static const char* k[] = {"idle", "starting", "running", "stopping", "restarting", "finished", "failed"};
  return k[s];
}

}  // namespace

class Coordinator {
 public:
  explicit Coordinator(const CoordinatorOptions& o);
  int run();

 private:
  // the control port
  void on_hello(int session, const proto::Hello& h);
  void on_heartbeat(int session, const proto::Heartbeat& hb);
  void on_closed(int session);
  proto::AdminReply on_admin(const proto::Admin& a);
  // supervision
  void tick();
  void check_group(Group& g);
  void check_members(Group& g);
  void launch(Group& g);
  std::vector<std::string> launch_command(const Group& g) const;
  void fail(Group& g, const std::string& cause, double detection_s);
  void recover(Group& g);
  void stop_group(Group& g, Group::AfterStop then);
  void group_stopped(Group& g);
  void group_exited(Group& g, int code);
  void request_stop(Group& g, const std::string& why);  // planned: checkpoint and exit
  void command_all(Group& g, proto::Command::Kind k);
  void resize(int slots);
  Layout layout_for(int slots) const {  // the training group's layout on `slots`
    return choose_layout(slots, o_.min_world, o_.max_world, facts_.batch_size, facts_.experts, facts_.preferred_ep,
                         first_share_);
  }
  Group* group_of_session(int session, int* rank);
  // events and status
  void record(Event e);
  void load_events();
  void write_endpoint() const;
  void publish_status();
  std::string status_ranks(Clock::time_point now) const;
  std::string status_replicas();
  std::string status_expert_load() const;
  std::string status_text() const;

  CoordinatorOptions o_;
  JobFacts facts_;
  std::string secret_, job_id_, control_addr_;
  net::io_context io_;
  net::steady_timer timer_;
  std::unique_ptr<ControlServer> control_;
  std::unique_ptr<CoordinatorHttp> http_;
  ReplicaSet replicas_;
  std::unique_ptr<ReplicaProxy> proxy_;
  std::vector<Group> groups_;
  std::map<int, std::pair<int, int>> sessions_;  // control session -> (group, rank)
  int slots_ = 0, first_share_ = 0;
  int64_t grow_after_checkpoint_ = -1;  // >= 0: grow once a checkpoint newer than this is committed
  bool shutting_down_ = false;
  bool stopped_early_ = false;  // training stopped (checkpointed) before train.steps: exit code 3, as `moe train`
  int exit_code_ = 0;
  Clock::time_point last_tick_ = Clock::now();
  bool judge_silence_ = true;  // this tick came on time (see tick)
  std::vector<Event> events_;
  std::vector<std::pair<int64_t, double>> loss_curve_;
  proto::Heartbeat expert_load_;  // the last heartbeat of rank 0 with expert loads
  double started_ = unix_now();
  mutable std::mutex status_mu_;
  std::string status_;
};

Coordinator::Coordinator(const CoordinatorOptions& o) : o_(o), timer_(io_) {
  MOE_CHECK(o.serve ? !o.checkpoint.empty() : !o.config.empty(),
            "moe coordinator: " << (o.serve ? "serve needs --checkpoint DIR" : "run needs --config FILE"));
  if (!o.serve) facts_ = train_facts(o);
  first_share_ = facts_.micro_batch;  // a configured micro-batch bounds every launch's (else the first launch's share)
  if (o_.job_dir.empty()) {
    MOE_CHECK(!o.serve, "moe coordinator serve needs --job-dir DIR");
    o_.job_dir = facts_.out_dir + "/coordinator";
  }
  if (o_.moe_bin.empty()) o_.moe_bin = self_exe();
  if (o_.slots <= 0) o_.slots = default_slots(o_);
  slots_ = o_.slots;
  fs::create_directories(o_.job_dir + "/logs");
  const std::string secret_file = o_.job_dir + "/secret";
  secret_ = fs::exists(secret_file) ? control::read_secret_file(secret_file) : control::create_secret_file(secret_file);
  job_id_ = control::hmac_sha256(secret_, "job-id").substr(0, 6);
  static const char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned char c : job_id_) hex += {kHex[c >> 4], kHex[c & 15]};
  job_id_ = hex;
  ControlServer::Handlers h;
  h.hello = [this](int s, const proto::Hello& m) { on_hello(s, m); };
  h.heartbeat = [this](int s, const proto::Heartbeat& m) { on_heartbeat(s, m); };
  h.closed = [this](int s) { on_closed(s); };
  h.admin = [this](int, const proto::Admin& a) { return on_admin(a); };
  // ranks on other hosts (a hostfile, a Slurm allocation) connect to this host's name; local ones to loopback
  const bool remote = o_.slurm || !o_.hostfile.empty();
  control_ = std::make_unique<ControlServer>(io_, remote ? "0.0.0.0" : "127.0.0.1", o_.control_port, secret_, h);
  control_addr_ = (remote ? host_name() : std::string("127.0.0.1")) + ":" + std::to_string(control_->port());
  CoordinatorHttpOptions ho;
  ho.host = o_.host;
  ho.port = o_.http_port;
  if (!o_.api_key_file.empty()) ho.api_key = serve::read_api_key_file(o_.api_key_file);
  http_ = std::make_unique<CoordinatorHttp>([this] { return status_text(); }, ho);
  if (o_.serve) {
    ProxyOptions po;
    po.host = o_.host;
    po.port = o_.api_port;
    proxy_ = std::make_unique<ReplicaProxy>(replicas_, po);
  }
  groups_.resize(o_.serve ? o_.replicas : 1);
  for (size_t i = 0; i < groups_.size(); ++i) groups_[i].id = static_cast<int>(i);
  load_events();
  write_endpoint();
}

// ------------------------------------------------------------------------------------------------ control port
Group* Coordinator::group_of_session(int session, int* rank) {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return nullptr;
  *rank = it->second.second;
  return &groups_.at(it->second.first);
}

void Coordinator::on_hello(int session, const proto::Hello& h) {
  if (h.kind() != proto::PEER_WORKER) return;  // the CLI: admin requests follow
  const int gi = o_.serve ? h.replica() : 0;
  if (gi < 0 || gi >= static_cast<int>(groups_.size()) || h.epoch() != groups_[gi].epoch ||
      groups_[gi].state > Group::kStopping) {
    MOE_WARN("coordinator: a rank of another or an old group (replica " << h.replica() << ", epoch " << h.epoch()
                                                                        << ") connected: closing it");
    return control_->close(session);
  }
  Member& m = groups_[gi].members[h.rank()];
  m = Member{};
  m.session = session;
  m.pid = h.pid();
  m.host = h.host();
  m.last_hb = m.last_progress = Clock::now();
  sessions_[session] = {gi, h.rank()};
}

void Coordinator::on_heartbeat(int session, const proto::Heartbeat& hb) {
  int rank = 0;
  Group* g = group_of_session(session, &rank);
  if (!g) return;
  Member& m = g->members[rank];
  const auto now = Clock::now();
  if (!m.have_hb || hb.step() != m.hb.step()) m.last_progress = now;
  m.hb = hb;
  m.have_hb = true;
  m.last_hb = now;
  g->max_step = std::max(g->max_step, hb.step());
  if (rank == 0 && hb.step() > 0 && (loss_curve_.empty() || loss_curve_.back().first != hb.step()) && !o_.serve) {
    loss_curve_.emplace_back(hb.step(), hb.loss());
    if (loss_curve_.size() > 4000) loss_curve_.erase(loss_curve_.begin(), loss_curve_.begin() + 2000);
  }
  if (rank == 0 && hb.expert_tokens_size() > 0) expert_load_ = hb;
  if (!o_.serve && grow_after_checkpoint_ >= 0 && rank == 0 && hb.checkpoint_step() > grow_after_checkpoint_ &&
      g->state == Group::kRunning) {
    grow_after_checkpoint_ = -1;
    request_stop(*g, "slots came back: growing at this checkpoint boundary");
  }
}

void Coordinator::on_closed(int session) {
  int rank = 0;
  Group* g = group_of_session(session, &rank);
  sessions_.erase(session);
  if (!g) return;
  Member& m = g->members[rank];
  m.connected = false;
  const bool finishing = m.have_hb && m.hb.phase() == proto::PHASE_DONE;
  if ((g->state == Group::kRunning || g->state == Group::kStarting) && !finishing && !g->planned)
    fail(*g,
         "rank " + std::to_string(rank) + " (pid " + std::to_string(m.pid) +
             ") exited: its control connection "
             "closed",
         secs(m.last_hb, Clock::now()));
}

proto::AdminReply Coordinator::on_admin(const proto::Admin& a) {
  proto::AdminReply r;
  r.set_ok(true);
  switch (a.kind()) {
    case proto::Admin::STATUS:
      r.set_status_json(status_text());
      break;
    case proto::Admin::CHECKPOINT:
      for (Group& g : groups_) command_all(g, proto::Command::CHECKPOINT);
      r.set_message("asked every rank to checkpoint at the next step boundary");
      break;
    case proto::Admin::SET_SLOTS:
      if (a.slots() < 1 || o_.serve || layout_for(a.slots()).world == 0) {
        r.set_ok(false);
        r.set_message(o_.serve       ? "slots apply to training jobs"
                      : a.slots() < 1 ? "slots must be >= 1"
                                      : std::to_string(a.slots()) + " slot(s) allow no world size of at least " +
                                            std::to_string(o_.min_world) + " that fits the batch and the experts");
        break;
      }
      resize(a.slots());
      r.set_message("slots " + std::to_string(slots_));
      break;
    case proto::Admin::SHUTDOWN:
      shutting_down_ = true;
      for (Group& g : groups_) request_stop(g, "shutdown requested");
      r.set_message("stopping the job (a checkpoint first)");
      break;
    default:
      r.set_ok(false);
      r.set_message("unknown admin request");
  }
  return r;
}

void Coordinator::command_all(Group& g, proto::Command::Kind k) {
  proto::ControlMessage m;
  m.mutable_command()->set_kind(k);
  for (auto& [rank, mem] : g.members)
    if (mem.connected) control_->send(mem.session, m);
}

// ------------------------------------------------------------------------------------------------ supervision
int Coordinator::run() {
  http_->start();
  if (proxy_) proxy_->start();
  MOE_INFO("coordinator: job " << job_id_ << " (" << (o_.serve ? "serve " + o_.checkpoint : "train " + o_.config)
                               << "), " << slots_ << " slot(s); control " << control_addr_ << ", dashboard http://"
                               << o_.host << ":" << http_->port() << "/"
                               << (proxy_ ? ", API http://" + o_.host + ":" + std::to_string(proxy_->port()) : "")
                               << "; state in " << o_.job_dir);
  net::signal_set signals(io_, SIGTERM, SIGINT, SIGUSR1);  // (SIGUSR1: Slurm's warning before the time limit)
  signals.async_wait([this](const boost::system::error_code& ec, int sig) {
    if (ec) return;
    MOE_INFO("coordinator: signal " << sig << ": stopping the job (a checkpoint first)");
    shutting_down_ = true;
    for (Group& g : groups_) request_stop(g, "coordinator stopped by a signal");
  });
  for (Group& g : groups_) launch(g);
  tick();
  io_.run();
  if (proxy_) proxy_->stop();
  http_->stop();
  return exit_code_;
}

void Coordinator::tick() {
  // A late tick means this process did not run for a while (an overloaded machine): heartbeats of that time may be
  // unread yet, so silence is not judged before the next tick has read them.
  const auto now = Clock::now();
  judge_silence_ = secs(last_tick_, now) < std::max(0.3, o_.heartbeat_timeout_s / 2);
  last_tick_ = now;
  for (Group& g : groups_) check_group(g);
  publish_status();
  const bool all_over = std::all_of(groups_.begin(), groups_.end(), [](const Group& g) {
    return g.state == Group::kDone || g.state == Group::kFailed;
  });
  if (all_over) {
    const bool failed =
        std::any_of(groups_.begin(), groups_.end(), [](const Group& g) { return g.state == Group::kFailed; });
    exit_code_ = failed ? 1 : stopped_early_ ? 3 : 0;
    return io_.stop();
  }
  timer_.expires_after(std::chrono::milliseconds(100));
  timer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec) tick();
  });
}

void Coordinator::check_group(Group& g) {
  if (g.state == Group::kBackoff && Clock::now() >= g.next_launch) return launch(g);
  if (!g.proc) return;
  if (g.after_stop != Group::kNone) {
    if (g.proc->stopped()) group_stopped(g);
    return;
  }
  if (g.proc->poll()) return group_exited(g, g.proc->exit_code());
  if (g.state == Group::kStopping && secs(g.stop_asked, Clock::now()) > o_.stop_timeout_s) {
    MOE_WARN("coordinator: epoch " << g.epoch << " did not stop within " << o_.stop_timeout_s << " s: killing it");
    return group_exited(g, -1);
  }
  if (g.state == Group::kStarting && secs(g.launched, Clock::now()) > o_.start_timeout_s)
    return fail(g, "the group did not start within " + std::to_string(int(o_.start_timeout_s)) + " s", -1);
  check_members(g);
}

// lost heartbeats (a dead, stopped or frozen rank) and hangs (no step progress)
void Coordinator::check_members(Group& g) {
  const auto now = Clock::now();
  double step_time = 0;
  for (auto& [rank, m] : g.members) step_time = std::max(step_time, m.hb.step_time_s());
  for (auto& [rank, m] : g.members) {
    if (!m.connected || !judge_silence_) continue;
    const double age = secs(m.last_hb, now);
    const std::string who = "rank " + std::to_string(rank) + " (pid " + std::to_string(m.pid) + ")";
    if (age > o_.heartbeat_timeout_s) {
      const std::string why = process_stopped(static_cast<pid_t>(m.pid)) ? " is stopped (hung: SIGSTOP or a debugger)"
                              : process_alive(static_cast<pid_t>(m.pid)) ? " is alive but silent (hung)"
                                                                         : " is gone";
      return fail(g, who + why + ": no heartbeat for " + std::to_string(age).substr(0, 4) + " s", age);
    }
    const double stall = secs(m.last_progress, now), limit = std::max(o_.hang_min_s, o_.hang_factor * step_time);
    if (!o_.serve && g.state == Group::kRunning && m.hb.phase() == proto::PHASE_TRAINING && step_time > 0 &&
        stall > limit)
      return fail(g,
                  who + " made no step progress for " + std::to_string(int(stall)) + " s (hung; steps take " +
                      std::to_string(step_time).substr(0, 5) + " s)",
                  stall - limit);
  }
  // started: every rank here; training: a first step; serving: every rank ready
  const bool all_in = static_cast<int>(g.members.size()) == g.layout.world;
  bool ready = all_in;
  for (auto& [rank, m] : g.members)
    ready = ready && m.have_hb &&
            (o_.serve ? m.hb.phase() == proto::PHASE_SERVING : m.hb.step() > 0 || m.hb.phase() == proto::PHASE_DONE);
  if (g.state == Group::kStarting && ready) {
    g.state = Group::kRunning;
    g.launches_without_progress = 0;
    if (g.recovery) {
      Event& e = events_.at(g.recovery->event);
      e.next_step_s = secs(g.recovery->detected, now);
      if (!o_.serve) e.steps_redone = std::max<int64_t>(0, g.recovery->failed_step - g.members[0].hb.resumed_step());
      e.world_after = g.layout.world;
      record(Event{});  // rewrites the log with the completed entry
      g.recovery.reset();
    }
  }
}

void Coordinator::launch(Group& g) {
  if (shutting_down_) {
    g.state = Group::kDone;
    stopped_early_ = stopped_early_ || !o_.serve;
    return;
  }
  g.layout = o_.serve ? Layout{o_.ranks_per_replica, o_.ranks_per_replica, 0} : layout_for(slots_);
  if (g.layout.world == 0) {
    g.state = Group::kFailed;
    record({unix_now(), g.epoch, "error",
            "no world size of at most " + std::to_string(slots_) +
                " slot(s) fits the batch and the experts (min_world " + std::to_string(o_.min_world) + ")"});
    return;
  }
  if (!o_.serve && first_share_ == 0) first_share_ = facts_.batch_size / g.layout.world;
  ++g.epoch;
  g.members.clear();
  g.planned = false;
  g.max_step = 0;
  if (o_.serve) g.port = free_port();
  const std::string log = o_.job_dir + "/logs/" + (o_.serve ? "replica" + std::to_string(g.id) + "_" : "") + "epoch_" +
                          std::to_string(g.epoch) + ".log";
  std::map<std::string, std::string> env = {
      {"MOE_COORDINATOR", control_addr_},        {"MOE_JOB_ID", job_id_},
      {"MOE_EPOCH", std::to_string(g.epoch)},    {"MOE_JOB_SECRET_FILE", fs::absolute(o_.job_dir + "/secret").string()},
      {"MOE_REPLICA", std::to_string(g.id)},     {"OMP_NUM_THREADS", std::to_string(o_.threads)},
      {"OMPI_ALLOW_RUN_AS_ROOT", "1"},           {"OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"},
      {"OMPI_MCA_rmaps_base_oversubscribe", "1"}};
  g.log = log;
  const std::vector<std::string> argv = launch_command(g);
  g.proc = std::make_unique<WorkerGroup>(argv, env, log);
  record({unix_now(), g.epoch, "launch",
          "world " + std::to_string(g.layout.world) + " (expert parallel " + std::to_string(g.layout.expert_parallel) +
              (g.layout.micro_batch ? ", micro-batch " + std::to_string(g.layout.micro_batch) : "") + ")",
          -1, -1, -1, 0, g.layout.world, o_.serve ? g.id : -1});
  g.launched = Clock::now();
  g.state = Group::kStarting;
  ++g.launches_without_progress;
  MOE_INFO(
      "coordinator: epoch " << g.epoch << (o_.serve ? " replica " + std::to_string(g.id) : "") << ": world "
                            << g.layout.world << " (expert parallel " << g.layout.expert_parallel
                            << (g.layout.micro_batch ? ", micro-batch " + std::to_string(g.layout.micro_batch) : "")
                            << "), " << argv[0] << " pid " << g.proc->pid() << ", log " << log);
}

std::vector<std::string> Coordinator::launch_command(const Group& g) const {
  const std::string w = std::to_string(g.layout.world);
  std::vector<std::string> a;
  if (o_.slurm) {
    a = {"srun", "--mpi=pmix", "-n", w, "--kill-on-bad-exit=1"};
    if (static_cast<unsigned>(g.layout.world) > std::thread::hardware_concurrency()) a.push_back("--overcommit");
  } else {
    a = {"mpirun", "-np", w, "--bind-to", "none"};
    for (const char* v :
         {"MOE_COORDINATOR", "MOE_JOB_ID", "MOE_EPOCH", "MOE_JOB_SECRET_FILE", "MOE_REPLICA", "OMP_NUM_THREADS"})
      a.insert(a.end(), {"-x", v});
    if (!o_.hostfile.empty())
      a.insert(a.end(), {"--hostfile", o_.hostfile});
    else
      a.insert(a.end(), {"--host", "localhost:" + w});
  }
  a.push_back(o_.moe_bin);
  // the user's overrides first: the layout the coordinator chose must win over a configured one
  std::vector<std::string> sets;
  for (const auto& s : o_.overrides) sets.insert(sets.end(), {"--set", s});
  if (o_.serve) {
    a.insert(a.end(), {"serve", "--checkpoint", o_.checkpoint, "--threads", std::to_string(o_.threads)});
    a.insert(a.end(), sets.begin(), sets.end());
    a.insert(a.end(), {"--set", "serving.host=127.0.0.1", "--set", "serving.port=" + std::to_string(g.port)});
    if (!o_.api_key_file.empty()) a.insert(a.end(), {"--api-key-file", o_.api_key_file});
  } else {
    a.insert(a.end(), {"train", "--config", o_.config, "--resume", "--threads", std::to_string(o_.threads)});
    a.insert(a.end(), sets.begin(), sets.end());
    a.insert(a.end(), {"--set", "parallel.expert_parallel=" + std::to_string(g.layout.expert_parallel), "--set",
                       "train.micro_batch_size=" + std::to_string(g.layout.micro_batch)});
  }
  return a;
}

// Every process of the group asked to go (SIGTERM, then SIGKILL after a grace) and its control connections closed;
// `then` follows once they are gone. The stop does not block: check_group moves it on at each tick, so the other
// groups' heartbeats are read meanwhile. The group is kStopping while it runs: the connections it closes are not
// failures.
void Coordinator::stop_group(Group& g, Group::AfterStop then) {
  g.state = Group::kStopping;
  g.after_stop = then;
  std::vector<pid_t> pids;
  for (auto& [rank, m] : g.members) pids.push_back(static_cast<pid_t>(m.pid));
  for (auto& [rank, m] : g.members)
    if (m.connected) control_->close(m.session);
  g.proc->begin_stop(pids);
}

void Coordinator::group_stopped(Group& g) {
  const Group::AfterStop then = g.after_stop;
  g.after_stop = Group::kNone;
  g.proc.reset();
  if (then == Group::kRecover) return recover(g);
  if (then == Group::kRelaunch) {  // a planned resize: relaunch now
    g.state = Group::kBackoff;
    g.next_launch = Clock::now();
    return;
  }
  const bool finished = then == Group::kFinished;
  g.state = Group::kDone;
  stopped_early_ = stopped_early_ || (!finished && !o_.serve);
  record({unix_now(), g.epoch, "finish", finished ? "the job finished" : "shut down", -1, -1, -1, g.layout.world, 0,
          o_.serve ? g.id : -1});
}

// An unplanned failure: stop the group, then record the event and relaunch (recover).
void Coordinator::fail(Group& g, const std::string& cause, double detection_s) {
  if (g.state != Group::kRunning && g.state != Group::kStarting) return;
  MOE_WARN("coordinator: epoch " << g.epoch << ": " << cause << "; stopping the group");
  g.failure = Event{unix_now(), g.epoch, "failure", cause, detection_s, -1, -1, g.layout.world, 0, o_.serve ? g.id : -1};
  g.recovery = Recovery{Clock::now(), g.max_step, 0};  // (its event: once recorded, in recover)
  stop_group(g, Group::kRecover);
}

// After a failure's stop: the event (with what a rank said before it failed: the launch's output is complete now),
// then a relaunch, now or after a backoff when the last launches made no progress; give up after max_restarts.
void Coordinator::recover(Group& g) {
  Event e = *g.failure;
  g.failure.reset();
  const size_t said = e.cause.size();
  e.cause += last_error(g.log);
  if (e.cause.size() > said) MOE_WARN("coordinator: epoch " << g.epoch << e.cause.substr(said));
  record(e);
  g.recovery->event = events_.size() - 1;
  if (g.launches_without_progress >= o_.max_restarts) {
    g.state = Group::kFailed;
    record({unix_now(), g.epoch, "error",
            std::to_string(g.launches_without_progress) +
                " launches in a row made no progress (a crash loop): giving up"});
    MOE_WARN("coordinator: giving up after " << g.launches_without_progress << " launches without progress");
    return;
  }
  const double backoff =
      g.launches_without_progress > 1 ? std::min(30.0, std::pow(2.0, g.launches_without_progress - 1)) : 0.0;
  g.state = Group::kBackoff;
  g.next_launch = g.recovery->detected + std::chrono::milliseconds(static_cast<int64_t>(backoff * 1000));
  if (backoff > 0) MOE_INFO("coordinator: relaunching in " << backoff << " s (backoff)");
}

// The launcher exited with `code` (or the group is killed after a planned stop took too long).
void Coordinator::group_exited(Group& g, int code) {
  if (!g.planned && (code != 0 || o_.serve)) return fail(g, "the launcher exited with code " + std::to_string(code), -1);
  const bool finished = code == 0 && !g.planned;
  stop_group(g, finished ? Group::kFinished : shutting_down_ ? Group::kShutDown : Group::kRelaunch);
}

void Coordinator::request_stop(Group& g, const std::string& why) {
  if (g.state == Group::kBackoff || g.state == Group::kIdle) {
    if (shutting_down_) {
      g.state = Group::kDone;
      stopped_early_ = stopped_early_ || !o_.serve;
    }
    return;
  }
  if (g.state != Group::kRunning && g.state != Group::kStarting) return;
  MOE_INFO("coordinator: epoch " << g.epoch << ": " << why << ": asking the ranks to checkpoint and stop");
  g.planned = true;
  g.state = Group::kStopping;
  g.stop_asked = Clock::now();
  record({unix_now(), g.epoch, shutting_down_ ? "finish" : "resize", why, -1, -1, -1, g.layout.world, 0,
          o_.serve ? g.id : -1});
  command_all(g, proto::Command::STOP);
}

void Coordinator::resize(int slots) {
  const int before = slots_;
  slots_ = slots;
  if (o_.serve || groups_.empty()) return;
  Group& g = groups_[0];
  const Layout next = layout_for(slots_);
  MOE_INFO("coordinator: slots " << before << " -> " << slots_ << " (world " << g.layout.world << " -> " << next.world
                                 << ")");
  if (next.world < g.layout.world) {
    grow_after_checkpoint_ = -1;
    return request_stop(g, "slots taken away: shrinking to world " + std::to_string(next.world));
  }
  if (next.world > g.layout.world && g.state == Group::kRunning)  // grow at the next checkpoint boundary
    grow_after_checkpoint_ = g.members.count(0) ? g.members[0].hb.checkpoint_step() : 0;
}

// ------------------------------------------------------------------------------------------------ events, status
void Coordinator::record(Event e) {
  if (!e.kind.empty()) events_.push_back(std::move(e));
  const std::string path = o_.job_dir + "/events.jsonl", tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    for (const Event& x : events_) f << x.json().text() << "\n";
  }
  fs::rename(tmp, path);
}

void Coordinator::load_events() {
  std::ifstream f(o_.job_dir + "/events.jsonl");
  for (std::string line; std::getline(f, line);) {
    try {
      const JsonValue v = parse_json(line, "events.jsonl");
      Event e;
      auto num = [&](const char* k, double d) { return v.field(k) ? v.field(k)->dbl : d; };
      e.time = num("time", 0);
      e.epoch = static_cast<int64_t>(num("epoch", 0));
      e.kind = v.field("kind") ? v.field("kind")->str : "";
      e.cause = v.field("cause") ? v.field("cause")->str : "";
      e.detection_s = num("detection_s", -1);
      e.next_step_s = num("next_step_s", -1);
      e.steps_redone = static_cast<int64_t>(num("steps_redone", -1));
      e.world_before = static_cast<int>(num("world_before", 0));
      e.world_after = static_cast<int>(num("world_after", 0));
      e.replica = static_cast<int>(num("replica", -1));
      events_.push_back(e);
    } catch (const Error&) {
      MOE_WARN("coordinator: skipping an unreadable line of " << o_.job_dir << "/events.jsonl");
    }
  }
  // a new coordinator of an old job: its groups' epochs continue after the last one recorded
  for (const Event& e : events_)
    for (Group& g : groups_)
      if (e.replica < 0 || e.replica == g.id) g.epoch = std::max(g.epoch, e.epoch);
  events_.push_back({unix_now(), groups_.empty() ? 0 : groups_[0].epoch, "start",
                     "coordinator started (pid " + std::to_string(::getpid()) + ")"});
}

void Coordinator::write_endpoint() const {
  JsonObject j;
  j.str("control", "127.0.0.1:" + std::to_string(control_->port()))
      .str("http", o_.host + ":" + std::to_string(http_->port()))
      .num("pid", int64_t(::getpid()))
      .str("job_id", job_id_);
  if (proxy_) j.str("api", o_.host + ":" + std::to_string(proxy_->port()));
  const std::string path = o_.job_dir + "/endpoint.json";
  std::ofstream(path + ".tmp") << j.text() << "\n";
  fs::rename(path + ".tmp", path);
}

std::string Coordinator::status_text() const {
  std::lock_guard<std::mutex> lk(status_mu_);
  return status_;
}

// the ranks of every group, with their health as the heartbeats tell it
std::string Coordinator::status_ranks(Clock::time_point now) const {
  std::vector<std::string> ranks;
  for (const Group& g : groups_)
    for (const auto& [rank, m] : g.members) {
      const double age = secs(m.last_hb, now);
      const char* health = !m.connected                   ? "exited"
                           : !m.have_hb                   ? "starting"
                           : age > o_.heartbeat_timeout_s ? (process_stopped(pid_t(m.pid)) ? "hung" : "lost")
                                                          : "ok";
      JsonObject r;
      r.num("rank", int64_t(rank)).str("host", m.host).num("pid", m.pid).str("health", health);
      r.str("phase", proto::Phase_Name(m.hb.phase())).num("step", m.hb.step()).num("loss", m.hb.loss());
      r.num("tokens_per_s", m.hb.tokens_per_s()).num("step_time_s", m.hb.step_time_s()).num("heartbeat_age_s", age);
      if (o_.serve) r.num("replica", int64_t(g.id));
      ranks.push_back(r.text());
    }
  return json_array(ranks);
}

// serving: the replicas (and the proxy's view of them: which are up, where)
std::string Coordinator::status_replicas() {
  if (!o_.serve) return "[]";
  const std::vector<int64_t> inflight = proxy_->in_flight();
  std::vector<Replica> list;
  std::vector<std::string> reps;
  for (const Group& g : groups_) {
    const bool healthy = g.state == Group::kRunning;
    list.push_back({g.id, "127.0.0.1", g.port > 0 ? g.port : 1, healthy});
    JsonObject r;
    r.num("id", int64_t(g.id)).str("url", "http://127.0.0.1:" + std::to_string(g.port));
    r.str("health", healthy ? "ok" : state_name(g.state)).num("epoch", g.epoch);
    r.num("in_flight", g.id < static_cast<int>(inflight.size()) ? inflight[g.id] : int64_t(0));
    reps.push_back(r.text());
  }
  replicas_.set(list);
  return json_array(reps);
}

std::string Coordinator::status_expert_load() const {
  JsonObject load;
  const int E = expert_load_.experts();
  if (E <= 0) return load.text();
  std::vector<int64_t> layers(expert_load_.expert_layers().begin(), expert_load_.expert_layers().end());
  std::vector<std::string> rows;
  for (size_t i = 0; i < layers.size() && int64_t(i + 1) * E <= expert_load_.expert_tokens_size(); ++i) {
    std::vector<std::string> row;
    for (int e = 0; e < E; ++e) row.push_back(std::to_string(expert_load_.expert_tokens(int(i) * E + e)));
    rows.push_back(json_array(row));
  }
  return load.nums("layers", layers).num("experts", int64_t(E)).json("tokens", json_array(rows)).text();
}

void Coordinator::publish_status() {
  const Group& g0 = groups_.front();
  const bool failed =
      std::any_of(groups_.begin(), groups_.end(), [](const Group& g) { return g.state == Group::kFailed; });
  JsonObject job;
  job.str("id", job_id_).str("kind", o_.serve ? "serve" : "train").str("config", o_.serve ? o_.checkpoint : o_.config);
  job.str("state", failed ? "failed" : state_name(g0.state)).json("started_at", unix_time_json(started_));
  if (!o_.serve) job.num("target_steps", int64_t(facts_.steps));
  JsonObject world;
  world.num("size", int64_t(g0.layout.world)).num("expert_parallel", int64_t(g0.layout.expert_parallel));
  world.num("data_parallel", int64_t(g0.layout.world / std::max(1, g0.layout.expert_parallel)));
  world.num("slots", int64_t(slots_)).num("min", int64_t(o_.min_world)).num("max", int64_t(o_.max_world));
  std::vector<std::string> curve, evs;
  for (const auto& [step, loss] : loss_curve_) curve.push_back(json_array({std::to_string(step), json_number(loss)}));
  for (const Event& e : events_) evs.push_back(e.json().text());
  JsonObject doc;
  doc.obj("job", job).num("epoch", g0.epoch).obj("world", world).json("ranks", status_ranks(Clock::now()));
  doc.json("loss_curve", json_array(curve)).json("expert_load", status_expert_load()).json("events", json_array(evs));
  doc.json("replicas", status_replicas());
  std::lock_guard<std::mutex> lk(status_mu_);
  status_ = doc.text();
}

int run_coordinator(const CoordinatorOptions& o) {
  Coordinator c(o);
  return c.run();
}

proto::AdminReply coordinator_admin(const std::string& job_dir, const proto::Admin& request) {
  const std::string endpoint_file = job_dir + "/endpoint.json";
  std::ifstream f(endpoint_file);
  MOE_CHECK(f, "no coordinator state in '" << job_dir << "' (" << endpoint_file
                                           << " is missing): is it the --job-dir "
                                              "of a `moe coordinator run|serve`?");
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const JsonValue v = parse_json(text, endpoint_file);
  const JsonValue* control = v.field("control");
  MOE_CHECK(control && control->kind == JsonValue::kString, endpoint_file << " has no \"control\" address");
  const std::string secret = control::read_secret_file(job_dir + "/secret");
  try {
    return admin_request(control->str, secret, request, 10);
  } catch (const Error& e) {
    const JsonValue* pid = v.field("pid");
    const bool alive = pid && pid->kind == JsonValue::kInt && ::kill(static_cast<pid_t>(pid->num), 0) == 0;
    MOE_CHECK(alive, "the coordinator of " << job_dir << " is not running (pid "
                                           << (pid ? std::to_string(pid->num) : "?") << " is gone): " << e.what());
    throw;
  }
}

}  // namespace moe::launcher
