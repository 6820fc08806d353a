#include "core/threads.h"

#include <cblas.h>
#include <omp.h>

#include <malloc.h>

#include <thread>

namespace moe {
namespace {
// Per-step scratch of up to tens of MB (dispatch plans and counts sized by the number of experts, activations)
// is allocated and freed every step. With glibc's default 128 KiB mmap threshold each of those came back as fresh
// mmap'd pages, so every step paid page faults and kernel page clearing proportional to the expert count
// (measured: ~10% of a word-expert step at 128k experts in page faults). Serve blocks below 64 MiB from the heap
// and keep up to 256 MiB of freed heap for reuse.
struct MallocTuning {
  MallocTuning() {
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
  }
};
const MallocTuning g_malloc_tuning;
}  // namespace

int set_num_threads(int n) {
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  if (n <= 0) n = 1;
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
  return n;
}
}  // namespace moe
