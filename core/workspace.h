// The per-model activation workspace (llm.c style: activations live in an explicit workspace, not hidden in the
// layers), on the device of its backend. A layer asks for its buffers once (buffer()) and sizes them every step
// (get(n)); memory is only ever grown, through the backend (alloc / copy / memset0 / free), never shrunk.
#pragma once
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

}  // namespace moe
