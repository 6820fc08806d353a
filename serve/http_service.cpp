#include "serve/http_service.h"

#include <chrono>

#include "core/error.h"
#include "core/log.h"

namespace moe::serve {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
using tcp = net::ip::tcp;

}  // namespace

// ---- the listener ----

// Accepts connections: those within max_connections become connections, the next ones (as many again, when the
// server refuses over the limit) are answered 429, any more are closed at once.
class HttpService::Listener : public std::enable_shared_from_this<Listener> {
 public:
  Listener(HttpService& service, const std::string& host, int port, AcceptHandler on_accept);  // binds and listens
  void start() { accept(); }
  void close() {
    beast::error_code ec;
    acceptor_.close(ec);
    retry_.cancel();
  }
  int port() const { return port_; }

 private:
  tcp::endpoint resolve(const std::string& host, int port);
  void accept();
  void on_accept(const beast::error_code& ec, tcp::socket socket);

  const ServiceNames names_;
  std::shared_ptr<ConnectionSet> connections_;
  AcceptHandler on_accept_;
  tcp::acceptor acceptor_;
  net::steady_timer retry_;
  int port_ = 0;
};

HttpService::Listener::Listener(HttpService& service, const std::string& host, int port, AcceptHandler on_accept)
    : names_(service.names_),
      connections_(service.connections_),
      on_accept_(std::move(on_accept)),
      acceptor_(service.ioc_),
      retry_(service.ioc_) {
  const std::string where = names_.error_prefix + "cannot listen on " + host + ":" + std::to_string(port);
  MOE_CHECK(port >= 0 && port <= 65535, where << ": the port must be in [0, 65535]");
  const tcp::endpoint ep = resolve(host, port);
  beast::error_code ec;
  acceptor_.open(ep.protocol(), ec);
  MOE_CHECK(!ec, where << ": " << ec.message());
  acceptor_.set_option(net::socket_base::reuse_address(true), ec);
  acceptor_.bind(ep, ec);
  MOE_CHECK(!ec, where << ": " << ec.message());
  acceptor_.listen(net::socket_base::max_listen_connections, ec);
  MOE_CHECK(!ec, where << ": " << ec.message());
  port_ = acceptor_.local_endpoint().port();
}

tcp::endpoint HttpService::Listener::resolve(const std::string& host, int port) {
  beast::error_code ec;
  const net::ip::address addr = net::ip::make_address(host, ec);
  if (!ec) return tcp::endpoint(addr, static_cast<unsigned short>(port));
  tcp::resolver resolver(acceptor_.get_executor());
  const auto results = resolver.resolve(host, std::to_string(port), ec);
  MOE_CHECK(!ec && !results.empty(), names_.error_prefix << "cannot listen on " << host << ":" << port
                                                         << ": unknown host (" << ec.message() << ")");
  return results.begin()->endpoint();
}

void HttpService::Listener::accept() {
  acceptor_.async_accept([self = shared_from_this()](const beast::error_code& ec, tcp::socket socket) {
    self->on_accept(ec, std::move(socket));
  });
}

void HttpService::Listener::on_accept(const beast::error_code& ec, tcp::socket socket) {
  if (!acceptor_.is_open()) return;  // closed: draining or stopped
  if (ec) {                          // e.g. out of file descriptors: try again shortly instead of spinning
    MOE_WARN(names_.log << ": accept failed: " << ec.message() << "; retrying");
    retry_.expires_after(std::chrono::milliseconds(50));
    retry_.async_wait([self = shared_from_this()](const beast::error_code& e) {
      if (!e) self->accept();
    });
    return;
  }
  const ConnectionSet::Admission a = connections_->admit();
  if (a == ConnectionSet::Admission::kDropped) {
    MOE_WARN(names_.log << ": " << connections_->size() << " connections open (max_connections "
                        << connections_->options().max_connections << "); closing one more");
  } else {
    on_accept_(std::move(socket), a == ConnectionSet::Admission::kAdmitted);
  }
  accept();
}

// ---- HttpService ----

HttpService::HttpService(ServiceNames names, ConnectionOptions opt)
    : names_(std::move(names)),
      work_(net::make_work_guard(ioc_)),
      connections_(std::make_shared<ConnectionSet>(std::move(opt))) {}

HttpService::~HttpService() { stop(); }

void HttpService::listen(const std::string& host, int port, AcceptHandler on_accept) {
  MOE_CHECK(!listener_, names_.type << ": listens already on " << where_);
  listener_ = std::make_shared<Listener>(*this, host, port, std::move(on_accept));
  where_ = host + ":" + std::to_string(listener_->port());
}

int HttpService::port() const { return listener_ ? listener_->port() : 0; }

bool HttpService::start() {
  std::lock_guard<std::mutex> lock(mu_);
  MOE_CHECK(!stopped_, names_.type << "::start after stop (" << where_ << ")");
  MOE_CHECK(listener_, names_.type << "::start before listen");
  if (started_) return false;
  started_ = true;
  listener_->start();
  thread_ = std::thread([this] { run(); });
  return true;
}

void HttpService::run() {
  while (true) {
    try {
      ioc_.run();
      return;
    } catch (const std::exception& e) {  // a handler threw: log it and keep serving
      MOE_WARN(names_.log << ": I/O thread: " << e.what());
    }
  }
}

void HttpService::stop_accepting() {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopped_ || !listener_) return;
  if (started_)
    net::post(ioc_, [l = listener_] { l->close(); });
  else
    listener_->close();
}

void HttpService::stop(const std::function<void()>& last) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopped_) return;
  stopped_ = true;
  if (started_) {
    net::post(ioc_, [this, &last] { shutdown_all(last); });
    thread_.join();
  } else {
    shutdown_all(last);
  }
}

void HttpService::shutdown_all(const std::function<void()>& last) {
  if (listener_) listener_->close();
  connections_->close_all();
  if (last) last();
  work_.reset();
  ioc_.stop();
}

}  // namespace moe::serve
