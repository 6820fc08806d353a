// `moe coordinator` (DESIGN.md "Coordinator"): the control plane that launches a job's worker groups and keeps them
// alive. A training job is one group (`moe train --resume` under mpirun, or srun inside a Slurm allocation); a
// serving job is R replica groups (`moe serve`) behind one OpenAI-compatible endpoint (launcher/replica_proxy.h).
//
// Every rank connects back to the control port (launcher/control_server.h: HMAC handshake with the job's secret,
// then Hello and a heartbeat every 250 ms). The coordinator keeps a membership epoch per group and detects a rank
// that exits (its connection closes, or the launcher exits), a lost heartbeat (a dead or stopped process, a frozen
// machine) and a hang (heartbeats but no step progress for hang_factor x the observed step time). It then stops the
// whole group (SIGTERM, then SIGKILL: no process is left), picks the world size the healthy slots allow (an expert
// parallel size dividing every expert count, data parallel to fill, micro-batches keeping each rank's batch share
// no larger than at the first launch, so the global batch and the schedule are unchanged) and relaunches from
// `latest`; consecutive launches that make no progress back off and end the job after max_restarts. Slots taken
// away shrink the group at once (checkpoint, stop, relaunch); slots given back grow it at the next checkpoint.
// Every event (epoch, cause, detection time, time to the next step, steps redone) goes to job_dir/events.jsonl and
// to /status. job_dir also holds the secret (0600) and endpoint.json, which `moe coordinator status|checkpoint|
// slots|shutdown --job-dir DIR` use.
#pragma once
#include <string>
#include <vector>

#include "proto/control.pb.h"

namespace moe::launcher {

struct CoordinatorOptions {
  bool serve = false;                  // a serving job (else training)
  std::string config;                  // training: the run config file
  std::string checkpoint;              // serving: the checkpoint
  std::vector<std::string> overrides;  // --set, passed to every launch
  std::string job_dir;                 // default: train.out_dir/coordinator (serving: required)
  int slots = 0;                       // process slots on this host (0: its cores); --slurm: SLURM_NTASKS
  bool slurm = false;                  // launch with srun --mpi=pmix inside the allocation
  std::string hostfile;                // mpirun --hostfile (slots: the sum of its slots= values)
  int min_world = 1;
  int max_world = 0;          // 0: the slots
  int threads = 1;            // OpenMP threads per rank
  int replicas = 1;           // serving
  int ranks_per_replica = 1;  // serving
  int max_restarts = 5;       // launches in a row without progress before the job fails
  double heartbeat_timeout_s = 1.0;
  double hang_factor = 20, hang_min_s = 10;
  double start_timeout_s = 120;    // every rank connected and a first step (training) / ready (serving)
  double stop_timeout_s = 120;     // a planned stop (checkpoint, exit) longer than this is killed
  std::string host = "127.0.0.1";  // the control, status and API ports listen here
  int control_port = 0, http_port = 0, api_port = 0;  // 0: any free port (endpoint.json and the log say which)
  std::string api_key_file;  // the dashboard's key (the serving API's rule); serving: passed to replicas
  std::string moe_bin;       // the worker binary (default: this executable)
};

// Runs the job to its end: 0 when it finished (training reached train.steps; serving was shut down), 1 when it
// failed (a crash loop, no usable layout). Throws moe::Error on a bad configuration.
int run_coordinator(const CoordinatorOptions& o);

// The slots of an Open MPI hostfile: the sum of each host line's slots=N (1 when not given); throws moe::Error naming
// the file and line when it cannot be read or a slots value is malformed.
int hostfile_slots(const std::string& path);

// One administrative request to the coordinator of job_dir (endpoint.json, secret); throws moe::Error when it cannot
// be reached or refuses.
proto::AdminReply coordinator_admin(const std::string& job_dir, const proto::Admin& request);

// The world a set of slots allows: the largest world in [min_world, max world] that divides the batch and admits an
// expert-parallel size dividing every expert count (the preferred one when it fits, else the largest), with the
// micro-batch (sequences per forward on a rank) at most max_share (0: the rank's whole share). world 0: none fits.
struct Layout {
  int world = 0, expert_parallel = 1, micro_batch = 0;
};
Layout choose_layout(int slots, int min_world, int max_world, int batch_size, const std::vector<int>& expert_counts,
                     int preferred_ep, int max_share);

}  // namespace moe::launcher
