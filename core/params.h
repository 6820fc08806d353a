// Named parameters with their gradients. Layers register their tensors here; the optimizer, gradient
// all-reduce and checkpoints iterate over it in registration order.
#pragma once
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"

namespace moe {

// How a parameter is initialised (init_params). Declared by the layer that registers it: nothing decides by name.
enum class Init {
  kNormal,     // N(0, init_std^2)
  kNormalOut,  // N(0, (init_std / sqrt(2 n_layers))^2): projections into the residual stream (GPT-2)
  kOnes,       // norm weights
  kZeros,      // biases
};

struct Param {
  std::string name;   // e.g. "layers.0.attn.wq"
  Tensor value;       // f32, on the store's device
  Tensor grad;        // f32, same shape and device
  bool decay = true;  // apply weight decay (matrices and embeddings; not norms or biases)
  Init init = Init::kNormal;
  // Frozen: trained by nobody. AdamW skips it (no moment updates, no weight decay, no row step counts), gradient
  // norms and clipping leave it out, and the grouped FFN computes no weight gradient for it (nor touches its rows)
  // while still computing the input gradient through it. Set after registration (param->frozen = true), before
  // the first backward; the value stays bit for bit what it was (loaded or initialised).
  bool frozen = false;
  // Sharding. Replicated (the default): every rank holds the whole tensor. Expert-sharded: dim 0 indexes experts,
  // sharded in contiguous blocks over the expert-parallel group; this rank holds global rows
  // [first_row, first_row + dim 0). Its gradient is all-reduced across data-parallel replicas only, checkpoints
  // store it with its global shape, and init_params draws each row from a stream of its GLOBAL row id (so every
  // layout holds the same experts).
  bool expert_sharded = false;
  int64_t first_row = 0;
  // Row-sparse gradient (word-expert tables, embeddings of huge vocabularies): only the rows (index along dim 0)
  // listed in `touched` may have non-zero gradients. Whoever writes the gradient calls touch_rows(); zero_grad,
  // gradient norms and the optimizer then cost O(touched rows), not O(table size).
  bool row_sparse = false;
  std::vector<int64_t> touched;  // unique, unordered
  std::vector<uint8_t> touched_mask;  // [dim 0] membership of `touched`
  void touch_row(int64_t r) {
    if (!touched_mask[r]) {
      touched_mask[r] = 1;
      touched.push_back(r);
    }
  }
  int64_t row_size() const { return value.ndim() ? value.numel() / value.dim(0) : 1; }
};

class ParamStore {
 public:
  // sized_only: parameters get their shapes but no storage (for sizing a model without allocating it).
  // with_grads false: values only, gradients get their shapes but no storage (inference: generation, serving).
  // device: where values and gradients live (the model's device).
  explicit ParamStore(bool sized_only = false, bool with_grads = true, Device device = Device::kCPU)
      : sized_only_(sized_only), with_grads_(with_grads), device_(device) {}
  // Adds a zero-initialised parameter; the returned pointer stays valid (params live in a deque-like vector of
  // unique_ptr).
  Param* add(const std::string& name, const Shape& shape, bool decay, Init init = Init::kNormal);
  // An expert-sharded parameter holding global rows [first_row, first_row + shape[0]) (see Param), optionally
  // row-sparse (see Param::row_sparse).
  Param* add_expert(const std::string& name, const Shape& shape, bool decay, Init init, int64_t first_row,
                    bool row_sparse = false);
  Param* find(const std::string& name);
  const Param* find(const std::string& name) const;
  Param& get(const std::string& name);  // throws naming the parameter if absent
  std::vector<Param*>& all() { return view_; }
  const std::vector<Param*>& all() const { return view_; }
  void zero_grad();
  int64_t numel() const;
  Device device() const { return device_; }

 private:
  bool sized_only_;
  bool with_grads_;
  Device device_;
  std::vector<std::unique_ptr<Param>> params_;
  std::vector<Param*> view_;
};

void init_normal(Tensor& t, Rng& rng, float std);

// Initialises every parameter by its declared Init: replicated ones in registration order from one stream
// Rng(seed); expert-sharded ones row by row, global row g of parameter `name` from its own stream (seeded by seed,
// the name and g), so a parameter's values never depend on the expert-parallel layout. std: model.init_std;
// out_std: the residual projections' (init_std / sqrt(2 n_layers)).
void init_params(ParamStore& ps, uint64_t seed, float std, float out_std);

}  // namespace moe
