// The serving engine (DESIGN.md "Serving"): continuous batching over the ranks of a serving job.
//
// Rank 0 owns the requests: the scheduler (serve/scheduler.h) picks each step's chunks, the engine broadcasts the
// step's plan (proto/serve.proto) to every rank, every rank runs the chunks placed on it through its model
// (Model::forward_infer: attention and the paged KV cache of its own sequences, data parallel; the MoE layers'
// experts expert parallel over all ranks, tokens moving by the training all-to-all), samples the next token of its
// sequences that need one (the plan carries each request's uniform draw, so the choice does not depend on the
// rank) and sends the tokens to rank 0, which detokenises, applies stop strings and limits, and hands the events
// to the requests' sinks (the HTTP layer). Every step also carries each rank's status (a stop signal, the tokens
// its routers sent to each expert). While idle, rank 0 sends a heartbeat plan every heartbeat_s.
//
// A request's greedy tokens are the same whether it runs alone or in a batch, on 1 or N ranks, with any block size
// or chunking: every kernel of the inference path is batch-invariant (core/kernels/cpu/inference.cpp) and the MoE
// layers are dropless.
#pragma once
#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "comm/communicator.h"
#include "core/data.h"
#include "core/kv_cache.h"
#include "core/model.h"
#include "proto/config.pb.h"
#include "proto/serve.pb.h"
#include "serve/api.h"
#include "serve/detokenizer.h"
#include "serve/scheduler.h"

namespace moe::serve {

struct EngineOptions {
  proto::ServingConfig serving;  // filled and validated (max_batch_tokens, max_running, max_queue, KV cache, ...)
  double heartbeat_s = 1.0;      // idle: a heartbeat plan this often (ranks report stop signals)
  double plan_timeout_s = 60.0;  // ranks > 0: a plan must arrive within this (rank 0 died or hangs otherwise)
};

class Engine final : public EngineApi {
 public:
  // world: every rank of the job (the model's expert-parallel group must span the same ranks). Not ready until
  // attach().
  Engine(const EngineOptions& o, comm::Communicator& world);
  ~Engine() override;

  // Every rank: the model (experts sharded over the world), and on rank 0 the tokenizer and the model's identity
  // (its head_dim and sparq fields come from the model).
  // Allocates this rank's KV cache (serving.kv_cache_bytes), then every rank is ready (collective).
  void attach(Model& model, const Tokenizer* tok, ModelInfo info);
  // Every rank: serves until shutdown: rank 0 schedules and runs steps until draining ends (a stop signal on any
  // rank, then in-flight requests finish or serving.drain_timeout_s passes), then sends SHUTDOWN; the other ranks
  // run the plans they receive. Throws when a peer fails (the caller aborts the job).
  void run();
  // Rank 0 of a one-rank engine (`moe generate`): runs steps until every submitted request has finished.
  void run_until_idle();
  // Rank 0: called on the engine thread when draining begins (the HTTP layer stops accepting).
  void set_on_drain(std::function<void()> f) { on_drain_ = std::move(f); }

  // Async-signal-safe: ask the engine to drain (SIGTERM / SIGINT handlers on any rank).
  static void request_drain();
  static bool drain_requested();
  // Rank 0, thread-safe: drain and stop (as a stop signal does, for this engine only).
  void shutdown() { stop_requested_ = true; }

  // ---- EngineApi (rank 0; thread-safe)
  SubmitStatus submit(GenerationRequest req, std::shared_ptr<RequestSink> sink) override;
  bool ready() const override { return ready_.load(); }
  EngineStats stats() const override;
  ModelInfo info() const override { return info_; }
  const Tokenizer& tokenizer() const override { return *tok_; }

 private:
  struct Live;  // a request on rank 0: its sink, detokenizer and limits
  struct Incoming {
    GenerationRequest req;
    std::shared_ptr<RequestSink> sink;
  };
  bool lead() const { return world_.rank() == 0; }
  void check_sparq_config(const Model& model) const;
  // rank 0
  bool step();  // one step if there is work; false when idle
  void intake();
  void drop_cancelled();
  void count_waiting();  // waiting_ = inbox + the scheduler's queue
  proto::StepPlan make_plan(const std::vector<ScheduledChunk>& chunks);
  void apply(const std::vector<ScheduledChunk>& chunks, const std::vector<float>& results);
  void emit(Live& live, Sequence& seq, const float* row);
  void finish(int64_t id, const std::string& reason, const std::string& error = "");
  void abort_all();  // every request ends with "abort" (the drain deadline)
  void heartbeat();
  void publish_stats();
  // every rank
  void send_plan(proto::StepPlan& plan);
  bool receive_plan(proto::StepPlan& plan);                 // false: SHUTDOWN
  std::vector<float> execute(const proto::StepPlan& plan);  // rank 0: the result rows of every sampled chunk
  void exchange_status();                                   // each rank's stop flag and expert loads to rank 0

  EngineOptions o_;
  std::function<void()> on_drain_;
  comm::Communicator& world_;
  std::unique_ptr<comm::Communicator> plan_comm_;  // the plan broadcasts (their own deadline)
  Model* model_ = nullptr;
  const Tokenizer* tok_ = nullptr;
  ModelInfo info_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<Scheduler> sched_;
  InferBatch batch_;
  std::vector<int> moe_layers_;  // model layers that report expert loads
  int num_experts_ = 0;
  std::atomic<bool> ready_{false};
  bool did_forward_ = false;  // this step ran the model (its routers' loads are reported)
  // rank 0
  std::map<int64_t, std::unique_ptr<Live>> live_;
  int64_t next_id_ = 0;
  int64_t step_no_ = 0;
  int64_t prompt_tokens_ = 0, generated_tokens_ = 0;
  bool draining_ = false;
  bool peer_drain_ = false;  // a rank reported a stop signal
  std::atomic<bool> accepting_{true};
  std::atomic<bool> stop_requested_{false};
  mutable std::mutex inbox_mu_;
  std::condition_variable inbox_cv_;
  std::vector<Incoming> inbox_;
  std::atomic<int64_t> waiting_{0};  // inbox + scheduler queue
  mutable std::mutex stats_mu_;
  EngineStats stats_;
};

// The KV cache of a serving engine with `num_blocks` blocks: the model's (Model::kv_dims), plus SparQ's key columns
// when the server's default is SparQ (serving.sparq_r > 0: most decode steps then read them; a SparQ request on a
// server without them reads the components from the key rows, the same result bit for bit).
KvCacheDims serving_kv_dims(const Model& model, const proto::ServingConfig& s, int num_blocks);

// One request run to its end on a one-rank engine (`moe generate`, tests): the generated tokens, each one's
// log-probability, the completion text and why it ended.
struct Completion {
  std::vector<int32_t> tokens;
  std::vector<double> logprobs;
  std::string text;
  std::string finish_reason;
};
Completion generate(Engine& engine, GenerationRequest req);

}  // namespace moe::serve
