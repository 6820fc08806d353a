// Device memory hooks of core/tensor.h for the CUDA build.
#include <cstdlib>
#include <cstring>

#include "core/kernels/cuda/cuda_check.h"
#include "core/host_alloc.h"
#include "core/tensor.h"

namespace moe {
namespace {
std::function<int(int)>& picker() {  // cuda_pick_device
  static std::function<int(int)> pick = [](int) { return 0; };
  return pick;
}
}  // namespace

void cuda_pick_device(std::function<int(int)> pick) { picker() = std::move(pick); }

void cuda_bind_device() {
  thread_local bool bound = false;
  if (bound) return;
  static const int ordinal = picker()(cuda_device_count());  // (asked once per process)
  MOE_CUDA_CHECK(cudaSetDevice(ordinal));
  bound = true;
}

double cuda_free_bytes() {
  cuda_bind_device();
  size_t free = 0, total = 0;
  MOE_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return static_cast<double>(free);
}

int cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

void* device_alloc(Device d, size_t bytes) {
  if (bytes == 0) bytes = 64;
  void* p = nullptr;
  if (d == Device::kCPU) {
    p = host_alloc(bytes);
  } else {
    cuda_bind_device();
    MOE_CUDA_CHECK(cudaMalloc(&p, bytes));
  }
  return p;
}

void device_free(Device d, void* p) {
  if (d == Device::kCPU) std::free(p);
  else cudaFree(p);  // no throw from a deleter
}

void device_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) {
  if (!bytes) return;
  if (dst_dev == Device::kCPU && src_dev == Device::kCPU) {
    std::memcpy(dst, src, bytes);
    return;
  }
  cuda_bind_device();
  MOE_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
}

void device_memset0(Device d, void* p, size_t bytes) {
  if (!bytes) return;
  if (d == Device::kCPU) std::memset(p, 0, bytes);
  else {
    cuda_bind_device();
    MOE_CUDA_CHECK(cudaMemset(p, 0, bytes));
  }
}

bool cuda_available() { return cuda_device_count() > 0; }

}  // namespace moe
