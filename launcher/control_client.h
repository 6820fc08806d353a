// A rank's link to the coordinator (launcher/coordinator.h), when the coordinator launched it: the environment then
// holds MOE_COORDINATOR=host:port, MOE_JOB_ID, MOE_EPOCH and the job secret (MOE_JOB_SECRET, or MOE_JOB_SECRET_FILE
// naming a 0600 file). The client connects at start (the rank fails with a clear error when it cannot), proves
// the secret (launcher/control_wire.h), says Hello and then, on its own thread, sends a Heartbeat every
// kHeartbeatInterval from the status the run publishes, and keeps the commands it receives as flags the run reads
// at its step boundaries. When the connection is lost (the coordinator died) lost() turns true: the run
// checkpoints and stops, and a new coordinator resumes it.
#pragma once
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "proto/control.pb.h"

namespace moe::launcher {

inline constexpr std::chrono::milliseconds kHeartbeatInterval{250};

class ControlClient {
 public:
  // From the environment (and MOE_REPLICA: the serving replica); null when MOE_COORDINATOR is not set (the rank was
  // not launched by a coordinator).
  static std::unique_ptr<ControlClient> from_env(int rank, int world);
  // Connects to host:port within connect_timeout_s and completes the handshake; throws moe::Error naming the
  // coordinator and what failed (unreachable, wrong secret, no answer).
  ControlClient(const std::string& endpoint, const std::string& secret, const proto::Hello& hello,
                double connect_timeout_s = 20);
  ~ControlClient();
  ControlClient(const ControlClient&) = delete;
  ControlClient& operator=(const ControlClient&) = delete;

  // The next heartbeats carry this status (thread-safe; epoch and rank are filled in).
  void publish(const proto::Heartbeat& status);
  // A CHECKPOINT command arrived since the last call (consumed).
  bool take_checkpoint_request() { return checkpoint_.exchange(false); }
  bool stop_requested() const { return stop_.load(); }  // a STOP command arrived
  bool lost() const { return lost_.load(); }            // the coordinator went away

 private:
  struct Link;  // the socket and its I/O thread
  void loop();
  bool send_status();  // one heartbeat of the published status; false when the connection failed
  std::unique_ptr<Link> link_;
  proto::Hello hello_;
  std::mutex mu_;
  proto::Heartbeat status_;
  std::atomic<bool> checkpoint_{false}, stop_{false}, lost_{false}, quit_{false};
  std::thread thread_;
};

// One administrative request (the `moe coordinator` CLI): connect, prove the secret, say Hello as an admin peer,
// send `request`, return the reply; throws moe::Error naming the coordinator on any failure (timeout_s overall).
proto::AdminReply admin_request(const std::string& endpoint, const std::string& secret, const proto::Admin& request,
                                double timeout_s = 30);

}  // namespace moe::launcher
