#include "core/kv_cache.h"

#include "core/error.h"

namespace moe {

KvCache::KvCache(Backend& be, const KvCacheDims& d) : be_(be), d_(d) {
  MOE_CHECK(d.n_layers > 0 && d.num_blocks > 0 && d.block_size > 0 && d.n_kv_heads > 0 && d.head_dim > 0,
            "KV cache: every dimension must be positive (layers "
                << d.n_layers << ", blocks " << d.num_blocks << ", block size " << d.block_size << ", kv heads "
                << d.n_kv_heads << ", head dim " << d.head_dim << ")");
  const size_t block = size_t(d.num_blocks) * d.slot_floats();  // floats of one row per block
  try {
    for (int l = 0; l < d.n_layers; ++l) {
      KvLayer p;
      p.keys = pool(block * d.block_size);
      p.values = pool(block * d.block_size);
      if (d.value_sums) p.value_sums = pool(block);
      if (d.key_columns) p.key_columns = pool(block * d.block_size);
      layers_.push_back(p);
    }
  } catch (...) {
    for (float* p : owned_) be_.free(p);
    throw;
  }
}

float* KvCache::pool(size_t floats) {
  owned_.push_back(static_cast<float*>(be_.alloc(sizeof(float) * floats)));
  be_.memset0(owned_.back(), sizeof(float) * floats);
  return owned_.back();
}

KvCache::~KvCache() {
  for (float* p : owned_) be_.free(p);
}

}  // namespace moe
