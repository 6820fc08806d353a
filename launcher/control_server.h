// The coordinator's control port (Boost.Asio, one io_context thread): every connection first passes the HMAC
// handshake of launcher/control_wire.h within kHandshakeTimeout (nothing it sends before is read as a message), then
// must say Hello, then exchanges length-prefixed ControlMessages. A wrong proof, a timeout, an oversized or
// unparsable frame, an unknown message type or a message out of turn drops the connection with a log line naming
// the peer and the reason; the server keeps running.
#pragma once
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "proto/control.pb.h"

namespace moe::launcher {

inline constexpr std::chrono::seconds kHandshakeTimeout{5};
inline constexpr size_t kMaxSessions = 4096;  // open connections (authenticated or not); more are refused

class ControlServer {
 public:
  struct Handlers {
    std::function<void(int id, const proto::Hello&)> hello;               // a peer passed the handshake and said Hello
    std::function<void(int id, const proto::Heartbeat&)> heartbeat;       // from a worker
    std::function<proto::AdminReply(int id, const proto::Admin&)> admin;  // from the CLI; the reply is sent back
    std::function<void(int id)> closed;                                   // a peer that had said Hello went away
  };
  // Listens on host:port (0: any free port) now; throws moe::Error naming the address when it cannot.
  ControlServer(boost::asio::io_context& io, const std::string& host, int port, std::string secret, Handlers h);
  ~ControlServer();
  int port() const;
  // Sends a message to connection `id` (ignored if it is gone). On the io_context's thread.
  void send(int id, const proto::ControlMessage& m);
  void close(int id);  // (a peer that had said Hello: the `closed` callback runs, within this call)
  int64_t dropped() const { return dropped_; }  // connections refused so far (bad proof, bad frames, ...)

 private:
  class Session;
  void accept();
  boost::asio::io_context& io_;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string secret_;
  Handlers h_;
  int next_id_ = 1;
  int64_t dropped_ = 0;
  std::map<int, std::shared_ptr<Session>> sessions_;
};

}  // namespace moe::launcher
