#include "launcher/control_client.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "core/log.h"
#include "launcher/control_wire.h"

namespace moe::launcher {
namespace {

using Clock = std::chrono::steady_clock;

int remaining_ms(Clock::time_point end) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now()).count();
  return left > 0 ? static_cast<int>(left) : 0;
}

// a connected TCP socket to host:port, or -1 (errno-style message in `why`)
int connect_once(const std::string& host, const std::string& port, std::string& why) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (const int e = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); e != 0) {
    why = gai_strerror(e);
    return -1;
  }
  int fd = -1;
  for (addrinfo* a = res; a && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (::connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      why = std::strerror(errno);
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(res);
  if (fd >= 0) {
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  return fd;
}

// exactly n bytes before `end`, or false
bool read_exact(int fd, char* p, size_t n, Clock::time_point end) {
  while (n > 0) {
    pollfd pf{fd, POLLIN, 0};
    if (::poll(&pf, 1, remaining_ms(end)) <= 0) return false;
    const ssize_t got = ::recv(fd, p, n, 0);
    if (got <= 0) return false;
    p += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

bool write_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t put = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (put <= 0) return false;
    off += static_cast<size_t>(put);
  }
  return true;
}

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

// A socket to the coordinator at `endpoint` that has passed the handshake (both proofs checked).
int connect_and_prove(const std::string& endpoint, const std::string& secret, Clock::time_point end) {
  const size_t colon = endpoint.rfind(':');
  MOE_CHECK(colon != std::string::npos && colon > 0, "the coordinator address '" << endpoint << "' is not host:port");
  const std::string host = endpoint.substr(0, colon), port = endpoint.substr(colon + 1);
  std::string why;
  int fd = -1;
  while ((fd = connect_once(host, port, why)) < 0 && Clock::now() < end)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  MOE_CHECK(fd >= 0, "cannot reach the coordinator at " << endpoint << ": " << why);
  struct Closer {
    int& fd;
    bool keep = false;
    ~Closer() {
      if (!keep) ::close(fd);
    }
  } closer{fd};
  std::string greeting(control::kMagicBytes + control::kNonceBytes, '\0');
  MOE_CHECK(read_exact(fd, greeting.data(), greeting.size(), end),
            "the coordinator at " << endpoint << " sent no greeting");
  MOE_CHECK(greeting.compare(0, control::kMagicBytes, control::kMagic) == 0,
            endpoint << " is not a moe coordinator (unknown greeting)");
  const std::string server_nonce = greeting.substr(control::kMagicBytes), nonce = control::random_bytes(32);
  MOE_CHECK(write_all(fd, nonce + control::client_proof(secret, server_nonce, nonce)),
            "the coordinator at " << endpoint << " closed the connection during the handshake");
  std::string proof(control::kProofBytes, '\0');
  MOE_CHECK(read_exact(fd, proof.data(), proof.size(), end),
            "the coordinator at " << endpoint << " refused the job secret (a wrong secret, or another job's)");
  MOE_CHECK(control::proof_equal(proof, control::server_proof(secret, nonce, server_nonce)),
            "the coordinator at " << endpoint << " does not know the job secret: not this job's coordinator");
  closer.keep = true;
  return fd;
}

Clock::time_point after(double s) { return Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(s * 1000)); }

}  // namespace

struct ControlClient::Link {
  int fd = -1;
  control::FrameReader reader;
  ~Link() {
    if (fd >= 0) ::close(fd);
  }
};

std::unique_ptr<ControlClient> ControlClient::from_env(int rank, int world) {
  const std::string endpoint = env_or("MOE_COORDINATOR", "");
  if (endpoint.empty()) return nullptr;
  std::string secret = env_or("MOE_JOB_SECRET", "");
  if (secret.empty()) {
    const std::string file = env_or("MOE_JOB_SECRET_FILE", "");
    MOE_CHECK(!file.empty(), "MOE_COORDINATOR is set but neither MOE_JOB_SECRET nor MOE_JOB_SECRET_FILE");
    secret = control::read_secret_file(file);
  }
  proto::Hello h;
  h.set_kind(proto::PEER_WORKER);
  h.set_job_id(env_or("MOE_JOB_ID", ""));
  h.set_epoch(std::atoll(env_or("MOE_EPOCH", "0").c_str()));
  h.set_rank(rank);
  h.set_world(world);
  h.set_pid(::getpid());
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  h.set_host(host);
  h.set_replica(std::atoi(env_or("MOE_REPLICA", "0").c_str()));
  return std::make_unique<ControlClient>(endpoint, secret, h);
}

ControlClient::ControlClient(const std::string& endpoint, const std::string& secret, const proto::Hello& hello,
                             double connect_timeout_s)
    : link_(std::make_unique<Link>()), hello_(hello) {
  link_->fd = connect_and_prove(endpoint, secret, after(connect_timeout_s));
  proto::ControlMessage m;
  *m.mutable_hello() = hello_;
  MOE_CHECK(write_all(link_->fd, control::encode_frame(m)), "the coordinator at " << endpoint << " went away");
  thread_ = std::thread([this] { loop(); });
}

proto::AdminReply admin_request(const std::string& endpoint, const std::string& secret, const proto::Admin& request,
                                double timeout_s) {
  const auto end = after(timeout_s);
  const int fd = connect_and_prove(endpoint, secret, end);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  proto::ControlMessage hello, req;
  hello.mutable_hello()->set_kind(proto::PEER_ADMIN);
  hello.mutable_hello()->set_pid(::getpid());
  *req.mutable_admin() = request;
  MOE_CHECK(write_all(fd, control::encode_frame(hello) + control::encode_frame(req)),
            "the coordinator at " << endpoint << " went away");
  control::FrameReader reader;
  char buf[8192];
  proto::ControlMessage reply;
  while (!reader.next(reply)) {
    pollfd pf{fd, POLLIN, 0};
    MOE_CHECK(::poll(&pf, 1, remaining_ms(end)) > 0, "the coordinator at " << endpoint << " did not answer");
    const ssize_t got = ::recv(fd, buf, sizeof buf, 0);
    MOE_CHECK(got > 0, "the coordinator at " << endpoint << " closed the connection without an answer");
    reader.feed(buf, static_cast<size_t>(got));
  }
  MOE_CHECK(reply.has_admin_reply(), "the coordinator at " << endpoint << " answered with something else");
  return reply.admin_reply();
}

ControlClient::~ControlClient() {
  quit_ = true;
  ::shutdown(link_->fd, SHUT_RD);  // wakes the poll; writes still go out
  if (thread_.joinable()) thread_.join();
  if (!lost_) send_status();  // the last word (PHASE_DONE: a run that finished did not fail)
}

bool ControlClient::send_status() {
  proto::ControlMessage m;
  {
    std::lock_guard<std::mutex> lk(mu_);
    *m.mutable_heartbeat() = status_;
  }
  m.mutable_heartbeat()->set_epoch(hello_.epoch());
  m.mutable_heartbeat()->set_rank(hello_.rank());
  return write_all(link_->fd, control::encode_frame(m));
}

void ControlClient::publish(const proto::Heartbeat& status) {
  std::lock_guard<std::mutex> lk(mu_);
  status_ = status;
}

// Heartbeats every kHeartbeatInterval; commands as they come. Any failure: lost.
void ControlClient::loop() {
  auto next = Clock::now();
  char buf[4096];
  while (!quit_) {
    if (Clock::now() >= next) {
      if (!send_status()) break;
      next += kHeartbeatInterval;
    }
    pollfd pf{link_->fd, POLLIN, 0};
    const int r = ::poll(&pf, 1, remaining_ms(next));
    if (r < 0 && errno != EINTR) break;
    if (r <= 0) continue;
    const ssize_t got = ::recv(link_->fd, buf, sizeof buf, 0);
    if (got <= 0) break;
    try {
      link_->reader.feed(buf, static_cast<size_t>(got));
      proto::ControlMessage m;
      while (link_->reader.next(m)) {
        if (!m.has_command()) continue;
        if (m.command().kind() == proto::Command::CHECKPOINT) checkpoint_ = true;
        if (m.command().kind() == proto::Command::STOP) stop_ = true;
      }
    } catch (const Error& e) {
      MOE_WARN("control: dropping the coordinator's connection: " << e.what());
      break;
    }
  }
  if (!quit_) {
    lost_ = true;
    MOE_WARN("control: lost the coordinator; stopping at the next step boundary (after a checkpoint)");
  }
}

}  // namespace moe::launcher
