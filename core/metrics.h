// The metrics stream: one JSON object per line (JSON Lines), appended and flushed as it happens, so a reader (a
// test, a dashboard, the coordinator) can follow a run. Training writes one line per logged step and one per
// evaluation (train_record / eval_record below); the serving and coordinator processes reuse the same sink.
//
//   {"type":"train","step":20,"total_steps":300,"loss":5.1,"router_loss":0.04,"lr":0.003,"grad_norm":0.9,
//    "tokens_per_s":12000,"elapsed_s":3.2,"layers":[{"layer":0,"router_loss":0.01,"aux_loss":1.0,
//    "dropped_fraction":0.0,"load_min":200,"load_max":300,"experts_used":8,"expert_load":[...],
//    "expert_routed":[...],"max_overload":1.3,"expert_bias":[...]}, ...]}
//   {"type":"eval","step":100,"val_loss":4.2,"val_ppl":66.7}
// Dense layers appear in "layers" without router fields. Losses are means over the steps since the previous line.
// Per learned MoE layer: expert_load = the slots each expert KEPT in the step's last forward, expert_routed = the
// slots that chose it before capacity drops over the whole step (all micro-batches), both summed over the world
// (FfnStats); max_overload = max / mean of expert_routed; expert_bias = the balancing bias (bias balancing only).
#pragma once
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "core/json.h"
#include "core/trainer.h"

namespace moe {

class MetricsSink {
 public:
  MetricsSink() = default;
  // Opens `path` for appending (its directory must exist); throws naming the path when it cannot.
  explicit MetricsSink(const std::string& path);
  bool enabled() const { return out_.is_open(); }
  void write(const JsonObject& record);  // one line, flushed

 private:
  std::ofstream out_;
  std::string path_;
};

JsonObject train_record(const LogRecord& r);
JsonObject eval_record(const EvalRecord& r);

}  // namespace moe
