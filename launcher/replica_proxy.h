// The coordinator's front end: several serving replicas (each a `moe serve` group on its own port) behind one
// OpenAI-compatible HTTP endpoint (Boost.Beast, HTTP/1.1 keep-alive towards clients, one I/O thread).
//
// Routing: every request but the proxy's own GET /health goes, as it came (method, target, headers including
// Authorization, body; hop-by-hop headers dropped, `Connection: close` upstream: one connection per request), to the
// healthy replica with the fewest requests in flight through this proxy (ties: the lower id). The replicas check the
// API key themselves. The response is relayed as it arrives (status, headers, body piece by piece, never buffered
// whole): an unknown length is sent chunked to HTTP/1.1 clients; server-sent events are passed on event by event.
//
// Failure: a replica that cannot be reached (connection refused, connect_timeout_s) or whose connection fails before
// its response head arrived is marked failed in the ReplicaSet and the request goes to the next least-loaded healthy
// replica (each replica at most once per request); a 503 head (loading, draining) moves it on too, unless no other
// replica is left (then the 503 is relayed). An event stream's head (and a chat stream's role-only first chunk) is
// held back until its first output (a token, a finish reason, an error): a replica that dies before its first token
// is retried like one that died before its head, and the client sees one whole stream. No replica left: 503 with Retry-After and OpenAI's error object
// ("service_unavailable_error"). A replica that sends nothing for request_timeout_s: 504 before the response head,
// the response cut short after it. A replica failing after its response head reached the client ends that response:
// an event stream gets a last `data: {"error":{...}}` event, `data: [DONE]` and its end, then the connection closes;
// any other body is cut (the connection closes before its end, so the client sees it incomplete).
//
// Limits, each answered with OpenAI's error object while the proxy keeps serving: the body size (413), the header
// size (431), malformed requests (400), open connections (the connection over max_connections is answered 429 with
// Retry-After and closed), a request not received within client_timeout_s (408); an idle keep-alive connection is
// closed after idle_timeout_s, a client that does not read its response within client_timeout_s is dropped. A client
// that goes away (EOF, reset) while its request is proxied: the upstream connection is closed at once, so the replica
// cancels the request and frees its KV blocks.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace moe::launcher {

// One serving replica as the coordinator sees it.
struct Replica {
  int id = 0;            // unique, >= 0 (the coordinator's replica index)
  std::string host;      // an IP address or a host name
  int port = 0;          // its `moe serve` HTTP port
  bool healthy = false;  // its /health said ok and its group is up
};

// The replicas the coordinator currently runs. Thread-safe: the coordinator writes, the proxy reads on every request.
class ReplicaSet {
 public:
  // Replaces the list with the coordinator's view and forgets every mark_failed(). Throws moe::Error on a negative or
  // duplicate id or a port outside [1, 65535].
  void set(std::vector<Replica> replicas);
  // The current list, in the order set() gave; a replica marked failed since the last set() reads healthy = false.
  std::vector<Replica> snapshot() const;
  // The proxy saw replica `id` fail: unhealthy until the next set(). Unknown ids are ignored.
  void mark_failed(int id);

 private:
  mutable std::mutex mu_;
  std::vector<Replica> replicas_;
  std::set<int> failed_;
};

struct ProxyOptions {
  std::string host = "127.0.0.1";   // address to bind (an IP address or a host name)
  int port = 0;                     // 0: an ephemeral port (ReplicaProxy::port() tells which)
  int max_body_bytes = 1 << 20;     // request body limit (413 above it)
  double connect_timeout_s = 2;     // resolving and connecting to a replica (then the next replica is tried)
  double request_timeout_s = 600;   // the longest a replica may send nothing while answering (504 / cut short)
  int max_connections = 256;        // open client connections; the next one is answered 429 and closed
  int max_header_bytes = 16 << 10;  // request line + headers limit (431 above it)
  double client_timeout_s = 30;     // a request's header and body from its first byte (408); a write to the client
  double idle_timeout_s = 60;       // a keep-alive connection waiting for its next request is closed after this
  int retry_after_s = 1;            // the Retry-After of 429 and 503 answers
};

class ReplicaProxy {
 public:
  // Binds and listens on opt.host:opt.port now; throws moe::Error naming host:port when it cannot (address in use,
  // unknown host) or when an option is out of range. `replicas` must outlive the proxy.
  ReplicaProxy(ReplicaSet& replicas, const ProxyOptions& opt);
  ~ReplicaProxy();  // stop()
  ReplicaProxy(const ReplicaProxy&) = delete;
  ReplicaProxy& operator=(const ReplicaProxy&) = delete;

  int port() const;  // the bound port
  // Starts the I/O thread (once; throws moe::Error after stop()).
  void start();
  // Closes the listener and every connection (upstream ones included: the replicas cancel those requests) and joins
  // the I/O thread. Idempotent; thread-safe, but not from the I/O thread itself.
  void stop();
  // Requests being proxied, indexed by replica id: entry i counts those on replica i (0 for ids not in use); the
  // size is one more than the largest id in the ReplicaSet or with a request in flight. Thread-safe.
  std::vector<int64_t> in_flight() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe::launcher
