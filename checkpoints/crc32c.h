#pragma once
#include <cstddef>
#include <cstdint>
namespace moe::ckpt {
// CRC-32C (Castagnoli); `crc` chains partial buffers. Uses the SSE4.2 CRC32 instruction where compiled for it.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
// Byte-at-a-time table version (the reference the fast one is tested against).
uint32_t crc32c_reference(const void* data, size_t n, uint32_t crc = 0);
}  // namespace moe::ckpt
