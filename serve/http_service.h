// The frame every HTTP server of the system runs in (serve/http_server.cpp, launcher/replica_proxy.cpp,
// launcher/coordinator_http.cpp): one io_context run by one I/O thread, a listener bound at construction time
// (resolve the host, bind, listen; "cannot listen on host:port: why" when it cannot) that accepts connections against
// the connection limit (serve/http_connection.h), and the stop that closes the listener and every connection.
//
// A handler that throws on the I/O thread is logged and the thread keeps serving.
#pragma once

// clang-format off
#include <utility>  // before any Boost.Asio header: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <boost/asio.hpp>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "serve/http_connection.h"

namespace moe::serve {

// How a server names itself.
struct ServiceNames {
  std::string log;           // the prefix of its log lines ("http", "proxy")
  std::string type;          // the class named in the error of a start after stop ("HttpServer")
  std::string error_prefix;  // before "cannot listen on ..." ("" or "proxy: ")
};

class HttpService {
 public:
  // A new connection, admitted (within max_connections) or to be answered 429: the server makes its HttpConnection
  // of it and starts it. On the I/O thread.
  using AcceptHandler = std::function<void(boost::asio::ip::tcp::socket socket, bool admitted)>;

  HttpService(ServiceNames names, ConnectionOptions opt);
  ~HttpService();  // stop()
  HttpService(const HttpService&) = delete;
  HttpService& operator=(const HttpService&) = delete;

  boost::asio::io_context& ioc() { return ioc_; }
  const std::shared_ptr<ConnectionSet>& connections() const { return connections_; }
  // Binds and listens on host:port now (port 0: an ephemeral one); throws moe::Error naming host:port when it cannot
  // (port out of range, unknown host, address in use). Once, before start().
  void listen(const std::string& host, int port, AcceptHandler on_accept);
  int port() const;  // the bound port

  // Starts accepting and the I/O thread; true the first time, false when it already runs. Throws moe::Error after
  // stop().
  bool start();
  // Closes the listener; open connections stay. Thread-safe.
  void stop_accepting();
  // Closes the listener and every connection, then runs `last` (if any) on the I/O thread, and joins it.
  // Idempotent; thread-safe, but not from the I/O thread itself.
  void stop(const std::function<void()>& last = {});

 private:
  class Listener;
  void run();
  void shutdown_all(const std::function<void()>& last);  // on the I/O thread (or before it started)

  const ServiceNames names_;
  boost::asio::io_context ioc_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::shared_ptr<ConnectionSet> connections_;
  std::shared_ptr<Listener> listener_;
  std::string where_;  // host:port
  std::thread thread_;
  std::mutex mu_;
  bool started_ = false, stopped_ = false;
};

}  // namespace moe::serve
