#include "checkpoints/crc32c.h"

#include <array>
#include <cstring>

#if defined(__SSE4_2__)
#include <nmmintrin.h>
#endif

namespace moe::ckpt {
namespace {
std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}

// The plain byte-at-a-time reference (also the fallback without SSE4.2).
uint32_t crc32c_table(const uint8_t* p, size_t n, uint32_t crc) {
  static const std::array<uint32_t, 256> table = make_table();
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return crc;
}
}  // namespace

namespace {
#if defined(__SSE4_2__)
// Large buffers: three independent CRC32 instruction chains over three thirds of the buffer in one loop (the
// instruction has a 3-cycle latency but a 1-cycle throughput, so one chain leaves 2/3 of it idle), joined with
// crc32c_combine: ~3x the single-chain speed (bench/RESULTS.md).
constexpr size_t kThreeWayMin = size_t(1) << 20;
uint32_t crc32c_three_way(const uint8_t* p, size_t n, uint32_t crc) {
  const size_t part = (n / 3) & ~size_t(7);
  const uint8_t *p0 = p, *p1 = p + part, *p2 = p + 2 * part;
  uint64_t c0 = static_cast<uint32_t>(~crc), c1 = 0xFFFFFFFFu, c2 = 0xFFFFFFFFu;
  for (size_t i = 0; i < part; i += 8) {
    uint64_t w0, w1, w2;
    std::memcpy(&w0, p0 + i, 8);
    std::memcpy(&w1, p1 + i, 8);
    std::memcpy(&w2, p2 + i, 8);
    c0 = _mm_crc32_u64(c0, w0);
    c1 = _mm_crc32_u64(c1, w1);
    c2 = _mm_crc32_u64(c2, w2);
  }
  const uint32_t a = ~static_cast<uint32_t>(c0), b = ~static_cast<uint32_t>(c1);
  const uint32_t c = crc32c(p2 + part, n - 3 * part, ~static_cast<uint32_t>(c2));  // the tail continues chain 2
  return crc32c_combine(crc32c_combine(a, b, part), c, n - 2 * part);
}
#endif
}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
#if defined(__SSE4_2__)
  if (n >= kThreeWayMin) return crc32c_three_way(p, n, crc);
#endif
  crc = ~crc;
#if defined(__SSE4_2__)
  // the CRC32 instruction computes CRC-32C (Castagnoli): 8 bytes per instruction
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
  }
  crc = static_cast<uint32_t>(c);
#endif
  return ~crc32c_table(p, n, crc);
}

uint32_t crc32c_reference(const void* data, size_t n, uint32_t crc) {
  return ~crc32c_table(static_cast<const uint8_t*>(data), n, ~crc);
}

namespace {
// multiplication of a 32x32 matrix over GF(2) (mat[i] = column i) by a vector
uint32_t gf2_times(const uint32_t* mat, uint32_t vec) {
  uint32_t sum = 0;
  for (; vec; vec >>= 1, ++mat)
    if (vec & 1) sum ^= *mat;
  return sum;
}
void gf2_square(uint32_t* square, const uint32_t* mat) {
  for (int n = 0; n < 32; ++n) square[n] = gf2_times(mat, mat[n]);
}
}  // namespace

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  if (len_b == 0) return crc_a;
  uint32_t even[32], odd[32];  // operators that append 2^k zero bits to a CRC
  odd[0] = 0x82F63B78u;        // one zero bit
  for (uint32_t n = 1, row = 1; n < 32; ++n, row <<= 1) odd[n] = row;
  gf2_square(even, odd);  // two zero bits
  gf2_square(odd, even);  // four zero bits
  // apply len_b zero bytes to crc_a (the first squaring below gives one zero byte)
  do {
    gf2_square(even, odd);
    if (len_b & 1) crc_a = gf2_times(even, crc_a);
    len_b >>= 1;
    if (!len_b) break;
    gf2_square(odd, even);
    if (len_b & 1) crc_a = gf2_times(odd, crc_a);
    len_b >>= 1;
  } while (len_b);
  return crc_a ^ crc_b;
}

}  // namespace moe::ckpt
