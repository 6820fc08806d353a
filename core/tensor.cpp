#include "core/tensor.h"

#include "core/host_alloc.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

namespace moe {

size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kI32: return 4;
  }
  return 0;
}

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kI32: return "i32";
  }
  return "?";
}

DType dtype_from_name(const std::string& name) {
  if (name == "f32" || name == "float32") return DType::kF32;
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "i32" || name == "int32") return DType::kI32;
  MOE_THROW("unknown dtype '" << name << "' (expected f32, bf16 or i32)");
}

const char* device_name(Device d) { return d == Device::kCPU ? "cpu" : "cuda"; }

std::string shape_str(const Shape& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) {
    MOE_CHECK(d >= 0, "negative dimension in shape " << shape_str(s));
    n *= d;
  }
  return n;
}

#ifndef MOE_HAVE_CUDA
void* device_alloc(Device d, size_t bytes) {
  MOE_CHECK(d == Device::kCPU, "this build has no CUDA support (configure with nvcc present and -DMOE_CUDA=ON)");
  void* p = nullptr;
  if (bytes == 0) bytes = 64;
  p = host_alloc(bytes);
  return p;
}
void device_free(Device, void* p) { std::free(p); }
void device_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) {
  MOE_CHECK(dst_dev == Device::kCPU && src_dev == Device::kCPU, "this build has no CUDA support");
  if (bytes) std::memcpy(dst, src, bytes);
}
void device_memset0(Device d, void* p, size_t bytes) {
  MOE_CHECK(d == Device::kCPU, "this build has no CUDA support");
  if (bytes) std::memset(p, 0, bytes);
}
bool cuda_available() { return false; }
int cuda_device_count() { return 0; }
void cuda_pick_device(std::function<int(int)>) {}
void cuda_bind_device() {}
double cuda_free_bytes() { return 0; }
#endif

Tensor Tensor::empty(const Shape& shape, DType dt, Device dev) {
  Tensor t;
  t.shape_ = shape;
  t.numel_ = shape_numel(shape);
  t.dtype_ = dt;
  t.device_ = dev;
  void* p = device_alloc(dev, t.nbytes());
  t.storage_ = std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [dev](uint8_t* q) { device_free(dev, q); });
  return t;
}

Tensor Tensor::shape_only(const Shape& shape, DType dt) {
  Tensor t;
  t.shape_ = shape;
  t.numel_ = shape_numel(shape);
  t.dtype_ = dt;
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dt, Device dev) {
  Tensor t = empty(shape, dt, dev);
  t.zero_();
  return t;
}

Tensor Tensor::from_vector(const std::vector<float>& v, const Shape& shape) {
  Tensor t = empty(shape, DType::kF32);
  MOE_CHECK(static_cast<int64_t>(v.size()) == t.numel(),
            "from_vector: " << v.size() << " values for shape " << shape_str(shape));
  std::memcpy(t.raw(), v.data(), t.nbytes());
  return t;
}

Tensor Tensor::from_vector(const std::vector<int32_t>& v, const Shape& shape) {
  Tensor t = empty(shape, DType::kI32);
  MOE_CHECK(static_cast<int64_t>(v.size()) == t.numel(),
            "from_vector: " << v.size() << " values for shape " << shape_str(shape));
  std::memcpy(t.raw(), v.data(), t.nbytes());
  return t;
}

int64_t Tensor::dim(int i) const {
  if (i < 0) i += ndim();
  MOE_CHECK(i >= 0 && i < ndim(), "dim " << i << " out of range for shape " << shape_str(shape_));
  return shape_[i];
}

void Tensor::check_dtype(DType want, const char* fn) const {
  MOE_CHECK(defined(), fn << ": tensor is undefined");
  MOE_CHECK(dtype_ == want, fn << ": tensor has dtype " << dtype_name(dtype_) << ", expected " << dtype_name(want));
}

float* Tensor::f32() { check_dtype(DType::kF32, "f32()"); return reinterpret_cast<float*>(raw()); }
const float* Tensor::f32() const { check_dtype(DType::kF32, "f32()"); return reinterpret_cast<const float*>(raw()); }
int32_t* Tensor::i32() { check_dtype(DType::kI32, "i32()"); return reinterpret_cast<int32_t*>(raw()); }
const int32_t* Tensor::i32() const { check_dtype(DType::kI32, "i32()"); return reinterpret_cast<const int32_t*>(raw()); }
bf16* Tensor::bf() { check_dtype(DType::kBF16, "bf()"); return reinterpret_cast<bf16*>(raw()); }
const bf16* Tensor::bf() const { check_dtype(DType::kBF16, "bf()"); return reinterpret_cast<const bf16*>(raw()); }

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device_);
  device_copy(t.raw(), device_, raw(), device_, nbytes());
  return t;
}

Tensor Tensor::to(Device dev) const {
  Tensor t = empty(shape_, dtype_, dev);
  device_copy(t.raw(), dev, raw(), device_, nbytes());
  return t;
}

Tensor Tensor::to_dtype(DType dt) const {
  MOE_CHECK(device_ == Device::kCPU, "to_dtype: only CPU tensors can be converted; move to cpu first");
  if (dt == dtype_) return clone();
  Tensor t = empty(shape_, dt, Device::kCPU);
  const int64_t n = numel_;
  if (dtype_ == DType::kF32 && dt == DType::kBF16) {
    for (int64_t i = 0; i < n; ++i) t.bf()[i] = float_to_bf16(f32()[i]);
  } else if (dtype_ == DType::kBF16 && dt == DType::kF32) {
    for (int64_t i = 0; i < n; ++i) t.f32()[i] = bf16_to_float(bf()[i]);
  } else if (dtype_ == DType::kI32 && dt == DType::kF32) {
    for (int64_t i = 0; i < n; ++i) t.f32()[i] = static_cast<float>(i32()[i]);
  } else {
    MOE_THROW("to_dtype: conversion " << dtype_name(dtype_) << " -> " << dtype_name(dt) << " is not supported");
  }
  return t;
}

Tensor Tensor::reshape(const Shape& shape) const {
  MOE_CHECK(shape_numel(shape) == numel_,
            "reshape: cannot view " << shape_str(shape_) << " as " << shape_str(shape));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

void Tensor::zero_() { device_memset0(device_, raw(), nbytes()); }

void Tensor::fill_(float v) {
  if (device_ != Device::kCPU) {  // filled on the host, then copied
    Tensor h = empty(shape_, dtype_, Device::kCPU);
    h.fill_(v);
    device_copy(raw(), device_, h.raw(), Device::kCPU, nbytes());
    return;
  }
  if (dtype_ == DType::kF32) {
    for (int64_t i = 0; i < numel_; ++i) f32()[i] = v;
  } else if (dtype_ == DType::kBF16) {
    bf16 b = float_to_bf16(v);
    for (int64_t i = 0; i < numel_; ++i) bf()[i] = b;
  } else {
    for (int64_t i = 0; i < numel_; ++i) i32()[i] = static_cast<int32_t>(v);
  }
}

std::vector<float> Tensor::to_float_vector() const {
  MOE_CHECK(device_ == Device::kCPU, "to_float_vector: CPU tensors only");
  Tensor f = dtype_ == DType::kF32 ? *this : to_dtype(DType::kF32);
  return std::vector<float>(f.f32(), f.f32() + numel_);
}

}  // namespace moe
