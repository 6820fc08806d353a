// One launched worker group of the coordinator: an mpirun (or srun) process started in its own session, so the whole
// tree (the launcher and every rank it started on this host) can be stopped together and none is left behind.
#pragma once
#include <sys/types.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

namespace moe::launcher {

class WorkerGroup {
 public:
  // Starts argv[0] (found on PATH) with `env` added to this process's environment, stdout and stderr appended to
  // `log`; throws moe::Error when it cannot be started.
  WorkerGroup(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env,
              const std::string& log);
  ~WorkerGroup();  // stop() if still running
  WorkerGroup(const WorkerGroup&) = delete;
  WorkerGroup& operator=(const WorkerGroup&) = delete;

  pid_t pid() const { return pid_; }
  // Not blocking: true once the launcher has exited (its status in exit_code(): the code, or 128 + the signal).
  bool poll();
  bool exited() const { return exited_; }
  int exit_code() const { return code_; }
  // Stops the group without blocking: SIGTERM to the session's processes and to `ranks` (pids the ranks reported,
  // which may live under another parent); each stopped() moves the stop on: SIGKILL to whatever is left after
  // `grace_s`, true once the launcher is reaped and the ranks are gone (or 5 s after SIGKILL, with a warning).
  void begin_stop(const std::vector<pid_t>& ranks = {}, double grace_s = 2.0);
  bool stopping() const { return stopping_; }
  bool stopped();
  // begin_stop, then waits until stopped(). Idempotent.
  void stop(const std::vector<pid_t>& ranks = {}, double grace_s = 2.0);
  // Rank processes still alive among `ranks` (on this host).
  static std::vector<pid_t> alive(const std::vector<pid_t>& ranks);

 private:
  void signal_all(int sig);

  pid_t pid_ = -1;
  bool exited_ = false;
  int code_ = 0;
  bool stopping_ = false, killed_ = false;
  std::vector<pid_t> ranks_;
  std::chrono::steady_clock::time_point kill_at_, give_up_at_;
};

// A stopped process ("T" in /proc/<pid>/stat: SIGSTOP, a debugger), as opposed to one that runs or has gone.
bool process_stopped(pid_t pid);
bool process_alive(pid_t pid);

}  // namespace moe::launcher
