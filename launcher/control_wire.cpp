#include "launcher/control_wire.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>

#include "core/error.h"
#include "core/log.h"

namespace moe::launcher::control {

std::string random_bytes(size_t n) {
  std::string s(n, '\0');
  MOE_CHECK(RAND_bytes(reinterpret_cast<unsigned char*>(s.data()), static_cast<int>(n)) == 1,
            "control: the random generator failed");
  return s;
}

std::string hmac_sha256(const std::string& key, const std::string& data) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  MOE_CHECK(HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
                 reinterpret_cast<const unsigned char*>(data.data()), data.size(), out, &len) != nullptr &&
                len == kProofBytes,
            "control: HMAC-SHA256 failed");
  return std::string(reinterpret_cast<char*>(out), len);
}

std::string client_proof(const std::string& secret, const std::string& server_nonce, const std::string& client_nonce) {
  return hmac_sha256(secret, "client" + server_nonce + client_nonce);
}

std::string server_proof(const std::string& secret, const std::string& client_nonce, const std::string& server_nonce) {
  return hmac_sha256(secret, "server" + client_nonce + server_nonce);
}

bool proof_equal(const std::string& a, const std::string& b) {
  if (a.size() != kProofBytes || b.size() != kProofBytes) return false;
  return CRYPTO_memcmp(a.data(), b.data(), kProofBytes) == 0;
}

std::string encode_frame(const proto::ControlMessage& m) {
  std::string body;
  MOE_CHECK(m.SerializeToString(&body), "control: cannot serialise a message");
  MOE_CHECK(body.size() <= kMaxFrameBytes,
            "control: a message of " << body.size() << " bytes exceeds the limit of " << kMaxFrameBytes);
  const uint32_t n = static_cast<uint32_t>(body.size());
  std::string out(4, '\0');
  for (int i = 0; i < 4; ++i) out[i] = static_cast<char>((n >> (24 - 8 * i)) & 0xff);
  return out + body;
}

namespace {
// the big-endian length at the head of `buf` (4 bytes there), checked against the limit
uint32_t frame_length(const std::string& buf) {
  uint32_t len = 0;
  for (int i = 0; i < 4; ++i) len = (len << 8) | static_cast<uint8_t>(buf[i]);
  MOE_CHECK(len <= kMaxFrameBytes,
            "control: a frame announces " << len << " bytes, over the limit of " << kMaxFrameBytes);
  return len;
}
}  // namespace

void FrameReader::feed(const char* data, size_t n) {
  buf_.append(data, n);
  if (buf_.size() >= 4) frame_length(buf_);  // refused as soon as the length is there
}

bool FrameReader::next(proto::ControlMessage& out) {
  if (buf_.size() < 4) return false;
  const uint32_t len = frame_length(buf_);
  if (buf_.size() < 4 + size_t(len)) return false;
  MOE_CHECK(out.ParseFromArray(buf_.data() + 4, static_cast<int>(len)),
            "control: a frame of " << len << " bytes is not a control message");
  MOE_CHECK(out.body_case() != proto::ControlMessage::BODY_NOT_SET, "control: a message of an unknown type");
  buf_.erase(0, 4 + size_t(len));
  if (buf_.size() >= 4) frame_length(buf_);
  return true;
}

std::string create_secret_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  MOE_CHECK(fd >= 0, "cannot create the job secret file '" << path
                                                           << "' (it may exist already: it is never "
                                                              "overwritten)");
  static const char kHex[] = "0123456789abcdef";
  std::string secret;
  for (unsigned char c : random_bytes(32)) secret += {kHex[c >> 4], kHex[c & 15]};
  const std::string line = secret + "\n";
  const bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()) && ::fsync(fd) == 0;
  ::close(fd);
  MOE_CHECK(ok, "cannot write the job secret file '" << path << "'");
  return secret;
}

std::string read_secret_file(const std::string& path) {
  std::ifstream f(path);
  MOE_CHECK(f.good(), "cannot read the job secret file '" << path << "'");
  std::string line;
  std::getline(f, line);
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
  MOE_CHECK(!line.empty(), "the job secret file '" << path << "' is empty");
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && (st.st_mode & 077))
    MOE_WARN("the job secret file '" << path << "' may be read by group or others (chmod 600 it)");
  return line;
}

}  // namespace moe::launcher::control
