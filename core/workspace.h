// TEMPORARY (replaced by the backend branch's workspace when merged): CPU-only stand-in with the same API.
#pragma once
#include <cstdint>
#include <deque>
#include <vector>

namespace moe {
class Workspace {
 public:
  class Buffer {
   public:
    float* get(int64_t n) {
      if (static_cast<int64_t>(v_.size()) < n) v_.resize(n);
      return v_.data();
    }
    float* data() { return v_.data(); }
    const float* data() const { return v_.data(); }
    int64_t size() const { return static_cast<int64_t>(v_.size()); }

   private:
    std::vector<float> v_;
  };
  Buffer& buffer() { return bufs_.emplace_back(); }
  size_t bytes() const {
    size_t n = 0;
    for (const auto& b : bufs_) n += b.size() * sizeof(float);
    return n;
  }

 private:
  std::deque<Buffer> bufs_;
};
}  // namespace moe
