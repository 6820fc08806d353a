#pragma once
#include <cstddef>
#include <cstdint>
namespace moe::ckpt {
// CRC-32C (Castagnoli), software slicing-by-1 table; `crc` chains partial buffers.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
}
