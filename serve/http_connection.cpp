#include "serve/http_connection.h"

#include <chrono>
#include <cstdio>
#include <sstream>

namespace moe::serve {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

constexpr size_t kWatchBytes = 4096;    // one read while waiting or while a request is answered
constexpr double kLingerSeconds = 1.0;  // reading (and dropping) what the client still sends before closing

std::string_view view(beast::string_view s) { return std::string_view(s.data(), s.size()); }

std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

std::string serialize(const HttpReply& r, const ConnectionOptions& opt, unsigned version, bool keep_alive) {
  http::response<http::string_body> res{static_cast<http::status>(r.status), version};
  res.set(http::field::server, opt.server);
  res.set(http::field::content_type, r.content_type);
  for (const auto& [k, v] : opt.headers) res.set(k, v);
  for (const auto& [k, v] : r.headers) res.set(k, v);
  res.keep_alive(keep_alive);
  res.body() = r.body;
  res.prepare_payload();
  std::ostringstream os;
  os << res;
  return os.str();
}

// The answer to a request that could not be read, or nullopt when there is nobody to answer (the client closed the
// connection, or it failed).
std::optional<ApiError> read_error(const beast::error_code& ec, bool timed_out, const ConnectionOptions& opt) {
  const auto error = [](int status, std::string message) { return ApiError{status, std::move(message), "", ""}; };
  const auto& http_category = http::make_error_code(http::error::bad_target).category();
  if (timed_out) {
    return error(408, "the request was not received within " + opt.request_timeout_name + " = " +
                          seconds_text(opt.request_timeout_s) + " s");
  }
  if (ec == http::error::body_limit)
    return error(413, "the request body is over the limit of " + std::to_string(opt.max_body_bytes) + " bytes");
  if (ec == http::error::header_limit) {
    return error(
        431, "the request line and headers are over the limit of " + std::to_string(opt.max_header_bytes) + " bytes");
  }
  if (&ec.category() == &http_category && ec != http::error::end_of_stream && ec != http::error::partial_message)
    return error(400, "malformed HTTP request: " + ec.message());
  return std::nullopt;
}

}  // namespace

HttpReply json_reply(int status, std::string body) {
  HttpReply r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

HttpReply error_reply(const ApiError& e, int retry_after_s) {
  HttpReply r = json_reply(e.status, error_json(e));
  if (e.status == 429 || e.status == 503) r.headers.emplace_back("Retry-After", std::to_string(retry_after_s));
  if (e.status == 401) r.headers.emplace_back("WWW-Authenticate", "Bearer");
  return r;
}

// ---- Deadline ----

void Deadline::arm(double s, std::function<void()> on_expiry) {
  using Clock = std::chrono::steady_clock;
  const uint64_t epoch = ++epoch_;
  timer_.expires_after(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s)));
  timer_.async_wait([this, epoch, f = std::move(on_expiry)](const beast::error_code& ec) {
    if (!ec && epoch == epoch_) f();
  });
}

void Deadline::disarm() {
  ++epoch_;
  timer_.cancel();
}

// ---- ConnectionSet ----

ConnectionSet::Admission ConnectionSet::admit() const {
  if (admitted_ < opt_.max_connections) return Admission::kAdmitted;
  if (opt_.refuse_over_limit && refused_ < opt_.max_connections) return Admission::kRefused;
  return Admission::kDropped;
}

void ConnectionSet::add(HttpConnection* c, bool admitted) {
  open_[c] = c->weak_from_this();
  ++(admitted ? admitted_ : refused_);
}

void ConnectionSet::remove(HttpConnection* c, bool admitted) {
  open_.erase(c);
  --(admitted ? admitted_ : refused_);
}

void ConnectionSet::close_all() {
  std::vector<std::shared_ptr<HttpConnection>> open;
  for (auto& [p, w] : open_)
    if (auto c = w.lock()) open.push_back(std::move(c));
  for (auto& c : open) c->close();
}

// ---- HttpConnection: reading ----

HttpConnection::HttpConnection(tcp::socket socket, std::shared_ptr<ConnectionSet> set, bool admitted)
    : socket_(std::move(socket)),
      set_(std::move(set)),
      admitted_(admitted),
      read_deadline_(socket_.get_executor()),
      write_deadline_(socket_.get_executor()) {}

HttpConnection::~HttpConnection() { leave_set(); }

void HttpConnection::leave_set() {
  if (!in_set_) return;
  in_set_ = false;
  set_->remove(this, admitted_);
}

void HttpConnection::start() {
  set_->add(this, admitted_);
  in_set_ = true;
  beast::error_code ec;
  socket_.set_option(tcp::no_delay(true), ec);
  wait_for_request();
}

void HttpConnection::close() {
  if (state_ == State::kClosed) return;
  state_ = State::kClosed;
  read_deadline_.disarm();
  write_deadline_.disarm();
  beast::error_code ec;
  socket_.shutdown(tcp::socket::shutdown_both, ec);
  socket_.close(ec);
  leave_set();
  after_write_ = nullptr;
  on_closed();
}

// Idle: the next request's first bytes (already buffered, or a read pending) within idle_timeout_s.
void HttpConnection::wait_for_request() {
  state_ = State::kIdle;
  auto self = shared_from_this();
  read_deadline_.arm(options().idle_timeout_s, [self] {
    if (self->state_ == State::kIdle) self->close();
  });
  if (buffer_.size() > 0) return read_request();
  if (!watching_) watch();
}

void HttpConnection::watch_client() {
  if (!watching_ && buffer_.size() == 0) watch();
}

// One read of whatever the client sends: a request's first bytes (idle), pipelined bytes or the end of the
// connection (busy), or what is left before closing (lingering). Never started with bytes in the buffer except
// when lingering, so a pending watch and buffered request bytes never coexist.
void HttpConnection::watch() {
  watching_ = true;
  socket_.async_read_some(
      buffer_.prepare(kWatchBytes),
      [self = shared_from_this()](const beast::error_code& ec, size_t n) { self->on_watch(ec, n); });
}

void HttpConnection::on_watch(const beast::error_code& ec, size_t n) {
  watching_ = false;
  if (state_ == State::kClosed) return;
  if (ec) return close();  // EOF or reset: the client went away (close() cancels the server's work)
  buffer_.commit(n);
  if (state_ == State::kIdle) return read_request();
  if (state_ == State::kClosing) {
    buffer_.consume(buffer_.size());
    return watch();
  }
  // kBusy: a pipelined request; it waits in the buffer (a failed write still tells a client that went away)
}

void HttpConnection::read_request() {
  state_ = State::kReading;
  timed_out_ = false;
  response_keep_alive_.reset();  // a new request: its response decides anew
  parser_.emplace();
  parser_->header_limit(static_cast<uint32_t>(options().max_header_bytes));
  parser_->body_limit(static_cast<uint64_t>(options().max_body_bytes));
  auto self = shared_from_this();
  read_deadline_.arm(options().request_timeout_s, [self] {
    if (self->state_ != State::kReading) return;
    self->timed_out_ = true;
    beast::error_code ec;
    self->socket_.cancel(ec);  // the pending read ends with operation_aborted: on_read_error answers 408
  });
  http::async_read_header(socket_, buffer_, *parser_,
                          [self](const beast::error_code& ec, size_t) { self->on_header(ec); });
}

void HttpConnection::on_header(const beast::error_code& ec) {
  if (state_ == State::kClosed) return;
  if (ec) return on_read_error(ec);
  const Request& req = parser_->get();
  if (req.version() >= 11 && beast::iequals(req[http::field::expect], "100-continue") && !parser_->is_done())
    send("HTTP/1.1 100 Continue\r\n\r\n");
  http::async_read(socket_, buffer_, *parser_,
                   [self = shared_from_this()](const beast::error_code& ec, size_t) { self->on_body(ec); });
}

void HttpConnection::on_body(const beast::error_code& ec) {
  if (state_ == State::kClosed) return;
  if (ec) return on_read_error(ec);
  read_deadline_.disarm();
  handle();
}

// A request that could not be read: 408, 413, 431 or 400 (then the connection closes), or the client left.
void HttpConnection::on_read_error(const beast::error_code& ec) {
  read_deadline_.disarm();
  const std::optional<ApiError> e = read_error(ec, timed_out_, options());
  if (!e) return close();
  version_ = 11;
  refuse(*e);
}

// Answers the request being read (or just read) with `e`, then closes.
void HttpConnection::refuse(const ApiError& e) {
  state_ = State::kBusy;
  keep_alive_ = false;
  HttpReply r = error_reply(e, options().retry_after_s);
  r.close = true;
  reply_refusal(r, parser_->is_header_done() ? view(parser_->get().target()) : std::string_view());
}

void HttpConnection::reply_refusal(const HttpReply& r, std::string_view) { reply(r); }

void HttpConnection::handle() {
  state_ = State::kBusy;
  version_ = parser_->get().version();
  keep_alive_ = parser_->get().keep_alive();
  if (!admitted_) {
    const ConnectionOptions& o = options();
    return refuse(ApiError{429,
                           "too many open connections (max_connections = " + std::to_string(o.max_connections) +
                               "); retry after " + std::to_string(o.retry_after_s) + " s",
                           "", "too_many_connections"});
  }
  on_request(parser_->release());
}

// ---- HttpConnection: writing ----

bool HttpConnection::keep_alive() {
  if (!response_keep_alive_) response_keep_alive_ = keep_alive_ && version_ >= 10 && keep_serving();
  return *response_keep_alive_;
}

void HttpConnection::reply(const HttpReply& r, std::function<void()> on_written) {
  if (state_ == State::kClosed) return;
  const bool close = r.close || !keep_alive();
  send(serialize(r, options(), version_, !close));
  end_response(close, std::move(on_written));
}

void HttpConnection::send(std::string bytes, std::function<void()> on_written) {
  if (state_ == State::kClosed) return;
  pending_ += bytes;
  if (on_written) after_write_ = std::move(on_written);
  if (write_pending_) return;
  if (!pending_.empty()) return do_write();
  if (auto f = std::exchange(after_write_, nullptr)) f();
}

void HttpConnection::end_response(bool close, std::function<void()> on_written) {
  close = close || !keep_alive();
  send("", [self = shared_from_this(), close, f = std::move(on_written)] {
    if (f) f();
    self->after_response(close);
  });
}

void HttpConnection::do_write() {
  writing_.swap(pending_);
  pending_.clear();
  write_pending_ = true;
  auto self = shared_from_this();
  write_deadline_.arm(options().request_timeout_s, [self] { self->close(); });  // the client stopped reading
  net::async_write(socket_, net::buffer(writing_), [self](const beast::error_code& ec, size_t) { self->on_write(ec); });
}

void HttpConnection::on_write(const beast::error_code& ec) {
  write_pending_ = false;
  write_deadline_.disarm();
  if (state_ == State::kClosed) return;
  if (ec) return close();  // the client went away (close() cancels the server's work)
  if (!pending_.empty()) return do_write();
  if (auto f = std::exchange(after_write_, nullptr)) f();
}

void HttpConnection::after_response(bool close) {
  on_response_end();
  if (state_ == State::kClosed) return;
  if (close) return linger();
  wait_for_request();
}

// Closing after a response: stop sending, drop what the client still sends for a moment (so that it reads the
// response instead of a reset), then close.
void HttpConnection::linger() {
  state_ = State::kClosing;
  beast::error_code ec;
  socket_.shutdown(tcp::socket::shutdown_send, ec);
  auto self = shared_from_this();
  read_deadline_.arm(kLingerSeconds, [self] { self->close(); });
  buffer_.consume(buffer_.size());
  if (!watching_) watch();
}

}  // namespace moe::serve
