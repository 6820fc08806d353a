// The paged KV cache of the inference path (vLLM's PagedAttention layout): per layer one pool of key rows and one
// of value rows, [num_blocks * block_size, Hkv, D] each, on the model's device. A sequence's positions live in
// fixed-size blocks anywhere in the pool; its block table (block ids in position order) says where: position p is
// slot table[p / block_size] * block_size + p % block_size. Which blocks belong to which sequence is decided by
// the caller (serve/ allocates them) and handed to the model with each batch (InferBatch, core/model.h).
// A contiguous cache is the special case of one block of max_seq_len positions per sequence.
#pragma once
#include <cstdint>
#include <vector>

#include "core/backend.h"

namespace moe {

struct KvCacheDims {
  int n_layers = 0;
  int num_blocks = 0;  // blocks in the pool
  int block_size = 0;  // positions per block
  int n_kv_heads = 0;  // Hkv
  int head_dim = 0;    // D
  // bytes of one block over all layers, keys and values (f32)
  int64_t block_bytes() const { return int64_t(2) * n_layers * block_size * n_kv_heads * head_dim * 4; }
  int64_t slot_floats() const { return int64_t(n_kv_heads) * head_dim; }
};

class KvCache {
 public:
  // Allocates (and zeroes) the pools on the backend's device; throws when a dimension is not positive.
  KvCache(Backend& be, const KvCacheDims& dims);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  const KvCacheDims& dims() const { return d_; }
  float* keys(int layer) { return k_.at(layer); }    // [num_blocks * block_size, Hkv, D] on the device
  float* values(int layer) { return v_.at(layer); }  // [num_blocks * block_size, Hkv, D]
  int64_t bytes() const { return d_.block_bytes() * d_.num_blocks; }

 private:
  Backend& be_;
  KvCacheDims d_;
  std::vector<float*> k_, v_;
};

}  // namespace moe
