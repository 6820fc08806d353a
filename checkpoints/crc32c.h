#pragma once
#include <cstddef>
#include <cstdint>
namespace moe::ckpt {
// CRC-32C (Castagnoli); `crc` chains partial buffers. Uses the SSE4.2 CRC32 instruction where compiled for it.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
// Byte-at-a-time table version (the reference the fast one is tested against).
uint32_t crc32c_reference(const void* data, size_t n, uint32_t crc = 0);
// The CRC-32C of the concatenation A + B from crc_a = crc32c(A), crc_b = crc32c(B) and B's length (zlib's
// crc32_combine method with the Castagnoli polynomial): the checksum of a tensor from its shards' checksums.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);
}  // namespace moe::ckpt
