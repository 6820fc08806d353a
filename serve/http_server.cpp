#include "serve/http_server.h"

#include <sys/stat.h>

// clang-format off
#include <utility>  // before any Boost.Asio header: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/config.h"
#include "core/data.h"
#include "core/error.h"
#include "core/log.h"
#include "serve/http_connection.h"
#include "serve/http_service.h"
#include "serve/openai.h"
#include "serve/openapi.h"
#include "serve/prometheus.h"

namespace moe::serve {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;
using Request = http::request<http::string_body>;
using Reply = HttpReply;

constexpr size_t kMaxTargetInMessage = 200;  // characters of a request target quoted in an error message

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// ---- metrics ----

// The metrics the server exports; engine counters and gauges are copied from EngineStats at each scrape, as is the
// count of open connections.
struct HttpMetrics {
  explicit HttpMetrics(prom::Registry& r);
  void update(const EngineStats& s, int open_connections);

  prom::ValueFamily& requests;
  prom::ValueFamily& connections;
  prom::ValueFamily& prompt_tokens;
  prom::ValueFamily& generation_tokens;
  prom::ValueFamily& steps;
  prom::ValueFamily& preemptions;
  prom::ValueFamily& waiting;
  prom::ValueFamily& running;
  prom::ValueFamily& kv_used;
  prom::ValueFamily& kv_free;
  prom::ValueFamily& expert_tokens;
  prom::Histogram& ttft;
  prom::Histogram& itl;
  prom::Histogram& duration;
};

std::vector<double> duration_buckets() {
  std::vector<double> b = prom::latency_buckets();
  b.insert(b.end(), {30, 60});
  return b;
}

HttpMetrics::HttpMetrics(prom::Registry& r)
    : requests(
          r.counter("moe_http_requests_total", "HTTP requests answered, by route and status code.", {"route", "code"})),
      connections(r.gauge("moe_http_connections", "Open HTTP connections.")),
      prompt_tokens(r.counter("moe_prompt_tokens_total", "Prompt tokens of finished and running requests.")),
      generation_tokens(r.counter("moe_generation_tokens_total", "Tokens generated.")),
      steps(r.counter("moe_engine_steps_total", "Engine steps run.")),
      preemptions(r.counter("moe_preemptions_total", "Sequences preempted (recomputed later) for want of KV blocks.")),
      waiting(r.gauge("moe_requests_waiting", "Requests waiting for their first engine step.")),
      running(r.gauge("moe_requests_running", "Sequences in the running batch.")),
      kv_used(r.gauge("moe_kv_blocks_used", "KV cache blocks in use, over all ranks.")),
      kv_free(r.gauge("moe_kv_blocks_free", "KV cache blocks free, over all ranks.")),
      expert_tokens(
          r.counter("moe_expert_tokens_total", "Tokens routed to each expert of each MoE layer.", {"layer", "expert"})),
      ttft(r.histogram("moe_time_to_first_token_seconds", "From the request received to its first token.",
                       prom::latency_buckets())),
      itl(r.histogram("moe_inter_token_latency_seconds", "Between consecutive tokens of a request.",
                      prom::latency_buckets())),
      duration(r.histogram("moe_request_duration_seconds", "From the request received to its last token.",
                           duration_buckets())) {}

void HttpMetrics::update(const EngineStats& s, int open_connections) {
  connections.set(double(open_connections));
  prompt_tokens.set(double(s.prompt_tokens));
  generation_tokens.set(double(s.generated_tokens));
  steps.set(double(s.steps));
  preemptions.set(double(s.preemptions));
  waiting.set(double(s.queue_depth));
  running.set(double(s.running));
  kv_used.set(double(s.kv_blocks_used));
  kv_free.set(double(s.kv_blocks_total - s.kv_blocks_used));
  for (size_t i = 0; i < s.expert_tokens.size(); ++i) {
    const std::string layer = std::to_string(i < s.moe_layers.size() ? s.moe_layers[i] : int(i));
    for (size_t e = 0; e < s.expert_tokens[i].size(); ++e)
      expert_tokens.set({layer, std::to_string(e)}, double(s.expert_tokens[i][e]));
  }
}

// ---- shared state ----

// Posts engine events to the I/O thread; after close() (the server stopped) they are dropped. Thread-safe.
class EventPoster {
 public:
  explicit EventPoster(net::io_context& ioc) : ioc_(&ioc) {}
  void post(std::function<void()> f) {
    std::lock_guard<std::mutex> lock(mu_);
    if (ioc_) net::post(*ioc_, std::move(f));
  }
  void close() {
    std::lock_guard<std::mutex> lock(mu_);
    ioc_ = nullptr;
  }

 private:
  std::mutex mu_;
  net::io_context* ioc_;
};

class Session;
class GenerationCall;

// What the connections and requests share; it lives as long as any of them. Fields without a comment are touched
// on the I/O thread only.
struct ServerCore {
  ServerCore(EngineApi& e, const HttpOptions& o, net::io_context& ioc, std::shared_ptr<ConnectionSet> c)
      : engine(e), opt(o), metrics(registry), poster(std::make_shared<EventPoster>(ioc)), connections(std::move(c)) {
    std::random_device rd;
    ids.seed((uint64_t(rd()) << 32) ^ rd());
    seeds.seed(opt.seed ? opt.seed : (uint64_t(rd()) << 32) ^ rd());
  }
  std::string new_id(const char* prefix) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%s%016llx%08llx", prefix, static_cast<unsigned long long>(ids()),
                  static_cast<unsigned long long>(ids() >> 32));
    return buf;
  }

  EngineApi& engine;
  const HttpOptions opt;
  prom::Registry registry;  // thread-safe
  HttpMetrics metrics;      // thread-safe
  std::shared_ptr<EventPoster> poster;
  std::atomic<int64_t> in_flight{0};
  std::atomic<bool> draining{false};
  std::shared_ptr<ConnectionSet> connections;  // the open connections
  std::unordered_map<GenerationCall*, std::weak_ptr<GenerationCall>> calls;
  std::mt19937_64 ids, seeds;
};

// The error reply of `e` (serve/http_connection.h) with the server's Retry-After.
Reply error_reply(const ApiError& e, const HttpOptions& opt) { return serve::error_reply(e, opt.retry_after_s); }

// ---- one connection ----

// One TCP connection: routes each request and writes the replies and streams of its generations. While a generation
// runs a read stays pending to notice the client going away.
class Session : public HttpConnection {
 public:
  Session(tcp::socket socket, std::shared_ptr<ServerCore> core, bool admitted)
      : HttpConnection(std::move(socket), core->connections, admitted), core_(std::move(core)) {}
  ~Session() override;
  std::shared_ptr<Session> self() { return std::static_pointer_cast<Session>(shared_from_this()); }
  Clock::time_point received() const { return received_; }

  // For the router and generation calls (the request being answered):
  void respond(const Reply& r, const std::string& route, std::function<void()> on_written = {});
  void begin_call(std::shared_ptr<GenerationCall> call);
  void start_stream(const std::string& route);  // 200 text/event-stream, chunked
  void stream_data(const std::string& data);
  void end_stream(std::function<void()> on_written);

 private:
  void on_request(Request req) override;
  void on_closed() override;  // cancels its generation
  void on_response_end() override { call_.reset(); }
  bool keep_serving() const override { return !core_->draining; }
  void reply_refusal(const Reply& r, std::string_view target) override;

  std::shared_ptr<ServerCore> core_;
  std::shared_ptr<GenerationCall> call_;
  bool chunked_ = true;
  Clock::time_point received_;
};

// ---- one generation request ----

// One API request being generated: its choices' engine requests, and the response assembled from their events
// (written to the session while it is open). Lives until the engine has finished every choice it accepted; keeps
// its session alive until the response is written or the client is gone.
class GenerationCall : public std::enable_shared_from_this<GenerationCall> {
 public:
  GenerationCall(std::shared_ptr<ServerCore> core, std::shared_ptr<Session> session, const ParsedRequest& req,
                 ResponseMeta meta, std::string route, Clock::time_point received);
  // Submits every choice; on the first refusal the accepted ones are cancelled and the refusal returned.
  SubmitStatus submit(std::vector<GenerationRequest> choices);
  void begin();  // streaming: the SSE head and the first chunks
  void on_token(int choice, const TokenEvent& ev, Clock::time_point t);
  void on_finish(int choice, const FinishEvent& ev, Clock::time_point t);
  void client_gone();  // the connection closed: cancel the choices still running
  void abandon();      // the server stops: cancel, and stop counting it in flight

 private:
  void complete();  // every choice finished (or the request failed): the response's end
  void fail_internal(const std::string& what);
  void response_written();
  void maybe_release();
  Session* live_session() const { return session_ && session_->open() ? session_.get() : nullptr; }

  std::shared_ptr<ServerCore> core_;
  std::shared_ptr<Session> session_;  // reset once the response is written or the client is gone
  bool stream_;
  ResponseAssembler assembler_;
  std::string route_;
  Clock::time_point received_;
  std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
  std::vector<Clock::time_point> last_token_;
  std::vector<bool> got_token_;
  int accepted_ = 0, finished_ = 0;
  bool completed_ = false, response_done_ = false, released_ = false, registered_ = false;
};

// The sink of one choice: forwards the engine's events to the I/O thread (never blocks the engine).
class ChoiceSink : public RequestSink {
 public:
  ChoiceSink(std::shared_ptr<EventPoster> poster, std::shared_ptr<GenerationCall> call, int choice,
             std::shared_ptr<std::atomic<bool>> cancelled)
      : poster_(std::move(poster)), call_(std::move(call)), choice_(choice), cancelled_(std::move(cancelled)) {}
  void on_token(const TokenEvent& ev) override {
    poster_->post([call = call_, i = choice_, ev, t = Clock::now()] { call->on_token(i, ev, t); });
  }
  void on_finish(const FinishEvent& ev) override {
    poster_->post([call = call_, i = choice_, ev, t = Clock::now()] { call->on_finish(i, ev, t); });
  }
  bool cancelled() const override { return cancelled_->load(); }

 private:
  std::shared_ptr<EventPoster> poster_;
  std::shared_ptr<GenerationCall> call_;
  int choice_;
  std::shared_ptr<std::atomic<bool>> cancelled_;
};

GenerationCall::GenerationCall(std::shared_ptr<ServerCore> core, std::shared_ptr<Session> session,
                               const ParsedRequest& req, ResponseMeta meta, std::string route,
                               Clock::time_point received)
    : core_(std::move(core)),
      session_(std::move(session)),
      stream_(req.stream),
      assembler_(req, std::move(meta), core_->engine.tokenizer()),
      route_(std::move(route)),
      received_(received),
      last_token_(req.choices.size()),
      got_token_(req.choices.size(), false) {}

SubmitStatus GenerationCall::submit(std::vector<GenerationRequest> choices) {
  ++core_->in_flight;
  core_->calls[this] = weak_from_this();
  registered_ = true;
  SubmitStatus status = SubmitStatus::kAccepted;
  try {
    for (size_t i = 0; i < choices.size() && status == SubmitStatus::kAccepted; ++i) {
      auto sink = std::make_shared<ChoiceSink>(core_->poster, shared_from_this(), int(i), cancelled_);
      status = core_->engine.submit(std::move(choices[i]), std::move(sink));
      if (status == SubmitStatus::kAccepted) ++accepted_;
    }
  } catch (...) {  // the router answers 500; the choices already accepted are cancelled
    client_gone();
    throw;
  }
  if (status != SubmitStatus::kAccepted) client_gone();  // the router answers the refusal
  return status;
}

void GenerationCall::begin() {
  if (!stream_) return;
  Session* s = live_session();
  if (!s) return client_gone();
  s->start_stream(route_);
  const std::string first = assembler_.stream_start();
  if (!first.empty()) s->stream_data(first);
}

void GenerationCall::on_token(int choice, const TokenEvent& ev, Clock::time_point t) {
  if (got_token_[choice])
    core_->metrics.itl.observe(seconds(t - last_token_[choice]));
  else
    core_->metrics.ttft.observe(seconds(t - received_));
  got_token_[choice] = true;
  last_token_[choice] = t;
  if (completed_) return;
  try {
    const std::string bytes = assembler_.on_token(choice, ev);
    Session* s = live_session();
    if (!s) return client_gone();
    if (!bytes.empty()) s->stream_data(bytes);
  } catch (const std::exception& e) {
    fail_internal(e.what());
  }
}

void GenerationCall::on_finish(int choice, const FinishEvent& ev, Clock::time_point t) {
  ++finished_;
  if (ev.reason != "abort") core_->metrics.duration.observe(seconds(t - received_));
  if (!completed_) {
    try {
      const std::string bytes = assembler_.on_finish(choice, ev);
      Session* s = live_session();
      if (!s) {
        client_gone();
      } else {
        if (!bytes.empty()) s->stream_data(bytes);
        if (assembler_.finished()) complete();
      }
    } catch (const std::exception& e) {
      fail_internal(e.what());
    }
  }
  maybe_release();
}

void GenerationCall::complete() {
  completed_ = true;
  if (assembler_.failed()) cancelled_->store(true);  // the other choices are not needed any more
  Session* s = live_session();
  if (!s) return client_gone();
  auto self = shared_from_this();
  if (stream_) return s->end_stream([self] { self->response_written(); });
  const Reply r =
      assembler_.failed() ? error_reply(assembler_.error(), core_->opt) : json_reply(200, assembler_.response_json());
  s->respond(r, route_, [self] { self->response_written(); });
}

void GenerationCall::fail_internal(const std::string& what) {
  MOE_WARN("http: a request failed while writing its response: " << what);
  completed_ = true;
  cancelled_->store(true);
  Session* s = live_session();
  if (!s) return client_gone();
  const ApiError e{500, "internal error while writing the response: " + what, "", "internal_error"};
  auto self = shared_from_this();
  if (stream_) {
    s->stream_data(sse_event(error_json(e)) + kSseDone);
    return s->end_stream([self] { self->response_written(); });
  }
  s->respond(error_reply(e, core_->opt), route_, [self] { self->response_written(); });
}

void GenerationCall::client_gone() {
  cancelled_->store(true);
  completed_ = response_done_ = true;
  session_.reset();
  maybe_release();
}

void GenerationCall::abandon() {
  cancelled_->store(true);
  completed_ = response_done_ = true;
  session_.reset();
  finished_ = accepted_;  // no more events will come (the server stops)
  maybe_release();
}

void GenerationCall::response_written() {
  response_done_ = true;
  session_.reset();
  maybe_release();
}

void GenerationCall::maybe_release() {
  if (released_ || !response_done_ || finished_ < accepted_) return;
  released_ = true;
  --core_->in_flight;
  if (registered_) core_->calls.erase(this);
}

// ---- routing ----

struct Route {
  const char* path;
  http::verb method;
};
constexpr Route kRoutes[] = {{"/health", http::verb::get},          {"/v1/models", http::verb::get},
                             {"/metrics", http::verb::get},         {"/openapi.json", http::verb::get},
                             {"/v1/completions", http::verb::post}, {"/v1/chat/completions", http::verb::post}};

const Route* find_route(std::string_view path) {
  for (const Route& r : kRoutes)
    if (path == r.path) return &r;
  return nullptr;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n'))
    s.remove_suffix(1);
  return s;
}

// Answers one request: a Reply, or nothing when a generation was started (it answers through the session).
class Router {
 public:
  explicit Router(std::shared_ptr<ServerCore> core) : core_ptr_(std::move(core)), core_(*core_ptr_) {}
  std::optional<Reply> route(const Request& req, Session& s);

 private:
  bool authorized(const Request& req, std::string& why) const;
  Reply health() const;
  Reply metrics() const;
  Reply openapi() const;
  Reply unavailable() const;
  std::optional<Reply> generate(ApiKind kind, const Request& req, Session& s, const std::string& route);
  ApiError error(int status, std::string message, std::string code = "") const {
    return ApiError{status, std::move(message), "", std::move(code)};
  }
  std::shared_ptr<ServerCore> core_ptr_;
  ServerCore& core_;
};

bool Router::authorized(const Request& req, std::string& why) const {
  if (core_.opt.api_key.empty()) return true;
  const auto it = req.find(http::field::authorization);
  if (it == req.end()) {
    why = "Missing API key: send the header 'Authorization: Bearer <key>'";
    return false;
  }
  const std::string_view v = trim(std::string_view(it->value().data(), it->value().size()));
  const bool bearer = v.size() > 7 && beast::iequals(beast::string_view(v.data(), 7), "Bearer ");
  const bool ok = constant_time_equal(bearer ? trim(v.substr(7)) : std::string_view(), core_.opt.api_key);
  if (!ok) why = bearer ? "Incorrect API key provided" : "The Authorization header must be 'Bearer <key>'";
  return ok && bearer;
}

Reply Router::health() const {
  if (core_.draining) {
    Reply r = json_reply(503, R"({"status":"draining"})");
    r.headers.emplace_back("Retry-After", std::to_string(core_.opt.retry_after_s));
    r.close = true;
    return r;
  }
  if (core_.engine.ready()) return json_reply(200, R"({"status":"ok"})");
  Reply r = json_reply(503, R"({"status":"loading"})");
  r.headers.emplace_back("Retry-After", std::to_string(core_.opt.retry_after_s));
  return r;
}

Reply Router::metrics() const {
  core_.metrics.update(core_.engine.stats(), core_.connections->admitted());
  Reply r = json_reply(200, core_.registry.text());
  r.content_type = prom::kContentType;
  return r;
}

Reply Router::openapi() const {
  OpenApiOptions o;
  o.auth = !core_.opt.api_key.empty();
  if (core_.engine.ready()) {
    const ModelInfo info = core_.engine.info();
    o.model_name = info.name;
    o.max_seq_len = info.max_seq_len;
    o.vocab_size = info.vocab_size;
    o.head_dim = info.head_dim;
  }
  return json_reply(200, openapi_json(o));
}

Reply Router::unavailable() const {
  if (core_.draining) {
    Reply r = error_reply(error(503, "the server is shutting down; retry on another replica", "draining"), core_.opt);
    r.close = true;
    return r;
  }
  return error_reply(error(503, "the model is still loading; retry in a moment", "model_loading"), core_.opt);
}

std::optional<Reply> Router::route(const Request& req, Session& s) {
  const std::string_view target(req.target().data(), req.target().size());
  const std::string_view path = target.substr(0, target.find('?'));
  const Route* r = find_route(path);
  const bool is_health = r && std::string_view(r->path) == "/health";
  if (core_.draining && !(is_health && req.method() == r->method)) return unavailable();
  std::string why;
  if (!is_health && !authorized(req, why)) return error_reply(error(401, why, "invalid_api_key"), core_.opt);
  const std::string method(req.method_string().data(), req.method_string().size());
  if (!r) {
    const std::string shown = utf8_sanitize(std::string(target.substr(0, kMaxTargetInMessage)));
    const char* routes = "/health, /v1/models, /metrics, /openapi.json, /v1/completions and /v1/chat/completions";
    return error_reply(error(404, "Invalid URL (" + method + " " + shown + "): the routes are " + routes), core_.opt);
  }
  if (req.method() != r->method) {
    const std::string allowed(http::to_string(r->method));
    Reply e = error_reply(
        error(405, "Method " + method + " is not allowed on " + r->path + " (allowed: " + allowed + ")"), core_.opt);
    e.headers.emplace_back("Allow", allowed);
    return e;
  }
  if (is_health) return health();
  if (path == "/metrics") return metrics();
  if (path == "/openapi.json") return openapi();
  if (!core_.engine.ready()) return unavailable();
  if (path == "/v1/models") return json_reply(200, models_json(core_.engine.info()));
  return generate(path == "/v1/completions" ? ApiKind::kCompletion : ApiKind::kChat, req, s, r->path);
}

std::optional<Reply> Router::generate(ApiKind kind, const Request& req, Session& s, const std::string& route) {
  ParseContext ctx{core_.engine.info(), &core_.engine.tokenizer(), core_.seeds()};
  ParsedRequest pr;
  try {
    pr = kind == ApiKind::kChat ? parse_chat_request(req.body(), ctx) : parse_completion_request(req.body(), ctx);
  } catch (const RequestError& e) {
    return error_reply(e.error(), core_.opt);
  }
  const ResponseMeta meta{core_.new_id(kind == ApiKind::kChat ? "chatcmpl-" : "cmpl-"), int64_t(std::time(nullptr)),
                          pr.model};
  auto call = std::make_shared<GenerationCall>(core_ptr_, s.self(), pr, meta, route, s.received());
  const SubmitStatus st = call->submit(std::move(pr.choices));
  if (st == SubmitStatus::kQueueFull) {
    return error_reply(
        error(429, "the engine's queue is full; retry after " + std::to_string(core_.opt.retry_after_s) + " s",
              "queue_full"),
        core_.opt);
  }
  if (st == SubmitStatus::kShuttingDown) {
    Reply r = error_reply(error(503, "the server is shutting down; retry on another replica", "draining"), core_.opt);
    r.close = true;
    return r;
  }
  if (st == SubmitStatus::kNotReady) return unavailable();
  s.begin_call(call);
  call->begin();
  return std::nullopt;
}

// ---- Session ----

// The route label of a request target in the metrics: a route's path, or "other" (bounded label values).
std::string route_label(std::string_view target) {
  const Route* r = find_route(target.substr(0, target.find('?')));
  return r ? r->path : "other";
}

Session::~Session() {
  if (open() && call_) call_->client_gone();
}

void Session::on_closed() {
  if (auto call = std::move(call_)) call->client_gone();
}

void Session::on_request(Request req) {
  received_ = Clock::now();
  const std::string label = route_label(std::string_view(req.target().data(), req.target().size()));
  std::optional<Reply> r;
  try {
    r = Router(core_).route(req, *this);
  } catch (const std::exception& ex) {
    MOE_WARN("http: " << req.method_string() << " " << req.target() << " failed: " << ex.what());
    r = error_reply(ApiError{500, std::string("internal error: ") + ex.what(), "", "internal_error"}, core_->opt);
  }
  if (r) respond(*r, label);
}

void Session::reply_refusal(const Reply& r, std::string_view target) { respond(r, route_label(target)); }

void Session::respond(const Reply& r, const std::string& route, std::function<void()> on_written) {
  if (!open()) return;
  core_->metrics.requests.inc({route, std::to_string(r.status)});
  reply(r, std::move(on_written));
}

void Session::begin_call(std::shared_ptr<GenerationCall> call) {
  call_ = std::move(call);
  watch_client();
}

void Session::start_stream(const std::string& route) {
  core_->metrics.requests.inc({route, "200"});
  chunked_ = version() >= 11;
  http::response<http::empty_body> res{http::status::ok, version()};
  res.set(http::field::server, options().server);
  res.set(http::field::content_type, "text/event-stream");
  res.set(http::field::cache_control, "no-cache");
  res.set("X-Accel-Buffering", "no");
  res.keep_alive(chunked_ && keep_alive());
  if (chunked_) res.chunked(true);
  std::ostringstream os;
  os << res.base();
  send(os.str());
}

void Session::stream_data(const std::string& data) {
  if (data.empty()) return;
  if (!chunked_) return send(data);
  char size[20];
  std::snprintf(size, sizeof size, "%zx\r\n", data.size());
  send(size + data + "\r\n");
}

void Session::end_stream(std::function<void()> on_written) {
  if (chunked_) send("0\r\n\r\n");
  end_response(!chunked_, std::move(on_written));
}

// The connections' side of the options.
ConnectionOptions connection_options(const HttpOptions& o) {
  ConnectionOptions c;
  c.server = "moe";
  c.max_connections = o.max_connections;
  c.refuse_over_limit = true;
  c.retry_after_s = o.retry_after_s;
  c.max_body_bytes = o.max_body_bytes;
  c.max_header_bytes = o.max_header_bytes;
  c.request_timeout_s = o.request_timeout_s;
  c.request_timeout_name = "request_timeout_s";
  c.idle_timeout_s = o.idle_timeout_s;
  return c;
}

}  // namespace

// ---- HttpServer ----

class HttpServer::Impl {
 public:
  Impl(EngineApi& engine, const HttpOptions& opt)
      : service_({"http", "HttpServer", ""}, connection_options(opt)),
        core_(std::make_shared<ServerCore>(engine, opt, service_.ioc(), service_.connections())) {
    service_.listen(opt.host, opt.port, [core = core_](tcp::socket socket, bool admitted) {
      std::make_shared<Session>(std::move(socket), core, admitted)->start();
    });
  }
  ~Impl() { stop(); }
  int port() const { return service_.port(); }
  void start();
  void stop_accepting();
  void stop();
  int64_t in_flight() const { return core_->in_flight.load(); }

 private:
  HttpService service_;
  std::shared_ptr<ServerCore> core_;
};

void HttpServer::Impl::start() {
  if (!service_.start()) return;
  MOE_DEBUG("http: listening on http://" << core_->opt.host << ":" << port()
                                         << (core_->opt.api_key.empty() ? " (no API key)" : " (API key required)"));
}

void HttpServer::Impl::stop_accepting() {
  core_->draining = true;
  service_.stop_accepting();
}

// After every connection closed, the generations still running are abandoned (the engine's events are dropped).
void HttpServer::Impl::stop() {
  core_->poster->close();
  service_.stop([core = core_] {
    std::vector<std::shared_ptr<GenerationCall>> calls;
    for (auto& [p, w] : core->calls)
      if (auto c = w.lock()) calls.push_back(std::move(c));
    for (auto& c : calls) c->abandon();
  });
}

HttpServer::HttpServer(EngineApi& engine, const HttpOptions& opt) : impl_(std::make_unique<Impl>(engine, opt)) {}
HttpServer::~HttpServer() = default;
int HttpServer::port() const { return impl_->port(); }
void HttpServer::start() { impl_->start(); }
void HttpServer::stop_accepting() { impl_->stop_accepting(); }
void HttpServer::stop() { impl_->stop(); }
int64_t HttpServer::in_flight() const { return impl_->in_flight(); }

bool HttpServer::wait_in_flight(double timeout_s) const {
  const auto deadline =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  while (in_flight() > 0 && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  return in_flight() == 0;
}

HttpOptions http_options(const proto::ServingConfig& cfg, const std::string& api_key) {
  HttpOptions o;
  o.host = cfg.host();
  o.port = cfg.port();
  o.api_key = api_key;
  o.max_connections = cfg.max_connections();
  o.max_body_bytes = cfg.max_body_bytes();
  o.request_timeout_s = cfg.request_timeout_s();
  o.idle_timeout_s = cfg.idle_timeout_s();
  o.seed = cfg.seed();
  return o;
}

std::string read_api_key_file(const std::string& path) {
  std::ifstream f(path);
  MOE_CHECK(f.good(), "cannot read the API key file '" << path << "'");
  std::string line;
  std::getline(f, line);
  const std::string key(trim(line));
  MOE_CHECK(!key.empty(), "the API key file '" << path << "' is empty (its first line must be the key)");
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && (st.st_mode & (S_IRGRP | S_IROTH))) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%03o", static_cast<unsigned>(st.st_mode & 0777));
    MOE_WARN("the API key file '" << path << "' is readable by group or others (mode " << mode << "); chmod 600 it");
  }
  return key;
}

bool constant_time_equal(std::string_view a, std::string_view b) {
  // Every byte of the longer string is visited whatever the contents; the length mismatch is folded in at the end.
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = a.size() == b.size() ? 0u : 1u;
  for (size_t i = 0; i < n; ++i) {
    const unsigned x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0u;
    const unsigned y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0u;
    diff |= x ^ y;
  }
  return diff == 0;
}

}  // namespace moe::serve
