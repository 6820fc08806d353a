#include "core/kv_cache.h"

#include "core/error.h"

namespace moe {

KvCache::KvCache(Backend& be, const KvCacheDims& d) : be_(be), d_(d) {
  MOE_CHECK(d.n_layers > 0 && d.num_blocks > 0 && d.block_size > 0 && d.n_kv_heads > 0 && d.head_dim > 0,
            "KV cache: every dimension must be positive (layers "
                << d.n_layers << ", blocks " << d.num_blocks << ", block size " << d.block_size << ", kv heads "
                << d.n_kv_heads << ", head dim " << d.head_dim << ")");
  const size_t bytes = sizeof(float) * size_t(d.num_blocks) * d.block_size * d.slot_floats();
  try {
    for (int l = 0; l < d.n_layers; ++l) {
      k_.push_back(static_cast<float*>(be_.alloc(bytes)));
      be_.memset0(k_.back(), bytes);
      v_.push_back(static_cast<float*>(be_.alloc(bytes)));
      be_.memset0(v_.back(), bytes);
    }
  } catch (...) {
    for (float* p : k_) be_.free(p);
    for (float* p : v_) be_.free(p);
    throw;
  }
}

KvCache::~KvCache() {
  for (float* p : k_) be_.free(p);
  for (float* p : v_) be_.free(p);
}

}  // namespace moe
