// serve/http_server.h end to end over real TCP sockets on 127.0.0.1, against ScriptedEngine: a test double of the
// engine (it only tests the HTTP layer in isolation; the real engine is tested elsewhere) whose requests
// "generate" scripted texts on its own thread, polling cancelled() before each token as the engine does.
#include <gtest/gtest.h>
#include <sys/stat.h>

// clang-format off
#include <utility>  // before any Boost.Asio header: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <mutex>
#include <thread>

#include "core/data.h"
#include "core/json.h"
#include "serve/http_server.h"
#include "tests/unit/http_test_client.h"
#include "tests/unit/oracle.h"
#include "tests/unit/serve_helpers.h"

namespace moe::test {
namespace {

using serve::SubmitStatus;
using namespace std::chrono_literals;

// ---- the engine test double ----

// Every request emits script[0], script[1], ... (one token each, logprob -0.5) up to max_tokens, then finishes
// "stop" ("length" when max_tokens ran out first); `hold` keeps every request emitting until it is cancelled.
// Cancelled requests finish "abort". One token per 2 ms per request, on the double's own thread.
class ScriptedEngine : public serve::EngineApi {
 public:
  ScriptedEngine() : thread_([this] { run(); }) {
    info_.name = "moe-test";
    info_.max_seq_len = 64;
    info_.vocab_size = serve_tokenizer().vocab_size();
    info_.created = 1700000000;
  }
  ~ScriptedEngine() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  SubmitStatus submit(serve::GenerationRequest req, std::shared_ptr<serve::RequestSink> sink) override {
    if (throw_on_submit) throw Error("scripted submit failure", __FILE__, __LINE__);
    if (status != SubmitStatus::kAccepted) return status;
    std::lock_guard<std::mutex> lock(mu_);
    last_ = req;
    active_.push_back({std::move(req), std::move(sink), 0});
    ++submitted_;
    cv_.notify_all();
    return SubmitStatus::kAccepted;
  }
  bool ready() const override { return is_ready; }
  serve::EngineStats stats() const override {
    serve::EngineStats s;
    s.queue_depth = 2;
    s.running = 3;
    s.kv_blocks_total = 100;
    s.kv_blocks_used = 40;
    s.preemptions = 1;
    s.prompt_tokens = 50;
    s.generated_tokens = 60;
    s.steps = 70;
    s.moe_layers = {1, 3};
    s.expert_tokens = {{5, 6}, {7, 8}};
    return s;
  }
  serve::ModelInfo info() const override { return info_; }
  const Tokenizer& tokenizer() const override { return serve_tokenizer(); }

  int submitted() const {
    std::lock_guard<std::mutex> lock(mu_);
    return submitted_;
  }
  serve::GenerationRequest last_request() const {
    std::lock_guard<std::mutex> lock(mu_);
    return last_;
  }
  // Waits (up to 5 s) until `n` requests have finished "abort".
  bool wait_aborted(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, 5s, [&] { return aborted_ >= n; });
  }

  std::atomic<bool> is_ready{true};
  std::atomic<bool> hold{false};
  std::atomic<bool> throw_on_submit{false};
  std::atomic<bool> fail_after_first{false};  // finish "abort" with an engine error after one token
  std::atomic<SubmitStatus> status{SubmitStatus::kAccepted};
  const std::vector<std::string> script = {"Good", " morrow", ",", " cousin"};

 private:
  struct Active {
    serve::GenerationRequest req;
    std::shared_ptr<serve::RequestSink> sink;
    int emitted;
  };
  // One token (or the finish) of a request; true when it finished.
  bool step(Active& a) {
    serve::FinishEvent fin;
    fin.usage = {int(a.req.prompt.size()), a.emitted};
    if (a.sink->cancelled()) {
      fin.reason = "abort";
    } else if (fail_after_first && a.emitted == 1) {
      fin.reason = "abort";
      fin.error = "scripted engine failure";
    } else if (a.emitted < a.req.max_tokens && (hold || a.emitted < int(script.size()))) {
      serve::TokenEvent ev;
      ev.token = 10 + a.emitted % 20;
      ev.text = script[a.emitted % script.size()];
      ev.logprob = -0.5;
      for (int k = 0; k < a.req.logprobs; ++k) ev.top.push_back({40 + k, -1.0 - k});
      a.sink->on_token(ev);
      ++a.emitted;
      return false;
    } else {
      fin.reason = a.emitted >= a.req.max_tokens ? "length" : "stop";
    }
    a.sink->on_finish(fin);
    return true;
  }
  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!quit_) {
      cv_.wait_for(lock, 2ms);
      for (auto it = active_.begin(); it != active_.end();) {
        const bool done = step(*it);
        if (done && it->sink->cancelled()) ++aborted_;
        it = done ? active_.erase(it) : std::next(it);
      }
      cv_.notify_all();
    }
  }

  serve::ModelInfo info_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Active> active_;
  serve::GenerationRequest last_;
  int submitted_ = 0, aborted_ = 0;
  bool quit_ = false;
  std::thread thread_;
};

// A server on an ephemeral port around a ScriptedEngine.
struct Served {
  explicit Served(serve::HttpOptions o = {}) : opt(with_port0(o)), server(engine, opt) { server.start(); }
  static serve::HttpOptions with_port0(serve::HttpOptions o) {
    o.port = 0;
    o.seed = 42;
    return o;
  }
  Client client() { return Client(server.port()); }
  ScriptedEngine engine;
  serve::HttpOptions opt;
  serve::HttpServer server;
};

const char* kCompletion = R"({"prompt": "ROMEO:", "max_tokens": 8})";

// A POST request's bytes, written by hand (Content-Length from the body).
std::string raw_post(const std::string& target, const std::string& body) {
  return "POST " + target + " HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" +
         body;
}

TEST(HttpServer, HealthFollowsReadinessAndDraining) {
  Served s;
  s.engine.is_ready = false;
  Client c = s.client();
  Response r = c.get("/health");
  EXPECT_EQ(r.result_int(), 503);
  EXPECT_EQ(json_of(r).field("status")->str, "loading");
  EXPECT_EQ(r[http::field::retry_after], "1");
  EXPECT_EQ(r[http::field::content_type], "application/json");
  r = c.post("/v1/completions", kCompletion);  // not ready: generation refused too
  EXPECT_EQ(r.result_int(), 503);
  EXPECT_EQ(r[http::field::retry_after], "1");
  s.engine.is_ready = true;
  r = c.get("/health");
  EXPECT_EQ(r.result_int(), 200);
  EXPECT_EQ(json_of(r).field("status")->str, "ok");
  s.server.stop_accepting();
  r = c.get("/health");
  EXPECT_EQ(r.result_int(), 503);
  EXPECT_EQ(json_of(r).field("status")->str, "draining");
  EXPECT_TRUE(c.closed_by_server());  // draining: Connection: close
  beast::error_code ec;
  EXPECT_TRUE(eventually([&] {
    net::io_context ioc;
    tcp::socket sock(ioc);
    sock.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), s.server.port()), ec);
    return bool(ec);  // the listener is closed: connections are refused
  }));
}

TEST(HttpServer, ModelsMetricsOpenApiAndUnknownRoutes) {
  Served s;
  Client c = s.client();
  Response r = c.get("/v1/models");
  ASSERT_EQ(r.result_int(), 200);
  const JsonValue m = json_of(r);
  EXPECT_EQ(m.field("object")->str, "list");
  EXPECT_EQ(m.field("data")->array.at(0).field("id")->str, "moe-test");
  EXPECT_EQ(m.field("data")->array.at(0).field("max_model_len")->num, 64u);

  r = c.get("/openapi.json");
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_EQ(json_of(r).field("openapi")->str, "3.0.3");

  r = c.get("/v1/nothing?x=1");
  EXPECT_EQ(r.result_int(), 404);
  EXPECT_NE(error_message(r).find("Invalid URL (GET /v1/nothing?x=1)"), std::string::npos);
  EXPECT_EQ(r[http::field::content_type], "application/json");
  r = c.get("/v1/completions");
  EXPECT_EQ(r.result_int(), 405);
  EXPECT_EQ(r[http::field::allow], "POST");
  EXPECT_NE(error_message(r).find("Method GET is not allowed on /v1/completions"), std::string::npos);
  r = c.post("/health", "{}");
  EXPECT_EQ(r.result_int(), 405);
  EXPECT_EQ(r[http::field::allow], "GET");

  ASSERT_EQ(c.post("/v1/completions", kCompletion).result_int(), 200);
  r = c.get("/metrics");
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_EQ(r[http::field::content_type], "text/plain; version=0.0.4; charset=utf-8");
  const std::string& t = r.body();
  for (const char* line :
       {"moe_http_requests_total{route=\"/v1/completions\",code=\"200\"} 1\n",
        "moe_http_requests_total{route=\"/v1/completions\",code=\"405\"} 1\n",
        "moe_http_requests_total{route=\"other\",code=\"404\"} 1\n", "moe_http_connections 1\n",
        "moe_prompt_tokens_total 50\n", "moe_generation_tokens_total 60\n", "moe_engine_steps_total 70\n",
        "moe_preemptions_total 1\n", "moe_requests_waiting 2\n", "moe_requests_running 3\n", "moe_kv_blocks_used 40\n",
        "moe_kv_blocks_free 60\n", "moe_expert_tokens_total{layer=\"3\",expert=\"1\"} 8\n",
        "# TYPE moe_time_to_first_token_seconds histogram\n", "moe_time_to_first_token_seconds_count 1\n",
        "moe_inter_token_latency_seconds_count 3\n", "moe_request_duration_seconds_count 1\n",
        "moe_request_duration_seconds_bucket{le=\"+Inf\"} 1\n"}) {
    EXPECT_NE(t.find(line), std::string::npos) << line << "\n" << t;
  }
}

TEST(HttpServer, ApiKeyAuth) {
  serve::HttpOptions o;
  o.api_key = "sk-secret";
  Served s(o);
  Client c = s.client();
  EXPECT_EQ(c.get("/health").result_int(), 200);  // always open
  Response r = c.get("/v1/models");
  EXPECT_EQ(r.result_int(), 401);
  EXPECT_EQ(r[http::field::www_authenticate], "Bearer");
  const JsonValue e = json_of(r);
  EXPECT_EQ(e.field("error")->field("type")->str, "authentication_error");
  EXPECT_EQ(e.field("error")->field("code")->str, "invalid_api_key");
  EXPECT_NE(error_message(r).find("Missing API key"), std::string::npos);
  for (const char* bad :
       {"Bearer sk-secreT", "Bearer sk-secret2", "Bearer sk", "Bearer ", "sk-secret", "Basic sk-secret"}) {
    r = c.get("/v1/models", {{"Authorization", bad}});
    EXPECT_EQ(r.result_int(), 401) << bad;
  }
  EXPECT_EQ(c.post("/v1/completions", kCompletion).result_int(), 401);
  EXPECT_EQ(c.get("/nothing").result_int(), 401);  // no route is revealed without the key
  EXPECT_EQ(c.get("/metrics").result_int(), 401);
  r = c.get("/v1/models", {{"Authorization", "Bearer sk-secret"}});
  EXPECT_EQ(r.result_int(), 200);
  r = c.post("/v1/completions", kCompletion, {{"Authorization", "bearer  sk-secret "}});
  EXPECT_EQ(r.result_int(), 200);
  const JsonValue doc = json_of(c.get("/openapi.json", {{"Authorization", "Bearer sk-secret"}}));
  EXPECT_NE(doc.field("security"), nullptr);

  EXPECT_TRUE(serve::constant_time_equal("abc", "abc"));
  EXPECT_TRUE(serve::constant_time_equal("", ""));
  EXPECT_FALSE(serve::constant_time_equal("abc", "abd"));
  EXPECT_FALSE(serve::constant_time_equal("abc", "abcd"));
  EXPECT_FALSE(serve::constant_time_equal("abc", ""));
  EXPECT_FALSE(serve::constant_time_equal(std::string_view("a\0b", 3), std::string_view("a", 1)));
}

TEST(HttpServer, CompletionsChatAndKeepAlive) {
  Served s;
  Client c = s.client();
  for (int i = 0; i < 3; ++i) {  // one connection, three requests
    Response r = c.post("/v1/completions", kCompletion);
    ASSERT_EQ(r.result_int(), 200) << r.body();
    EXPECT_TRUE(r.keep_alive());
    const JsonValue v = json_of(r);
    EXPECT_EQ(v.field("object")->str, "text_completion");
    EXPECT_EQ(v.field("id")->str.rfind("cmpl-", 0), 0u);
    EXPECT_EQ(v.field("model")->str, "moe-test");
    EXPECT_EQ(v.field("choices")->array.at(0).field("text")->str, "Good morrow, cousin");
    EXPECT_EQ(v.field("choices")->array.at(0).field("finish_reason")->str, "stop");
    EXPECT_EQ(v.field("usage")->field("completion_tokens")->num, 4u);
  }
  Response r = c.post("/v1/completions", R"({"prompt": "ROMEO:", "max_tokens": 2, "seed": 9})");
  EXPECT_EQ(json_of(r).field("choices")->array.at(0).field("finish_reason")->str, "length");
  EXPECT_EQ(s.engine.last_request().sampling.seed, 9u);
  EXPECT_EQ(s.engine.last_request().prompt, serve_tokenizer().encode("ROMEO:"));
  r = c.post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "Hail"}], "n": 2})");
  ASSERT_EQ(r.result_int(), 200) << r.body();
  const JsonValue v = json_of(r);
  EXPECT_EQ(v.field("object")->str, "chat.completion");
  ASSERT_EQ(v.field("choices")->array.size(), 2u);
  EXPECT_EQ(v.field("choices")->array[1].field("message")->field("content")->str, "Good morrow, cousin");
  EXPECT_EQ(s.engine.last_request().stop, std::vector<std::string>{"\n\n"});
  EXPECT_EQ(s.engine.last_request().prompt, serve_tokenizer().encode("USER:\nHail\n\nASSISTANT:\n"));
  EXPECT_TRUE(eventually([&] { return s.server.in_flight() == 0; }));  // once the server's write completed
}

TEST(HttpServer, ValidationErrorsKeepTheConnection) {
  Served s;
  Client c = s.client();
  Response r = c.post("/v1/completions", R"({"prompt": "x", "temperature": 9})");
  EXPECT_EQ(r.result_int(), 400);
  EXPECT_EQ(json_of(r).field("error")->field("param")->str, "temperature");
  r = c.post("/v1/completions", R"({"prompt": "x", "model": "nope"})");
  EXPECT_EQ(r.result_int(), 404);
  EXPECT_EQ(json_of(r).field("error")->field("code")->str, "model_not_found");
  r = c.post("/v1/chat/completions", "{not json");
  EXPECT_EQ(r.result_int(), 400);
  EXPECT_NE(error_message(r).find("could not parse the JSON body"), std::string::npos);
  EXPECT_EQ(c.post("/v1/completions", kCompletion).result_int(), 200);  // the same connection still serves
  EXPECT_EQ(s.engine.submitted(), 1);                                   // nothing invalid reached the engine
}

TEST(HttpServer, PipelinedRequestsAreAnsweredInOrder) {
  Served s;
  Client c = s.client();
  const std::string gen = raw_post("/v1/completions", R"({"prompt": "ROMEO:", "max_tokens": 2})");
  const std::string stream = raw_post("/v1/completions", R"({"prompt": "ROMEO:", "max_tokens": 2, "stream": true})");
  c.write_raw(gen + "GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + stream + gen);  // one write, four requests
  Response r = c.read();
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_EQ(json_of(r).field("choices")->array.at(0).field("text")->str, "Good morrow");
  r = c.read();
  EXPECT_EQ(json_of(r).field("status")->str, "ok");
  r = c.read();
  EXPECT_EQ(r[http::field::content_type], "text/event-stream");
  EXPECT_EQ(r.body().substr(r.body().size() - 14), "data: [DONE]\n\n");
  r = c.read();
  EXPECT_EQ(json_of(r).field("usage")->field("completion_tokens")->num, 2u);
  EXPECT_EQ(s.engine.submitted(), 3);
}

TEST(HttpServer, StreamingFramesEndWithDone) {
  Served s;
  Client c = s.client();
  Response r = c.post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "Hail"}], "stream": true,
                                                   "stream_options": {"include_usage": true}})");
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_EQ(r[http::field::content_type], "text/event-stream");
  EXPECT_EQ(r[http::field::cache_control], "no-cache");
  EXPECT_TRUE(r.chunked());
  const std::string& body = r.body();
  ASSERT_GE(body.size(), 14u);
  EXPECT_EQ(body.substr(body.size() - 14), "data: [DONE]\n\n");
  std::string text;
  size_t pos = 0, events = 0;
  while (pos < body.size()) {
    const size_t end = body.find("\n\n", pos);
    ASSERT_NE(end, std::string::npos);
    const std::string ev = body.substr(pos, end - pos);
    ASSERT_EQ(ev.rfind("data: ", 0), 0u) << ev;
    if (ev != "data: [DONE]") {
      const JsonValue v = parse_json(ev.substr(6), "chunk");
      EXPECT_EQ(v.field("object")->str, "chat.completion.chunk");
      if (!v.field("choices")->array.empty()) {
        const JsonValue* content = v.field("choices")->array[0].field("delta")->field("content");
        if (content) text += content->str;
      } else {
        EXPECT_EQ(v.field("usage")->field("completion_tokens")->num, 4u);
      }
    }
    ++events;
    pos = end + 2;
  }
  EXPECT_EQ(text, "Good morrow, cousin");
  EXPECT_EQ(events, 1u + 4u + 1u + 1u + 1u);                            // role, 4 deltas, finish, usage, [DONE]
  EXPECT_EQ(c.post("/v1/completions", kCompletion).result_int(), 200);  // keep-alive after a stream
}

TEST(HttpServer, ClientDisconnectCancelsTheRequest) {
  Served s;
  s.engine.hold = true;
  {
    Client c = s.client();
    http::request<http::string_body> req{http::verb::post, "/v1/completions", 11};
    req.set(http::field::host, "x");
    req.body() = R"({"prompt": "ROMEO:", "max_tokens": 40, "stream": true})";
    req.prepare_payload();
    http::write(c.socket(), req);
    http::response_parser<http::string_body> p;
    http::read_header(c.socket(), c.buffer(), p);
    EXPECT_EQ(p.get().result_int(), 200);
    while (p.get().body().find("data: ") == std::string::npos) http::read_some(c.socket(), c.buffer(), p);
    EXPECT_EQ(s.server.in_flight(), 1);
  }  // the client goes away mid-stream
  EXPECT_TRUE(s.engine.wait_aborted(1));
  EXPECT_TRUE(eventually([&] { return s.server.in_flight() == 0; }));
  {
    Client c = s.client();  // a request that is not streamed, abandoned while it generates
    c.write_raw(raw_post("/v1/completions", R"({"prompt": "ROMEO:", "max_tokens": 40})"));
    EXPECT_TRUE(eventually([&] { return s.engine.submitted() == 2; }));
  }
  EXPECT_TRUE(s.engine.wait_aborted(2));
  EXPECT_TRUE(eventually([&] { return s.server.in_flight() == 0; }));
}

TEST(HttpServer, BodyAndHeaderLimits) {
  serve::HttpOptions o;
  o.max_body_bytes = 1000;
  o.max_header_bytes = 2048;
  Served s(o);
  {
    Client c = s.client();
    Response r = c.post("/v1/completions", R"({"prompt": ")" + std::string(3000, 'a') + R"("})");
    EXPECT_EQ(r.result_int(), 413);
    EXPECT_NE(error_message(r).find("over the limit of 1000 bytes"), std::string::npos);
    EXPECT_TRUE(c.closed_by_server());
  }
  {
    Client c = s.client();
    Response r = c.get("/health", {{"X-Big", std::string(4000, 'h')}});
    EXPECT_EQ(r.result_int(), 431);
    EXPECT_NE(error_message(r).find("over the limit of 2048 bytes"), std::string::npos);
    EXPECT_TRUE(c.closed_by_server());
  }
  {
    Client c = s.client();
    c.write_raw("GET /health HTTP/1.1\r\nHost x\r\n\r\n");  // a malformed header line
    Response r = c.read();
    EXPECT_EQ(r.result_int(), 400);
    EXPECT_NE(error_message(r).find("malformed HTTP request"), std::string::npos);
  }
  EXPECT_EQ(s.client().get("/health").result_int(), 200);  // still serving
}

TEST(HttpServer, RequestAndIdleTimeouts) {
  serve::HttpOptions o;
  o.request_timeout_s = 0.2;
  o.idle_timeout_s = 0.2;
  Served s(o);
  {
    Client c = s.client();
    c.write_raw("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro");  // never finished
    Response r = c.read();
    EXPECT_EQ(r.result_int(), 408);
    EXPECT_NE(error_message(r).find("request_timeout_s = 0.2 s"), std::string::npos);
    EXPECT_TRUE(c.closed_by_server());
  }
  {
    Client c = s.client();
    EXPECT_EQ(c.get("/health").result_int(), 200);
    EXPECT_TRUE(c.closed_by_server());  // idle after its request: closed after idle_timeout_s
  }
}

TEST(HttpServer, ConnectionLimit) {
  serve::HttpOptions o;
  o.max_connections = 1;
  o.retry_after_s = 3;
  Served s(o);
  Client first = s.client();
  ASSERT_EQ(first.get("/health").result_int(), 200);  // admitted
  {
    Client second = s.client();
    Response r = second.get("/health");
    EXPECT_EQ(r.result_int(), 429);
    EXPECT_EQ(r[http::field::retry_after], "3");
    EXPECT_NE(error_message(r).find("max_connections = 1"), std::string::npos);
    EXPECT_TRUE(second.closed_by_server());
  }
  EXPECT_EQ(first.get("/health").result_int(), 200);
  first.close();
  EXPECT_TRUE(eventually([&] {  // once the first is gone, a new connection is admitted
    Client c = s.client();
    return c.get("/health").result_int() == 200;
  }));
}

TEST(HttpServer, QueueFullAndShuttingDown) {
  serve::HttpOptions o;
  o.retry_after_s = 2;
  Served s(o);
  Client c = s.client();
  s.engine.status = SubmitStatus::kQueueFull;
  Response r = c.post("/v1/completions", kCompletion);
  EXPECT_EQ(r.result_int(), 429);
  EXPECT_EQ(r[http::field::retry_after], "2");
  EXPECT_EQ(json_of(r).field("error")->field("type")->str, "rate_limit_error");
  EXPECT_NE(error_message(r).find("queue is full"), std::string::npos);
  s.engine.status = SubmitStatus::kShuttingDown;
  r = c.post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}]})");
  EXPECT_EQ(r.result_int(), 503);
  EXPECT_EQ(r[http::field::retry_after], "2");
  EXPECT_EQ(s.server.in_flight(), 0);
}

TEST(HttpServer, EngineFailuresAreAnswered) {
  Served s;
  Client c = s.client();
  s.engine.fail_after_first = true;
  Response r = c.post("/v1/completions", kCompletion);
  EXPECT_EQ(r.result_int(), 500);
  EXPECT_NE(error_message(r).find("scripted engine failure"), std::string::npos);
  r = c.post("/v1/completions", R"({"prompt": "ROMEO:", "max_tokens": 8, "stream": true})");
  EXPECT_EQ(r.result_int(), 200);  // the stream had started: the error comes as an event
  const std::string& body = r.body();
  EXPECT_NE(body.find("data: {\"error\":{\"message\":\"the engine failed the request: scripted engine failure\""),
            std::string::npos)
      << body;
  EXPECT_EQ(body.substr(body.size() - 14), "data: [DONE]\n\n");
  s.engine.fail_after_first = false;
  s.engine.throw_on_submit = true;
  r = c.post("/v1/completions", kCompletion);
  EXPECT_EQ(r.result_int(), 500);
  EXPECT_NE(error_message(r).find("scripted submit failure"), std::string::npos);
  s.engine.throw_on_submit = false;
  EXPECT_EQ(c.post("/v1/completions", kCompletion).result_int(), 200);  // still serving, same connection
  EXPECT_TRUE(s.server.wait_in_flight(5));
}

TEST(HttpServer, DrainLetsInFlightRequestsFinish) {
  Served s;
  s.engine.hold = true;
  Client streaming = s.client();
  Client other = s.client();
  ASSERT_EQ(other.get("/health").result_int(), 200);
  http::request<http::string_body> req{http::verb::post, "/v1/completions", 11};
  req.set(http::field::host, "x");
  req.body() = R"({"prompt": "ROMEO:", "max_tokens": 30, "stream": true})";
  req.prepare_payload();
  http::write(streaming.socket(), req);
  http::response_parser<http::string_body> p;
  http::read_header(streaming.socket(), streaming.buffer(), p);
  ASSERT_EQ(p.get().result_int(), 200);
  s.server.stop_accepting();
  Response r = other.post("/v1/completions", kCompletion);  // a later request on an open connection
  EXPECT_EQ(r.result_int(), 503);
  EXPECT_FALSE(r.keep_alive());
  EXPECT_TRUE(other.closed_by_server());
  EXPECT_FALSE(s.server.wait_in_flight(0.05));  // the stream still runs
  s.engine.hold = false;                        // the in-flight stream runs to its end
  http::read(streaming.socket(), streaming.buffer(), p);
  const std::string& body = p.get().body();
  EXPECT_NE(body.find("\"finish_reason\":\"stop\""), std::string::npos);
  EXPECT_EQ(body.substr(body.size() - 14), "data: [DONE]\n\n");
  EXPECT_TRUE(s.server.wait_in_flight(5));
}

// A response whose head said keep-alive keeps its connection even when draining starts before it ends (the race of
// a /health answered just as stop_accepting() runs, made deterministic with a stream): the client may send its
// next request there, and it is answered 503 draining with Connection: close instead of finding the socket closed.
TEST(HttpServer, DrainKeepsTheConnectionAResponseKeptAlive) {
  Served s;
  s.engine.hold = true;
  Client c = s.client();
  c.write_raw(raw_post("/v1/completions", R"({"prompt": "ROMEO:", "max_tokens": 30, "stream": true})"));
  http::response_parser<http::string_body> p;
  http::read_header(c.socket(), c.buffer(), p);
  ASSERT_EQ(p.get().result_int(), 200);
  ASSERT_TRUE(p.get().keep_alive());  // the head promised the connection stays open
  s.server.stop_accepting();
  s.engine.hold = false;
  http::read(c.socket(), c.buffer(), p);
  EXPECT_EQ(p.get().body().substr(p.get().body().size() - 14), "data: [DONE]\n\n");
  Response r = c.get("/health");
  EXPECT_EQ(r.result_int(), 503);
  EXPECT_EQ(json_of(r).field("status")->str, "draining");
  EXPECT_FALSE(r.keep_alive());
  EXPECT_TRUE(c.closed_by_server());
  EXPECT_TRUE(s.server.wait_in_flight(5));
}

TEST(HttpServer, StopCancelsInFlightRequests) {
  auto s = std::make_unique<Served>();
  s->engine.hold = true;
  Client c = s->client();
  c.write_raw(raw_post("/v1/completions", R"({"prompt": "ROMEO:", "max_tokens": 40})"));
  ASSERT_TRUE(eventually([&] { return s->engine.submitted() == 1; }));
  s->server.stop();
  s->server.stop();  // idempotent
  EXPECT_EQ(s->server.in_flight(), 0);
  EXPECT_TRUE(s->engine.wait_aborted(1));  // the engine saw cancelled()
  EXPECT_TRUE(c.closed_by_server());
}

TEST(HttpServer, BindErrorsNameTheAddress) {
  Served s;
  ScriptedEngine engine;
  serve::HttpOptions o;
  o.port = s.server.port();
  const std::string e = error_of([&] { serve::HttpServer second(engine, o); });
  EXPECT_NE(e.find("cannot listen on 127.0.0.1:" + std::to_string(o.port)), std::string::npos) << e;
  EXPECT_NE(e.find("in use"), std::string::npos) << e;
  o.port = 70000;
  EXPECT_NE(error_of([&] { serve::HttpServer third(engine, o); }).find("the port must be in [0, 65535]"),
            std::string::npos);
}

TEST(HttpServer, ApiKeyFile) {
  TempDir dir;
  const std::string path = dir.file("key");
  std::ofstream(path) << "  sk-from-file \t\nsecond line\n";
  ::chmod(path.c_str(), 0600);
  EXPECT_EQ(serve::read_api_key_file(path), "sk-from-file");
  ::chmod(path.c_str(), 0644);  // readable by others: still read (with a warning)
  EXPECT_EQ(serve::read_api_key_file(path), "sk-from-file");
  std::ofstream(dir.file("empty")) << "\n";
  EXPECT_NE(error_of([&] { serve::read_api_key_file(dir.file("empty")); }).find("'" + dir.file("empty") + "' is empty"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              serve::read_api_key_file(dir.file("missing"));
            }).find("cannot read the API key file '" + dir.file("missing") + "'"),
            std::string::npos);
}

}  // namespace
}  // namespace moe::test
