#include "experts/moe_layer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "core/config.h"
#include "core/error.h"

namespace moe::experts {
namespace {
using clk = std::chrono::steady_clock;
double since(clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); }
float* grow(Workspace::Buffer& b, int64_t n) { return b.get(std::max<int64_t>(n, 1)); }

router::LearnedRouterOptions router_options(const proto::MoeConfig& m, uint64_t seed) {
  router::LearnedRouterOptions o;
  o.score = m.score() == proto::SIGMOID ? router::ScoreFn::kSigmoid : router::ScoreFn::kSoftmax;
  o.capacity_factor = m.capacity_factor();
  o.dropless = m.dropless();
  o.normalize_topk = !m.no_normalize_topk();
  o.aux_loss_coef = m.aux_loss_coef();
  o.z_loss_coef = m.z_loss_coef();
  o.jitter_eps = m.jitter_eps();
  o.seed = seed;
  o.bias_balancing = m.bias_balancing();
  o.bias_update_rate = m.bias_update_rate();
  return o;
}

int ep_size(const ExpertComm& ep) { return ep.ep ? ep.ep->size() : 1; }

// MoeFfn's routed_ buffer: [stats: E+2 doubles | choice: N*k ints | gate: N*k floats]; the floats before the choices
int64_t routed_head(int E) { return 2 * int64_t(E + 2); }

}  // namespace

WordExpertPlacement::WordExpertPlacement(int64_t E, proto::WordExpertConfig::Placement placement)
    : E_(E), multiplicative_(placement == proto::WordExpertConfig::PLACEMENT_MULTIPLICATIVE) {
  MOE_CHECK(E > 0, "word experts: need at least one expert, got " << E);
  if (multiplicative_) {
    // s coprime to E and near 0.618 E: l -> (l * s) mod E is a permutation of [0, E)
    s_ = std::max<int64_t>(1, static_cast<int64_t>(0.6180339887 * static_cast<double>(E)) | 1);
    while (std::gcd(s_, E) != 1) s_ += 2;
    s_ %= E;
    return;
  }
  MOE_CHECK(placement == proto::WordExpertConfig::PLACEMENT_INTERLEAVED,
            "model.word_experts.placement " << int(placement) << " is not a known placement");
  while (bits_ < 6 && E % (int64_t(2) << bits_) == 0) ++bits_;  // Q = 2^bits, the largest power of two <= 64 | E
}

int64_t WordExpertPlacement::row(int64_t l) const {
  MOE_CHECK(l >= 0 && l < E_, "word expert " << l << " outside [0, " << E_ << ")");
  if (multiplicative_) return (l * s_) % E_;
  const int64_t Q = int64_t(1) << bits_, j = l % Q;
  int64_t rev = 0;
  for (int b = 0; b < bits_; ++b) rev |= ((j >> b) & 1) << (bits_ - 1 - b);
  return rev * (E_ / Q) + l / Q;
}

int64_t word_expert_row(int64_t l, int64_t E, proto::WordExpertConfig::Placement placement) {
  return WordExpertPlacement(E, placement).row(l);
}

// ================================================================== MoeFfn
MoeFfn::MoeFfn(ParamStore& ps, Workspace& ws, const std::string& prefix, const proto::ModelConfig& cfg,
               ExpertComm ep, uint64_t seed)
    : prefix_(prefix),
      C_(cfg.d_model()),
      E_(cfg.moe().num_experts()),
      be_(ws.backend()),
      w_router_(ps.add(prefix + ".router.weight", {cfg.moe().num_experts(), cfg.d_model()}, false)),
      w_router_packed_(ws),
      router_(cfg.moe().num_experts(), cfg.moe().top_k(), cfg.d_model(), router_options(cfg.moe(), seed)),
      dispatcher_(ws, ep, cfg.moe().num_experts()),
      bank_(ps, ws, prefix + ".experts",
            ExpertBankDims{cfg.moe().num_experts() / ep_size(ep), cfg.d_model(), cfg.moe().d_expert(),
                           cfg.activation(), dispatcher_.first_local_expert()}),
      expert_out_(ws.buffer()),
      dexpert_in_(ws.buffer()),
      dgate_(ws.buffer()),
      noise_(ws.buffer()),
      xin_(ws.buffer()),
      logits_(ws.buffer()),
      dlogits_(ws.buffer()),
      tmp_(ws.buffer()),
      score_(ws.buffer()),
      routed_(ws.buffer()),
      lse_(ws.buffer()),
      bias_(ws.buffer()),
      fraction_(ws.buffer()) {}

void MoeFfn::capture_state(UnitState& s) const {
  s.rngs[prefix_] = router_.rng_state();
  if (router_.options().bias_balancing) s.biases[prefix_] = router_.bias();
}

void MoeFfn::prepare_inference() {
  w_router_packed_.pack(*w_router_);
  bank_.prepare_inference();
}

bool MoeFfn::restore_state(const UnitState& s) {
  auto b = s.biases.find(prefix_);
  if (b != s.biases.end() && router_.options().bias_balancing) {
    MOE_CHECK(static_cast<int>(b->second.size()) == E_, prefix_ << ": stored router bias has " << b->second.size()
                                                                << " entries, model.moe.num_experts is " << E_);
    router_.set_bias(b->second);
  }
  auto it = s.rngs.find(prefix_);
  if (it == s.rngs.end()) return false;
  router_.set_rng_state(it->second);
  return true;
}

void MoeFfn::after_optimizer_step(const WorldSum& sum_over_world) {
  const bool had_step = step_open_;
  step_open_ = false;
  if (!router_.options().bias_balancing) return;
  // every rank takes part in the sum (a rank that routed nothing this step adds zeros)
  std::vector<double> load(E_, 0.0);
  if (had_step) std::copy(step_routed_.begin(), step_routed_.end(), load.begin());
  if (sum_over_world) sum_over_world(load);
  router_.update_bias(load.data());
}

void MoeFfn::reset_timings() {
  expert_seconds_ = route_seconds_ = 0;
  dispatcher_.timings().reset();
}

const float* MoeFfn::router_input(const float* x, int N, bool training) {
  const std::vector<float>& noise = router_.draw_noise(N, training);
  if (noise.empty()) return router_in_ = x;
  const int64_t NC = int64_t(N) * C_;
  float* nz = grow(noise_, NC);
  be_.from_host(nz, noise.data(), sizeof(float) * NC);
  float* xi = grow(xin_, NC);
  be_.mul(xi, x, nz, NC);
  return router_in_ = xi;
}

void MoeFfn::forward(const FfnContext& ctx, float* y, const float* x, int N) {
  auto t0 = clk::now();
  const float* xin = router_input(x, N, ctx.training);
  const int64_t NE = int64_t(N) * E_;
  float* logits = grow(logits_, NE);  // [N,E] = x' W^T, in fp32 whatever model.matmul_precision
  if (N > 0 && ctx.batch_invariant) {
    be_.linear_rows(logits, xin, w_router_packed_.slot(), nullptr, N, C_, E_);
  } else if (N > 0) {
    const Fp32Gemms fp32(be_);
    be_.matmul(logits, xin, w_router_->value.f32(), N, E_, C_, false, true);
  }
  route(logits, N, ctx.training);
  if (ctx.training) {  // the step's routed loads (every micro-batch, before capacity drops)
    if (!step_open_) step_routed_.assign(E_, 0);
    step_open_ = true;
    for (int32_t e : router_.topk_experts()) ++step_routed_[e];
  }
  route_seconds_ += since(t0);
  step_ = &dispatcher_.dispatch(last_.plan, x, C_);
  t0 = clk::now();
  float* out = grow(expert_out_, step_->local_rows() * C_);  // [local_rows,C]
  const auto& used = step_->experts();
  bank_.forward(out, step_->rows(), used.data(), step_->offsets().data(), static_cast<int64_t>(used.size()),
                ctx.batch_invariant);
  expert_seconds_ += since(t0);
  step_->combine(y, out);
}

void MoeFfn::backward(const FfnContext& ctx, float* dx, const float* dy, int N) {
  float* dgate = grow(dgate_, last_.plan.num_slots());  // [N*k]
  const float* dexp_out = step_->combine_backward(dy, dgate);
  auto t0 = clk::now();
  float* dexp_in = grow(dexpert_in_, step_->local_rows() * C_);  // [local_rows,C]
  bank_.backward(dexp_in, dexp_out);
  expert_seconds_ += since(t0);
  be_.memset0(dx, sizeof(float) * int64_t(N) * C_);
  step_->dispatch_backward(dx, dexp_in);
  t0 = clk::now();
  router_backward(dx, dgate, N, ctx.loss_scale);
  route_seconds_ += since(t0);
}

void MoeFfn::route(const float* logits, int N, bool training) {
  const int64_t Nk = int64_t(N) * router_.top_k(), head = routed_head(E_);
  float* routed = grow(routed_, head + 2 * Nk);
  auto* stats = reinterpret_cast<double*>(routed);
  auto* choice = reinterpret_cast<int32_t*>(routed + head);
  float* gate = routed + head + Nk;
  const float* bias = router_.options().bias_balancing ? bias_.upload(router_.bias()) : nullptr;
  be_.router_topk(router_.dims(N), choice, gate, grow(score_, int64_t(N) * E_),
                  reinterpret_cast<double*>(grow(lse_, 2 * int64_t(N))), stats, logits, bias);
  routed_host_.resize(head + 2 * Nk);
  be_.to_host(routed_host_.data(), routed, sizeof(float) * routed_host_.size());
  const float* h = routed_host_.data();
  last_ = router_.assign(reinterpret_cast<const int32_t*>(h + head), h + head + Nk,
                         reinterpret_cast<const double*>(h), N, training);
}

void MoeFfn::router_backward(float* dx, const float* dgate, int N, float loss_scale) {
  if (N == 0) return;
  float* dlogits = grow(dlogits_, int64_t(N) * E_);
  be_.router_logits_grad(router_.dims(N), dlogits, logits_.data(), reinterpret_cast<const double*>(lse_.data()),
                         reinterpret_cast<const int32_t*>(routed_.data() + routed_head(E_)), step_->plan_rows(), dgate,
                         fraction_.upload(router_.expert_fraction()),
                         static_cast<double>(loss_scale) * router_.options().aux_loss_coef,
                         static_cast<double>(loss_scale) * router_.options().z_loss_coef);
  const Fp32Gemms fp32(be_);  // (as the forward's logits)
  const float* w = w_router_->value.f32();
  be_.matmul(w_router_->grad.f32(), dlogits, router_in_, E_, C_, N, true, false, 1.0f, 1.0f);
  if (router_.jitter_noise().empty()) {
    be_.matmul(dx, dlogits, w, N, C_, E_, false, false, 1.0f, 1.0f);
    return;
  }
  const int64_t NC = int64_t(N) * C_;
  float* t = grow(tmp_, NC);
  be_.matmul(t, dlogits, w, N, C_, E_, false, false);
  be_.mul(t, t, noise_.data(), NC);
  be_.add_inplace(dx, t, NC);
}

FfnStats MoeFfn::stats() const {
  const router::DispatchPlan& plan = last_.plan;
  FfnStats s;
  s.has_router = true;
  s.aux_loss = last_.aux_loss;
  s.dropped_fraction = plan.dropped_fraction();
  s.load_min = plan.load_min();
  s.load_max = plan.load_max();
  s.expert_load.assign(plan.counts.begin(), plan.counts.end());
  s.experts_used = plan.experts_used();
  s.expert_routed = step_routed_;
  if (router_.options().bias_balancing) s.expert_bias = router_.bias();
  return s;
}


// ================================================================== WordExpertFfn
static_assert(router::kMaxWordTokens - 1 == kTokenContext, "the model carries the context a routing key reads");

WordExpertFfn::WordExpertFfn(ParamStore& ps, Workspace& ws, const std::string& prefix,
                             const proto::ModelConfig& cfg, ExpertComm ep,
                             const std::vector<int64_t>* route_counts, std::shared_ptr<WordExpertShared> shared)
    : prefix_(prefix),
      num_routes_(cfg.word_experts().routing_vocab_size() > 0 ? cfg.word_experts().routing_vocab_size()
                                                              : cfg.vocab_size()),
      num_frequent_(cfg.word_experts().num_frequent()),
      skip_top_(cfg.word_experts().skip_top()),
      word_routing_(cfg.word_experts().routing_vocab_size() > 0),
      C_(cfg.d_model()),
      E_(cfg.word_experts().num_experts()),
      shared_(std::move(shared)),
      dispatcher_(ws, ep, cfg.word_experts().num_experts()),
      table_(ps, ws, cfg.word_experts().share_table() ? WordExpertShared::kSharedTablePrefix : prefix + ".experts",
             WordExpertDims{cfg.word_experts().num_experts() / ep_size(ep), cfg.d_model(),
                            cfg.word_experts().d_expert(), cfg.activation(), dispatcher_.first_local_expert()},
             cfg.word_experts().share_table() ? &shared_->table : nullptr),
      placement_(E_, cfg.word_experts().placement() == proto::WordExpertConfig::PLACEMENT_UNSET
                         ? proto::WordExpertConfig::PLACEMENT_INTERLEAVED
                         : cfg.word_experts().placement()),
      expert_out_(ws.buffer()),
      dexpert_in_(ws.buffer()) {
  const auto& w = cfg.word_experts();
  if (w.freeze())  // a fine-tune with fixed word experts: no updates, no weight gradients, dX still flows
    for (Param* p : {table_.w_gate(), table_.w_up(), table_.w_down()})
      if (p) p->frozen = true;
  if (w.hash_routing()) {
    hash_.emplace(E_);
  } else if (route_counts) {
    MOE_CHECK(static_cast<int>(route_counts->size()) == num_routes_,
              prefix << ": route counts cover " << route_counts->size() << " routes, the layer has " << num_routes_
                     << (w.routing_vocab_size() > 0 ? " (model.word_experts.routing_vocab_size)" : " (model.vocab_size)"));
    vocab_.emplace(router::VocabRouter::build(*route_counts, E_, w.num_frequent()));
  }
}

void WordExpertFfn::capture_state(UnitState& s) const {
  if (vocab_) s.tables[prefix_] = vocab_->table();
  if (shared_->vocab) shared_->vocab->to_tables(WordExpertShared::kVocabPrefix, s.tables);
}

bool WordExpertFfn::restore_state(const UnitState& s) {
  if (hash_) return true;  // nothing to restore
  if (word_routing_) {  // the vocabulary the layers share: read once per state
    if (!router::RoutingVocabulary::has_tables(WordExpertShared::kVocabPrefix, s.tables)) return false;
    if (!shared_->vocab || !shared_->vocab->matches_tables(WordExpertShared::kVocabPrefix, s.tables))
      shared_->vocab.emplace(router::RoutingVocabulary::from_tables(WordExpertShared::kVocabPrefix, s.tables));
    MOE_CHECK(shared_->vocab->sizes().size == num_routes_,
              prefix_ << ": the stored routing vocabulary has " << shared_->vocab->sizes().size
                      << " ids, model.word_experts.routing_vocab_size is " << num_routes_);
  }
  auto it = s.tables.find(prefix_);
  if (it == s.tables.end()) return false;
  MOE_CHECK(static_cast<int>(it->second.size()) == num_routes_,
            prefix_ << ": stored routing table has " << it->second.size() << " entries, the layer routes "
                    << num_routes_ << " ids");
  vocab_.emplace(router::VocabRouter::load(it->second, E_, num_frequent_));
  return true;
}

int32_t WordExpertFfn::route_of(const FfnContext& ctx, int n) const {
  if (!word_routing_) return ctx.token_ids[n];
  return shared_->vocab->id(ctx.token_ids[n], ctx.token_context + int64_t(n) * kTokenContext);
}

void WordExpertFfn::forward(const FfnContext& ctx, float* y, const float* x, int N) {
  MOE_CHECK(ctx.token_ids, "word-expert FFN needs the token ids of its rows");
  MOE_CHECK(vocab_ || hash_, prefix_ << ": no routing table (build the model with corpus token counts, or load the "
                                        "table from a checkpoint)");
  MOE_CHECK(!word_routing_ || (shared_->vocab && ctx.token_context),
            prefix_ << ": word routing needs the routing vocabulary (built from the corpus, or from a checkpoint) and "
                       "the rows' token context");
  // The routing table gives logical experts (word experts 0..W-1 in descending route frequency, then shared ones);
  // the skip_top most frequent routes bypass the layer (expert -1: output 0). Experts are sharded over the EP group
  // in contiguous blocks, so the logical ids are placed by a fixed permutation of [0, E) first
  // (model.word_experts.placement): otherwise every frequent route would land on the first rank. The interleaved
  // placement also keeps the frequent experts in a few dense runs of rows.
  expert_ids_.resize(N);
  for (int n = 0; n < N; ++n) {
    const int64_t logical = vocab_ ? vocab_->expert_of(route_of(ctx, n)) : hash_->expert_of(ctx.token_ids[n]);
    expert_ids_[n] = logical < skip_top_ ? -1 : static_cast<int32_t>(placement_.row(logical));
  }
  // a compact plan and the dispatcher's (expert, rows) exchange: nothing per step is O(E)
  plan_ = router::make_top1_plan_compact(expert_ids_.data(), N, E_);
  step_ = &dispatcher_.dispatch(plan_, x, C_);
  // the experts that received rows, with their row ranges (the table works on used experts only)
  const auto& used = step_->experts();
  float* out = grow(expert_out_, step_->local_rows() * C_);  // [local_rows,C]
  table_.forward(out, step_->rows(), used.data(), step_->offsets().data(), static_cast<int64_t>(used.size()),
                 ctx.batch_invariant);
  step_->combine(y, out);
}

void WordExpertFfn::backward(const FfnContext&, float* dx, const float* dy, int N) {
  const float* dexp_out = step_->combine_backward(dy, nullptr);  // gates are constant 1: no gate gradient
  float* dexp_in = grow(dexpert_in_, step_->local_rows() * C_);  // [local_rows,C]
  table_.backward(dexp_in, dexp_out);
  dispatcher_.backend().memset0(dx, sizeof(float) * int64_t(N) * C_);
  step_->dispatch_backward(dx, dexp_in);
}

FfnStats WordExpertFfn::stats() const {
  FfnStats s;
  s.has_router = true;
  s.dropped_fraction = plan_.dropped_fraction();
  s.load_min = plan_.load_min();
  s.load_max = plan_.load_max();
  s.experts_used = plan_.experts_used();
  return s;
}

}  // namespace moe::experts
