// One server-side HTTP/1.1 connection on Boost.Beast: the machinery every HTTP server of the system shares (the
// OpenAI-compatible API in serve/http_server.cpp, the replica proxy and the coordinator's dashboard in launcher/).
//
// A connection waits for a request's first byte (closed after idle_timeout_s), reads its header and body within the
// limits and request_timeout_s from that first byte (answering "100 Continue" when asked), then hands the request to
// on_request(); the server answers through reply() or send() + end_response(), in order, through one write queue
// whose every write must finish within request_timeout_s (else the client is dropped). Then the next request
// (keep-alive; pipelined bytes wait in the buffer) or, after a response that closes, a lingering close: stop sending,
// drop what the client still sends for a moment, so that it reads the response instead of a reset. A request that
// cannot be read is answered with OpenAI's error object and Connection: close (400 malformed, 408 not received in
// time, 413 body, 431 header), as is every request of a connection over max_connections (429 with Retry-After).
// While a request is answered, watch_client() keeps a read pending so that the client going away (EOF, reset) closes
// the connection at once: on_closed() then cancels the server's work.
//
// Everything here runs on the server's one I/O thread.
#pragma once

// clang-format off
#include <utility>  // before any Boost.Asio header: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "serve/openai.h"

namespace moe::serve {

// How a server's connections behave; each server fills every field from its own options.
struct ConnectionOptions {
  std::string server;                                        // the Server header of every reply
  std::vector<std::pair<std::string, std::string>> headers;  // more headers on every complete reply

  int max_connections = 0;           // open connections admitted (over it: refuse_over_limit)
  bool refuse_over_limit = false;    // true: as many again are answered 429 and closed, any more closed at once;
                                     // false: a connection over max_connections is closed at once
  int retry_after_s = 0;             // the Retry-After of that 429
  int64_t max_body_bytes = 0;        // request body limit (413 above it)
  int64_t max_header_bytes = 0;      // request line + headers limit (431 above it)
  double request_timeout_s = 0;      // a request's header and body from its first byte (408); a write's limit
  std::string request_timeout_name;  // the option named in the 408 message ("request_timeout_s")
  double idle_timeout_s = 0;         // a connection waiting for its next request's first byte is closed after this
};

// A complete response.
struct HttpReply {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
  bool close = false;  // close the connection after it
};

HttpReply json_reply(int status, std::string body);

// OpenAI's error object for `e`, with the headers its status needs: Retry-After (429, 503), WWW-Authenticate (401).
HttpReply error_reply(const ApiError& e, int retry_after_s);

// A timer whose expiry runs an action unless re-armed or disarmed first.
class Deadline {
 public:
  explicit Deadline(const boost::asio::any_io_executor& ex) : timer_(ex) {}
  void arm(double s, std::function<void()> on_expiry);
  void disarm();

 private:
  boost::asio::steady_timer timer_;
  uint64_t epoch_ = 0;
};

class HttpConnection;

// The open connections of one server and their options: counted against max_connections, closed all at once when
// the server stops. It lives as long as any of its connections.
class ConnectionSet {
 public:
  enum class Admission { kAdmitted, kRefused, kDropped };  // kRefused: answered 429 and closed
  explicit ConnectionSet(ConnectionOptions opt) : opt_(std::move(opt)) {}
  const ConnectionOptions& options() const { return opt_; }
  Admission admit() const;  // of the next connection
  int admitted() const { return admitted_; }
  size_t size() const { return open_.size(); }
  void close_all();

 private:
  friend class HttpConnection;
  void add(HttpConnection* c, bool admitted);
  void remove(HttpConnection* c, bool admitted);

  const ConnectionOptions opt_;
  int admitted_ = 0, refused_ = 0;
  std::unordered_map<HttpConnection*, std::weak_ptr<HttpConnection>> open_;
};

// One TCP connection of a server; the server derives from it and implements the hooks.
class HttpConnection : public std::enable_shared_from_this<HttpConnection> {
 public:
  using Request = boost::beast::http::request<boost::beast::http::string_body>;
  // `admitted`: within max_connections; else its first request is answered 429 and the connection closes.
  HttpConnection(boost::asio::ip::tcp::socket socket, std::shared_ptr<ConnectionSet> set, bool admitted);
  virtual ~HttpConnection();
  HttpConnection(const HttpConnection&) = delete;
  HttpConnection& operator=(const HttpConnection&) = delete;

  void start();  // joins the set, waits for the first request
  void close();  // now: drops the connection; on_closed() runs (once)
  bool open() const { return state_ != State::kClosed; }

  // For the request being answered:
  unsigned version() const { return version_; }
  // The request allows keeping the connection open after its response, and the server keeps serving. Decided once
  // per response, at the first call: the response's head says it and its end must follow it, even if the server
  // starts draining in between (the client may have read that head and sent its next request already).
  bool keep_alive();
  // A complete response; on_written (if any) runs once it is written, then comes the next request or the close.
  void reply(const HttpReply& r, std::function<void()> on_written = {});
  // Part of a response; on_written (if any) runs once it and everything before it is written (never if the
  // connection closes first). At most one on_written is pending at a time.
  void send(std::string bytes, std::function<void()> on_written = {});
  // The response ends with what was sent (`close`: then the connection closes); on_written as for reply().
  void end_response(bool close, std::function<void()> on_written = {});
  // Keeps a read pending while the request is answered, to notice the client going away (unless pipelined bytes
  // already wait in the buffer: a failed write still tells then).
  void watch_client();

 protected:
  const ConnectionOptions& options() const { return set_->options(); }
  // A complete request arrived; the connection is busy until its response ends.
  virtual void on_request(Request req) = 0;
  // The connection closed (the client went away, a deadline passed, or close()): drop the request's work.
  virtual void on_closed() {}
  // The response has ended (written in full): forget the request.
  virtual void on_response_end() {}
  // False: every response closes its connection (a server that drains).
  virtual bool keep_serving() const { return true; }
  // Sends the connection's own error answers (400, 408, 413, 431, 429); `target` is the request's target when its
  // header was read, else "". A server that counts its responses overrides it.
  virtual void reply_refusal(const HttpReply& r, std::string_view target);

 private:
  enum class State { kIdle, kReading, kBusy, kClosing, kClosed };
  void wait_for_request();
  void watch();
  void on_watch(const boost::beast::error_code& ec, size_t n);
  void read_request();
  void on_header(const boost::beast::error_code& ec);
  void on_body(const boost::beast::error_code& ec);
  void on_read_error(const boost::beast::error_code& ec);
  void refuse(const ApiError& e);
  void handle();
  void do_write();
  void on_write(const boost::beast::error_code& ec);
  void after_response(bool close);
  void linger();
  void leave_set();

  boost::asio::ip::tcp::socket socket_;
  std::shared_ptr<ConnectionSet> set_;
  bool admitted_;
  State state_ = State::kIdle;
  boost::beast::flat_buffer buffer_;
  std::optional<boost::beast::http::request_parser<boost::beast::http::string_body>> parser_;
  Deadline read_deadline_, write_deadline_;
  std::string pending_, writing_;
  bool write_pending_ = false, watching_ = false, timed_out_ = false, keep_alive_ = true, in_set_ = false;
  std::function<void()> after_write_;
  std::optional<bool> response_keep_alive_;  // keep_alive() of the response being written, once decided
  unsigned version_ = 11;
};

}  // namespace moe::serve
