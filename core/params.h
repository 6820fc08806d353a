// Named parameters with their gradients. Layers register their tensors here; the optimizer, gradient
// all-reduce and checkpoints iterate over it in registration order.
#pragma once
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"

namespace moe {

struct Param {
  std::string name;   // e.g. "layers.0.attn.wq"
  Tensor value;       // f32
  Tensor grad;        // f32, same shape
  bool decay = true;  // apply weight decay (matrices and embeddings; not norms or biases)
  // Sharded by expert id over the expert-parallel group (this rank holds its local experts only): its gradient
  // is all-reduced across data-parallel replicas only, not over the whole world.
  bool expert_sharded = false;
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
  // Adds a zero-initialised parameter; the returned pointer stays valid (params live in a deque-like vector of
  // unique_ptr).
  Param* add(const std::string& name, const Shape& shape, bool decay);
  // A row-sparse parameter (see Param::row_sparse).
  Param* add_row_sparse(const std::string& name, const Shape& shape, bool decay);
  Param* find(const std::string& name);
  const Param* find(const std::string& name) const;
  Param& get(const std::string& name);  // throws naming the parameter if absent
  std::vector<Param*>& all() { return view_; }
  const std::vector<Param*>& all() const { return view_; }
  void zero_grad();
  int64_t numel() const;

 private:
  std::vector<std::unique_ptr<Param>> params_;
  std::vector<Param*> view_;
};

void init_normal(Tensor& t, Rng& rng, float std);

}  // namespace moe
