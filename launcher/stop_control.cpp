#include "launcher/stop_control.h"

#include <csignal>
#include <cstdlib>

#include "core/error.h"

namespace moe::launcher {
namespace {
volatile std::sig_atomic_t g_stop_signal = 0;
void on_signal(int sig) { g_stop_signal = sig; }
constexpr int kSignals[] = {SIGTERM, SIGUSR1, SIGINT};

int env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return -1;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  MOE_CHECK(end && *end == 0 && x >= 0, name << "='" << v << "' is not a non-negative integer");
  return static_cast<int>(x);
}
}  // namespace

StopControl::StopControl(comm::Parallel& par, ControlClient* control)
    : par_(par), control_(control), fault_rank_(env_int("MOE_FAULT_RANK")), fault_step_(env_int("MOE_FAULT_STEP")) {
  g_stop_signal = 0;
  for (int s : kSignals) std::signal(s, on_signal);
}

StopControl::~StopControl() {
  for (int s : kSignals) std::signal(s, SIG_DFL);
}

bool StopControl::should_stop(int step) {
  if (fault_rank_ == par_.rank() && fault_step_ == step)
    MOE_THROW("injected fault (MOE_FAULT_RANK=" << fault_rank_ << ", MOE_FAULT_STEP=" << fault_step_ << ")");
  const bool stop = g_stop_signal != 0 || (control_ && (control_->stop_requested() || control_->lost()));
  const bool ckpt = control_ && control_->take_checkpoint_request();
  double flags[2] = {stop ? 1.0 : 0.0, ckpt ? 1.0 : 0.0};  // one all-reduce for both decisions
  if (par_.size() > 1) par_.world().all_reduce_sum(flags, 2);
  checkpoint_now_ = flags[1] > 0;
  return flags[0] > 0;
}

int StopControl::signal() const { return g_stop_signal; }

}  // namespace moe::launcher
