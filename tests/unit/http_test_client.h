// What the tests of the HTTP servers share (serve/http_server.h, launcher/replica_proxy.h,
// launcher/coordinator_http.h): a blocking socket whose reads give up after 5 s, a blocking keep-alive HTTP/1.1
// client on it, and small helpers (waiting for a condition, the JSON of a response, its error message). A test that
// waits on a server that never answers fails after 5 s; it never hangs.
#pragma once
#include <poll.h>

// clang-format off
#include <utility>  // before any Boost.Asio header: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "core/json.h"

namespace moe::test {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;
using Headers = std::vector<std::pair<std::string, std::string>>;

inline constexpr int kWaitMs = 5000;  // the longest any blocking step of a test waits

// Waits (up to 5 s) for cond().
inline bool eventually(const std::function<bool()>& cond) {
  for (int i = 0; i < kWaitMs / 10; ++i) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return cond();
}

// A blocking socket whose every read waits at most 5 s for data (then fails with timed_out; SO_RCVTIMEO would not
// do: Asio waits again after EAGAIN). Meets Beast's SyncReadStream and SyncWriteStream.
class TimedSocket {
 public:
  explicit TimedSocket(tcp::socket s) : sock_(std::move(s)) {}
  explicit TimedSocket(net::io_context& ioc) : sock_(ioc) {}
  template <class Buffers>
  size_t read_some(const Buffers& b, beast::error_code& ec) {
    pollfd p{sock_.native_handle(), POLLIN, 0};
    if (::poll(&p, 1, kWaitMs) <= 0) {
      ec = net::error::timed_out;
      return 0;
    }
    return sock_.read_some(b, ec);
  }
  template <class Buffers>
  size_t read_some(const Buffers& b) {
    beast::error_code ec;
    const size_t n = read_some(b, ec);
    if (ec) throw beast::system_error(ec);
    return n;
  }
  template <class Buffers>
  size_t write_some(const Buffers& b, beast::error_code& ec) {
    return sock_.write_some(b, ec);
  }
  template <class Buffers>
  size_t write_some(const Buffers& b) {
    return sock_.write_some(b);
  }
  void write(const std::string& bytes) {
    beast::error_code ec;
    net::write(*this, net::buffer(bytes), ec);
  }
  // Reads until the peer closes (EOF or reset): true when it did within 5 s; what it sent is dropped.
  bool peer_closed() {
    char buf[512];
    beast::error_code ec;
    while (!ec) read_some(net::buffer(buf), ec);
    return ec == net::error::eof || ec == net::error::connection_reset;
  }
  tcp::socket& socket() { return sock_; }

 private:
  tcp::socket sock_;
};

// One keep-alive connection to a server on 127.0.0.1.
class Client {
 public:
  explicit Client(int port) : sock_(ioc_) {
    sock_.socket().connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)));
  }
  // Writes a request (a JSON body when there is one, or for POST).
  void write_request(http::verb method, const std::string& target, const std::string& body = "",
                     const Headers& headers = {}) {
    Request req{method, target, 11};
    req.set(http::field::host, "127.0.0.1");
    for (const auto& [k, v] : headers) req.set(k, v);
    if (!body.empty() || method == http::verb::post) {
      req.set(http::field::content_type, "application/json");
      req.body() = body;
    }
    req.prepare_payload();
    http::write(sock_, req);
  }
  Response send(http::verb method, const std::string& target, const std::string& body = "",
                const Headers& headers = {}) {
    write_request(method, target, body, headers);
    return read();
  }
  Response get(const std::string& target, const Headers& h = {}) { return send(http::verb::get, target, "", h); }
  Response post(const std::string& target, const std::string& body, const Headers& h = {}) {
    return send(http::verb::post, target, body, h);
  }
  Response read() {
    Response res;
    http::read(sock_, buf_, res);
    return res;
  }
  // Reads until `marker` is among the bytes received (kept for read()); false after 5 s without it.
  bool read_until(const std::string& marker) {
    while (beast::buffers_to_string(buf_.data()).find(marker) == std::string::npos) {
      beast::error_code ec;
      const size_t n = sock_.read_some(buf_.prepare(4096), ec);
      if (ec) return false;
      buf_.commit(n);
    }
    return true;
  }
  std::string received() const { return beast::buffers_to_string(buf_.data()); }
  void write_raw(const std::string& bytes) { net::write(sock_, net::buffer(bytes)); }
  // True when the server closed the connection (EOF or reset) within 5 s.
  bool closed_by_server() { return sock_.peer_closed(); }
  void close() { sock_.socket().close(); }
  // For reading a response piece by piece with Beast's parsers.
  TimedSocket& socket() { return sock_; }
  beast::flat_buffer& buffer() { return buf_; }

 private:
  net::io_context ioc_;
  TimedSocket sock_;
  beast::flat_buffer buf_;
};

inline JsonValue json_of(const Response& r) { return parse_json(r.body(), "response body"); }
inline std::string error_message(const Response& r) { return json_of(r).field("error")->field("message")->str; }
inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace moe::test
