// The per-model activation workspace (llm.c style: activations live in an explicit workspace, not hidden in the
// layers), on the device of its backend. A layer asks for its buffers once (buffer()) and sizes them every step
// (get(n)); memory is only ever grown, through the backend (alloc / copy / memset0 / free), never shrunk.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/backend.h"

namespace moe {

class Workspace {
 public:
  // A growing float buffer on the workspace's device.
  class Buffer {
   public:
    explicit Buffer(Backend& be) : be_(&be) {}
    ~Buffer();
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;

    // [>= n] floats. Growing keeps the old contents and zero-fills the new part, exactly like
    // std::vector<float>::resize (layers rely on zeroed fresh memory); a smaller n keeps everything.
    float* get(int64_t n);
    // v (4-byte elements: int32 indices or floats, made on the host) where the buffer's device reads it: v.data()
    // itself on the CPU (so v must outlive its use), else a copy in this buffer, grown to hold it
    template <class T>
    const T* upload(const std::vector<T>& v);
    float* data() { return data_; }  // [size()] device floats; null before the first get
    const float* data() const { return data_; }
    int64_t size() const { return size_; }  // floats held

   private:
    Backend* be_;
    float* data_ = nullptr;  // [size_] on be_'s device
    int64_t size_ = 0;
  };

  explicit Workspace(Backend& be) : be_(be) {}
  ~Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  Buffer& buffer();      // a new buffer owned by the workspace; the reference stays valid for its lifetime
  size_t bytes() const;  // bytes held now by all its buffers
  Backend& backend() const { return be_; }

 private:
  Backend& be_;
  std::vector<std::unique_ptr<Buffer>> buffers_;
};

// Host-made 4-byte elements (int32 indices, floats) where be reads them: v.data() itself on the CPU (v must outlive
// the use), else copied to room(n), a callable giving n >= max(v.size(), 1) floats in be's memory.
template <class T, class Room>
const T* readable_by(Backend& be, const std::vector<T>& v, Room&& room) {
  static_assert(sizeof(T) == sizeof(float), "float buffers hold 4-byte elements");
  if (be.device() == Device::kCPU) return v.data();
  float* p = room(std::max<int64_t>(static_cast<int64_t>(v.size()), 1));
  be.from_host(p, v.data(), sizeof(T) * v.size());
  return reinterpret_cast<const T*>(p);
}

template <class T>
const T* Workspace::Buffer::upload(const std::vector<T>& v) {
  return readable_by(*be_, v, [this](int64_t n) { return get(n); });
}

}  // namespace moe
