#include "launcher/control_server.h"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <deque>
#include <utility>  // (before Asio: Boost 1.74 needs std::exchange declared)

#include "core/error.h"
#include "core/log.h"
#include "launcher/control_wire.h"

namespace moe::launcher {

namespace net = boost::asio;
using tcp = net::ip::tcp;
using boost::system::error_code;

struct ControlServer::Impl {
  explicit Impl(net::io_context& io) : acceptor(io) {}
  tcp::acceptor acceptor;
};

// One connection: greeting, proof check, then frames.
class ControlServer::Session : public std::enable_shared_from_this<ControlServer::Session> {
 public:
  Session(ControlServer& srv, tcp::socket s, int id)
      : srv_(srv), socket_(std::move(s)), timer_(socket_.get_executor()), id_(id) {
    error_code ec;
    const auto ep = socket_.remote_endpoint(ec);
    peer_ = ec ? "?" : ep.address().to_string() + ":" + std::to_string(ep.port());
  }
  void start() {
    nonce_ = control::random_bytes(control::kNonceBytes);
    timer_.expires_after(kHandshakeTimeout);
    timer_.async_wait([self = shared_from_this()](error_code ec) {
      if (!ec && !self->authed_)
        self->drop("no valid handshake within " + std::to_string(kHandshakeTimeout.count()) + " s");
    });
    write(std::string(control::kMagic, control::kMagicBytes) + nonce_);
    in_.resize(control::kNonceBytes + control::kProofBytes);
    net::async_read(socket_, net::buffer(in_),
                    [self = shared_from_this()](error_code ec, size_t) { self->on_proof(ec); });
  }
  void write(std::string bytes) {
    const bool idle = out_.empty();
    out_.push_back(std::move(bytes));
    if (idle) flush();
  }
  void drop(const std::string& why) {
    if (closed_) return;
    if (!why.empty()) {
      MOE_WARN("control: dropped the connection from " << peer_ << ": " << why);
      if (!hello_) ++srv_.dropped_;
    }
    shutdown();
  }
  void shutdown() {
    if (closed_) return;
    closed_ = true;
    error_code ec;
    timer_.cancel();
    socket_.shutdown(tcp::socket::shutdown_both, ec);
    socket_.close(ec);
    const bool said_hello = hello_;
    srv_.sessions_.erase(id_);
    if (said_hello && srv_.h_.closed) srv_.h_.closed(id_);
  }

 private:
  void on_proof(error_code ec) {
    if (ec) return drop(closed_ ? "" : "closed during the handshake (" + ec.message() + ")");
    const std::string client_nonce = in_.substr(0, control::kNonceBytes), proof = in_.substr(control::kNonceBytes);
    if (!control::proof_equal(proof, control::client_proof(srv_.secret_, nonce_, client_nonce)))
      return drop("wrong job secret (the handshake proof does not match)");
    authed_ = true;
    write(control::server_proof(srv_.secret_, client_nonce, nonce_));
    read();
  }
  void read() {
    socket_.async_read_some(net::buffer(buf_), [self = shared_from_this()](error_code ec, size_t n) {
      if (ec) return self->drop(self->hello_ ? "" : "closed before its Hello");
      self->on_bytes(n);
    });
  }
  void on_bytes(size_t n) {
    try {
      reader_.feed(buf_.data(), n);
      proto::ControlMessage m;
      while (!closed_ && reader_.next(m)) on_message(m);
    } catch (const Error& e) {
      return drop(e.what());
    }
    if (!closed_) read();
  }
  void on_message(const proto::ControlMessage& m) {
    if (!hello_) {
      if (!m.has_hello()) return drop("the first message is not a Hello");
      hello_ = true;
      kind_ = m.hello().kind();
      timer_.cancel();
      if (srv_.h_.hello) srv_.h_.hello(id_, m.hello());
      return;
    }
    if (m.has_heartbeat() && kind_ == proto::PEER_WORKER) {
      if (srv_.h_.heartbeat) srv_.h_.heartbeat(id_, m.heartbeat());
    } else if (m.has_admin() && kind_ == proto::PEER_ADMIN && srv_.h_.admin) {
      proto::ControlMessage r;
      *r.mutable_admin_reply() = srv_.h_.admin(id_, m.admin());
      write(control::encode_frame(r));
    } else {
      drop("an unexpected message (field " + std::to_string(int(m.body_case())) + ") from a " +
           proto::PeerKind_Name(kind_) + " peer");
    }
  }
  void flush() {
    net::async_write(socket_, net::buffer(out_.front()), [self = shared_from_this()](error_code ec, size_t) {
      if (ec) return self->drop("");
      self->out_.pop_front();
      if (!self->out_.empty()) self->flush();
    });
  }

  ControlServer& srv_;
  tcp::socket socket_;
  net::steady_timer timer_;
  int id_;
  std::string peer_, nonce_, in_;
  std::array<char, 8192> buf_{};
  control::FrameReader reader_;
  std::deque<std::string> out_;
  bool authed_ = false, hello_ = false, closed_ = false;
  proto::PeerKind kind_ = proto::PEER_UNKNOWN;
};

ControlServer::ControlServer(net::io_context& io, const std::string& host, int port, std::string secret, Handlers h)
    : io_(io), impl_(std::make_unique<Impl>(io)), secret_(std::move(secret)), h_(std::move(h)) {
  error_code ec;
  const auto addr = net::ip::make_address(host, ec);
  MOE_CHECK(!ec, "control: '" << host << "' is not an IP address to listen on");
  const tcp::endpoint ep(addr, static_cast<unsigned short>(port));
  impl_->acceptor.open(ep.protocol(), ec);
  if (!ec) impl_->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) impl_->acceptor.bind(ep, ec);
  if (!ec) impl_->acceptor.listen(net::socket_base::max_listen_connections, ec);
  MOE_CHECK(!ec, "control: cannot listen on " << host << ":" << port << ": " << ec.message());
  accept();
}

ControlServer::~ControlServer() {
  h_ = {};  // (the owner is going away too: no callbacks from here on)
  error_code ec;
  impl_->acceptor.close(ec);
  auto sessions = sessions_;
  for (auto& [id, s] : sessions) s->shutdown();
}

int ControlServer::port() const { return impl_->acceptor.local_endpoint().port(); }

void ControlServer::accept() {
  impl_->acceptor.async_accept([this](error_code ec, tcp::socket s) {
    if (ec == net::error::operation_aborted) return;
    if (!ec && sessions_.size() >= kMaxSessions) {
      MOE_WARN("control: " << sessions_.size() << " connections open: refusing one more");
      ++dropped_;
      s.close(ec);
    } else if (!ec) {
      const int id = next_id_++;
      auto session = std::make_shared<Session>(*this, std::move(s), id);
      sessions_[id] = session;
      session->start();
    }
    accept();
  });
}

void ControlServer::send(int id, const proto::ControlMessage& m) {
  auto it = sessions_.find(id);
  if (it != sessions_.end()) it->second->write(control::encode_frame(m));
}

void ControlServer::close(int id) {
  auto it = sessions_.find(id);
  if (it != sessions_.end()) it->second->shutdown();
}

}  // namespace moe::launcher
