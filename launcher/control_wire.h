// The control plane's wire (proto/control.proto), shared by the coordinator and its clients (the ranks of a
// supervised group, the `moe coordinator` CLI):
//   handshake  server -> client: kMagic, a 32-byte random nonce
//              client -> server: its own 32-byte nonce, HMAC-SHA256(secret, "client" | server nonce | client nonce)
//              server -> client: HMAC-SHA256(secret, "server" | client nonce | server nonce)
//   then       frames: a 4-byte big-endian length (at most kMaxFrameBytes) and a serialized ControlMessage.
// Each side checks the other's proof (in constant time) before it reads any message: a peer without the job's
// secret (another job, a port scanner) learns nothing and is dropped. The secret is a random string per job,
// kept in a 0600 file (or the MOE_JOB_SECRET environment variable of the workers).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "proto/control.pb.h"

namespace moe::launcher::control {

inline constexpr const char kMagic[] = "MOE-CONTROL/1";  // 13 bytes on the wire (no terminator)
inline constexpr size_t kMagicBytes = sizeof(kMagic) - 1;
inline constexpr size_t kNonceBytes = 32;
inline constexpr size_t kProofBytes = 32;  // HMAC-SHA256
inline constexpr size_t kMaxFrameBytes = size_t(1) << 20;

std::string random_bytes(size_t n);  // from the OS's CSPRNG (OpenSSL RAND_bytes); throws moe::Error on failure
std::string hmac_sha256(const std::string& key, const std::string& data);
// the client's and the server's proofs of the secret for one handshake
std::string client_proof(const std::string& secret, const std::string& server_nonce, const std::string& client_nonce);
std::string server_proof(const std::string& secret, const std::string& client_nonce, const std::string& server_nonce);
// a == b in time independent of the contents (both kProofBytes long; false on any other length)
bool proof_equal(const std::string& a, const std::string& b);

// [length][bytes] of one message; throws moe::Error when it would exceed kMaxFrameBytes
std::string encode_frame(const proto::ControlMessage& m);

// Reassembles frames from a byte stream. feed() throws moe::Error (naming the problem) on a length over
// kMaxFrameBytes or a frame that is not a ControlMessage; the connection is then to be dropped.
class FrameReader {
 public:
  void feed(const char* data, size_t n);
  bool next(proto::ControlMessage& out);  // the next complete message, if any
  size_t buffered() const { return buf_.size(); }

 private:
  std::string buf_;
};

// The job secret: a new random one written to `path` with mode 0600 (never overwriting an existing file), or the
// one in `path` (its first line; refused when empty, warned when group or others may read it).
std::string create_secret_file(const std::string& path);
std::string read_secret_file(const std::string& path);

}  // namespace moe::launcher::control
