#include "launcher/replica_proxy.h"

// clang-format off
#include <utility>  // before any Boost.Asio header: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <algorithm>
#include <array>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cctype>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string_view>

#include "core/error.h"
#include "core/json.h"
#include "core/log.h"
#include "serve/http_connection.h"
#include "serve/http_service.h"
#include "serve/openai.h"

namespace moe::launcher {

// ---- ReplicaSet ----

void ReplicaSet::set(std::vector<Replica> replicas) {
  std::set<int> ids;
  for (const Replica& r : replicas) {
    MOE_CHECK(r.id >= 0, "replica id " << r.id << " is negative");
    MOE_CHECK(ids.insert(r.id).second, "replica id " << r.id << " appears twice");
    MOE_CHECK(r.port >= 1 && r.port <= 65535, "replica " << r.id << ": port " << r.port << " is outside [1, 65535]");
  }
  std::lock_guard<std::mutex> lock(mu_);
  replicas_ = std::move(replicas);
  failed_.clear();
}

std::vector<Replica> ReplicaSet::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Replica> out = replicas_;
  for (Replica& r : out) r.healthy = r.healthy && !failed_.count(r.id);
  return out;
}

void ReplicaSet::mark_failed(int id) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const Replica& r : replicas_)
    if (r.id == id) failed_.insert(id);
}

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using Request = http::request<http::string_body>;
using UpstreamParser = http::response_parser<http::buffer_body>;
using Reply = serve::HttpReply;

constexpr size_t kBodyPiece = 16 << 10;              // one read of a replica's response body
constexpr uint32_t kUpstreamHeaderLimit = 64 << 10;  // a replica's response head
constexpr size_t kMaxHeldEvent = 1 << 20;            // an unfinished server-sent event is held back at most this long
constexpr const char* kChunkedEnd = "0\r\n\r\n";     // the last chunk of a chunked body

std::string where(const Replica& r) {
  return "replica " + std::to_string(r.id) + " (" + r.host + ":" + std::to_string(r.port) + ")";
}

std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

// ---- load ----

// Requests in flight per replica id. Thread-safe (the I/O thread counts, in_flight() reads).
class LoadTable {
 public:
  // The healthy replica of `replicas` not in `tried` with the fewest requests in flight (ties: the lower id), its
  // count incremented (release() undoes it); nullopt when there is none.
  std::optional<Replica> acquire(const std::vector<Replica>& replicas, const std::set<int>& tried) {
    std::lock_guard<std::mutex> lock(mu_);
    const Replica* best = nullptr;
    int64_t best_load = 0;
    for (const Replica& r : replicas) {
      if (!r.healthy || tried.count(r.id)) continue;
      const auto it = counts_.find(r.id);
      const int64_t load = it == counts_.end() ? 0 : it->second;
      if (!best || load < best_load || (load == best_load && r.id < best->id)) {
        best = &r;
        best_load = load;
      }
    }
    if (!best) return std::nullopt;
    ++counts_[best->id];
    return *best;
  }
  void release(int id) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = counts_.find(id);
    if (it != counts_.end() && --it->second <= 0) counts_.erase(it);
  }
  // Indexed by id: one more entry than the largest id of `known` or with a request in flight.
  std::vector<int64_t> by_id(const std::vector<Replica>& known) const {
    std::lock_guard<std::mutex> lock(mu_);
    int max_id = -1;
    for (const Replica& r : known) max_id = std::max(max_id, r.id);
    if (!counts_.empty()) max_id = std::max(max_id, counts_.rbegin()->first);
    std::vector<int64_t> out(size_t(max_id + 1), 0);
    for (const auto& [id, n] : counts_) out[size_t(id)] = n;
    return out;
  }

 private:
  mutable std::mutex mu_;
  std::map<int, int64_t> counts_;
};

// ---- replies and headers ----

// A response of the proxy itself: OpenAI's error object (Retry-After on 429 and 503).
Reply error_reply(int status, std::string message, std::string code, const ProxyOptions& opt) {
  return serve::error_reply(serve::ApiError{status, std::move(message), "", std::move(code)}, opt.retry_after_s);
}

// The header names listed in the Connection header (lower case): hop-by-hop too.
std::vector<std::string> connection_tokens(const http::fields& f) {
  std::vector<std::string> out;
  for (const auto& token : http::token_list(f[http::field::connection])) {
    std::string t(token.data(), token.size());
    std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    out.push_back(std::move(t));
  }
  return out;
}

// Headers that concern one connection (RFC 7230 6.1), never forwarded; Content-Length and Expect are set by the
// proxy for its own framing.
bool hop_by_hop(beast::string_view name, const std::vector<std::string>& tokens) {
  static constexpr const char* kHop[] = {
      "connection", "keep-alive",          "proxy-connection",   "transfer-encoding", "te",    "trailer",
      "upgrade",    "proxy-authorization", "proxy-authenticate", "content-length",    "expect"};
  for (const char* h : kHop)
    if (beast::iequals(name, h)) return true;
  for (const std::string& t : tokens)
    if (beast::iequals(name, t)) return true;
  return false;
}

void copy_end_to_end(const http::fields& from, http::fields& to) {
  const std::vector<std::string> tokens = connection_tokens(from);
  for (const auto& f : from)
    if (!hop_by_hop(f.name_string(), tokens)) to.insert(f.name_string(), f.value());
}

// The bytes sent to replica `r` for the client's request: the same method, target, end-to-end headers and body,
// Content-Length for the body, Connection: close.
std::string upstream_request(const Request& in, const Replica& r) {
  Request out;
  out.version(11);
  if (in.method() == http::verb::unknown)
    out.method_string(in.method_string());
  else
    out.method(in.method());
  out.target(in.target());
  copy_end_to_end(in, out);
  if (out.find(http::field::host) == out.end()) out.set(http::field::host, r.host + ":" + std::to_string(r.port));
  out.set(http::field::connection, "close");
  out.body() = in.body();
  out.prepare_payload();
  std::ostringstream os;
  os << out;
  return os.str();
}

bool is_event_stream(const http::fields& f) {
  const beast::string_view type = f[http::field::content_type];
  constexpr beast::string_view kType = "text/event-stream";
  return type.size() >= kType.size() && beast::iequals(type.substr(0, kType.size()), kType);
}

// The length of the longest prefix of `s` made of complete server-sent events (each ends with a blank line:
// "\n\n", "\r\n\r\n" or "\r\r").
size_t complete_events(std::string_view s) {
  for (size_t i = s.size(); i >= 2; --i) {
    const char a = s[i - 2], b = s[i - 1];
    if ((a == '\n' && b == '\n') || (a == '\r' && b == '\r')) return i;
    if (i >= 4 && b == '\n' && a == '\r' && s[i - 3] == '\n' && s[i - 4] == '\r') return i;
  }
  return 0;
}

// Whether complete server-sent `events` of an OpenAI stream carry output: a token (a completion's non-empty text, a
// chat delta's non-empty content), a finish reason, an error or [DONE]. A chat stream's first chunk (the role, no
// content) does not: until an event that does, the replica may still fail "before the first token" and the request
// is retried elsewhere. Data that is not JSON counts as output (it is passed on as it came).
bool carries_output(std::string_view events) {
  size_t at = 0;
  while ((at = events.find("data:", at)) != std::string_view::npos) {
    at += 5;
    const size_t end = std::min(events.find_first_of("\r\n", at), events.size());
    std::string data(events.substr(at, end - at));
    at = end;
    data.erase(0, data.find_first_not_of(' '));
    if (data == "[DONE]") return true;
    JsonValue v;
    try {
      v = parse_json(data, "event");
    } catch (const Error&) {
      return true;
    }
    if (v.field("error")) return true;
    const JsonValue* choices = v.field("choices");
    if (!choices) return true;
    for (const JsonValue& c : choices->array) {
      const JsonValue* finish = c.field("finish_reason");
      const JsonValue* text = c.field("text");
      const JsonValue* delta = c.field("delta");
      const JsonValue* content = delta ? delta->field("content") : nullptr;
      if ((finish && finish->kind != JsonValue::kNull) || (text && !text->str.empty()) ||
          (content && !content->str.empty()))
        return true;
    }
  }
  return false;
}

// ---- one upstream connection ----

// One connection to one replica for one request (Connection: close): resolve and connect, send the request, read the
// response head, then its body piece by piece. Each step has a deadline; an expired one closes the connection and
// fails the step with net::error::timed_out. Handlers run on the I/O thread, also after close() (with an error).
class Upstream : public std::enable_shared_from_this<Upstream> {
 public:
  using Handler = std::function<void(beast::error_code)>;
  using BodyHandler = std::function<void(beast::error_code, std::string_view piece)>;
  Upstream(net::io_context& ioc, Replica r)
      : replica_(std::move(r)), resolver_(ioc), socket_(ioc), deadline_(ioc.get_executor()) {}
  const Replica& replica() const { return replica_; }
  void connect(double timeout_s, Handler h);
  void send(std::string bytes, double timeout_s, Handler h);
  // The response head (interim 1xx responses are skipped); a HEAD request's response has no body.
  void read_head(bool head_request, double timeout_s, Handler h);
  const UpstreamParser& parser() const { return *parser_; }
  bool body_done() const { return parser_->is_done(); }
  // The next bytes of the body (decoded from chunks); may be empty while !body_done(). With an error, `piece` holds
  // what was read before it.
  void read_body(double timeout_s, BodyHandler h);
  void close();

 private:
  void arm(double timeout_s);
  beast::error_code result(beast::error_code ec) const { return timed_out_ ? net::error::timed_out : ec; }

  Replica replica_;
  tcp::resolver resolver_;
  tcp::socket socket_;
  serve::Deadline deadline_;
  beast::flat_buffer buffer_;
  std::optional<UpstreamParser> parser_;
  std::string out_;
  std::array<char, kBodyPiece> piece_{};
  bool timed_out_ = false, closed_ = false;
};

void Upstream::arm(double timeout_s) {
  deadline_.arm(timeout_s, [self = shared_from_this()] {
    self->timed_out_ = true;
    self->close();
  });
}

void Upstream::connect(double timeout_s, Handler h) {
  arm(timeout_s);
  auto self = shared_from_this();
  auto done = [self, h](beast::error_code ec) {
    self->deadline_.disarm();
    h(self->result(ec));
  };
  beast::error_code ec;
  const net::ip::address addr = net::ip::make_address(replica_.host, ec);
  if (!ec) return socket_.async_connect(tcp::endpoint(addr, static_cast<unsigned short>(replica_.port)), done);
  resolver_.async_resolve(replica_.host, std::to_string(replica_.port),
                          [self, done](beast::error_code ec, const tcp::resolver::results_type& results) {
                            if (!ec && self->closed_) ec = net::error::operation_aborted;
                            if (ec) return done(ec);
                            net::async_connect(self->socket_, results,
                                               [done](beast::error_code ec, const tcp::endpoint&) { done(ec); });
                          });
}

void Upstream::send(std::string bytes, double timeout_s, Handler h) {
  out_ = std::move(bytes);
  arm(timeout_s);
  net::async_write(socket_, net::buffer(out_), [self = shared_from_this(), h](beast::error_code ec, size_t) {
    self->deadline_.disarm();
    h(self->result(ec));
  });
}

void Upstream::read_head(bool head_request, double timeout_s, Handler h) {
  parser_.emplace();
  parser_->header_limit(kUpstreamHeaderLimit);
  parser_->body_limit(std::numeric_limits<uint64_t>::max());
  if (head_request) parser_->skip(true);
  arm(timeout_s);
  http::async_read_header(socket_, buffer_, *parser_,
                          [self = shared_from_this(), head_request, timeout_s, h](beast::error_code ec, size_t) {
                            self->deadline_.disarm();
                            if (!ec && self->parser_->get().result_int() / 100 == 1)
                              return self->read_head(head_request, timeout_s, h);  // 100 Continue and the like
                            h(self->result(ec));
                          });
}

void Upstream::read_body(double timeout_s, BodyHandler h) {
  auto& body = parser_->get().body();
  body.data = piece_.data();
  body.size = piece_.size();
  arm(timeout_s);
  http::async_read_some(socket_, buffer_, *parser_, [self = shared_from_this(), h](beast::error_code ec, size_t) {
    self->deadline_.disarm();
    if (ec == http::error::need_buffer) ec = {};  // the piece is full
    const size_t n = self->piece_.size() - self->parser_->get().body().size;
    h(self->result(ec), std::string_view(self->piece_.data(), n));
  });
}

void Upstream::close() {
  if (closed_) return;
  closed_ = true;
  deadline_.disarm();
  resolver_.cancel();
  beast::error_code ec;
  socket_.shutdown(tcp::socket::shutdown_both, ec);
  socket_.close(ec);
}

// ---- shared state ----

class ClientSession;
class ProxiedRequest;

// What the connections and proxied requests share; it lives as long as any of them. Fields without a comment are
// touched on the I/O thread only.
struct ProxyCore {
  ProxyCore(ReplicaSet& r, const ProxyOptions& o, net::io_context& i, std::shared_ptr<serve::ConnectionSet> c)
      : replicas(r), opt(o), ioc(i), connections(std::move(c)) {}
  ReplicaSet& replicas;  // thread-safe
  const ProxyOptions opt;
  net::io_context& ioc;
  LoadTable load;  // thread-safe
  std::shared_ptr<serve::ConnectionSet> connections;
};

// ---- one client connection ----

// One client connection (serve::HttpConnection reads its requests and writes in order what the proxy sends):
// answers /health itself and hands every other request to a ProxiedRequest, which writes what it relays. While a
// request is proxied a read stays pending to notice the client going away.
class ClientSession : public serve::HttpConnection {
 public:
  ClientSession(tcp::socket socket, std::shared_ptr<ProxyCore> core, bool admitted)
      : HttpConnection(std::move(socket), core->connections, admitted), core_(std::move(core)) {}
  ~ClientSession() override;

 private:
  void on_request(Request req) override;
  void on_closed() override;  // the request being proxied closes its upstream
  void on_response_end() override { request_.reset(); }
  Reply health(const Request& req) const;

  std::shared_ptr<ProxyCore> core_;
  std::shared_ptr<ProxiedRequest> request_;
};

// ---- one proxied request ----

// One client request on its way through the replicas: picks the least-loaded healthy replica (and the next ones
// while it may retry), relays the response to the session as it arrives, and ends it cleanly or, after a failure, as
// its framing allows. Holds the replica's load count while an upstream connection is open.
class ProxiedRequest : public std::enable_shared_from_this<ProxiedRequest> {
 public:
  ProxiedRequest(std::shared_ptr<ProxyCore> core, std::shared_ptr<ClientSession> session, Request req)
      : core_(std::move(core)), session_(std::move(session)), req_(std::move(req)) {}
  ~ProxiedRequest() { drop_upstream(); }
  void start() { next_replica(); }
  void client_gone();  // the client's connection closed: drop the upstream (the replica cancels the request)

 private:
  enum class Framing { kNone, kLength, kChunked, kClose };  // of the body towards the client
  bool stale(const std::shared_ptr<Upstream>& up) const { return done_ || up != up_; }
  void next_replica();
  void try_replica(const Replica& r);
  void send_request();
  void on_head(beast::error_code ec);
  bool move_on_503();
  void relay_head();
  void read_body();
  void on_body(beast::error_code ec, std::string_view piece);
  std::string frame(std::string_view bytes) const;
  void end_body();
  void fail_attempt(const std::string& why);
  void fail_response(const std::string& why, bool mark);
  void respond(const Reply& r);
  void drop_upstream();

  std::shared_ptr<ProxyCore> core_;
  std::shared_ptr<ClientSession> session_;  // reset once the response is handed over or the client is gone
  Request req_;
  std::set<int> tried_;
  std::shared_ptr<Upstream> up_;
  Framing framing_ = Framing::kNone;
  bool done_ = false, sse_ = false, saw_done_ = false;
  std::string held_;  // an event stream's unfinished event (and, with head_, every event before its first output)
  std::string head_;  // an event stream's response head, held back until its first output (carries_output)
};

void ProxiedRequest::next_replica() {
  const std::optional<Replica> r = core_->load.acquire(core_->replicas.snapshot(), tried_);
  if (r) return try_replica(*r);
  std::string msg = "no healthy replica";
  if (tried_.empty()) {
    msg += " is available";
  } else {
    msg += " could take the request (tried replicas";
    for (int id : tried_) msg += " " + std::to_string(id);
    msg += ")";
  }
  respond(error_reply(503, msg + "; retry after " + std::to_string(core_->opt.retry_after_s) + " s", "", core_->opt));
}

// `r`'s load is already counted (acquire): released by drop_upstream.
void ProxiedRequest::try_replica(const Replica& r) {
  tried_.insert(r.id);
  held_.clear();
  head_.clear();
  sse_ = saw_done_ = false;
  up_ = std::make_shared<Upstream>(core_->ioc, r);
  auto self = shared_from_this();
  up_->connect(core_->opt.connect_timeout_s, [self, up = up_](beast::error_code ec) {
    if (self->stale(up)) return;
    if (ec) return self->fail_attempt("cannot connect: " + ec.message());
    self->send_request();
  });
}

void ProxiedRequest::send_request() {
  auto self = shared_from_this();
  up_->send(upstream_request(req_, up_->replica()), core_->opt.request_timeout_s,
            [self, up = up_](beast::error_code ec) {
              if (self->stale(up)) return;
              if (ec) return self->fail_attempt("the request could not be sent: " + ec.message());
              up->read_head(self->req_.method() == http::verb::head, self->core_->opt.request_timeout_s,
                            [self, up](beast::error_code ec) {
                              if (!self->stale(up)) self->on_head(ec);
                            });
            });
}

void ProxiedRequest::on_head(beast::error_code ec) {
  if (ec == net::error::timed_out) {
    const std::string msg = where(up_->replica()) + " sent no response within request_timeout_s = " +
                            seconds_text(core_->opt.request_timeout_s) + " s";
    MOE_WARN("proxy: " << msg);
    return respond(error_reply(504, msg, "replica_timeout", core_->opt));
  }
  if (ec) return fail_attempt("the connection failed before the response: " + ec.message());
  if (up_->parser().get().result_int() == 503 && move_on_503()) return;
  relay_head();
}

// A 503 (loading, draining): the request goes to another replica if one is left.
bool ProxiedRequest::move_on_503() {
  const std::optional<Replica> next = core_->load.acquire(core_->replicas.snapshot(), tried_);
  if (!next) return false;
  MOE_DEBUG("proxy: " << where(up_->replica()) << " answered 503; trying replica " << next->id);
  drop_upstream();
  try_replica(*next);
  return true;
}

// Before any byte reached the client: mark the replica failed and try the next one.
void ProxiedRequest::fail_attempt(const std::string& why) {
  const Replica r = up_->replica();
  MOE_WARN("proxy: " << where(r) << ": " << why << "; marked failed, the request goes to another replica");
  core_->replicas.mark_failed(r.id);
  drop_upstream();
  next_replica();
}

void ProxiedRequest::relay_head() {
  const auto& head = up_->parser().get();
  const int status = head.result_int();
  http::response<http::empty_body> res{head.result(), session_->version()};
  res.reason(head.reason());
  copy_end_to_end(head, res);
  sse_ = is_event_stream(head);
  const auto length = up_->parser().content_length();
  if (req_.method() == http::verb::head || status == 204 || status == 304) {
    framing_ = Framing::kNone;  // no body: a Content-Length describes the body a GET would get
    if (head.find(http::field::content_length) != head.end())
      res.set(http::field::content_length, head[http::field::content_length]);
  } else if (length) {
    framing_ = Framing::kLength;
    res.content_length(*length);
  } else {
    framing_ = session_->version() >= 11 ? Framing::kChunked : Framing::kClose;
    if (framing_ == Framing::kChunked) res.chunked(true);
  }
  res.keep_alive(session_->keep_alive() && framing_ != Framing::kClose);
  std::ostringstream os;
  os << res.base();
  if (sse_ && framing_ != Framing::kLength && !up_->body_done())
    head_ = os.str();  // sent with the first output
  else
    session_->send(os.str());
  if (up_->body_done()) return end_body();
  read_body();
}

void ProxiedRequest::read_body() {
  auto self = shared_from_this();
  up_->read_body(core_->opt.request_timeout_s, [self, up = up_](beast::error_code ec, std::string_view piece) {
    if (!self->stale(up)) self->on_body(ec, piece);
  });
}

void ProxiedRequest::on_body(beast::error_code ec, std::string_view piece) {
  std::string out;
  if (sse_) {  // whole events only, so that an error event after a failure starts on a fresh line
    held_.append(piece.data(), piece.size());
    size_t n = held_.size() > kMaxHeldEvent ? held_.size() : complete_events(held_);
    if (!head_.empty() && held_.size() <= kMaxHeldEvent && !carries_output(std::string_view(held_).substr(0, n))) n = 0;
    out = held_.substr(0, n);
    held_.erase(0, n);
    if (!out.empty()) saw_done_ = out.ends_with(serve::kSseDone);
  } else {
    out.assign(piece.data(), piece.size());
  }
  auto next = [self = shared_from_this(), ec, up = up_] {
    if (self->stale(up)) return;
    if (ec && !self->head_.empty()) {  // nothing reached the client yet: as a failure before the response
      if (ec != net::error::timed_out)
        return self->fail_attempt("the connection failed before the first token: " + ec.message());
      return self->respond(error_reply(504,
                                       where(up->replica()) + " sent no token within request_timeout_s = " +
                                           seconds_text(self->core_->opt.request_timeout_s) + " s",
                                       "replica_timeout", self->core_->opt));
    }
    if (ec == net::error::timed_out)
      return self->fail_response(
          "sent nothing for request_timeout_s = " + seconds_text(self->core_->opt.request_timeout_s) + " s", false);
    if (ec) return self->fail_response("the connection failed: " + ec.message(), true);
    if (up->body_done()) return self->end_body();
    self->read_body();
  };
  if (out.empty()) return next();
  session_->send(std::exchange(head_, "") + frame(out),
                 next);  // the next read waits for the client to take this piece (backpressure)
}

std::string ProxiedRequest::frame(std::string_view bytes) const {
  if (bytes.empty() || framing_ != Framing::kChunked) return std::string(bytes);
  char size[20];
  std::snprintf(size, sizeof size, "%zx\r\n", bytes.size());
  return size + std::string(bytes) + "\r\n";
}

// The replica's response is complete: so is the client's.
void ProxiedRequest::end_body() {
  std::string tail = std::exchange(head_, "") + frame(held_);  // an unfinished last event passes as it came
  if (framing_ == Framing::kChunked) tail += kChunkedEnd;
  drop_upstream();
  done_ = true;
  auto s = std::exchange(session_, nullptr);
  s->send(std::move(tail));
  s->end_response(framing_ == Framing::kClose);
}

// After the response head reached the client: an event stream (with a framing the proxy chose) ends with an error
// event and [DONE]; any other body is cut short by closing the connection.
void ProxiedRequest::fail_response(const std::string& why, bool mark) {
  const Replica r = up_->replica();
  MOE_WARN("proxy: " << where(r) << " failed during its response: " << why << (mark ? "; marked failed" : "")
                     << "; the client's response is cut short");
  if (mark) core_->replicas.mark_failed(r.id);
  drop_upstream();
  done_ = true;
  auto s = std::exchange(session_, nullptr);
  if (sse_ && (framing_ == Framing::kChunked || framing_ == Framing::kClose)) {
    std::string events;
    if (!saw_done_) {
      const serve::ApiError e{502, "replica " + std::to_string(r.id) + " failed during the response: " + why, "",
                              "replica_failed"};
      events = serve::sse_event(serve::error_json(e)) + serve::kSseDone;
    }
    s->send(frame(events) + (framing_ == Framing::kChunked ? kChunkedEnd : ""));
  }
  s->end_response(true);
}

void ProxiedRequest::respond(const Reply& r) {
  drop_upstream();
  done_ = true;
  if (auto s = std::exchange(session_, nullptr)) s->reply(r);
}

void ProxiedRequest::client_gone() {
  if (done_) return;
  done_ = true;
  session_.reset();
  drop_upstream();
}

void ProxiedRequest::drop_upstream() {
  if (!up_) return;
  core_->load.release(up_->replica().id);
  up_->close();
  up_.reset();
}

// ---- ClientSession ----

ClientSession::~ClientSession() {
  if (!open()) return;
  if (auto r = std::move(request_)) r->client_gone();
}

void ClientSession::on_closed() {
  if (auto r = std::move(request_)) r->client_gone();
}

void ClientSession::on_request(Request req) {
  const std::string_view target(req.target().data(), req.target().size());
  if (target.substr(0, target.find('?')) == "/health") return reply(health(req));
  auto self = std::static_pointer_cast<ClientSession>(shared_from_this());
  auto r = std::make_shared<ProxiedRequest>(core_, std::move(self), std::move(req));
  request_ = r;
  watch_client();
  r->start();
}

Reply ClientSession::health(const Request& req) const {
  if (req.method() != http::verb::get) {
    Reply r =
        error_reply(405, "Method " + std::string(req.method_string()) + " is not allowed on /health (allowed: GET)", "",
                    core_->opt);
    r.headers.emplace_back("Allow", "GET");
    return r;
  }
  int healthy = 0;
  for (const Replica& rep : core_->replicas.snapshot()) healthy += rep.healthy ? 1 : 0;
  const std::string n = std::to_string(healthy);
  if (healthy > 0) return serve::json_reply(200, R"({"status":"ok","replicas_healthy":)" + n + "}");
  Reply r = serve::json_reply(503, R"({"status":"unavailable","replicas_healthy":0})");
  r.headers.emplace_back("Retry-After", std::to_string(core_->opt.retry_after_s));
  return r;
}

// `o`, once every field is in range.
const ProxyOptions& checked(const ProxyOptions& o) {
  const std::string at = o.host + ":" + std::to_string(o.port);
  MOE_CHECK(o.max_body_bytes > 0, "proxy " << at << ": max_body_bytes must be > 0, got " << o.max_body_bytes);
  MOE_CHECK(o.max_header_bytes > 0, "proxy " << at << ": max_header_bytes must be > 0, got " << o.max_header_bytes);
  MOE_CHECK(o.max_connections > 0, "proxy " << at << ": max_connections must be > 0, got " << o.max_connections);
  MOE_CHECK(o.connect_timeout_s > 0 && o.request_timeout_s > 0 && o.client_timeout_s > 0 && o.idle_timeout_s > 0,
            "proxy " << at << ": every timeout must be > 0 s");
  MOE_CHECK(o.retry_after_s >= 0, "proxy " << at << ": retry_after_s must be >= 0, got " << o.retry_after_s);
  return o;
}

// The client connections' side of the options.
serve::ConnectionOptions connection_options(const ProxyOptions& o) {
  serve::ConnectionOptions c;
  c.server = "moe-proxy";
  c.max_connections = o.max_connections;
  c.refuse_over_limit = true;
  c.retry_after_s = o.retry_after_s;
  c.max_body_bytes = o.max_body_bytes;
  c.max_header_bytes = o.max_header_bytes;
  c.request_timeout_s = o.client_timeout_s;
  c.request_timeout_name = "client_timeout_s";
  c.idle_timeout_s = o.idle_timeout_s;
  return c;
}

}  // namespace

// ---- ReplicaProxy ----

class ReplicaProxy::Impl {
 public:
  Impl(ReplicaSet& replicas, const ProxyOptions& opt)
      : service_({"proxy", "ReplicaProxy", "proxy: "}, connection_options(checked(opt))),
        core_(std::make_shared<ProxyCore>(replicas, opt, service_.ioc(), service_.connections())) {
    service_.listen(opt.host, opt.port, [core = core_](tcp::socket socket, bool admitted) {
      std::make_shared<ClientSession>(std::move(socket), core, admitted)->start();
    });
  }
  ~Impl() { stop(); }
  int port() const { return service_.port(); }
  void start() {
    if (service_.start()) MOE_INFO("proxy: listening on http://" << core_->opt.host << ":" << port());
  }
  void stop() { service_.stop(); }
  std::vector<int64_t> in_flight() const { return core_->load.by_id(core_->replicas.snapshot()); }

 private:
  serve::HttpService service_;
  std::shared_ptr<ProxyCore> core_;
};

ReplicaProxy::ReplicaProxy(ReplicaSet& replicas, const ProxyOptions& opt)
    : impl_(std::make_unique<Impl>(replicas, opt)) {}
ReplicaProxy::~ReplicaProxy() = default;
int ReplicaProxy::port() const { return impl_->port(); }
void ReplicaProxy::start() { impl_->start(); }
void ReplicaProxy::stop() { impl_->stop(); }
std::vector<int64_t> ReplicaProxy::in_flight() const { return impl_->in_flight(); }

}  // namespace moe::launcher
