// Tensor: a contiguous n-d array of f32, bf16 or i32 on the CPU or a CUDA device.
// Storage is shared (copying a Tensor is cheap and aliases the same bytes; use clone() for a deep copy).
#pragma once
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/error.h"

namespace moe {

enum class DType { kF32, kBF16, kI32 };
enum class Device { kCPU, kCUDA };

size_t dtype_size(DType dt);
const char* dtype_name(DType dt);
DType dtype_from_name(const std::string& name);  // "f32" | "bf16" | "i32"
const char* device_name(Device d);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

// Device memory hooks. The CUDA build fills these in (core/kernels/cuda); without it they throw.
void* device_alloc(Device d, size_t bytes);
void device_free(Device d, void* p);
void device_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes);
void device_memset0(Device d, void* p, size_t bytes);
bool cuda_available();  // compiled with CUDA and at least one device usable
int cuda_device_count();  // the CUDA devices visible (0 without CUDA support or a driver)
// How this process picks its GPU from the number visible (a rank's: local rank % devices, launcher/launch_env.h;
// default: device 0). Only recorded: cuda_bind_device asks it (once) and makes that GPU current in the calling
// thread, which the hooks above and backend_for(kCUDA) do before their first CUDA call, so a process that never
// uses CUDA neither counts the devices nor creates a context.
void cuda_pick_device(std::function<int(int device_count)> pick);
void cuda_bind_device();
double cuda_free_bytes();  // free memory of this process's GPU now (0 without CUDA)

class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(const Shape& shape, DType dt = DType::kF32, Device dev = Device::kCPU);
  static Tensor zeros(const Shape& shape, DType dt = DType::kF32, Device dev = Device::kCPU);
  static Tensor from_vector(const std::vector<float>& v, const Shape& shape);
  static Tensor from_vector(const std::vector<int32_t>& v, const Shape& shape);
  // A shape without storage (defined() is false): for sizing a model without allocating it.
  static Tensor shape_only(const Shape& shape, DType dt = DType::kF32);

  bool defined() const { return static_cast<bool>(storage_); }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const;
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  void* raw() { return storage_.get(); }
  const void* raw() const { return storage_.get(); }
  float* f32();
  const float* f32() const;
  int32_t* i32();
  const int32_t* i32() const;
  bf16* bf();
  const bf16* bf() const;

  Tensor clone() const;
  Tensor to(Device dev) const;        // copy to another device (same dtype)
  Tensor to_dtype(DType dt) const;    // f32 <-> bf16 conversion (CPU); i32 -> f32 too
  Tensor reshape(const Shape& shape) const;  // same storage, new shape (numel must match)
  void zero_();
  void fill_(float v);
  std::vector<float> to_float_vector() const;  // any dtype, CPU

 private:
  void check_dtype(DType want, const char* fn) const;
  std::shared_ptr<uint8_t> storage_;
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::kF32;
  Device device_ = Device::kCPU;
};

}  // namespace moe
