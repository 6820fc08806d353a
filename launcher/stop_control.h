// Stopping a training run early, agreed by every rank: SIGTERM, SIGUSR1 (Slurm's warning before the time limit)
// and SIGINT set a flag on the rank that receives them (any one rank, or all of them through mpirun); every step
// the ranks agree with one scalar all-reduce whether any rank has the flag, so all of them finish the same step,
// checkpoint once and exit with the requeue code 3 together. Under a coordinator (launcher/control_client.h) its
// STOP command, or losing it, stops the run the same way, and its CHECKPOINT command makes every rank checkpoint
// after the same step (agreed in the same all-reduce). Fault injection for tests of the failure path lives here
// too: MOE_FAULT_RANK=r MOE_FAULT_STEP=s makes rank r throw at step s.
#pragma once
#include "comm/parallel.h"
#include "launcher/control_client.h"

namespace moe::launcher {

class StopControl {
 public:
  // installs the signal handlers (process-wide); control: the coordinator's link, or null
  explicit StopControl(comm::Parallel& par, ControlClient* control = nullptr);
  ~StopControl();  // restores the default handlers
  StopControl(const StopControl&) = delete;
  StopControl& operator=(const StopControl&) = delete;
  // Collective, after every step (1-based `step`): true on every rank when any rank received a stop signal.
  bool should_stop(int step);
  // After should_stop(step): true on every rank when any rank's coordinator asked for a checkpoint now.
  bool checkpoint_now() const { return checkpoint_now_; }
  int signal() const;  // the signal this rank received, 0 if none

 private:
  comm::Parallel& par_;
  ControlClient* control_;
  bool checkpoint_now_ = false;
  int fault_rank_ = -1, fault_step_ = -1;
};

}  // namespace moe::launcher
