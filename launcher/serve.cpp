#include "launcher/serve.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <thread>

#include "checkpoints/checkpoint.h"
#include "comm/parallel.h"
#include "comm/self_comm.h"
#include "core/config.h"
#include "core/log.h"
#include "launcher/control_client.h"
#include "launcher/run_state.h"
#include "serve/engine.h"
#include "serve/http_server.h"

namespace fs = std::filesystem;

namespace moe::launcher {
namespace {

// The checkpoint's config with the overrides (the HTTP server starts before the model loads).
Config serve_config(const ServeOptions& o) {
  Config cfg = ckpt::read_manifest(ckpt::resolve(o.checkpoint)).config();
  for (const auto& a : o.overrides) apply_override(cfg, a);
  fill_defaults(cfg);
  if (!o.api_key_file.empty()) cfg.mutable_serving()->set_api_key_file(o.api_key_file);
  validate(cfg.serving());
  return cfg;
}

// The experts are sharded over every rank of the job: each expert count must be divisible by the rank count.
void check_ranks(const proto::ModelConfig& m, int ranks) {
  for (int l = 0; l < std::min(m.n_layers(), std::max(1, m.ffn_pattern_size())); ++l) {
    const proto::FfnKind k = layer_ffn_kind(m, l);
    const int E = k == proto::FFN_MOE ? m.moe().num_experts()
                                      : (k == proto::FFN_WORD_EXPERT ? m.word_experts().num_experts() : 0);
    MOE_CHECK(E == 0 || E % ranks == 0, "moe serve on " << ranks << " ranks: "
                                                        << (k == proto::FFN_MOE ? "model.moe.num_experts = "
                                                                                : "model.word_experts.num_experts = ")
                                                        << E << " is not divisible by " << ranks
                                                        << " (the experts are sharded over every rank): launch a "
                                                           "rank count that divides it");
  }
}

serve::ModelInfo model_info(const LoadedModel& lm) {
  serve::ModelInfo info;
  info.name = lm.cfg.serving().model_name();
  if (info.name.empty()) info.name = fs::path(lm.cfg.train().out_dir()).filename().string();
  if (info.name.empty()) info.name = "moe";
  info.max_seq_len = lm.cfg.model().max_seq_len();
  info.vocab_size = lm.cfg.model().vocab_size();
  std::error_code ec;
  const auto t = fs::last_write_time(lm.dir + "/manifest.pb", ec);
  if (!ec)
    info.created =
        std::chrono::duration_cast<std::chrono::seconds>(std::chrono::file_clock::to_sys(t).time_since_epoch()).count();
  info.eos_id = lm.tok->eos_id();
  return info;
}

extern "C" void on_stop_signal(int) { serve::Engine::request_drain(); }

// SIGTERM, SIGINT and SIGUSR1 drain the server, on any rank (the status exchange tells rank 0). Under mpirun send
// SIGUSR1 to mpirun (it forwards it); Open MPI kills the ranks 1 s after forwarding a SIGTERM
// (odls_base_sigkill_timeout), too soon for a drain.
struct DrainSignals {
  static constexpr int kSignals[] = {SIGTERM, SIGINT, SIGUSR1};
  DrainSignals() {
    for (int s : kSignals) std::signal(s, on_stop_signal);
  }
  ~DrainSignals() {
    for (int s : kSignals) std::signal(s, SIG_DFL);
  }
};

// Rank 0's HTTP front end, bound before anything else so a taken port fails the job at once (every rank learns it).
std::unique_ptr<serve::HttpServer> start_http(serve::Engine& engine, const proto::ServingConfig& s,
                                              comm::Communicator& world) {
  std::unique_ptr<serve::HttpServer> http;
  std::string err;
  if (world.rank() == 0) {
    try {
      const serve::HttpOptions h =
          serve::http_options(s, s.api_key_file().empty() ? "" : serve::read_api_key_file(s.api_key_file()));
      http = std::make_unique<serve::HttpServer>(engine, h);
      http->start();
      MOE_INFO("serve: listening on http://" << s.host() << ":" << http->port()
                                             << (h.api_key.empty() ? " (no API key)" : " (API key required)")
                                             << "; pid " << ::getpid() << " (SIGTERM or SIGUSR1 drains)");
    } catch (const Error& e) {
      err = e.what();
    }
  }
  int32_t failed = err.empty() ? 0 : 1;
  world.broadcast(&failed, sizeof failed, 0);
  if (world.rank() == 0) MOE_CHECK(!failed, err);
  MOE_CHECK(!failed, "serve: rank 0 could not start the HTTP server");
  return http;
}

// What the coordinator sees of a serving rank (when one launched it): loading, then serving. Its STOP command, or
// losing the coordinator, drains the server as a stop signal does.
class ServeLink {
 public:
  explicit ServeLink(comm::Communicator& world) : client_(ControlClient::from_env(world.rank(), world.size())) {
    if (!client_) return;
    set_phase(proto::PHASE_LOADING);
    watch_ = std::thread([this] {
      while (!quit_) {
        if (client_->stop_requested() || client_->lost()) return serve::Engine::request_drain();
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    });
  }
  ~ServeLink() {
    quit_ = true;
    if (watch_.joinable()) watch_.join();
    if (client_) set_phase(proto::PHASE_DONE);
  }
  void set_phase(proto::Phase p) {
    if (!client_) return;
    proto::Heartbeat hb;
    hb.set_phase(p);
    client_->publish(hb);
  }

 private:
  std::unique_ptr<ControlClient> client_;
  std::atomic<bool> quit_{false};
  std::thread watch_;
};

}  // namespace

int run_serve(const ServeOptions& o, comm::Communicator& world_in) {
  const Config cfg = serve_config(o);
  check_ranks(cfg.model(), world_in.size());
  const proto::ServingConfig& serving = cfg.serving();
  // a peer that stops answering fails the collectives after parallel.collective_timeout_s (never a hang)
  world_in.set_deadline(cfg.parallel().collective_timeout_s());
  // experts over every rank
  comm::Parallel par(world_in.split(0, world_in.rank()), world_in.size(), tensor_world(cfg));
  serve::EngineOptions eo;
  eo.serving = serving;
  serve::Engine engine(eo, par.world());
  DrainSignals signals;
  ServeLink link(par.world());
  std::unique_ptr<serve::HttpServer> http = start_http(engine, serving, par.world());
  if (http) engine.set_on_drain([h = http.get()] { h->stop_accepting(); });
  LoadOptions lo;
  lo.overrides = o.overrides;
  lo.ep = par.expert_group();
  lo.ep_rows = par.expert_rows_group();
  lo.inference = true;
  LoadedModel lm = load_for_inference(o.checkpoint, lo);
  if (par.rank() == 0)
    MOE_INFO("serve: " << lm.dir << " (step " << lm.manifest.step() << "), " << lm.model->params().numel()
                       << " parameters on rank 0, experts over " << par.size() << " rank(s)");
  engine.attach(*lm.model, lm.tok.get(), model_info(lm));
  if (par.rank() == 0)
    MOE_INFO("serve: ready: KV cache of " << engine.stats().kv_blocks_total << " blocks of " << serving.kv_block_size()
                                          << " positions over " << par.size() << " rank(s), step budget "
                                          << serving.max_batch_tokens() << " tokens, up to " << serving.max_running()
                                          << " running sequences");
  link.set_phase(proto::PHASE_SERVING);
  engine.run();
  if (http) {
    // the engine finished every request; let the last responses reach their clients
    if (!http->wait_in_flight(5.0)) MOE_WARN("serve: " << http->in_flight() << " response(s) still unsent at exit");
    http->stop();
  }
  return 0;
}

int run_generate(const GenerateOptions& o) {
  LoadOptions lo;
  lo.overrides = o.overrides;
  lo.inference = true;
  LoadedModel lm = load_for_inference(o.checkpoint, lo);
  const std::vector<int32_t> ids = lm.tok->encode(o.prompt);
  MOE_CHECK(!ids.empty(), "--prompt '" << o.prompt << "' encodes to no tokens");
  const int max_T = lm.cfg.model().max_seq_len();
  MOE_CHECK(static_cast<int>(ids.size()) < max_T,
            "--prompt has " << ids.size() << " tokens, model.max_seq_len is " << max_T);
  // one sequence: a KV cache of exactly max_seq_len positions
  comm::SelfCommunicator self;
  serve::EngineOptions eo;
  eo.serving = lm.cfg.serving();
  eo.serving.set_kv_cache_bytes(serve::serving_kv_dims(*lm.model, eo.serving, 1).block_bytes() *
                                ((max_T + eo.serving.kv_block_size() - 1) / eo.serving.kv_block_size()));
  serve::Engine engine(eo, self);
  engine.attach(*lm.model, lm.tok.get(), model_info(lm));
  const proto::GenerateConfig& g = lm.cfg.generate();
  serve::GenerationRequest req;
  req.prompt = ids;
  req.sampling.temperature = g.temperature();
  req.sampling.top_k = g.top_k();
  req.sampling.seed = g.seed();
  req.max_tokens = std::min<int>(g.max_new_tokens(), max_T - static_cast<int>(ids.size()));
  req.logprobs = 0;
  req.ignore_eos = true;
  const serve::Completion c = serve::generate(engine, std::move(req));
  std::vector<int32_t> all = ids;
  all.insert(all.end(), c.tokens.begin(), c.tokens.end());
  // decoded as one sequence: the continuation decoded alone would lose its leading space ("looked atthe")
  std::cout << lm.tok->decode(all) << std::endl;
  if (o.print_ids) {
    for (size_t i = 0; i < all.size(); ++i) std::cerr << (i ? " " : "") << all[i];
    std::cerr << std::endl;
    char buf[32];
    for (size_t i = 0; i < c.logprobs.size(); ++i) {
      std::snprintf(buf, sizeof buf, "%.9g", c.logprobs[i]);
      std::cerr << (i ? " " : "") << buf;
    }
    std::cerr << std::endl;
  }
  return 0;
}

}  // namespace moe::launcher
