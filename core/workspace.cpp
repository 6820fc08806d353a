#include "core/workspace.h"

#include "core/error.h"

namespace moe {

Workspace::Buffer::~Buffer() { be_->free(data_); }

// Grows to exactly n floats: new block, old contents copied, the tail zeroed, old block freed (all stream-ordered
// on the backend; free waits for pending work on the old block where the device needs it).
float* Workspace::Buffer::get(int64_t n) {
  MOE_CHECK(n >= 0, "workspace buffer: negative size " << n);
  if (n <= size_) return data_;
  const size_t old_bytes = sizeof(float) * size_t(size_), new_bytes = sizeof(float) * size_t(n);
  auto* fresh = static_cast<float*>(be_->alloc(new_bytes));  // [n]
  try {
    if (old_bytes) be_->copy(fresh, data_, old_bytes);
    be_->memset0(fresh + size_, new_bytes - old_bytes);
  } catch (...) {
    be_->free(fresh);
    throw;
  }
  be_->free(data_);
  data_ = fresh;
  size_ = n;
  return data_;
}

Workspace::Buffer& Workspace::buffer() {
  buffers_.push_back(std::make_unique<Buffer>(be_));
  return *buffers_.back();
}

size_t Workspace::bytes() const {
  size_t total = 0;
  for (const auto& b : buffers_) total += sizeof(float) * size_t(b->size());
  return total;
}

}  // namespace moe
