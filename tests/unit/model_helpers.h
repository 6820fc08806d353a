// Tests build models the way the system does: through experts::build_model (the one model constructor).
#pragma once
#include <algorithm>
#include <memory>
#include <vector>

#include "core/config.h"
#include "core/kv_cache.h"
#include "core/model.h"
#include "core/rng.h"
#include "experts/build_model.h"

namespace moe::test {

// A 2-layer model of vocabulary 37, d_model 32, d_ff 48, max_seq_len 16 with H query and Hkv key/value heads.
inline proto::ModelConfig tiny_config(int H, int Hkv, proto::Activation act, proto::NormKind norm, bool tied) {
  proto::ModelConfig m;
  m.set_vocab_size(37);
  m.set_d_model(32);
  m.set_n_layers(2);
  m.set_n_heads(H);
  m.set_n_kv_heads(Hkv);
  m.set_d_ff(48);
  m.set_activation(act);
  m.set_norm(norm);
  m.set_max_seq_len(16);
  m.set_rope_theta(10000.0f);
  m.set_norm_eps(1e-5f);
  m.set_tie_embeddings(tied);
  m.set_init_std(0.1f);  // larger than usual so every path carries signal
  return m;
}

// v = n tokens drawn uniformly from [0, V)
inline void random_tokens(Rng& rng, std::vector<int32_t>& v, int n, int V) {
  v.resize(n);
  for (auto& x : v) x = static_cast<int32_t>(rng.below(V));
}

// A model of `m` with weights drawn from `seed` (train.seed), built by experts::build_model.
inline std::unique_ptr<Model> make_model(const proto::ModelConfig& m, uint64_t seed,
                                         const experts::ModelInputs& in = {}) {
  Config cfg;
  *cfg.mutable_model() = m;
  cfg.mutable_train()->set_seed(seed);
  return experts::build_model(cfg, in);
}

// Every row's logits of `toks` through the inference path (Model::forward_infer), fed in chunks of `chunk` tokens
// into a paged cache of blocks of `block_size` (the sequence's blocks are the pool's last ones, backwards), with
// SparQ knobs `sq` and, if key_columns, the cache's key columns.
inline std::vector<float> chunked_logits(Model& model, const std::vector<int32_t>& toks, int block_size, int chunk,
                                         const SparqKnobs& sq = {}, bool key_columns = false) {
  const int T = static_cast<int>(toks.size()), V = model.config().vocab_size();
  const int nblk = (model.config().max_seq_len() + block_size - 1) / block_size;
  model.prepare_inference();
  KvCacheDims dims = model.kv_dims(nblk + 2, block_size);
  dims.key_columns = key_columns;
  KvCache cache(model.workspace().backend(), dims);
  std::vector<int32_t> blocks;
  for (int b = 0; b < nblk; ++b) blocks.push_back(nblk + 1 - b);
  std::vector<float> out;
  InferBatch batch;
  for (int t0 = 0; t0 < T; t0 += chunk) {
    const int n = std::min(chunk, T - t0);
    batch.clear();
    batch.add(SeqChunk::of(toks.data(), t0, n, false, sq), blocks, block_size);
    for (int i = 0; i < n; ++i) batch.logit_rows.push_back(i);  // every row's logits
    const float* lg = model.forward_infer(batch, cache);
    out.insert(out.end(), lg, lg + int64_t(n) * V);
  }
  return out;
}

}  // namespace moe::test
