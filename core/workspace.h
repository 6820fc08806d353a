// The per-model activation workspace (llm.c style: activations live in an explicit workspace, not hidden in the
// layers), on the device of its backend. A layer asks for its buffers once (buffer()) and sizes them every step
// (get(n)); memory is only ever grown, through the backend (alloc / copy / memset0 / free), never shrunk.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
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
    // v (4-byte elements: int32 indices or floats, made on the host) copied into this buffer, grown to hold it,
    // where the buffer's device reads it (the CPU takes the same path: a small memcpy)
    template <class T>
    const T* upload(const std::vector<T>& v);
    // Several such vectors at once, packed one after another into this buffer by ONE copy from the host (on a
    // device one synchronisation instead of one per vector; on the CPU the same path: two small memcpys)
    template <class... T>
    std::tuple<const T*...> upload_all(const std::vector<T>&... v);
    float* data() { return data_; }  // [size()] device floats; null before the first get
    const float* data() const { return data_; }
    int64_t size() const { return size_; }  // floats held

   private:
    Backend* be_;
    float* data_ = nullptr;  // [size_] on be_'s device
    int64_t size_ = 0;
    std::vector<uint32_t> staging_;  // upload_all's packed host copy
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

// Host-made 4-byte elements (int32 indices, floats) where be reads them: copied to room(n), a callable giving
// n >= max(v.size(), 1) floats in be's memory (on every device alike, so the CPU tests the path a GPU takes).
template <class T, class Room>
const T* readable_by(Backend& be, const std::vector<T>& v, Room&& room) {
  static_assert(sizeof(T) == sizeof(float), "float buffers hold 4-byte elements");
  float* p = room(std::max<int64_t>(static_cast<int64_t>(v.size()), 1));
  be.from_host(p, v.data(), sizeof(T) * v.size());
  return reinterpret_cast<const T*>(p);
}

template <class T>
const T* Workspace::Buffer::upload(const std::vector<T>& v) {
  return readable_by(*be_, v, [this](int64_t n) { return get(n); });
}

template <class... T>
std::tuple<const T*...> Workspace::Buffer::upload_all(const std::vector<T>&... v) {
  static_assert(((sizeof(T) == sizeof(float)) && ...), "float buffers hold 4-byte elements");
  const int64_t total = (static_cast<int64_t>(v.size()) + ... + 0);
  staging_.resize(static_cast<size_t>(total));
  float* dev = get(std::max<int64_t>(total, 1));
  int64_t at = 0;
  auto place = [&](const auto& x) {  // x's elements into staging_ at `at`; x's place in dev
    using E = typename std::decay_t<decltype(x)>::value_type;
    if (!x.empty()) std::memcpy(staging_.data() + at, x.data(), sizeof(E) * x.size());
    const E* where = reinterpret_cast<const E*>(dev + at);
    at += static_cast<int64_t>(x.size());
    return where;
  };
  std::tuple<const T*...> out{place(v)...};  // (braced: the vectors are placed in order)
  be_->from_host(dev, staging_.data(), sizeof(float) * static_cast<size_t>(total));
  return out;
}

}  // namespace moe
