#include "launcher/coordinator_http.h"

// clang-format off
#include <utility>  // before any Boost.Asio header: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "core/log.h"
#include "serve/http_server.h"
#include "serve/openai.h"

namespace moe::launcher {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

constexpr size_t kMaxTargetInMessage = 200;  // characters of a request target quoted in an error message
constexpr double kLingerSeconds = 1.0;       // reading (and dropping) what a client still sends before closing
constexpr size_t kLingerBytes = 4096;        // one read while lingering

std::chrono::steady_clock::duration duration_of(double s) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s));
}

std::string_view view(beast::string_view s) { return std::string_view(s.data(), s.size()); }

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// ---- replies ----

// A complete response.
struct Reply {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
};

Reply json_reply(int status, std::string body) {
  Reply r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

// The serving API's error JSON (its type from the status); 401 carries WWW-Authenticate: Bearer.
Reply error_reply(int status, std::string message, std::string code = "") {
  Reply r = json_reply(status, serve::error_json(serve::ApiError{status, std::move(message), "", std::move(code)}));
  if (status == 401) r.headers.emplace_back("WWW-Authenticate", "Bearer");
  return r;
}

// The page may only run its own inline script and style and fetch from its own origin; it never sends the URL (and
// its key) as a referrer and cannot be framed.
constexpr const char* kPagePolicy =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

Reply page_reply() {
  Reply r = json_reply(200, std::string(dashboard_html()));
  r.content_type = "text/html; charset=utf-8";
  r.headers.emplace_back("Content-Security-Policy", kPagePolicy);
  r.headers.emplace_back("Referrer-Policy", "no-referrer");
  return r;
}

// ---- authorization ----

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// s decoded as application/x-www-form-urlencoded ('+' is a space, %XX a byte); nullopt when an escape is malformed.
std::optional<std::string> form_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') {
      out += ' ';
    } else if (s[i] != '%') {
      out += s[i];
    } else {
      if (i + 2 >= s.size() || hex_value(s[i + 1]) < 0 || hex_value(s[i + 2]) < 0) return std::nullopt;
      out += static_cast<char>(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2]));
      i += 2;
    }
  }
  return out;
}

// The decoded value of the first query parameter `name` ("" when its escapes are malformed), or nullopt when absent.
std::optional<std::string> query_param(std::string_view query, std::string_view name) {
  while (!query.empty()) {
    const size_t amp = query.find('&');
    const std::string_view part = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    const size_t eq = part.find('=');
    if (part.substr(0, eq) != name) continue;
    if (eq == std::string_view::npos) return std::string();
    return form_decode(part.substr(eq + 1)).value_or(std::string());
  }
  return std::nullopt;
}

// Why the request is not authorized, or "" when it is: no key is set, or `Authorization: Bearer <key>` or the query
// parameter `key` carries it. Both are compared (in constant time) whenever present.
std::string auth_failure(const Request& req, std::string_view query, const std::string& key) {
  if (key.empty()) return "";
  const auto header = req.find(http::field::authorization);
  const bool has_header = header != req.end();
  const std::string_view v = has_header ? trim(view(header->value())) : std::string_view();
  const bool bearer = v.size() > 7 && beast::iequals(beast::string_view(v.data(), 7), "Bearer ");
  const bool header_ok = serve::constant_time_equal(bearer ? trim(v.substr(7)) : std::string_view(), key) && bearer;
  const std::optional<std::string> param = query_param(query, "key");
  const bool param_ok = param && serve::constant_time_equal(*param, key);
  if (header_ok || param_ok) return "";
  if (!has_header && !param)
    return "Missing API key: send the header 'Authorization: Bearer <key>' (or open the dashboard as /?key=<key>)";
  if (has_header && !bearer && !param) return "The Authorization header must be 'Bearer <key>'";
  return "Incorrect API key provided";
}

// ---- routing ----

// What the connections share; it lives as long as any of them. `sessions` is touched on the I/O thread only.
class Session;
struct Core {
  std::function<std::string()> status_json;
  CoordinatorHttpOptions opt;
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions;
};

Reply status_reply(const Core& core) {
  try {
    return json_reply(200, core.status_json());
  } catch (const std::exception& e) {
    MOE_WARN("coordinator http: the status document failed: " << e.what());
    return error_reply(500, std::string("internal error: the status document failed: ") + e.what(), "internal_error");
  }
}

// Answers one request.
Reply route(const Request& req, const Core& core) {
  const std::string_view target = view(req.target());
  const size_t q = target.find('?');
  const std::string_view path = target.substr(0, q);
  const std::string_view query = q == std::string_view::npos ? std::string_view() : target.substr(q + 1);
  if (path != "/health") {
    const std::string why = auth_failure(req, query, core.opt.api_key);
    if (!why.empty()) return error_reply(401, why, "invalid_api_key");
  }
  const std::string method(view(req.method_string()));
  if (path != "/" && path != "/status" && path != "/health") {
    const std::string shown = serve::utf8_sanitize(std::string(target.substr(0, kMaxTargetInMessage)));
    return error_reply(404, "Invalid URL (" + method + " " + shown + "): the routes are /, /status and /health");
  }
  if (req.method() != http::verb::get) {
    Reply r = error_reply(405, "Method " + method + " is not allowed on " + std::string(path) + " (allowed: GET)");
    r.headers.emplace_back("Allow", "GET");
    return r;
  }
  if (path == "/health") return json_reply(200, R"({"status":"ok"})");
  if (path == "/status") return status_reply(core);
  return page_reply();
}

// The reply to a request that could not be read (then the connection closes), or nullopt when there is nobody to
// answer: the client closed the connection or it failed, or the read timed out (the stream closed the socket).
std::optional<Reply> read_error_reply(const beast::error_code& ec, const CoordinatorHttpOptions& opt) {
  const std::string limit = std::to_string(opt.max_request_bytes) + " bytes";
  if (ec == http::error::body_limit) return error_reply(413, "the request body is over the limit of " + limit);
  if (ec == http::error::header_limit)
    return error_reply(431, "the request line and headers are over the limit of " + limit);
  const auto& http_category = http::make_error_code(http::error::bad_target).category();
  if (&ec.category() == &http_category && ec != http::error::end_of_stream && ec != http::error::partial_message)
    return error_reply(400, "malformed HTTP request: " + ec.message());
  return std::nullopt;
}

// ---- one connection ----

// One TCP connection: reads requests (keep-alive; pipelined bytes stay in the buffer), answers each in order.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, std::shared_ptr<Core> core) : stream_(std::move(socket)), core_(std::move(core)) {}
  ~Session() {
    if (!closed_) core_->sessions.erase(this);
  }
  void start() {
    core_->sessions[this] = weak_from_this();
    beast::error_code ec;
    stream_.socket().set_option(tcp::no_delay(true), ec);
    read();
  }
  // Now: drops the connection (pending operations end with operation_aborted).
  void close() {
    if (closed_) return;
    closed_ = true;
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.socket().close(ec);
    core_->sessions.erase(this);
  }

 private:
  void read();
  void on_read(const beast::error_code& ec);
  void write(const Reply& r, unsigned version, bool keep_alive);
  void on_write(const beast::error_code& ec, bool keep_alive);
  void linger();
  void drain();

  beast::tcp_stream stream_;
  std::shared_ptr<Core> core_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  Response res_;
  char drain_[kLingerBytes];
  bool closed_ = false;
};

void Session::read() {
  parser_.emplace();
  parser_->header_limit(static_cast<uint32_t>(core_->opt.max_request_bytes));
  parser_->body_limit(static_cast<uint64_t>(core_->opt.max_request_bytes));
  stream_.expires_after(duration_of(core_->opt.read_timeout_s));
  http::async_read(stream_, buffer_, *parser_,
                   [self = shared_from_this()](const beast::error_code& ec, size_t) { self->on_read(ec); });
}

void Session::on_read(const beast::error_code& ec) {
  if (closed_) return;
  if (ec) {
    const std::optional<Reply> r = read_error_reply(ec, core_->opt);
    return r ? write(*r, 11, false) : close();
  }
  const Request req = parser_->release();
  Reply r;
  try {
    r = route(req, *core_);
  } catch (const std::exception& e) {  // a bug or out of memory: answer it, keep serving
    MOE_WARN("coordinator http: " << req.method_string() << " " << req.target() << " failed: " << e.what());
    r = error_reply(500, std::string("internal error: ") + e.what(), "internal_error");
  }
  write(r, req.version(), req.keep_alive());
}

void Session::write(const Reply& r, unsigned version, bool keep_alive) {
  res_ = Response{static_cast<http::status>(r.status), version};
  res_.set(http::field::server, "moe-coordinator");
  res_.set(http::field::content_type, r.content_type);
  res_.set(http::field::cache_control, "no-store");
  res_.set("X-Content-Type-Options", "nosniff");
  for (const auto& [k, v] : r.headers) res_.set(k, v);
  res_.keep_alive(keep_alive);
  res_.body() = r.body;
  res_.prepare_payload();
  stream_.expires_after(duration_of(core_->opt.read_timeout_s));  // a client that stops reading is dropped
  http::async_write(stream_, res_, [self = shared_from_this(), keep_alive](const beast::error_code& ec, size_t) {
    self->on_write(ec, keep_alive);
  });
}

void Session::on_write(const beast::error_code& ec, bool keep_alive) {
  if (closed_) return;
  if (ec) return close();
  if (keep_alive) return read();
  linger();
}

// Closing after a response: stop sending, then drop what the client still sends (the rest of an oversized request)
// until it closes or kLingerSeconds pass, so that it reads the response instead of a reset.
void Session::linger() {
  beast::error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  buffer_.consume(buffer_.size());
  stream_.expires_after(duration_of(kLingerSeconds));  // one deadline for every read below
  drain();
}

void Session::drain() {
  stream_.async_read_some(net::buffer(drain_), [self = shared_from_this()](const beast::error_code& ec, size_t) {
    if (self->closed_) return;
    if (ec) return self->close();  // EOF, timeout, reset
    self->drain();
  });
}

// ---- the listener ----

tcp::endpoint resolve(net::io_context& ioc, const std::string& host, int port) {
  beast::error_code ec;
  const net::ip::address addr = net::ip::make_address(host, ec);
  if (!ec) return tcp::endpoint(addr, static_cast<unsigned short>(port));
  tcp::resolver resolver(ioc);
  const auto results = resolver.resolve(host, std::to_string(port), ec);
  MOE_CHECK(!ec && !results.empty(),
            "cannot listen on " << host << ":" << port << ": unknown host (" << ec.message() << ")");
  return results.begin()->endpoint();
}

// Accepts connections: up to max_connections become sessions, any more are closed at once.
class Listener : public std::enable_shared_from_this<Listener> {
 public:
  Listener(net::io_context& ioc, std::shared_ptr<Core> core);  // binds and listens
  void start() { accept(); }
  void close() {
    beast::error_code ec;
    acceptor_.close(ec);
    retry_.cancel();
  }
  int port() const { return port_; }

 private:
  void accept();
  void on_accept(const beast::error_code& ec, tcp::socket socket);

  std::shared_ptr<Core> core_;
  tcp::acceptor acceptor_;
  net::steady_timer retry_;
  int port_ = 0;
};

Listener::Listener(net::io_context& ioc, std::shared_ptr<Core> core)
    : core_(std::move(core)), acceptor_(ioc), retry_(ioc) {
  const CoordinatorHttpOptions& o = core_->opt;
  const std::string where = o.host + ":" + std::to_string(o.port);
  MOE_CHECK(o.port >= 0 && o.port <= 65535, "cannot listen on " << where << ": the port must be in [0, 65535]");
  const tcp::endpoint ep = resolve(ioc, o.host, o.port);
  beast::error_code ec;
  acceptor_.open(ep.protocol(), ec);
  MOE_CHECK(!ec, "cannot listen on " << where << ": " << ec.message());
  acceptor_.set_option(net::socket_base::reuse_address(true), ec);
  acceptor_.bind(ep, ec);
  MOE_CHECK(!ec, "cannot listen on " << where << ": " << ec.message());
  acceptor_.listen(net::socket_base::max_listen_connections, ec);
  MOE_CHECK(!ec, "cannot listen on " << where << ": " << ec.message());
  port_ = acceptor_.local_endpoint().port();
}

void Listener::accept() {
  acceptor_.async_accept([self = shared_from_this()](const beast::error_code& ec, tcp::socket socket) {
    self->on_accept(ec, std::move(socket));
  });
}

void Listener::on_accept(const beast::error_code& ec, tcp::socket socket) {
  if (!acceptor_.is_open()) return;  // stopped
  if (ec) {                          // e.g. out of file descriptors: try again shortly instead of spinning
    MOE_WARN("coordinator http: accept failed: " << ec.message() << "; retrying");
    retry_.expires_after(std::chrono::milliseconds(50));
    retry_.async_wait([self = shared_from_this()](const beast::error_code& e) {
      if (!e) self->accept();
    });
    return;
  }
  if (core_->sessions.size() < static_cast<size_t>(core_->opt.max_connections)) {
    std::make_shared<Session>(std::move(socket), core_)->start();
  } else {
    MOE_WARN("coordinator http: " << core_->sessions.size() << " connections open (max_connections); closing one more");
    beast::error_code ignored;
    socket.close(ignored);
  }
  accept();
}

void check_options(const std::function<std::string()>& status_json, const CoordinatorHttpOptions& o) {
  const std::string where = o.host + ":" + std::to_string(o.port);
  MOE_CHECK(bool(status_json), "coordinator http on " << where << ": no status callback");
  MOE_CHECK(o.max_request_bytes > 0 && o.max_request_bytes <= (int64_t(1) << 30),
            "coordinator http on " << where << ": max_request_bytes must be in [1, 2^30], not " << o.max_request_bytes);
  MOE_CHECK(o.read_timeout_s > 0,
            "coordinator http on " << where << ": read_timeout_s must be > 0, not " << o.read_timeout_s);
  MOE_CHECK(o.max_connections > 0,
            "coordinator http on " << where << ": max_connections must be > 0, not " << o.max_connections);
}

}  // namespace

// ---- CoordinatorHttp ----

class CoordinatorHttp::Impl {
 public:
  Impl(std::function<std::string()> status_json, const CoordinatorHttpOptions& opt)
      : work_(net::make_work_guard(ioc_)),
        core_(std::make_shared<Core>(Core{std::move(status_json), opt, {}})),
        listener_(std::make_shared<Listener>(ioc_, core_)) {}
  ~Impl() { stop(); }
  int port() const { return listener_->port(); }
  void start();
  void stop();

 private:
  void run();
  void shutdown_all();  // on the I/O thread (or before it started)

  net::io_context ioc_;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work_;
  std::shared_ptr<Core> core_;
  std::shared_ptr<Listener> listener_;
  std::thread thread_;
  std::mutex mu_;
  bool started_ = false, stopped_ = false;
};

void CoordinatorHttp::Impl::start() {
  std::lock_guard<std::mutex> lock(mu_);
  MOE_CHECK(!stopped_, "CoordinatorHttp::start after stop (" << core_->opt.host << ":" << port() << ")");
  if (started_) return;
  started_ = true;
  listener_->start();
  thread_ = std::thread([this] { run(); });
  MOE_DEBUG("coordinator http: listening on http://" << core_->opt.host << ":" << port()
                                                     << (core_->opt.api_key.empty() ? " (open)" : " (API key)"));
}

void CoordinatorHttp::Impl::run() {
  while (true) {
    try {
      ioc_.run();
      return;
    } catch (const std::exception& e) {  // a handler threw: log it and keep serving
      MOE_WARN("coordinator http: I/O thread: " << e.what());
    }
  }
}

void CoordinatorHttp::Impl::stop() {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopped_) return;
  stopped_ = true;
  if (started_) {
    net::post(ioc_, [this] { shutdown_all(); });
    thread_.join();
  } else {
    shutdown_all();
  }
}

void CoordinatorHttp::Impl::shutdown_all() {
  listener_->close();
  std::vector<std::shared_ptr<Session>> sessions;
  for (auto& [p, w] : core_->sessions)
    if (auto s = w.lock()) sessions.push_back(std::move(s));
  for (auto& s : sessions) s->close();
  work_.reset();
  ioc_.stop();
}

CoordinatorHttp::CoordinatorHttp(std::function<std::string()> status_json, const CoordinatorHttpOptions& opt) {
  check_options(status_json, opt);
  impl_ = std::make_unique<Impl>(std::move(status_json), opt);
}
CoordinatorHttp::~CoordinatorHttp() = default;
int CoordinatorHttp::port() const { return impl_->port(); }
void CoordinatorHttp::start() { impl_->start(); }
void CoordinatorHttp::stop() { impl_->stop(); }

}  // namespace moe::launcher
