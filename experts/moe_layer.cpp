#include "experts/moe_layer.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/config.h"
#include "core/error.h"

namespace moe::experts {
namespace {
using clk = std::chrono::steady_clock;
double since(clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); }
float* grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

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
  return o;
}

int ep_size(comm::Communicator* ep) { return ep ? ep->size() : 1; }

// Fills expert slices [E_local, ...] of `p` from per-GLOBAL-expert seeded streams: the same expert gets the same
// weights whatever the expert-parallel layout.
void init_by_global_expert(Param* p, int64_t first_global, uint64_t seed, float std) {
  if (!p) return;
  const int64_t el = p->value.dim(0), per = p->value.numel() / el;
  float* w = p->value.f32();
  for (int64_t e = 0; e < el; ++e) {
    Rng rng(seed ^ (0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(first_global + e + 1)));
    if (std == 0) std::fill(w + e * per, w + (e + 1) * per, 0.0f);
    else
      for (int64_t i = 0; i < per; ++i) w[e * per + i] = rng.normal() * std;
  }
}

uint64_t name_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (char c : s) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ULL;
  return h;
}
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
MoeFfn::MoeFfn(ParamStore& ps, const std::string& prefix, const proto::ModelConfig& cfg, comm::Communicator* ep,
               uint64_t seed)
    : C_(cfg.d_model()),
      E_(cfg.moe().num_experts()),
      w_router_(ps.add(prefix + ".router.weight", {cfg.moe().num_experts(), cfg.d_model()}, false)),
      router_(cfg.moe().num_experts(), cfg.moe().top_k(), cfg.d_model(), router_options(cfg.moe(), seed)),
      dispatcher_(ep, cfg.moe().num_experts()),
      bank_(ps, prefix + ".experts",
            ExpertBankDims{cfg.moe().num_experts() / ep_size(ep), cfg.d_model(), cfg.moe().d_expert(),
                           cfg.activation()}) {}

void MoeFfn::reset_timings() {
  expert_seconds_ = route_seconds_ = combine_seconds_ = 0;
  dispatcher_.timings().reset();
}

void MoeFfn::forward(const FfnContext& ctx, float* y, const float* x, int N) {
  auto t0 = clk::now();
  last_ = router_.forward(x, w_router_->value.f32(), N, ctx.training);
  route_seconds_ += since(t0);
  const float* rows = dispatcher_.dispatch(last_.plan, x, C_);
  t0 = clk::now();
  float* out = grow(expert_out_, std::max<int64_t>(dispatcher_.local_rows(), 1) * C_);
  bank_.forward(out, rows, dispatcher_.local_offsets().data());
  expert_seconds_ += since(t0);
  y_rows_ = dispatcher_.combine_rows(out, C_);
  t0 = clk::now();
  last_.plan.unpermute_combine(y, y_rows_, C_);
  combine_seconds_ += since(t0);
}

void MoeFfn::backward(const FfnContext&, float* dx, const float* dy, int N) {
  const router::DispatchPlan& plan = last_.plan;
  auto t0 = clk::now();
  float* drows = grow(drows_, std::max<int64_t>(plan.rows(), 1) * C_);
  float* dgate = grow(dgate_, std::max(plan.num_slots(), 1));
  plan.unpermute_combine_backward(drows, dgate, dy, y_rows_, C_);
  combine_seconds_ += since(t0);
  const float* dexp_out = dispatcher_.dispatch_grad(drows, C_);
  t0 = clk::now();
  float* dexp_in = grow(dexpert_in_, std::max<int64_t>(dispatcher_.local_rows(), 1) * C_);
  bank_.backward(dexp_in, dexp_out);
  expert_seconds_ += since(t0);
  const float* dx_rows = dispatcher_.combine_grad(dexp_in, C_);
  t0 = clk::now();
  std::memset(dx, 0, sizeof(float) * int64_t(N) * C_);
  plan.permute_backward(dx, dx_rows, C_);
  router_.backward(dx, w_router_->grad.f32(), dgate, w_router_->value.f32(), 1.0f);
  route_seconds_ += since(t0);
}

FfnStats MoeFfn::stats() const {
  FfnStats s;
  s.has_router = true;
  s.aux_loss = last_.aux_loss;
  s.dropped_fraction = last_.plan.dropped_fraction();
  s.load_min = last_.plan.load_min();
  s.load_max = last_.plan.load_max();
  return s;
}


// ================================================================== WordExpertFfn
WordExpertFfn::WordExpertFfn(ParamStore& ps, const std::string& prefix, const proto::ModelConfig& cfg,
                             comm::Communicator* ep, const std::vector<int64_t>* token_counts,
                             const std::vector<int32_t>* table)
    : C_(cfg.d_model()),
      E_(cfg.word_experts().num_experts()),
      dispatcher_(ep, cfg.word_experts().num_experts()),
      table_(ps, prefix + ".experts",
             WordExpertDims{cfg.word_experts().num_experts() / ep_size(ep), cfg.d_model(),
                            cfg.word_experts().d_expert(), cfg.activation()}),
      placement_(E_, cfg.word_experts().placement() == proto::WordExpertConfig::PLACEMENT_UNSET
                         ? proto::WordExpertConfig::PLACEMENT_INTERLEAVED
                         : cfg.word_experts().placement()) {
  const auto& w = cfg.word_experts();
  if (w.hash_routing()) {
    hash_.emplace(E_);
  } else if (table && !table->empty()) {
    MOE_CHECK(static_cast<int>(table->size()) == cfg.vocab_size(),
              prefix << ": stored routing table has " << table->size() << " entries, model.vocab_size is "
                     << cfg.vocab_size());
    vocab_.emplace(router::VocabRouter::load(*table, E_, w.num_frequent()));
  } else {
    MOE_CHECK(token_counts, prefix << ": vocabulary routing needs corpus token counts (or a stored table); "
                                      "set model.word_experts.hash_routing to route by hash");
    MOE_CHECK(static_cast<int>(token_counts->size()) == cfg.vocab_size(),
              prefix << ": token counts cover " << token_counts->size() << " ids, model.vocab_size is "
                     << cfg.vocab_size());
    vocab_.emplace(router::VocabRouter::build(*token_counts, E_, w.num_frequent()));
  }
}

std::vector<int32_t> WordExpertFfn::routing_table() const { return vocab_ ? vocab_->table() : std::vector<int32_t>(); }

void WordExpertFfn::forward(const FfnContext& ctx, float* y, const float* x, int N) {
  MOE_CHECK(ctx.token_ids, "word-expert FFN needs the token ids of its rows");
  // The routing table gives logical experts (word experts 0..W-1 in descending token frequency, then shared ones).
  // Experts are sharded over the EP group in contiguous blocks, so the logical ids are placed by a fixed
  // permutation of [0, E) first (model.word_experts.placement): otherwise every frequent token would land on the
  // first rank. The interleaved placement also keeps the frequent experts in a few dense runs of rows.
  expert_ids_.resize(N);
  for (int n = 0; n < N; ++n) {
    const int64_t logical = vocab_ ? vocab_->expert_of(ctx.token_ids[n]) : hash_->expert_of(ctx.token_ids[n]);
    expert_ids_[n] = static_cast<int32_t>(placement_.row(logical));
  }
  // a compact plan and the dispatcher's (expert, rows) exchange: nothing per step is O(E)
  plan_ = router::make_top1_plan_compact(expert_ids_.data(), N, E_);
  const float* rows = dispatcher_.dispatch(plan_, x, C_);
  // the experts that received rows, with their row ranges (the table works on used experts only)
  const auto& used = dispatcher_.local_experts();
  float* out = grow(expert_out_, std::max<int64_t>(dispatcher_.local_rows(), 1) * C_);
  table_.forward(out, rows, used.data(), dispatcher_.group_offsets().data(), static_cast<int64_t>(used.size()));
  const float* yrows = dispatcher_.combine_rows(out, C_);
  plan_.unpermute_combine(y, yrows, C_);
}

void WordExpertFfn::backward(const FfnContext&, float* dx, const float* dy, int N) {
  std::vector<float>& drows = expert_out_;  // reuse: forward outputs are not needed (gates are constant 1)
  float* d = grow(drows, std::max<int64_t>(plan_.rows(), 1) * C_);
  plan_.unpermute_combine_backward(d, nullptr, dy, nullptr, C_);
  const float* dexp_out = dispatcher_.dispatch_grad(d, C_);
  std::vector<float> dexp_in(std::max<int64_t>(dispatcher_.local_rows(), 1) * C_);
  table_.backward(dexp_in.data(), dexp_out);
  const float* dx_rows = dispatcher_.combine_grad(dexp_in.data(), C_);
  std::memset(dx, 0, sizeof(float) * int64_t(N) * C_);
  plan_.permute_backward(dx, dx_rows, C_);
}

FfnStats WordExpertFfn::stats() const {
  FfnStats s;
  s.has_router = true;
  s.dropped_fraction = plan_.dropped_fraction();
  s.load_min = plan_.load_min();
  s.load_max = plan_.load_max();
  return s;
}

// ================================================================== factory and helpers
FfnFactory make_ffn_factory(const FfnBuildContext& ctx) {
  return [ctx](ParamStore& ps, const std::string& prefix, const proto::ModelConfig& cfg,
               int layer) -> std::unique_ptr<FfnUnit> {
    switch (layer_ffn_kind(cfg, layer)) {
      case proto::FFN_MOE:
        return std::make_unique<MoeFfn>(ps, prefix, cfg, ctx.ep, ctx.seed ^ name_hash(prefix));
      case proto::FFN_WORD_EXPERT: {
        auto it = ctx.routing_tables.find(prefix);
        return std::make_unique<WordExpertFfn>(ps, prefix, cfg, ctx.ep, ctx.token_counts,
                                               it == ctx.routing_tables.end() ? nullptr : &it->second);
      }
      default:
        return std::make_unique<DenseFfn>(ps, prefix, cfg.d_model(), cfg.d_ff(), cfg.activation());
    }
  };
}

void init_expert_weights(Model& model, uint64_t seed) {
  const auto& cfg = model.config();
  const float std = cfg.init_std();
  const float down_std = std / std::sqrt(2.0f * cfg.n_layers());
  for (int l = 0; l < model.n_layers(); ++l) {
    const Dispatcher* d = nullptr;
    if (auto* m = dynamic_cast<MoeFfn*>(&model.ffn(l))) d = &m->dispatcher();
    if (auto* w = dynamic_cast<WordExpertFfn*>(&model.ffn(l))) d = &w->dispatcher();
    if (!d) continue;
    const std::string prefix = "layers." + std::to_string(l) + ".ffn.experts";
    for (const std::string name : {".w_gate", ".w_up", ".w_down", ".b_up", ".b_down"}) {
      Param* p = model.params().find(prefix + name);
      if (!p) continue;
      const float s = name[1] == 'b' ? 0.0f : (name == ".w_down" ? down_std : std);
      init_by_global_expert(p, d->first_local_expert(), seed ^ name_hash(prefix + name), s);
    }
  }
}

std::map<std::string, std::vector<int32_t>> routing_tables(Model& model) {
  std::map<std::string, std::vector<int32_t>> out;
  for (int l = 0; l < model.n_layers(); ++l)
    if (auto* w = dynamic_cast<WordExpertFfn*>(&model.ffn(l)))
      out["layers." + std::to_string(l) + ".ffn"] = w->routing_table();
  return out;
}

}  // namespace moe::experts
