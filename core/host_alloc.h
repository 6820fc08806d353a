// Host allocation shared by the CPU and CUDA builds of the device hooks (header-only: core and the CUDA library
// both use it). 64-byte aligned; large blocks (>= 32 MiB: word-expert tables, their gradients and optimizer
// moments) are 2 MiB aligned and advised to use transparent huge pages, to cut the TLB misses of row-sparse
// updates scattered over GB-sized tables.
#pragma once
#include <sys/mman.h>

#include <cstdlib>

#include "core/error.h"

namespace moe {

inline void* host_alloc(size_t bytes) {
  constexpr size_t kHuge = size_t(2) << 20, kLarge = size_t(32) << 20;
  void* p = nullptr;
  const size_t align = bytes >= kLarge ? kHuge : 64;
  MOE_CHECK(posix_memalign(&p, align, bytes) == 0, "out of host memory allocating " << bytes << " bytes");
  if (bytes >= kLarge) madvise(p, bytes, MADV_HUGEPAGE);  // advisory: ignored where THP is off
  return p;
}

}  // namespace moe
