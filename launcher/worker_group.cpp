#include "launcher/worker_group.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <thread>

#include "core/error.h"
#include "core/log.h"

namespace moe::launcher {
namespace {

// the child side of the fork: its own session, the log as stdout/stderr, the environment, exec
[[noreturn]] void exec_child(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env,
                             const std::string& log) {
  ::setsid();
  const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd >= 0) {
    ::dup2(fd, STDOUT_FILENO);
    ::dup2(fd, STDERR_FILENO);
  }
  const int null = ::open("/dev/null", O_RDONLY);
  if (null >= 0) ::dup2(null, STDIN_FILENO);
  for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  ::execvp(args[0], args.data());
  const std::string msg = "coordinator: cannot start " + argv[0] + ": " + std::strerror(errno) + "\n";
  if (::write(STDERR_FILENO, msg.data(), msg.size()) < 0) {
  }
  ::_exit(127);
}

}  // namespace

bool process_alive(pid_t pid) { return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM); }

bool process_stopped(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(f, line)) return false;
  const size_t close = line.rfind(')');  // the state follows "pid (comm) "
  return close != std::string::npos && close + 2 < line.size() && (line[close + 2] == 'T' || line[close + 2] == 't');
}

WorkerGroup::WorkerGroup(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env,
                         const std::string& log) {
  MOE_CHECK(!argv.empty(), "coordinator: an empty launch command");
  pid_ = ::fork();
  MOE_CHECK(pid_ >= 0, "coordinator: fork failed: " << std::strerror(errno));
  if (pid_ == 0) exec_child(argv, env, log);
}

WorkerGroup::~WorkerGroup() {
  if (!exited_ || stopping_) stop();
}

bool WorkerGroup::poll() {
  if (exited_) return true;
  int status = 0;
  const pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r != pid_) return false;
  exited_ = true;
  code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return true;
}

std::vector<pid_t> WorkerGroup::alive(const std::vector<pid_t>& ranks) {
  std::vector<pid_t> out;
  for (pid_t p : ranks)
    if (process_alive(p)) out.push_back(p);
  return out;
}

void WorkerGroup::signal_all(int sig) {
  ::kill(-pid_, sig);  // the session (process group) of the launcher
  ::kill(pid_, sig);   // (the launcher itself, should it not have called setsid yet)
  for (pid_t p : ranks_) ::kill(p, sig);
  if (sig == SIGTERM) {  // a stopped process acts on SIGTERM only once continued
    ::kill(-pid_, SIGCONT);
    ::kill(pid_, SIGCONT);
    for (pid_t p : ranks_) ::kill(p, SIGCONT);
  }
}

void WorkerGroup::begin_stop(const std::vector<pid_t>& ranks, double grace_s) {
  if (stopping_) return;
  stopping_ = true;
  ranks_ = ranks;
  if (!poll()) signal_all(SIGTERM);
  kill_at_ = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                    std::chrono::duration<double>(grace_s));
}

bool WorkerGroup::stopped() {
  if (!stopping_) return false;
  if (poll() && alive(ranks_).empty()) return true;
  const auto now = std::chrono::steady_clock::now();
  if (!killed_ && now >= kill_at_) {
    signal_all(SIGKILL);
    killed_ = true;
    give_up_at_ = now + std::chrono::seconds(5);
  }
  if (!killed_ || now < give_up_at_ || !poll()) return false;  // (a launcher outlives SIGKILL only in the kernel)
  MOE_WARN("coordinator: " << alive(ranks_).size() << " rank process(es) survived SIGKILL");
  ranks_.clear();
  return true;
}

void WorkerGroup::stop(const std::vector<pid_t>& ranks, double grace_s) {
  begin_stop(ranks, grace_s);
  while (!stopped()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

}  // namespace moe::launcher
