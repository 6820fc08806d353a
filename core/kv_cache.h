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
  // SparQ attention's side tables (core/kernels/cpu/kernels.h attention_sparq), per layer:
  bool value_sums = false;   // the sequences' value sums through each block: [num_blocks, Hkv, D]
  bool key_columns = false;  // the keys again by component: [num_blocks, Hkv, D, block_size] (+50% memory; SparQ
                             // then reads only r components of each key)
  // bytes of one block over all layers: keys and values, and the side tables kept (f32)
  int64_t block_bytes() const {
    const int64_t rows = 2 * block_size + (value_sums ? 1 : 0) + (key_columns ? block_size : 0);
    return rows * n_layers * n_kv_heads * head_dim * 4;
  }
  int64_t slot_floats() const { return int64_t(n_kv_heads) * head_dim; }
};

// One layer's pools on the device; the side tables are null when the cache does not keep them.
struct KvLayer {
  float* keys = nullptr;         // [num_blocks * block_size, Hkv, D]
  float* values = nullptr;       // [num_blocks * block_size, Hkv, D]
  float* value_sums = nullptr;   // [num_blocks, Hkv, D]
  float* key_columns = nullptr;  // [num_blocks, Hkv, D, block_size]
};

class KvCache {
 public:
  // Allocates (and zeroes) the pools on the backend's device; throws when a dimension is not positive.
  KvCache(Backend& be, const KvCacheDims& dims);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  const KvCacheDims& dims() const { return d_; }
  KvLayer layer(int l) const { return layers_.at(l); }
  float* keys(int l) const { return layer(l).keys; }
  float* values(int l) const { return layer(l).values; }
  int64_t bytes() const { return d_.block_bytes() * d_.num_blocks; }

 private:
  float* pool(size_t floats);  // allocated and zeroed, owned
  Backend& be_;
  KvCacheDims d_;
  std::vector<KvLayer> layers_;
  std::vector<float*> owned_;
};

}  // namespace moe
