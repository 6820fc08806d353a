// launcher/coordinator_http.h end to end over real TCP sockets on 127.0.0.1: routes, auth (header and ?key=), errors
// and limits, and the dashboard page it serves (its JavaScript runs in tests/integration/lib/dashboard_check.sh).
#include <gtest/gtest.h>

// clang-format off
#include <utility>  // before any Boost.Asio header: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/json.h"
#include "launcher/coordinator_http.h"
#include "tests/unit/http_test_client.h"

namespace moe::test {
namespace {

using launcher::CoordinatorHttp;
using launcher::CoordinatorHttpOptions;

const char* kDoc = R"({"job":{"id":"a1b2c3","kind":"train","state":"running"},"epoch":3})";

// A started server on an ephemeral port whose status document is `doc` (or what `status` returns).
struct Served {
  explicit Served(CoordinatorHttpOptions o = {}, std::function<std::string()> status = {})
      : server(
            status ? std::move(status) : [this] { return doc_of(); }, o) {
    server.start();
  }
  std::string doc_of() {
    ++calls;
    return kDoc;
  }
  Client client() { return Client(server.port()); }
  std::atomic<int> calls{0};
  CoordinatorHttp server;
};

TEST(CoordinatorHttp, RoutesOnOneKeepAliveConnection) {
  Served s;
  Client c = s.client();
  Response r = c.get("/health");
  EXPECT_EQ(r.result_int(), 200);
  EXPECT_EQ(r[http::field::content_type], "application/json");
  EXPECT_EQ(json_of(r).field("status")->str, "ok");

  r = c.get("/status");
  EXPECT_EQ(r.result_int(), 200);
  EXPECT_EQ(r[http::field::content_type], "application/json");
  EXPECT_EQ(r[http::field::cache_control], "no-store");
  EXPECT_EQ(r.body(), kDoc);
  EXPECT_TRUE(r.keep_alive());
  EXPECT_EQ(c.get("/status?x=1").body(), kDoc);
  EXPECT_EQ(s.calls.load(), 2);  // once per request

  r = c.get("/");
  EXPECT_EQ(r.result_int(), 200);
  EXPECT_EQ(r[http::field::content_type], "text/html; charset=utf-8");
  EXPECT_EQ(r.body(), launcher::dashboard_html());
  EXPECT_TRUE(contains(std::string(r["Content-Security-Policy"]), "default-src 'none'"));
  EXPECT_EQ(r["Referrer-Policy"], "no-referrer");
}

TEST(CoordinatorHttp, PageIsSelfContainedWithTheSectionIds) {
  const std::string page(launcher::dashboard_html());
  for (const char* id : {"job", "loss-chart", "ranks", "events", "expert-heatmap", "replicas", "error"})
    EXPECT_TRUE(contains(page, std::string("id=\"") + id + "\"")) << id;
  EXPECT_TRUE(contains(page, "dataset.updated"));
  EXPECT_TRUE(contains(page, "fetch('status'"));
  EXPECT_TRUE(contains(page, "Authorization: 'Bearer '"));  // the page passes its ?key= on
  EXPECT_TRUE(contains(page, "<style>"));
  EXPECT_TRUE(contains(page, "<script>"));
  for (const char* external :
       {"<script src", "<link", "<img", "<iframe", "@import", "url(http", "https://", "innerHTML"})
    EXPECT_FALSE(contains(page, external)) << external;
}

TEST(CoordinatorHttp, UnknownRoutesAndMethods) {
  Served s;
  Client c = s.client();
  Response r = c.get("/nothing?a=1");
  EXPECT_EQ(r.result_int(), 404);
  EXPECT_EQ(r[http::field::content_type], "application/json");
  EXPECT_TRUE(contains(error_message(r), "Invalid URL (GET /nothing?a=1)")) << error_message(r);
  EXPECT_EQ(json_of(r).field("error")->field("type")->str, "invalid_request_error");
  for (const char* target : {"/status", "/", "/health"}) {
    r = c.send(http::verb::post, target);
    EXPECT_EQ(r.result_int(), 405) << target;
    EXPECT_EQ(r[http::field::allow], "GET");
    EXPECT_TRUE(contains(error_message(r), "Method POST is not allowed on")) << error_message(r);
  }
  r = c.send(http::verb::delete_, "/status");
  EXPECT_EQ(r.result_int(), 405);
  EXPECT_EQ(c.get("/status").result_int(), 200);  // the same connection still serves
  EXPECT_EQ(s.calls.load(), 1);
}

TEST(CoordinatorHttp, ApiKeyInTheHeader) {
  CoordinatorHttpOptions o;
  o.api_key = "sk-coord";
  Served s(o);
  Client c = s.client();
  Response r = c.get("/status");
  EXPECT_EQ(r.result_int(), 401);
  EXPECT_EQ(r[http::field::www_authenticate], "Bearer");
  EXPECT_EQ(r[http::field::content_type], "application/json");
  const JsonValue e = json_of(r);
  EXPECT_EQ(e.field("error")->field("type")->str, "authentication_error");
  EXPECT_EQ(e.field("error")->field("code")->str, "invalid_api_key");
  EXPECT_TRUE(contains(e.field("error")->field("message")->str, "Missing API key"));
  EXPECT_EQ(s.calls.load(), 0);  // the document is not even built

  r = c.get("/status", {{"Authorization", "Bearer sk-wrong"}});
  EXPECT_EQ(r.result_int(), 401);
  EXPECT_EQ(error_message(r), "Incorrect API key provided");
  r = c.get("/status", {{"Authorization", "Basic sk-coord"}});
  EXPECT_EQ(r.result_int(), 401);
  EXPECT_TRUE(contains(error_message(r), "must be 'Bearer <key>'"));
  r = c.get("/status", {{"Authorization", "Bearer sk-coord"}});
  EXPECT_EQ(r.result_int(), 200);
  EXPECT_EQ(r.body(), kDoc);
  EXPECT_EQ(c.get("/", {{"Authorization", "bearer  sk-coord "}}).result_int(), 200);

  EXPECT_EQ(c.get("/health").result_int(), 200);   // open
  EXPECT_EQ(c.get("/nothing").result_int(), 401);  // no probing of routes without the key
  EXPECT_EQ(c.get("/nothing", {{"Authorization", "Bearer sk-coord"}}).result_int(), 404);
  EXPECT_EQ(c.send(http::verb::post, "/status").result_int(), 401);
}

TEST(CoordinatorHttp, ApiKeyInTheQuery) {
  CoordinatorHttpOptions o;
  o.api_key = "k+y/=&%";  // characters that must be escaped in a query
  Served s(o);
  Client c = s.client();
  const std::string escaped = "k%2By%2F%3D%26%25";
  for (const char* path : {"/", "/status"}) {
    EXPECT_EQ(c.get(std::string(path) + "?key=" + escaped).result_int(), 200) << path;
    EXPECT_EQ(c.get(std::string(path) + "?a=1&key=" + escaped + "&b").result_int(), 200) << path;
    Response r = c.get(std::string(path) + "?key=k%2By");
    EXPECT_EQ(r.result_int(), 401) << path;
    EXPECT_EQ(error_message(r), "Incorrect API key provided");
    EXPECT_EQ(r[http::field::www_authenticate], "Bearer");
  }
  EXPECT_EQ(c.get("/status?key=k+y%2F%3D%26%25").result_int(), 401);  // '+' is a space
  EXPECT_EQ(c.get("/status?key=%zz").result_int(), 401);              // a malformed escape matches nothing
  EXPECT_EQ(c.get("/status?key").result_int(), 401);
  EXPECT_EQ(c.get("/status?notkey=" + escaped).result_int(), 401);
  // a wrong header does not spoil a right query parameter (a browser may send stale credentials)
  EXPECT_EQ(c.get("/status?key=" + escaped, {{"Authorization", "Bearer old"}}).result_int(), 200);
  EXPECT_EQ(s.calls.load(), 3);
}

TEST(CoordinatorHttp, MalformedRequestIsAnswered400AndTheServerKeepsServing) {
  Served s;
  {
    Client c = s.client();
    c.write_raw("NOT AN HTTP REQUEST\r\n\r\n");
    const Response r = c.read();
    EXPECT_EQ(r.result_int(), 400);
    EXPECT_TRUE(contains(error_message(r), "malformed HTTP request")) << error_message(r);
    EXPECT_FALSE(r.keep_alive());
    EXPECT_TRUE(c.closed_by_server());
  }
  {
    Client c = s.client();
    c.write_raw("GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n");
    EXPECT_EQ(c.read().result_int(), 400);
  }
  Client c = s.client();
  EXPECT_EQ(c.get("/status").body(), kDoc);
}

TEST(CoordinatorHttp, RequestSizeLimits) {
  CoordinatorHttpOptions o;
  o.max_request_bytes = 1024;
  Served s(o);
  {
    Client c = s.client();
    const Response r = c.get("/status", {{"X-Padding", std::string(2000, 'a')}});
    EXPECT_EQ(r.result_int(), 431);
    EXPECT_TRUE(contains(error_message(r), "over the limit of 1024 bytes")) << error_message(r);
    EXPECT_TRUE(c.closed_by_server());
  }
  {
    Client c = s.client();
    c.write_raw("POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + std::string(5000, 'b'));
    const Response r = c.read();
    EXPECT_EQ(r.result_int(), 413);
    EXPECT_TRUE(contains(error_message(r), "request body is over the limit")) << error_message(r);
  }
  EXPECT_EQ(s.client().get("/health").result_int(), 200);
}

TEST(CoordinatorHttp, PipelinedRequestsAreAnsweredInOrder) {
  Served s;
  Client c = s.client();
  c.write_raw("GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /status HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(json_of(c.read()).field("status")->str, "ok");
  EXPECT_EQ(c.read().body(), kDoc);
}

TEST(CoordinatorHttp, Http10ClosesAfterTheResponse) {
  Served s;
  Client c = s.client();
  c.write_raw("GET /health HTTP/1.0\r\n\r\n");
  const Response r = c.read();
  EXPECT_EQ(r.result_int(), 200);
  EXPECT_TRUE(c.closed_by_server());
}

TEST(CoordinatorHttp, IncompleteRequestIsDroppedAfterTheReadTimeout) {
  CoordinatorHttpOptions o;
  o.read_timeout_s = 0.2;
  Served s(o);
  Client c = s.client();
  c.write_raw("GET /status HTTP/1.1\r\nHost:");
  EXPECT_TRUE(c.closed_by_server());
  EXPECT_EQ(s.client().get("/status").result_int(), 200);
}

TEST(CoordinatorHttp, FailingStatusCallbackIsAnswered500) {
  std::atomic<bool> fail{true};
  Served s({}, [&]() -> std::string {
    MOE_CHECK(!fail, "the membership table is being rebuilt");
    return kDoc;
  });
  Client c = s.client();
  const Response r = c.get("/status");
  EXPECT_EQ(r.result_int(), 500);
  EXPECT_TRUE(contains(error_message(r), "the membership table is being rebuilt")) << error_message(r);
  EXPECT_EQ(json_of(r).field("error")->field("type")->str, "server_error");
  fail = false;
  EXPECT_EQ(c.get("/status").body(), kDoc);
}

TEST(CoordinatorHttp, BindFailuresNameTheAddress) {
  CoordinatorHttp first([] { return std::string(kDoc); }, {});
  CoordinatorHttpOptions o;
  o.port = first.port();
  try {
    CoordinatorHttp second([] { return std::string(kDoc); }, o);
    FAIL() << "bound a port in use";
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "127.0.0.1:" + std::to_string(o.port))) << e.what();
  }
  o.port = 70000;
  try {
    CoordinatorHttp bad([] { return std::string(kDoc); }, o);
    FAIL() << "accepted port 70000";
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "127.0.0.1:70000")) << e.what();
  }
  EXPECT_THROW(CoordinatorHttp(nullptr, {}), Error);
}

TEST(CoordinatorHttp, StopIsIdempotentAndClosesConnections) {
  auto s = std::make_unique<Served>();
  Client c = s->client();
  EXPECT_EQ(c.get("/health").result_int(), 200);
  s->server.stop();
  EXPECT_TRUE(c.closed_by_server());
  s->server.stop();
  EXPECT_THROW(s->server.start(), Error);
  s.reset();  // the destructor stops again

  CoordinatorHttp never_started([] { return std::string(kDoc); }, {});
  never_started.stop();
}

TEST(CoordinatorHttp, ConcurrentClients) {
  Served s;
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      Client c = s.client();
      for (int i = 0; i < 20; ++i) ok += c.get("/status").body() == kDoc;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 160);
  EXPECT_EQ(s.calls.load(), 160);
}

}  // namespace
}  // namespace moe::test
