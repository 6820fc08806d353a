// The MoE FFN units that plug into a decoder block (core/layers.h FfnUnit):
//   MoeFfn         learned top-k router + dispatcher (all-to-all over the expert-parallel group) + ExpertBank; the
//                  router (its GEMMs, scores, top-k, gates and the logits' gradient), the token movement and the
//                  experts run on the workspace's backend; the host gets the N x k choices and gates, and drops
//                  the slots over capacity (a sequential, slot-major pass) as it builds the dispatch plan
//   WordExpertFfn  vocabulary (or hash) router + dispatcher + WordExpertTable (MoWE)
// Each unit owns its parameters (with their init and sharding), its extra state (a router's jitter RNG, a routing
// table: capture_state / restore_state) and its statistics. experts/build_model.h puts them into a model.
#pragma once
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/layers.h"
#include "core/model.h"
#include "experts/dispatcher.h"
#include "experts/expert_bank.h"
#include "experts/word_experts.h"
#include "router/router.h"
#include "router/routing_vocab.h"

namespace moe::experts {

class MoeFfn : public FfnUnit {
 public:
  // Registers <prefix>.router.weight [E,C] (replicated) and <prefix>.experts.* (this rank's E/P experts).
  MoeFfn(ParamStore& ps, Workspace& ws, const std::string& prefix, const proto::ModelConfig& cfg,
         ExpertComm ep, uint64_t seed);
  void forward(const FfnContext& ctx, float* y, const float* x, int N) override;
  void backward(const FfnContext& ctx, float* dx, const float* dy, int N) override;
  double extra_loss() const override { return last_.loss; }
  FfnStats stats() const override;
  // The jitter RNG, and with bias balancing the selection bias. Restoring a state without a bias (a checkpoint
  // trained without bias balancing) keeps the current one; restore returns false when the RNG is missing.
  void capture_state(UnitState& s) const override;
  bool restore_state(const UnitState& s) override;
  // Bias balancing: sums the step's routed loads over the world and moves the bias (LearnedRouter::update_bias).
  // Either way the step closes: the next training forward starts counting the next step's loads.
  void after_optimizer_step(const WorldSum& sum_over_world) override;
  void prepare_inference() override;  // the router's and the experts' matrices
  const router::LearnedRouter& router() const { return router_; }
  Dispatcher& dispatcher() { return dispatcher_; }
  double expert_seconds() const { return expert_seconds_; }
  double route_seconds() const { return route_seconds_; }
  double combine_seconds() const { return dispatcher_.timings().combine; }
  void reset_timings();

 private:
  // the router's input x' on the device: x, or with jitter x * noise (kept for backward)
  const float* router_input(const float* x, int N, bool training);
  // the router's gate on the device: scores, top-k and gates of logits[N,E], copied to the host for the plan
  void route(const float* logits, int N, bool training);
  // the router backward: dlogits from the gates' gradient and the losses, then dW += dlogits^T x',
  // dx += (dlogits W) * noise
  void router_backward(float* dx, const float* dgate, int N, float loss_scale);

  std::string prefix_;
  int C_, E_;
  Backend& be_;
  Param* w_router_;
  PackedWeight w_router_packed_;
  router::LearnedRouter router_;
  Dispatcher dispatcher_;
  ExpertBank bank_;
  router::RouterOutput last_;
  // token-slots choosing each expert (before capacity drops) over the training forwards of the current step
  std::vector<int64_t> step_routed_;  // [E]
  bool step_open_ = false;            // false: the next training forward starts a new step (zeroes step_routed_)
  Dispatcher::Step* step_ = nullptr;  // this step's token movement (last forward)
  // on the device: expert outputs and input gradients [local_rows,C], gate gradients [N*k], the jitter noise and
  // x' [N,C], logits, scores and their gradients [N,E], a [N,C] temporary; the gate's results: routed_ holds
  // [stats: E+2 doubles | choice: N*k ints | gate: N*k floats], lse_ [N] doubles; the selection bias and f [E]
  Workspace::Buffer &expert_out_, &dexpert_in_, &dgate_, &noise_, &xin_, &logits_, &dlogits_, &tmp_;
  Workspace::Buffer &score_, &routed_, &lse_, &bias_, &fraction_;
  const float* router_in_ = nullptr;  // x' of the last forward (x itself without jitter)
  std::vector<float> routed_host_;    // routed_ copied to the host
  double expert_seconds_ = 0, route_seconds_ = 0;
};

// Where logical word expert l of E is stored: row(l) of the global table (proto WordExpertConfig.Placement; UNSET
// is not accepted here: fill_defaults resolves it). A permutation of [0, E) independent of the expert-parallel
// size; its parameters are computed once, row() is on the per-token path.
class WordExpertPlacement {
 public:
  WordExpertPlacement(int64_t E, proto::WordExpertConfig::Placement placement);
  int64_t row(int64_t l) const;

 private:
  int64_t E_;
  bool multiplicative_;
  int64_t s_ = 1;  // multiplicative: l -> (l * s) mod E
  int bits_ = 0;   // interleaved: Q = 2^bits segments of E / Q rows
};
// WordExpertPlacement(E, placement).row(l)
int64_t word_expert_row(int64_t l, int64_t E, proto::WordExpertConfig::Placement placement);

// What the word-expert layers of one model share: the routing vocabulary (model.word_experts.routing_vocab_size >
// 0) and, with model.word_experts.share_table, the table's parameters (registered by the first layer, under
// kSharedTablePrefix).
struct WordExpertShared {
  static constexpr const char* kVocabPrefix = "word_routing";             // the vocabulary's checkpoint tables
  static constexpr const char* kSharedTablePrefix = "word_experts.shared";  // the shared table's parameters
  std::optional<router::RoutingVocabulary> vocab;
  SharedTable table;
};

class WordExpertFfn : public FfnUnit {
 public:
  // Registers <prefix>.experts.* (this rank's E/P word experts, row-sparse), or uses the shared table. Routes are
  // token ids, or with a routing vocabulary (in `shared`) word-level routing ids; a route's expert comes from a
  // table built from `route_counts` (corpus counts of the routes: token counts, or the vocabulary's id counts;
  // new models) or set by restore_state (a checkpoint's table); with neither, forward throws naming the layer.
  // Hash routing needs neither.
  WordExpertFfn(ParamStore& ps, Workspace& ws, const std::string& prefix, const proto::ModelConfig& cfg,
                ExpertComm ep, const std::vector<int64_t>* route_counts,
                std::shared_ptr<WordExpertShared> shared = std::make_shared<WordExpertShared>());
  void forward(const FfnContext& ctx, float* y, const float* x, int N) override;
  void backward(const FfnContext& ctx, float* dx, const float* dy, int N) override;
  FfnStats stats() const override;
  void capture_state(UnitState& s) const override;  // the routing table (vocabulary routing)
  bool restore_state(const UnitState& s) override;
  void prepare_inference() override { table_.prepare_inference(); }
  Dispatcher& dispatcher() { return dispatcher_; }

 private:
  int32_t route_of(const FfnContext& ctx, int n) const;  // token n's route: its token id or routing id
  std::string prefix_;
  int num_routes_, num_frequent_, skip_top_;  // routes: model.vocab_size, or routing_vocab_size
  bool word_routing_;                          // routes are the shared vocabulary's routing ids
  int C_, E_;
  std::shared_ptr<WordExpertShared> shared_;  // with the other word-expert layers of the model
  std::optional<router::VocabRouter> vocab_;
  std::optional<router::HashRouter> hash_;
  router::DispatchPlan plan_;
  Dispatcher dispatcher_;
  WordExpertTable table_;
  WordExpertPlacement placement_;      // logical expert -> row of the global table
  std::vector<int32_t> expert_ids_;    // [N] scattered expert of each token
  Dispatcher::Step* step_ = nullptr;   // this step's token movement (last forward)
  Workspace::Buffer &expert_out_, &dexpert_in_;  // [local_rows,C] on the device
};

}  // namespace moe::experts
