// Software prefetch of whole rows. Row-sparse updates (word-expert tables: a few thousand 2 KiB rows scattered
// over a GB-sized table) defeat the hardware stream prefetchers, which restart at every row: measured on the
// build machine, an AdamW pass over 1024 rows of a 131072-row table took 1.5x as long as over a 1024-row table.
// Fetching the NEXT row's lines while the current one is processed hides most of that (bench_moe, section 4).
#pragma once
#include <cstdint>

namespace moe {

// Touches every 64-byte line of p[0, n) with a prefetch (a hint: no fault, no effect on results).
inline void prefetch_read(const float* p, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(p + j, 0);
}
inline void prefetch_write(const float* p, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(p + j, 1);
}

// Passes over the touched rows of a row-sparse tensor (zeroing, grad norm, clipping, AdamW) run on one thread
// below this many elements in all: an OpenMP team costs more than it saves there.
constexpr int64_t kParRows = 65536;

// Rows up to this many floats get the next row prefetched by walk_row; longer ones are left to the hardware
// prefetchers, which follow a long row well (and the next row would be evicted before its turn).
constexpr int64_t kPrefetchRowMax = 65536;

// Walks row x[0, n) in blocks of 1024 floats, fn(block pointer, length), prefetching (for reading, or for writing
// with kWrite) the matching lines of the next row to visit, at offset `next` from x (0: none), block by block as it
// goes: spread over the row, the prefetches keep the memory system busy without flooding it. (A whole 48 KiB row
// prefetched at once made a pass over such rows slower than none; spread, it is ~1.3x faster than none for
// 12 KiB rows: measured on the build machine.) Without a next row, or for a long row, fn gets the whole row at
// once (zeroing a 384 KiB row in one memset is faster than in 4 KiB pieces).
template <bool kWrite, class T, class Fn>
void walk_row(T* x, int64_t n, int64_t next, const Fn& fn) {
  constexpr int64_t kBlock = 1024;
  if (next == 0 || n > kPrefetchRowMax) return fn(x, n);  // nothing to prefetch: one call for the whole row
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = n - j0 < kBlock ? n - j0 : kBlock;
    for (int64_t j = j0; j < j0 + len; j += 16) __builtin_prefetch(x + next + j, kWrite ? 1 : 0);
    fn(x + j0, len);
  }
}

}  // namespace moe
