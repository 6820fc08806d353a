// The HTTP side of `moe coordinator`: GET /status (the coordinator's JSON document), GET / (a self-contained dashboard
// page that polls /status every second) and GET /health, on Boost.Beast (HTTP/1.1, keep-alive, one I/O thread).
//
// Any other path: 404; a known path with another method: 405 with Allow: GET. Errors are the serving API's JSON,
// {"error":{"message","type","param","code"}}. With an API key every route but /health needs it, either as
// `Authorization: Bearer <key>` or as the query parameter `key` (`/?key=<key>`: browsers cannot set the header on a
// page load; form-encoded, so a '+' in a key is written %2B); both are compared in constant time. Without it: 401
// with WWW-Authenticate: Bearer. A request over max_request_bytes (413 or 431), a malformed one (400) or one not
// received within read_timeout_s of its first byte (408) is answered and ends its connection; the server keeps
// serving. The connections are serve/http_connection.h's (keep-alive, pipelining, 100 Continue, a lingering close).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace moe::launcher {

struct CoordinatorHttpOptions {
  std::string host = "127.0.0.1";        // address to bind (an IP address or a host name)
  int port = 0;                          // 0: an ephemeral port (CoordinatorHttp::port() tells which)
  std::string api_key;                   // empty: every route is open
  int64_t max_request_bytes = 64 << 10;  // limit of the request line and headers (431), and of a body (413)
  double read_timeout_s = 15;            // a request must arrive in full within this from its first byte (408), a
                                         // response be written within it, an idle connection wait at most this
  int max_connections = 64;              // open connections; one more is closed at once
};

class CoordinatorHttp {
 public:
  // Binds and listens on opt.host:opt.port now; throws moe::Error naming host:port when it cannot (address in use,
  // unknown host, port out of range). `status_json` is called on the I/O thread for every authorized GET /status,
  // must be thread-safe and returns the status document (JSON text, sent as is); an exception from it is answered
  // 500 with its message.
  CoordinatorHttp(std::function<std::string()> status_json, const CoordinatorHttpOptions& opt);
  ~CoordinatorHttp();  // stop()
  CoordinatorHttp(const CoordinatorHttp&) = delete;
  CoordinatorHttp& operator=(const CoordinatorHttp&) = delete;

  int port() const;  // the bound port
  // Starts the I/O thread (once; again is a no-op). Throws moe::Error after stop().
  void start();
  // Closes the listener and every connection, and joins the I/O thread. Idempotent; thread-safe, but not from the
  // I/O thread (the status callback) itself.
  void stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

// The dashboard page served at GET /: HTML with inline CSS and JavaScript, no external resources. It fetches
// `status` (relative to the page; with the page's `key` query parameter as a Bearer token) every second and renders
// the job header (#job), the loss curve (#loss-chart), ranks (#ranks), restart events (#events), the per-expert load
// heat map (#expert-heatmap) and replicas (#replicas). document.body.dataset.updated counts successful refreshes;
// dataset.state is "ok" after a successful one, "error" after a failed one.
std::string_view dashboard_html();

}  // namespace moe::launcher
