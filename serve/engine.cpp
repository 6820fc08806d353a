#include "serve/engine.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstring>
#include <thread>

#include "core/config.h"
#include "core/error.h"
#include "core/log.h"
#include "serve/sampler.h"

namespace moe::serve {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::atomic<bool> g_drain{false};
static_assert(std::atomic<bool>::is_always_lock_free, "the drain flag is set from signal handlers");

// A sampled token travels to rank 0 as one row of floats: token, log-probability, number of alternatives, then
// (token, log-probability) of each alternative. Integers travel bit for bit.
constexpr int kResultFloats = 3 + 2 * kMaxTopLogprobs;
float bits(int32_t v) { return std::bit_cast<float>(v); }
int32_t ibits(float v) { return std::bit_cast<int32_t>(v); }

void pack(float* row, const Sampled& s) {
  std::fill(row, row + kResultFloats, 0.0f);
  row[0] = bits(s.token);
  row[1] = static_cast<float>(s.logprob);
  row[2] = bits(static_cast<int32_t>(s.top.size()));
  for (size_t i = 0; i < s.top.size(); ++i) {
    row[3 + 2 * i] = bits(s.top[i].token);
    row[4 + 2 * i] = static_cast<float>(s.top[i].logprob);
  }
}

SampleChoice choice_of(const proto::SampleSpec& sp) {
  return SampleChoice{sp.temperature(), sp.top_p(), sp.top_k(), sp.u(), sp.logprobs()};
}

}  // namespace

// A request on rank 0 while it runs.
struct Engine::Live {
  std::shared_ptr<RequestSink> sink;
  GenerationRequest req;
  Detokenizer detok;
  Live(std::shared_ptr<RequestSink> s, GenerationRequest r, const Tokenizer& tok)
      : sink(std::move(s)), req(std::move(r)), detok(tok, req.prompt, req.stop) {}
};

void Engine::request_drain() { g_drain.store(true); }
bool Engine::drain_requested() { return g_drain.load(); }

Engine::Engine(const EngineOptions& o, comm::Communicator& world)
    : o_(o), world_(world), plan_comm_(world.split(0, world.rank())) {
  plan_comm_->set_deadline(world.rank() == 0 ? world.deadline() : o.plan_timeout_s);
}

Engine::~Engine() = default;

KvCacheDims serving_kv_dims(const Model& model, const proto::ServingConfig& s, int num_blocks) {
  KvCacheDims d = model.kv_dims(num_blocks, s.kv_block_size());
  d.key_columns = s.sparq_r() > 0;
  return d;
}

void Engine::attach(Model& model, const Tokenizer* tok, ModelInfo info) {
  const proto::ServingConfig& s = o_.serving;
  const proto::ModelConfig& m = model.config();
  model_ = &model;
  tok_ = tok;
  info_ = std::move(info);
  info_.head_dim = m.d_model() / m.n_heads();
  info_.sparq = model.workspace().backend().has_sparq();
  MOE_CHECK(!lead() || tok, "serve: rank 0 needs the tokenizer");
  check_sparq_config(model);
  const int64_t block_bytes = serving_kv_dims(model, s, 1).block_bytes();
  const int64_t blocks = s.kv_cache_bytes() / block_bytes;
  const int need = (m.max_seq_len() + s.kv_block_size() - 1) / s.kv_block_size();
  MOE_CHECK(blocks >= need && blocks <= INT32_MAX,
            "config field serving.kv_cache_bytes = "
                << s.kv_cache_bytes() << ": holds " << blocks << " KV blocks of " << block_bytes << " bytes ("
                << s.kv_block_size() << " positions), but one sequence of model.max_seq_len = " << m.max_seq_len()
                << " needs " << need << " (at least " << need * block_bytes << " bytes)");
  cache_ = std::make_unique<KvCache>(model.workspace().backend(), serving_kv_dims(model, s, int(blocks)));
  model.prepare_inference();
  for (int l = 0; l < m.n_layers(); ++l)
    if (layer_ffn_kind(m, l) == proto::FFN_MOE) moe_layers_.push_back(l);
  num_experts_ = moe_layers_.empty() ? 0 : m.moe().num_experts();
  if (lead()) {
    sched_ = std::make_unique<Scheduler>(
        SchedulerOptions{world_.size(), int(blocks), s.kv_block_size(), s.max_batch_tokens(), s.max_running()},
        m.max_seq_len());
    std::lock_guard<std::mutex> lk(stats_mu_);
    stats_.moe_layers = moe_layers_;
    stats_.expert_tokens.assign(moe_layers_.size(), std::vector<int64_t>(num_experts_, 0));
    stats_.kv_blocks_total = sched_->blocks_total();
  }
  world_.barrier();  // every rank holds its shard and cache
  ready_ = true;
}

// serving.sparq_r / sparq_k against the model and its backend (validate(ServingConfig) checked the rest)
void Engine::check_sparq_config(const Model& model) const {
  const proto::ServingConfig& s = o_.serving;
  MOE_CHECK(s.sparq_r() <= info_.head_dim, "config field serving.sparq_r = " << s.sparq_r()
                                                                             << ": SparQ picks at most the head dim "
                                                                             << info_.head_dim << " components");
  MOE_CHECK(s.sparq_r() == 0 || info_.sparq,
            "config field serving.sparq_r = " << s.sparq_r() << ": the backend of model.device = "
                                              << proto::Device_Name(model.config().device())
                                              << " has no SparQ attention (set serving.sparq_r and sparq_k to 0)");
}

// ---------------------------------------------------------------- rank 0: requests in, events out

SubmitStatus Engine::submit(GenerationRequest req, std::shared_ptr<RequestSink> sink) {
  if (!ready_) return SubmitStatus::kNotReady;
  if (!accepting_) return SubmitStatus::kShuttingDown;
  std::lock_guard<std::mutex> lk(inbox_mu_);
  if (waiting_.load() >= o_.serving.max_queue()) return SubmitStatus::kQueueFull;
  inbox_.push_back({std::move(req), std::move(sink)});
  ++waiting_;
  inbox_cv_.notify_one();
  return SubmitStatus::kAccepted;
}

void Engine::intake() {
  std::vector<Incoming> in;
  {
    std::lock_guard<std::mutex> lk(inbox_mu_);
    in.swap(inbox_);
  }
  for (Incoming& r : in) {
    const int64_t id = next_id_++;
    const GenerationRequest& q = r.req;
    const int max_T = model_->config().max_seq_len();
    auto seq = std::make_unique<Sequence>();
    seq->id = id;
    seq->tokens = q.prompt;
    seq->n_prompt = static_cast<int>(q.prompt.size());
    seq->sampling = SampleChoice{q.sampling.temperature, q.sampling.top_p, q.sampling.top_k, 0, q.logprobs};
    seq->sparq = q.sparq.value_or(SparqParams{o_.serving.sparq_r(), o_.serving.sparq_k()});
    seq->rng.reseed(q.sampling.seed);
    live_.emplace(id, std::make_unique<Live>(std::move(r.sink), std::move(r.req), *tok_));
    // the HTTP layer validated the request; a bad one that got here anyway fails alone, the engine goes on
    bool ok = !seq->tokens.empty() && seq->n_prompt < max_T;
    for (int32_t t : seq->tokens) ok = ok && t >= 0 && t < model_->config().vocab_size();
    const SparqParams& sq = seq->sparq;
    ok = ok && sq.r >= 0 && sq.r <= info_.head_dim && sq.k >= 0 && (sq.r == 0) == (sq.k == 0) &&
         (sq.r == 0 || model_->workspace().backend().has_sparq());
    if (!ok) {
      finish(id, "abort",
             "invalid request: empty prompt, a token outside the vocabulary, no room in the context, or SparQ "
             "knobs out of range");
      continue;
    }
    prompt_tokens_ += seq->n_prompt;
    sched_->add(std::move(seq));
  }
  count_waiting();
}

void Engine::count_waiting() {
  std::lock_guard<std::mutex> lk(inbox_mu_);
  waiting_ = sched_->waiting() + static_cast<int64_t>(inbox_.size());
}

void Engine::drop_cancelled() {
  std::vector<int64_t> gone;
  for (auto& [id, live] : live_)
    if (live->sink->cancelled()) gone.push_back(id);
  for (int64_t id : gone) finish(id, "abort");
}

void Engine::finish(int64_t id, const std::string& reason, const std::string& error) {
  auto it = live_.find(id);
  if (it == live_.end()) return;
  Live& live = *it->second;
  FinishEvent ev;
  ev.reason = reason;
  ev.error = error;
  ev.text = live.detok.flush();
  ev.usage.prompt_tokens = static_cast<int>(live.req.prompt.size());
  if (Sequence* seq = sched_->find(id)) ev.usage.completion_tokens = seq->generated();
  live.sink->on_finish(ev);
  sched_->finish(id);
  live_.erase(it);
}

void Engine::abort_all() {
  std::vector<int64_t> ids;
  for (auto& [id, live] : live_) ids.push_back(id);
  for (int64_t id : ids) finish(id, "abort");  // no engine error: the client is told the server is shutting down
}

// The token of one sampled chunk: into the sequence, through the detokenizer and stop strings, to the sink.
void Engine::emit(Live& live, Sequence& seq, const float* row) {
  TokenEvent ev;
  ev.token = ibits(row[0]);
  ev.logprob = row[1];
  const int ntop = ibits(row[2]);
  for (int i = 0; i < ntop; ++i) ev.top.push_back({ibits(row[3 + 2 * i]), double(row[4 + 2 * i])});
  seq.tokens.push_back(ev.token);
  ++generated_tokens_;
  const bool eos = ev.token == info_.eos_id && !live.req.ignore_eos;
  bool stopped = false;
  if (!eos) ev.text = live.detok.push(ev.token, &stopped);
  live.sink->on_token(ev);
  const int max_new = std::min(live.req.max_tokens, model_->config().max_seq_len() - seq.n_prompt);
  if (stopped || eos)
    finish(seq.id, "stop");
  else if (seq.generated() >= max_new)
    finish(seq.id, "length");
}

proto::StepPlan Engine::make_plan(const std::vector<ScheduledChunk>& chunks) {
  proto::StepPlan plan;
  plan.set_kind(proto::StepPlan::RUN);
  plan.set_step(step_no_);
  for (const ScheduledChunk& c : chunks) {
    Sequence& s = *c.seq;
    proto::Chunk* p = plan.add_chunks();
    p->set_rank(s.rank);
    p->set_seq(s.id);
    p->set_pos0(c.pos0);
    p->mutable_tokens()->Add(s.tokens.begin() + c.pos0, s.tokens.begin() + c.pos0 + c.n);
    p->mutable_before()->Add(s.tokens.begin() + std::max(0, c.pos0 - kTokenContext), s.tokens.begin() + c.pos0);
    p->mutable_blocks()->Add(s.blocks.begin(), s.blocks.end());
    p->set_sample(c.sample);
    if (s.sparq.r > 0) {
      proto::Sparq* sq = p->mutable_sparq();
      sq->set_r(s.sparq.r);
      sq->set_k(s.sparq.k);
      sq->set_from(s.n_prompt);
    }
    if (!c.sample) continue;
    proto::SampleSpec* sp = p->mutable_spec();
    sp->set_temperature(s.sampling.temperature);
    sp->set_top_p(s.sampling.top_p);
    sp->set_top_k(s.sampling.top_k);
    sp->set_logprobs(s.sampling.logprobs);
    if (s.sampling.temperature > 0) sp->set_u(s.rng.uniform());  // the request's stream: one draw per token
  }
  return plan;
}

void Engine::apply(const std::vector<ScheduledChunk>& chunks, const std::vector<float>& results) {
  // results come rank by rank, each rank's sampled chunks in plan order
  std::vector<std::vector<int64_t>> by_rank(world_.size());
  for (const ScheduledChunk& c : chunks)
    if (c.sample) by_rank[c.seq->rank].push_back(c.seq->id);
  size_t row = 0;
  for (const auto& ids : by_rank)
    for (int64_t id : ids) {
      const float* r = results.data() + row++ * kResultFloats;
      auto it = live_.find(id);
      Sequence* seq = sched_->find(id);
      if (it != live_.end() && seq) emit(*it->second, *seq, r);
    }
}

bool Engine::step() {
  intake();
  drop_cancelled();
  std::vector<ScheduledChunk> chunks = sched_->schedule();
  count_waiting();
  if (chunks.empty()) {
    publish_stats();
    return false;
  }
  proto::StepPlan plan = make_plan(chunks);
  send_plan(plan);
  const std::vector<float> results = execute(plan);
  exchange_status();
  sched_->completed(chunks);
  apply(chunks, results);
  ++step_no_;
  publish_stats();
  std::this_thread::yield();  // let the HTTP thread send this step's tokens now if it shares our core
  return true;
}

void Engine::heartbeat() {
  proto::StepPlan plan;
  plan.set_kind(proto::StepPlan::IDLE);
  plan.set_step(step_no_);
  send_plan(plan);
  exchange_status();
}

void Engine::publish_stats() {
  std::lock_guard<std::mutex> lk(stats_mu_);
  stats_.queue_depth = waiting_.load();
  stats_.running = sched_->running();
  stats_.kv_blocks_used = sched_->blocks_total() - sched_->blocks_free();
  stats_.preemptions = sched_->preemptions();
  stats_.steps = step_no_;
  stats_.prompt_tokens = prompt_tokens_;
  stats_.generated_tokens = generated_tokens_;
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lk(stats_mu_);
  return stats_;
}

// ---------------------------------------------------------------- the loops

void Engine::run() {
  MOE_CHECK(ready_, "serve: the engine runs after attach()");
  if (!lead()) {
    proto::StepPlan plan;
    while (receive_plan(plan)) {
      if (plan.kind() == proto::StepPlan::RUN) execute(plan);
      exchange_status();
    }
    return;
  }
  Clock::time_point last = Clock::now(), drain_start;
  while (true) {
    if (!draining_ && (drain_requested() || peer_drain_ || stop_requested_)) {
      draining_ = true;
      accepting_ = false;
      drain_start = Clock::now();
      MOE_INFO("serve: draining (a stop signal): no new requests; " << live_.size() << " in flight get "
                                                                    << o_.serving.drain_timeout_s() << " s");
      if (on_drain_) on_drain_();
    }
    if (draining_) {
      intake();
      if (live_.empty()) break;
      if (seconds_since(drain_start) > o_.serving.drain_timeout_s()) {
        MOE_WARN("serve: drain deadline passed: aborting " << live_.size() << " request(s)");
        abort_all();
        break;
      }
    }
    if (step()) {
      last = Clock::now();
      continue;
    }
    if (world_.size() > 1 && seconds_since(last) >= o_.heartbeat_s) {
      heartbeat();
      last = Clock::now();
    }
    std::unique_lock<std::mutex> lk(inbox_mu_);
    inbox_cv_.wait_for(lk, std::chrono::milliseconds(50), [&] { return !inbox_.empty(); });
  }
  proto::StepPlan bye;
  bye.set_kind(proto::StepPlan::SHUTDOWN);
  send_plan(bye);
  publish_stats();
  MOE_INFO("serve: engine stopped after " << step_no_ << " steps");
}

void Engine::run_until_idle() {
  MOE_CHECK(ready_ && lead() && world_.size() == 1, "serve: run_until_idle is for a one-rank engine");
  while (true) {
    intake();
    if (live_.empty()) return;
    MOE_CHECK(step(), "serve: " << live_.size() << " request(s) cannot be scheduled");
  }
}

// ---------------------------------------------------------------- every rank: plans, execution, status

void Engine::send_plan(proto::StepPlan& plan) {
  std::string bytes;
  MOE_CHECK(plan.SerializeToString(&bytes), "serve: cannot serialise the step plan");
  int64_t n = static_cast<int64_t>(bytes.size());
  plan_comm_->broadcast(&n, sizeof n, 0);
  plan_comm_->broadcast(bytes.data(), bytes.size(), 0);
}

bool Engine::receive_plan(proto::StepPlan& plan) {
  int64_t n = 0;
  plan_comm_->broadcast(&n, sizeof n, 0);
  MOE_CHECK(n >= 0 && n < (int64_t(1) << 31), "serve: step plan of " << n << " bytes");
  std::string bytes(static_cast<size_t>(n), '\0');
  plan_comm_->broadcast(bytes.data(), bytes.size(), 0);
  MOE_CHECK(plan.ParseFromString(bytes), "serve: rank " << world_.rank() << " got an unreadable step plan");
  return plan.kind() != proto::StepPlan::SHUTDOWN;
}

std::vector<float> Engine::execute(const proto::StepPlan& plan) {
  const int me = world_.rank(), P = world_.size(), V = model_->config().vocab_size();
  const int bs = o_.serving.kv_block_size();
  batch_.clear();
  std::vector<const proto::Chunk*> sampled;
  std::vector<int64_t> recv_counts(P, 0), send_counts(P, 0);
  std::vector<int32_t> blocks;
  for (const proto::Chunk& c : plan.chunks()) {
    if (c.sample()) ++recv_counts[c.rank()];
    if (c.rank() != me) continue;
    blocks.assign(c.blocks().begin(), c.blocks().end());
    const SparqKnobs sparq{c.sparq().r(), c.sparq().k(), c.sparq().from()};
    batch_.add({c.tokens().data(), c.tokens_size(), c.pos0(), c.before().data(), c.before_size(), c.sample(), sparq},
               blocks, bs);
    if (c.sample()) sampled.push_back(&c);
  }
  const float* logits = model_->forward_infer(batch_, *cache_);  // every rank: the MoE layers exchange tokens
  std::vector<float> host(size_t(sampled.size()) * V), rows(std::max<size_t>(sampled.size(), 1) * kResultFloats);
  model_->workspace().backend().to_host(host.data(), logits, sizeof(float) * host.size());
  for (size_t i = 0; i < sampled.size(); ++i)
    pack(rows.data() + i * kResultFloats, sample_token(host.data() + i * V, V, choice_of(sampled[i]->spec())));
  send_counts[0] = static_cast<int64_t>(sampled.size());
  if (me != 0) std::fill(recv_counts.begin(), recv_counts.end(), 0);
  int64_t total = 0;
  for (int64_t c : recv_counts) total += c;
  std::vector<float> out(std::max<int64_t>(total, 1) * kResultFloats);
  world_.all_to_all_v(rows.data(), send_counts.data(), out.data(), recv_counts.data(), kResultFloats);
  out.resize(total * kResultFloats);
  did_forward_ = true;
  return out;
}

void Engine::exchange_status() {
  const int P = world_.size(), L = static_cast<int>(moe_layers_.size());
  const int64_t width = 1 + int64_t(L) * num_experts_;
  std::vector<float> row(width, 0.0f);
  row[0] = drain_requested() ? 1.0f : 0.0f;
  if (did_forward_ && L > 0) {  // the tokens this rank's routers sent to each expert in this step
    const std::vector<FfnStats> st = model_->ffn_stats();
    for (int i = 0; i < L; ++i) {
      const auto& load = st[moe_layers_[i]].expert_load;
      for (int e = 0; e < num_experts_ && e < int(load.size()); ++e) row[1 + i * num_experts_ + e] = float(load[e]);
    }
  }
  did_forward_ = false;
  std::vector<int64_t> send(P, 0), recv(P, 0);
  send[0] = 1;
  if (lead()) std::fill(recv.begin(), recv.end(), 1);
  std::vector<float> all(lead() ? P * width : 1);
  world_.all_to_all_v(row.data(), send.data(), all.data(), recv.data(), width);
  if (!lead()) return;
  std::lock_guard<std::mutex> lk(stats_mu_);
  for (int r = 0; r < P; ++r) {
    const float* s = all.data() + r * width;
    if (s[0] != 0.0f) peer_drain_ = true;
    for (int i = 0; i < L; ++i)
      for (int e = 0; e < num_experts_; ++e)
        stats_.expert_tokens[i][e] += static_cast<int64_t>(s[1 + i * num_experts_ + e]);
  }
}

namespace {
class CollectSink final : public RequestSink {
 public:
  explicit CollectSink(Completion& c) : c_(c) {}
  void on_token(const TokenEvent& ev) override {
    c_.tokens.push_back(ev.token);
    c_.logprobs.push_back(ev.logprob);
    c_.text += ev.text;
  }
  void on_finish(const FinishEvent& ev) override {
    c_.text += ev.text;
    c_.finish_reason = ev.reason;
    MOE_CHECK(ev.error.empty(), "generation failed: " << ev.error);
  }
  bool cancelled() const override { return false; }

 private:
  Completion& c_;
};
}  // namespace

Completion generate(Engine& engine, GenerationRequest req) {
  Completion c;
  const SubmitStatus st = engine.submit(std::move(req), std::make_shared<CollectSink>(c));
  MOE_CHECK(st == SubmitStatus::kAccepted, "generate: the engine did not take the request (status " << int(st) << ")");
  engine.run_until_idle();
  return c;
}

}  // namespace moe::serve
