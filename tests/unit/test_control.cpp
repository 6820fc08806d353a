// The coordinator's control plane: the wire (HMAC handshake, frames), the server's refusal of bad peers, a real
// client's Hello/heartbeats/commands, admin requests, and the layout the coordinator picks for a set of slots.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>
#include <utility>  // (before Asio: Boost 1.74 needs std::exchange declared)

#include "core/error.h"
#include "launcher/control_client.h"
#include "launcher/control_server.h"
#include "launcher/control_wire.h"
#include "launcher/coordinator.h"

namespace fs = std::filesystem;
using namespace moe;
using namespace moe::launcher;

namespace {

std::string hex(const std::string& s) {
  static const char k[] = "0123456789abcdef";
  std::string o;
  for (unsigned char c : s) o += {k[c >> 4], k[c & 15]};
  return o;
}

TEST(ControlWire, HmacSha256MatchesRfc4231) {
  // RFC 4231 test case 2
  EXPECT_EQ(hex(control::hmac_sha256("Jefe", "what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST(ControlWire, ProofsBindBothNoncesAndTheSide) {
  const std::string a(32, 'a'), b(32, 'b');
  EXPECT_EQ(control::client_proof("s", a, b).size(), control::kProofBytes);
  EXPECT_NE(control::client_proof("s", a, b), control::server_proof("s", b, a));  // a reflected proof is no proof
  EXPECT_NE(control::client_proof("s", a, b), control::client_proof("t", a, b));
  EXPECT_NE(control::client_proof("s", a, b), control::client_proof("s", b, a));
  EXPECT_TRUE(control::proof_equal(control::client_proof("s", a, b), control::client_proof("s", a, b)));
  EXPECT_FALSE(control::proof_equal(control::client_proof("s", a, b), control::client_proof("s", a, a)));
  EXPECT_FALSE(control::proof_equal("short", "short"));
  EXPECT_NE(control::random_bytes(32), control::random_bytes(32));
}

TEST(ControlWire, FramesRoundTripByteByByte) {
  proto::ControlMessage a, b;
  a.mutable_heartbeat()->set_step(41);
  a.mutable_heartbeat()->set_loss(2.5);
  b.mutable_command()->set_kind(proto::Command::STOP);
  const std::string bytes = control::encode_frame(a) + control::encode_frame(b);
  EXPECT_EQ(bytes.substr(0, 4), std::string("\0\0\0", 3) + char(a.ByteSizeLong()));
  control::FrameReader r;
  std::vector<proto::ControlMessage> got;
  for (char c : bytes) {
    r.feed(&c, 1);
    proto::ControlMessage m;
    while (r.next(m)) got.push_back(m);
  }
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].heartbeat().step(), 41);
  EXPECT_EQ(got[1].command().kind(), proto::Command::STOP);
  EXPECT_EQ(r.buffered(), 0u);
}

TEST(ControlWire, OversizedAndGarbageFramesAreRefused) {
  control::FrameReader big;
  const char two_gb[4] = {char(0x80), 0, 0, 0};
  try {
    big.feed(two_gb, 4);
    FAIL() << "a 2 GiB length prefix was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("2147483648"), std::string::npos) << e.what();
  }
  control::FrameReader junk;
  const std::string bad = std::string("\0\0\0\x04", 4) + "\xff\xff\xff\xff";
  EXPECT_THROW(
      {
        junk.feed(bad.data(), bad.size());
        proto::ControlMessage m;
        junk.next(m);
      },
      Error);
  proto::ControlMessage huge;
  huge.mutable_admin_reply()->set_status_json(std::string(control::kMaxFrameBytes + 1, 'x'));
  EXPECT_THROW(control::encode_frame(huge), Error);
}

TEST(ControlWire, SecretFileIsPrivateAndNeverOverwritten) {
  const fs::path dir = fs::temp_directory_path() / ("moe_secret_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "secret").string();
  const std::string s = control::create_secret_file(path);
  EXPECT_GE(s.size(), 32u);
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(control::read_secret_file(path), s);
  EXPECT_THROW(control::create_secret_file(path), Error);
  std::ofstream(dir / "empty").close();
  EXPECT_THROW(control::read_secret_file((dir / "empty").string()), Error);
  EXPECT_THROW(control::read_secret_file((dir / "missing").string()), Error);
  fs::remove_all(dir);
}

// ---- a ControlServer on its own io thread, and raw or real clients ----
struct Server {
  boost::asio::io_context io;
  std::unique_ptr<ControlServer> srv;
  std::mutex mu;
  std::vector<proto::Hello> hellos;
  std::vector<int> hello_ids;
  std::vector<proto::Heartbeat> beats;
  std::atomic<int> closed{0};
  std::thread th;
  explicit Server(const std::string& secret) {
    ControlServer::Handlers h;
    h.hello = [this](int id, const proto::Hello& m) {
      std::lock_guard<std::mutex> lk(mu);
      hellos.push_back(m);
      hello_ids.push_back(id);
    };
    h.heartbeat = [this](int, const proto::Heartbeat& m) {
      std::lock_guard<std::mutex> lk(mu);
      beats.push_back(m);
    };
    h.closed = [this](int) { ++closed; };
    h.admin = [](int, const proto::Admin& a) {
      proto::AdminReply r;
      r.set_ok(a.kind() == proto::Admin::SET_SLOTS);
      r.set_message("slots " + std::to_string(a.slots()));
      return r;
    };
    srv = std::make_unique<ControlServer>(io, "127.0.0.1", 0, secret, h);
    th = std::thread([this] {
      auto guard = boost::asio::make_work_guard(io);
      io.run();
    });
  }
  ~Server() {
    boost::asio::post(io, [this] {
      srv.reset();
      io.stop();
    });
    th.join();
  }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(srv->port()); }
  // runs f on the io thread and waits for it
  template <class F>
  auto on_io(F f) {
    std::packaged_task<decltype(f())()> t(f);
    auto fut = t.get_future();
    boost::asio::post(io, [&t] { t(); });
    return fut.get();
  }
  int64_t dropped() {
    return on_io([this] { return srv->dropped(); });
  }
};

// polls `cond` for up to 5 s
template <class C>
bool eventually(C cond) {
  for (int i = 0; i < 500; ++i) {
    if (cond()) return true;  // (once: a condition may consume what it checks)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

int raw_connect(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  return fd;
}

// true when the server closed fd (read returns 0 or an error) within 6 s
bool closed_by_peer(int fd) {
  timeval tv{6, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char buf[256];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n == 0) return true;
    if (n < 0) return errno != EAGAIN && errno != EWOULDBLOCK;
  }
}

// the greeting read and a correct proof written: the connection is authenticated
std::string handshake(int fd, const std::string& secret) {
  std::string g(control::kMagicBytes + control::kNonceBytes, '\0');
  size_t got = 0;
  while (got < g.size()) {
    const ssize_t n = ::recv(fd, g.data() + got, g.size() - got, 0);
    if (n <= 0) return "";
    got += static_cast<size_t>(n);
  }
  const std::string cn(control::kNonceBytes, 'c');
  const std::string out = cn + control::client_proof(secret, g.substr(control::kMagicBytes), cn);
  EXPECT_EQ(::send(fd, out.data(), out.size(), MSG_NOSIGNAL), ssize_t(out.size()));
  return g;
}

proto::Hello worker_hello(int rank) {
  proto::Hello h;
  h.set_kind(proto::PEER_WORKER);
  h.set_rank(rank);
  h.set_epoch(7);
  h.set_pid(::getpid());
  return h;
}

TEST(ControlServer, ClientSaysHelloSendsHeartbeatsAndReceivesCommands) {
  Server s("job-secret");
  ControlClient c(s.endpoint(), "job-secret", worker_hello(3));
  proto::Heartbeat hb;
  hb.set_step(12);
  hb.set_phase(proto::PHASE_TRAINING);
  c.publish(hb);
  ASSERT_TRUE(eventually([&] {
    std::lock_guard<std::mutex> lk(s.mu);
    return !s.beats.empty() && s.beats.back().step() == 12;
  }));
  {
    std::lock_guard<std::mutex> lk(s.mu);
    ASSERT_EQ(s.hellos.size(), 1u);
    EXPECT_EQ(s.hellos[0].rank(), 3);
    EXPECT_EQ(s.beats.back().epoch(), 7);  // filled in by the client
    EXPECT_EQ(s.beats.back().rank(), 3);
  }
  const int id = s.hello_ids.at(0);
  proto::ControlMessage m;
  m.mutable_command()->set_kind(proto::Command::CHECKPOINT);
  s.on_io([&] {
    s.srv->send(id, m);
    return 0;
  });
  EXPECT_TRUE(eventually([&] { return c.take_checkpoint_request(); }));
  EXPECT_FALSE(c.take_checkpoint_request());  // consumed
  m.mutable_command()->set_kind(proto::Command::STOP);
  s.on_io([&] {
    s.srv->send(id, m);
    return 0;
  });
  EXPECT_TRUE(eventually([&] { return c.stop_requested(); }));
  EXPECT_FALSE(c.lost());
  // the coordinator goes away: the client notices
  s.on_io([&] {
    s.srv->close(id);
    return 0;
  });
  EXPECT_TRUE(eventually([&] { return c.lost(); }));
  EXPECT_EQ(s.dropped(), 0);
}

TEST(ControlServer, TheLastStatusArrivesWhenTheClientEnds) {
  Server s("k");
  {
    ControlClient c(s.endpoint(), "k", worker_hello(0));
    proto::Heartbeat hb;
    hb.set_phase(proto::PHASE_DONE);
    c.publish(hb);
  }  // (at once: before the next periodic heartbeat)
  ASSERT_TRUE(eventually([&] { return s.closed.load() == 1; }));
  std::lock_guard<std::mutex> lk(s.mu);
  ASSERT_FALSE(s.beats.empty());
  EXPECT_EQ(s.beats.back().phase(), proto::PHASE_DONE);
}

TEST(ControlServer, AWrongSecretIsRefusedOnBothSides) {
  Server s("right");
  try {
    ControlClient c(s.endpoint(), "wrong", worker_hello(0), 3);
    FAIL() << "connected with a wrong secret";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("refused the job secret"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(eventually([&] { return s.dropped() == 1; }));
  // a server with another secret is not believed by the client either (it cannot prove the secret)
  const int fd = raw_connect(s.srv->port());
  handshake(fd, "wrong");
  EXPECT_TRUE(closed_by_peer(fd));
  ::close(fd);
  std::lock_guard<std::mutex> lk(s.mu);
  EXPECT_TRUE(s.hellos.empty());
}

TEST(ControlServer, GarbageOversizedFramesAndMessagesOutOfTurnAreDropped) {
  Server s("k");
  {  // garbage instead of a handshake (an HTTP client on the wrong port)
    const int fd = raw_connect(s.srv->port());
    const std::string junk = "GET / HTTP/1.1\r\nHost: x\r\n\r\n" + std::string(64, 'z');
    ::send(fd, junk.data(), junk.size(), MSG_NOSIGNAL);
    EXPECT_TRUE(closed_by_peer(fd));
    ::close(fd);
  }
  {  // authenticated, then a 2 GiB length prefix
    const int fd = raw_connect(s.srv->port());
    handshake(fd, "k");
    const char len[4] = {char(0x80), 0, 0, 0};
    ::send(fd, len, 4, MSG_NOSIGNAL);
    EXPECT_TRUE(closed_by_peer(fd));
    ::close(fd);
  }
  {  // authenticated, then a heartbeat before any Hello
    const int fd = raw_connect(s.srv->port());
    handshake(fd, "k");
    proto::ControlMessage m;
    m.mutable_heartbeat()->set_step(1);
    const std::string f = control::encode_frame(m);
    ::send(fd, f.data(), f.size(), MSG_NOSIGNAL);
    EXPECT_TRUE(closed_by_peer(fd));
    ::close(fd);
  }
  EXPECT_TRUE(eventually([&] { return s.dropped() == 3; }));
  // and the server still serves a good client
  ControlClient c(s.endpoint(), "k", worker_hello(1));
  EXPECT_TRUE(eventually([&] {
    std::lock_guard<std::mutex> lk(s.mu);
    return s.hellos.size() == 1;
  }));
  std::lock_guard<std::mutex> lk(s.mu);
  EXPECT_TRUE(s.beats.empty() || s.beats.back().rank() == 1);
}

TEST(ControlServer, SilentPeersAreDroppedAfterTheHandshakeTimeout) {
  Server s("k");
  const int fd = raw_connect(s.srv->port());  // connects, then says nothing
  EXPECT_TRUE(closed_by_peer(fd));            // (within kHandshakeTimeout + 1 s)
  ::close(fd);
  EXPECT_EQ(s.dropped(), 1);
}

TEST(ControlServer, AdminRequestsGetTheirReply) {
  Server s("k");
  proto::Admin a;
  a.set_kind(proto::Admin::SET_SLOTS);
  a.set_slots(3);
  const proto::AdminReply r = admin_request(s.endpoint(), "k", a, 5);
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.message(), "slots 3");
  EXPECT_THROW(admin_request(s.endpoint(), "not-k", a, 5), Error);
  EXPECT_THROW(admin_request("127.0.0.1:1", "k", a, 0.3), Error);  // nobody there
}

TEST(ControlClient, FromEnvIsNullWithoutACoordinatorAndNeedsTheSecret) {
  ::unsetenv("MOE_COORDINATOR");
  EXPECT_EQ(ControlClient::from_env(0, 1), nullptr);
  ::setenv("MOE_COORDINATOR", "127.0.0.1:1", 1);
  ::unsetenv("MOE_JOB_SECRET");
  ::unsetenv("MOE_JOB_SECRET_FILE");
  EXPECT_THROW(ControlClient::from_env(0, 1), Error);
  ::unsetenv("MOE_COORDINATOR");
}

// ---- the layout the coordinator picks ----
TEST(ChooseLayout, LargestWorldThatFitsTheBatchAndTheExperts) {
  // 4 slots, batch 8, 4 experts, preferred expert parallel 2
  Layout l = choose_layout(4, 1, 0, 8, {4}, 2, 0);
  EXPECT_EQ(l.world, 4);
  EXPECT_EQ(l.expert_parallel, 2);
  EXPECT_EQ(l.micro_batch, 0);
  // 3 slots: 3 does not divide the batch
  l = choose_layout(3, 1, 0, 8, {4}, 2, 0);
  EXPECT_EQ(l.world, 2);
  EXPECT_EQ(l.expert_parallel, 2);
  // 1 slot after a first launch at world 2 (share 4): the one rank runs micro-batches of 4
  l = choose_layout(1, 1, 0, 8, {4}, 2, 4);
  EXPECT_EQ(l.world, 1);
  EXPECT_EQ(l.expert_parallel, 1);
  EXPECT_EQ(l.micro_batch, 4);
  // 6 experts, 4 slots: the preferred 4 does not divide 6, the largest that does and divides 4 is 2
  l = choose_layout(4, 1, 0, 8, {6}, 4, 0);
  EXPECT_EQ(l.world, 4);
  EXPECT_EQ(l.expert_parallel, 2);
  // every expert count must be divisible (an MoE layer of 4 and a word-expert layer of 6)
  l = choose_layout(4, 1, 0, 8, {4, 6}, 4, 0);
  EXPECT_EQ(l.expert_parallel, 2);
  // --max-world caps; --min-world above what the slots allow: nothing fits
  EXPECT_EQ(choose_layout(8, 1, 2, 8, {4}, 1, 0).world, 2);
  EXPECT_EQ(choose_layout(1, 2, 0, 8, {4}, 1, 0).world, 0);
  // a share that max_share does not divide: the largest divisor below it
  l = choose_layout(1, 1, 0, 12, {}, 1, 5);
  EXPECT_EQ(l.world, 1);
  EXPECT_EQ(l.micro_batch, 4);
}

}  // namespace

namespace {

TEST(Hostfile, SlotsAreSummedPerHostLine) {
  const fs::path dir = fs::temp_directory_path() / ("moe_hostfile_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string good = (dir / "good").string(), bad = (dir / "bad").string();
  std::ofstream(good) << "# cluster\nnode1 slots=4\nnode2\n\nnode3 slots=2 max_slots=8  # a comment\n";
  EXPECT_EQ(hostfile_slots(good), 7);
  std::ofstream(bad) << "node1 slots=4\nnode2 slots=x\n";
  try {
    hostfile_slots(bad);
    FAIL() << "a malformed slots value was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("line 2"), std::string::npos) << e.what();
  }
  std::ofstream(bad) << "# nothing\n";
  EXPECT_THROW(hostfile_slots(bad), Error);
  EXPECT_THROW(hostfile_slots((dir / "missing").string()), Error);
  fs::remove_all(dir);
}

}  // namespace
