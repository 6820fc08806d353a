// launcher/replica_proxy.h over real TCP sockets on 127.0.0.1, against in-process backends: small blocking Beast
// servers (a thread per connection) that answer as `moe serve` would (a JSON completion, an SSE stream ending in
// `data: [DONE]`, a 503 while loading) or fail as a crashed replica does (a closed port, a close before answering, a
// death in the middle of a response). Backends wait on gates the test opens, so "the first chunk arrived before the
// second was sent" is an ordering, not a timing. Every blocking read gives up after 5 s (a failed test, never a hang).
#include <gtest/gtest.h>

// clang-format off
#include <utility>  // before any Boost.Asio header: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/json.h"
#include "launcher/replica_proxy.h"
#include "tests/unit/http_test_client.h"

namespace moe::test {
namespace {

using launcher::ProxyOptions;
using launcher::Replica;
using launcher::ReplicaProxy;
using launcher::ReplicaSet;
using namespace std::chrono_literals;

// Permits the test hands out and backends take (each wait at most 5 s).
class Gate {
 public:
  void open(int n = 1) {
    std::lock_guard<std::mutex> lock(mu_);
    permits_ += n;
    cv_.notify_all();
  }
  bool pass() {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, std::chrono::milliseconds(kWaitMs), [&] { return permits_ > 0; })) return false;
    --permits_;
    return true;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int permits_ = 0;
};

// ---- backends ----

// One request that reached a backend, and the ways to answer it.
struct Call {
  TimedSocket& sock;
  const Request& req;
  void json(int status, const std::string& body, const Headers& headers = {}) {
    Response res{static_cast<http::status>(status), 11};
    res.set(http::field::content_type, "application/json");
    for (const auto& [k, v] : headers) res.set(k, v);
    res.keep_alive(false);
    res.body() = body;
    res.prepare_payload();
    beast::error_code ec;
    http::write(sock, res, ec);
  }
  void sse_head() {
    sock.write(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
  }
  void chunk(const std::string& data) {
    char size[20];
    std::snprintf(size, sizeof size, "%zx\r\n", data.size());
    sock.write(size + data + "\r\n");
  }
  void event(int n) { chunk("data: {\"n\":" + std::to_string(n) + "}\n\n"); }
  void end_stream() {
    chunk("data: [DONE]\n\n");
    sock.write("0\r\n\r\n");
  }
};

// A server on 127.0.0.1 (an ephemeral port): each connection's one request goes to the handler, then the connection
// closes (as the proxy asks: Connection: close).
class Backend {
 public:
  using Handler = std::function<void(Call&)>;
  explicit Backend(Handler h)
      : acceptor_(ioc_, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0)), handler_(std::move(h)) {
    thread_ = std::thread([this] { accept_loop(); });
  }
  ~Backend() {
    stopping_ = true;
    beast::error_code ec;
    tcp::socket wake(ioc_);  // ends the blocking accept
    wake.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port())), ec);
    thread_.join();
    for (std::thread& t : connections_) t.join();
  }
  int port() const { return acceptor_.local_endpoint().port(); }
  int requests() const {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }
  Request last() const {
    std::lock_guard<std::mutex> lock(mu_);
    return last_;
  }

 private:
  void accept_loop() {
    while (true) {
      tcp::socket s(ioc_);
      beast::error_code ec;
      acceptor_.accept(s, ec);
      if (stopping_) return;
      if (!ec) connections_.emplace_back([this, s = std::move(s)]() mutable { serve(std::move(s)); });
    }
  }
  void serve(tcp::socket s) {
    TimedSocket sock(std::move(s));
    beast::flat_buffer buf;
    Request req;
    beast::error_code ec;
    http::read(sock, buf, req, ec);
    if (ec) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      last_ = req;
      ++requests_;
    }
    Call call{sock, req};
    handler_(call);
    sock.socket().shutdown(tcp::socket::shutdown_both, ec);
  }

  net::io_context ioc_;
  tcp::acceptor acceptor_;
  Handler handler_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
  std::vector<std::thread> connections_;  // touched by the accept thread, then by the destructor after joining it
  mutable std::mutex mu_;
  int requests_ = 0;
  Request last_;
};

// Answers like `moe serve`: a JSON body naming the backend and echoing what it received, or (with "stream" in the
// body) an SSE stream of three events and [DONE]; unknown paths 404.
Backend::Handler serve_like(const std::string& name) {
  return [name](Call& c) {
    const std::string target(c.req.target());
    if (target == "/nothing") return c.json(404, R"({"error":{"message":"Invalid URL"}})");
    if (c.req.body().find("\"stream\"") != std::string::npos) {
      c.sse_head();
      for (int i = 0; i < 3; ++i) c.event(i);
      return c.end_stream();
    }
    JsonObject o;
    o.str("backend", name)
        .str("method", std::string(c.req.method_string()))
        .str("target", target)
        .str("authorization", std::string(c.req[http::field::authorization]))
        .str("connection", std::string(c.req[http::field::connection]))
        .str("custom", std::string(c.req["X-Custom"]))
        .boolean("dropped", c.req.find("X-Drop") == c.req.end())
        .str("body", c.req.body());
    c.json(200, o.text(), {{"X-Backend", name}});
  };
}

// A port nothing listens on (bound once, then closed).
int closed_port() {
  net::io_context ioc;
  tcp::acceptor a(ioc, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  return a.local_endpoint().port();
}

Replica rep(int id, int port, bool healthy = true) { return Replica{id, "127.0.0.1", port, healthy}; }

// A proxy on an ephemeral port in front of `replicas`.
struct Proxied {
  explicit Proxied(std::vector<Replica> replicas, ProxyOptions o = {}) : proxy(set, with_port0(o)) {
    set.set(std::move(replicas));
    proxy.start();
  }
  static ProxyOptions with_port0(ProxyOptions o) {
    o.port = 0;
    return o;
  }
  Client client() { return Client(proxy.port()); }
  bool healthy(int id) const {
    for (const Replica& r : set.snapshot())
      if (r.id == id) return r.healthy;
    return false;
  }
  ReplicaSet set;
  ReplicaProxy proxy;
};

const char* kCompletion = R"({"prompt": "ROMEO:", "max_tokens": 8})";
const char* kStream = R"({"prompt": "ROMEO:", "max_tokens": 8, "stream": true})";

// ---- tests ----

TEST(ReplicaProxy, ReplicaSetMarksFailedUntilTheNextSet) {
  ReplicaSet s;
  s.set({rep(0, 1000), rep(3, 1003), rep(1, 1001, false)});
  s.mark_failed(3);
  s.mark_failed(7);  // unknown: ignored
  std::vector<Replica> v = s.snapshot();
  ASSERT_EQ(v.size(), 3u);
  EXPECT_EQ(v[0].id, 0);  // the order set() gave
  EXPECT_EQ(v[1].id, 3);
  EXPECT_TRUE(v[0].healthy);
  EXPECT_FALSE(v[1].healthy);
  EXPECT_FALSE(v[2].healthy);
  s.set({rep(0, 1000), rep(3, 1003)});
  EXPECT_TRUE(s.snapshot()[1].healthy);
  EXPECT_THROW(s.set({rep(0, 1000), rep(0, 1001)}), Error);
  EXPECT_THROW(s.set({rep(-1, 1000)}), Error);
  EXPECT_THROW(s.set({rep(0, 0)}), Error);
  EXPECT_EQ(s.snapshot().size(), 2u);  // a refused set() changes nothing
}

TEST(ReplicaProxy, ForwardsRequestsAsTheyCameAndRelaysResponses) {
  Backend a(serve_like("A"));
  Proxied p({rep(0, a.port())});
  Client c = p.client();
  Response r = c.post("/v1/completions?x=1", kCompletion,
                      {{"Authorization", "Bearer sk-x"}, {"X-Custom", "7"}, {"Connection", "X-Drop"}, {"X-Drop", "1"}});
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_EQ(r["X-Backend"], "A");
  EXPECT_EQ(r[http::field::content_type], "application/json");
  EXPECT_TRUE(r.keep_alive());
  const JsonValue j = json_of(r);
  EXPECT_EQ(j.field("method")->str, "POST");
  EXPECT_EQ(j.field("target")->str, "/v1/completions?x=1");
  EXPECT_EQ(j.field("authorization")->str, "Bearer sk-x");
  EXPECT_EQ(j.field("custom")->str, "7");
  EXPECT_EQ(j.field("connection")->str, "close");  // one upstream connection per request
  EXPECT_TRUE(j.field("dropped")->b);              // a header the Connection header names is hop-by-hop
  EXPECT_EQ(j.field("body")->str, kCompletion);

  r = c.get("/v1/models");  // same connection (keep-alive), forwarded like the rest
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_EQ(json_of(r).field("target")->str, "/v1/models");
  r = c.get("/nothing");  // other paths too: the replica answers 404
  EXPECT_EQ(r.result_int(), 404);
  EXPECT_EQ(r.body(), R"({"error":{"message":"Invalid URL"}})");
  EXPECT_EQ(a.requests(), 3);
  EXPECT_TRUE(eventually([&] { return p.proxy.in_flight() == std::vector<int64_t>{0}; }));
}

TEST(ReplicaProxy, PicksTheLeastLoadedHealthyReplica) {
  Gate release;
  Backend a([&](Call& c) {
    if (c.req.target() == "/hold") release.pass();
    serve_like("A")(c);
  });
  Backend b(serve_like("B"));
  Proxied p({rep(0, a.port()), rep(1, b.port())});
  Client held = p.client();
  held.write_request(http::verb::post, "/hold", kCompletion);  // ties go to the lower id: A, which holds it
  ASSERT_TRUE(eventually([&] { return a.requests() == 1; }));
  EXPECT_EQ(p.proxy.in_flight(), (std::vector<int64_t>{1, 0}));
  Client c = p.client();
  for (int i = 0; i < 2; ++i) {
    const Response r = c.post("/v1/completions", kCompletion);
    ASSERT_EQ(r.result_int(), 200);
    EXPECT_EQ(json_of(r).field("backend")->str, "B");  // A has one in flight
  }
  release.open();
  const Response r = held.read();
  EXPECT_EQ(json_of(r).field("backend")->str, "A");
  ASSERT_TRUE(eventually([&] { return p.proxy.in_flight() == std::vector<int64_t>{0, 0}; }));
  EXPECT_EQ(json_of(c.post("/v1/completions", kCompletion)).field("backend")->str, "A");  // a tie again

  p.set.set({rep(0, a.port(), false), rep(1, b.port())});  // an unhealthy replica gets nothing
  EXPECT_EQ(json_of(c.post("/v1/completions", kCompletion)).field("backend")->str, "B");
  EXPECT_EQ(a.requests(), 2);
}

TEST(ReplicaProxy, RetriesOnAnotherReplicaBeforeTheFirstByte) {
  Backend closes([](Call&) {});  // reads the request, closes without an answer
  Backend loading([](Call& c) {
    c.json(503, R"({"error":{"message":"the model is still loading","code":"model_loading"}})", {{"Retry-After", "1"}});
  });
  Backend good(serve_like("good"));
  Proxied p({rep(0, closed_port()), rep(1, closes.port()), rep(2, loading.port()), rep(3, good.port())});
  Client c = p.client();
  Response r = c.post("/v1/completions", kCompletion, {{"Authorization", "Bearer k"}});
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_EQ(json_of(r).field("backend")->str, "good");
  EXPECT_EQ(json_of(r).field("authorization")->str, "Bearer k");
  EXPECT_EQ(closes.requests(), 1);
  EXPECT_EQ(loading.requests(), 1);
  EXPECT_FALSE(p.healthy(0));  // refused: marked failed
  EXPECT_FALSE(p.healthy(1));  // closed before answering: marked failed
  EXPECT_TRUE(p.healthy(2));   // a 503 is an answer: only this request moved on
  EXPECT_TRUE(p.healthy(3));

  r = c.post("/v1/completions", kCompletion);  // 2 (a tie with 3, lower id) answers 503: 3 takes it
  EXPECT_EQ(json_of(r).field("backend")->str, "good");
  EXPECT_EQ(loading.requests(), 2);

  p.set.set({rep(2, loading.port())});  // the last replica's 503 is relayed
  r = c.post("/v1/completions", kCompletion);
  EXPECT_EQ(r.result_int(), 503);
  EXPECT_EQ(r[http::field::retry_after], "1");
  EXPECT_EQ(json_of(r).field("error")->field("code")->str, "model_loading");
  EXPECT_TRUE(eventually([&] { return p.proxy.in_flight() == std::vector<int64_t>{0, 0, 0}; }));
}

TEST(ReplicaProxy, ConnectTimeoutMovesOn) {
  // A listener that never accepts, its queue filled by one connection: the kernel drops further SYNs, so a connect
  // to it hangs until the proxy's connect_timeout_s.
  net::io_context ioc;
  tcp::acceptor full(ioc, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0).protocol());
  full.bind(tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  full.listen(0);
  tcp::socket filler(ioc);
  filler.connect(full.local_endpoint());
  Backend good(serve_like("good"));
  ProxyOptions o;
  o.connect_timeout_s = 0.2;
  o.request_timeout_s = 3;  // should the kernel accept after all: a failed test, soon
  Proxied p({rep(0, full.local_endpoint().port()), rep(1, good.port())}, o);
  Client c = p.client();
  const Response r = c.post("/v1/completions", kCompletion);
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_EQ(json_of(r).field("backend")->str, "good");
  EXPECT_FALSE(p.healthy(0));
}

TEST(ReplicaProxy, NoHealthyReplicaIs503) {
  Backend good(serve_like("good"));
  Backend closes([](Call&) {});
  ProxyOptions o;
  o.retry_after_s = 3;
  Proxied p({rep(0, good.port(), false)}, o);
  Client c = p.client();
  Response r = c.post("/v1/chat/completions", R"({"messages": []})");
  ASSERT_EQ(r.result_int(), 503);
  EXPECT_EQ(r[http::field::retry_after], "3");
  EXPECT_EQ(r[http::field::content_type], "application/json");
  const JsonValue e = *json_of(r).field("error");
  EXPECT_EQ(e.field("message")->str.rfind("no healthy replica", 0), 0u) << e.field("message")->str;
  EXPECT_EQ(e.field("type")->str, "service_unavailable_error");
  EXPECT_EQ(e.field("param")->kind, JsonValue::kNull);
  EXPECT_EQ(e.field("code")->kind, JsonValue::kNull);
  r = c.get("/health");
  EXPECT_EQ(r.result_int(), 503);
  EXPECT_EQ(json_of(r).field("replicas_healthy")->num, 0u);
  EXPECT_EQ(good.requests(), 0);

  p.set.set({rep(0, good.port()), rep(1, closes.port())});
  r = c.get("/health");  // the proxy's own: not forwarded
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_EQ(json_of(r).field("status")->str, "ok");
  EXPECT_EQ(json_of(r).field("replicas_healthy")->num, 2u);
  EXPECT_EQ(good.requests(), 0);
  EXPECT_EQ(c.post("/health", "{}").result_int(), 405);

  p.set.set({rep(0, closed_port()), rep(1, closes.port())});  // both fail: nothing is left
  r = c.post("/v1/completions", kCompletion);
  ASSERT_EQ(r.result_int(), 503);
  EXPECT_NE(json_of(r).field("error")->field("message")->str.find("tried replicas 0 1"), std::string::npos);
  EXPECT_EQ(c.get("/health").result_int(), 503);
}

TEST(ReplicaProxy, StreamsEachEventAsItArrives) {
  Gate next;
  Backend a([&](Call& c) {
    c.sse_head();
    for (int i = 0; i < 3; ++i) {
      c.event(i);
      if (!next.pass()) return;  // the next event only once the test saw this one
    }
    c.end_stream();
  });
  Proxied p({rep(0, a.port())});
  Client c = p.client();
  c.write_request(http::verb::post, "/v1/completions", kStream);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(c.read_until("data: {\"n\":" + std::to_string(i) + "}\n\n")) << c.received();
    EXPECT_EQ(c.received().find("[DONE]"), std::string::npos);
    next.open();
  }
  const Response r = c.read();  // the whole response, from the bytes already received on
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_EQ(r[http::field::content_type], "text/event-stream");
  EXPECT_TRUE(r.chunked());
  EXPECT_TRUE(r.keep_alive());
  EXPECT_EQ(r.body(), "data: {\"n\":0}\n\ndata: {\"n\":1}\n\ndata: {\"n\":2}\n\ndata: [DONE]\n\n");
  EXPECT_EQ(c.get("/health").result_int(), 200);  // the connection stays usable
}

TEST(ReplicaProxy, StreamsToHttp10ClientsUntilClose) {
  Backend a(serve_like("A"));
  Proxied p({rep(0, a.port())});
  Client c = p.client();
  const std::string body = kStream;
  c.write_raw("POST /v1/completions HTTP/1.0\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body);
  ASSERT_TRUE(c.read_until("data: [DONE]\n\n")) << c.received();
  const std::string got = c.received();
  EXPECT_EQ(got.rfind("HTTP/1.0 200", 0), 0u) << got;
  EXPECT_EQ(got.find("chunked"), std::string::npos) << got;  // no chunked encoding for HTTP/1.0: the end is the close
  EXPECT_NE(got.find("\r\n\r\ndata: {\"n\":0}\n\ndata: {\"n\":1}\n\n"), std::string::npos) << got;
  EXPECT_TRUE(c.closed_by_server());
}

TEST(ReplicaProxy, DeathMidStreamEndsTheStreamWithAnErrorEvent) {
  Backend a([](Call& c) {
    c.sse_head();
    c.event(0);
    c.chunk("data: {\"n\":");  // an unfinished event, then the replica dies
  });
  Proxied p({rep(0, a.port())});
  Client c = p.client();
  const Response r = c.post("/v1/completions", kStream);
  ASSERT_EQ(r.result_int(), 200);
  const std::string& b = r.body();
  const std::string first = "data: {\"n\":0}\n\n";
  ASSERT_EQ(b.rfind(first, 0), 0u) << b;
  const std::string done = "data: [DONE]\n\n";
  ASSERT_GT(b.size(), first.size() + done.size());
  ASSERT_EQ(b.substr(b.size() - done.size()), done) << b;
  const std::string event = b.substr(first.size(), b.size() - first.size() - done.size());
  ASSERT_EQ(event.rfind("data: ", 0), 0u) << event;
  const JsonValue e = *parse_json(event.substr(6), "error event").field("error");
  EXPECT_EQ(e.field("type")->str, "server_error");
  EXPECT_EQ(e.field("code")->str, "replica_failed");
  EXPECT_TRUE(c.closed_by_server());
  EXPECT_FALSE(p.healthy(0));
}

TEST(ReplicaProxy, AStreamWhoseReplicaDiesBeforeItsFirstTokenIsRetried) {
  // a chat stream's first chunk carries the role and no token: the head and it are held back until a token comes
  const std::string role = R"(data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},)"
                           R"("finish_reason":null}]})"
                           "\n\n";
  const std::string token = R"(data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]})"
                            "\n\n";
  const std::string finish = R"(data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]})"
                             "\n\n";
  Backend a([&](Call& c) {
    c.sse_head();
    c.chunk(role);  // then the replica dies, before its first token
  });
  Backend b([&](Call& c) {
    c.sse_head();
    c.chunk(role);
    c.chunk(token);
    c.chunk(finish);
    c.end_stream();
  });
  Proxied p({rep(0, a.port()), rep(1, b.port())});
  Client c = p.client();
  const Response r = c.post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"hi"}],"stream":true})");
  ASSERT_EQ(r.result_int(), 200);
  EXPECT_EQ(r.body(), role + token + finish + "data: [DONE]\n\n");  // replica 1's stream, whole, and nothing else
  EXPECT_EQ(a.requests(), 1);
  EXPECT_EQ(b.requests(), 1);
  EXPECT_FALSE(p.healthy(0));
  EXPECT_TRUE(p.healthy(1));
}

TEST(ReplicaProxy, DeathMidBodyCutsTheResponse) {
  Backend a([](Call& c) {
    c.sock.write("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"partial\"");
  });
  Proxied p({rep(0, a.port())});
  Client c = p.client();
  c.write_request(http::verb::post, "/v1/completions", kCompletion);
  EXPECT_THROW(c.read(), beast::system_error);  // closed before the announced length: incomplete, never a hang
}

TEST(ReplicaProxy, ClientDisconnectClosesTheUpstream) {
  std::atomic<int> upstream_closed{0};
  Backend a([&](Call& c) {
    if (c.req.body().find("\"stream\"") != std::string::npos) {
      c.sse_head();
      c.event(0);
    }
    if (c.sock.peer_closed()) ++upstream_closed;  // the replica notices and cancels the request
  });
  Proxied p({rep(0, a.port())});
  {
    Client c = p.client();
    c.write_request(http::verb::post, "/v1/completions", kStream);
    ASSERT_TRUE(c.read_until("data: {\"n\":0}\n\n"));
    c.close();
  }
  EXPECT_TRUE(eventually([&] { return upstream_closed == 1; }));
  {
    Client c = p.client();  // before any response byte
    c.write_request(http::verb::post, "/v1/completions", kCompletion);
    ASSERT_TRUE(eventually([&] { return a.requests() == 2; }));
    c.close();
  }
  EXPECT_TRUE(eventually([&] { return upstream_closed == 2; }));
  EXPECT_TRUE(eventually([&] { return p.proxy.in_flight() == std::vector<int64_t>{0}; }));
  EXPECT_TRUE(p.healthy(0));
}

TEST(ReplicaProxy, StopClosesUpstreamConnections) {
  std::atomic<int> upstream_closed{0};
  Backend a([&](Call& c) {
    if (c.sock.peer_closed()) ++upstream_closed;
  });
  Proxied p({rep(0, a.port())});
  Client c = p.client();
  c.write_request(http::verb::post, "/v1/completions", kCompletion);
  ASSERT_TRUE(eventually([&] { return a.requests() == 1; }));
  p.proxy.stop();
  EXPECT_TRUE(eventually([&] { return upstream_closed == 1; }));
  EXPECT_TRUE(c.closed_by_server());
  p.proxy.stop();  // idempotent
  EXPECT_THROW(p.proxy.start(), Error);
}

TEST(ReplicaProxy, ReplicaSilentPastTheTimeoutIs504) {
  Backend a([](Call& c) { c.sock.peer_closed(); });  // never answers
  ProxyOptions o;
  o.request_timeout_s = 0.2;
  Proxied p({rep(0, a.port())}, o);
  Client c = p.client();
  const Response r = c.post("/v1/completions", kCompletion);
  EXPECT_EQ(r.result_int(), 504);
  EXPECT_NE(json_of(r).field("error")->field("message")->str.find("request_timeout_s"), std::string::npos);
  EXPECT_TRUE(p.healthy(0));  // slow is not dead: the coordinator's health checks decide
}

TEST(ReplicaProxy, BodyAndHeaderLimitsAndMalformedRequests) {
  Backend a(serve_like("A"));
  ProxyOptions o;
  o.max_body_bytes = 1000;
  o.max_header_bytes = 2000;
  Proxied p({rep(0, a.port())}, o);
  {
    Client c = p.client();
    const Response r = c.post("/v1/completions", std::string(1001, 'x'));
    EXPECT_EQ(r.result_int(), 413);
    EXPECT_EQ(json_of(r).field("error")->field("type")->str, "invalid_request_error");
    EXPECT_TRUE(c.closed_by_server());
  }
  {
    Client c = p.client();
    EXPECT_EQ(c.post("/v1/completions", kCompletion, {{"X-Big", std::string(3000, 'y')}}).result_int(), 431);
  }
  {
    Client c = p.client();
    c.write_raw("NOT HTTP\r\n\r\n");
    EXPECT_EQ(c.read().result_int(), 400);
  }
  {
    ProxyOptions t = o;
    t.client_timeout_s = 0.2;
    Proxied slow({rep(0, a.port())}, t);
    Client c = slow.client();
    c.write_raw("POST /v1/completions HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");  // the rest never comes
    EXPECT_EQ(c.read().result_int(), 408);
  }
  Client c = p.client();  // the proxy keeps serving
  EXPECT_EQ(c.post("/v1/completions", std::string(R"({"p":")") + std::string(900, 'z') + "\"}").result_int(), 200);
  EXPECT_EQ(a.requests(), 1);
}

TEST(ReplicaProxy, ConnectionLimit) {
  Backend a(serve_like("A"));
  ProxyOptions o;
  o.max_connections = 1;
  o.retry_after_s = 2;
  Proxied p({rep(0, a.port())}, o);
  Client first = p.client();
  ASSERT_EQ(first.post("/v1/completions", kCompletion).result_int(), 200);
  {
    Client second = p.client();
    const Response r = second.post("/v1/completions", kCompletion);
    EXPECT_EQ(r.result_int(), 429);
    EXPECT_EQ(r[http::field::retry_after], "2");
    EXPECT_TRUE(second.closed_by_server());
  }
  EXPECT_EQ(first.post("/v1/completions", kCompletion).result_int(), 200);
  first.close();
  EXPECT_TRUE(eventually([&] {  // once the first is gone, a new connection is admitted
    Client c = p.client();
    return c.get("/health").result_int() == 200;
  }));
  EXPECT_EQ(a.requests(), 2);
}

TEST(ReplicaProxy, BindErrorsNameTheAddress) {
  ReplicaSet set;
  ReplicaProxy first(set, ProxyOptions{});
  ProxyOptions o;
  o.port = first.port();
  try {
    ReplicaProxy second(set, o);
    FAIL() << "bound twice";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("127.0.0.1:" + std::to_string(first.port())), std::string::npos) << e.what();
  }
  o.port = 0;
  o.max_body_bytes = 0;
  EXPECT_THROW(ReplicaProxy(set, o), Error);
}

}  // namespace
}  // namespace moe::test
