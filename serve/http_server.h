// The HTTP front end of `moe serve`: an OpenAI-compatible API on Boost.Beast (HTTP/1.1, keep-alive, one I/O thread).
//
// Routes: GET /health (no auth: 200 {"status":"ok"} once the engine is ready, else 503 "loading" or "draining"),
// GET /v1/models, GET /metrics (Prometheus text), GET /openapi.json, POST /v1/completions, POST /v1/chat/completions
// (JSON, or server-sent events with "stream": true). Any other path: 404; a known path with another method: 405 with
// Allow. Every body but /metrics is JSON; every error is OpenAI's {"error":{message,type,param,code}}.
//
// Limits, each answered with its status and the error JSON while the server keeps serving: an API key (401 with
// WWW-Authenticate: Bearer, compared in constant time), the body size (413), the header size (431), open connections
// (the connection over max_connections gets its request answered 429 with Retry-After and is closed), the engine's
// queue (429 with Retry-After), loading and draining (503 with Retry-After), a request not received within
// request_timeout_s (408, then closed); an idle keep-alive connection is closed after idle_timeout_s.
//
// While a request generates, a read stays pending on its connection: the client going away (EOF, reset, or a
// failed write of a stream) makes its sinks' cancelled() true, so the engine aborts it and frees its KV blocks.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "serve/api.h"

namespace moe::proto {
class ServingConfig;
}

namespace moe::serve {

struct HttpOptions {
  std::string host = "127.0.0.1";    // address to bind (an IP address or a host name)
  int port = 8000;                   // 0: an ephemeral port (HttpServer::port() tells which)
  std::string api_key;               // empty: no auth
  int max_connections = 256;         // open connections; the next one is answered 429 and closed
  int64_t max_body_bytes = 1 << 20;  // request body limit (413 above it)
  int max_header_bytes = 16 << 10;   // request line + header limit (431 above it)
  double request_timeout_s = 30;     // a request's header and body, from its first byte (408); also a write's limit
  double idle_timeout_s = 60;        // a connection waiting for its next request is closed after this
  int retry_after_s = 1;             // the Retry-After of 429 and 503 answers
  uint64_t seed = 0;                 // the stream of seeds of requests that bring none; 0: from std::random_device
};

// The options of a serving config (serving.*) with the given API key (the contents of serving.api_key_file, or "").
HttpOptions http_options(const proto::ServingConfig& cfg, const std::string& api_key);

class HttpServer {
 public:
  // Binds and listens on opt.host:opt.port now; throws moe::Error naming host:port when it cannot (address in use,
  // unknown host). `engine` must outlive the server.
  HttpServer(EngineApi& engine, const HttpOptions& opt);
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const;  // the bound port
  // Starts the I/O thread (once).
  void start();
  // Draining: closes the listener; /health answers 503 "draining", later requests on open connections 503 with
  // Connection: close; requests in flight run to their end. Thread-safe.
  void stop_accepting();
  // Closes every connection (requests in flight are cancelled) and joins the I/O thread. Idempotent; thread-safe,
  // but not from the I/O thread itself.
  void stop();
  // Generation requests submitted to the engine whose response is not complete yet (including those whose client
  // went away until the engine has finished them). Thread-safe.
  int64_t in_flight() const;
  // Waits until in_flight() is 0 or timeout_s passed; true when it reached 0. For a graceful end: after the engine
  // has finished its last request, its responses may still be on their way to the clients; stop() cuts them off.
  bool wait_in_flight(double timeout_s) const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

// The API key in `path`: its first line, trimmed. Throws moe::Error naming the file when it is missing, unreadable
// or its first line is empty; logs a warning when group or others may read it.
std::string read_api_key_file(const std::string& path);

// a == b in time that depends only on the lengths of a and b (no early exit on the first difference or on a length
// mismatch): for API keys.
bool constant_time_equal(std::string_view a, std::string_view b);

}  // namespace moe::serve
