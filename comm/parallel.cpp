#include "comm/parallel.h"

#include <algorithm>
#include <cstdint>

#include "core/backend.h"
#include "core/error.h"
#include "core/workspace.h"

namespace moe::comm {

Parallel::Parallel(std::unique_ptr<Communicator> world, int expert_parallel, std::unique_ptr<Communicator> tensors)
    : groups_(make_process_groups(*world, expert_parallel)) {
  // make_process_groups keeps its own handles on the worlds; ours can go
  if (tensors) {
    MOE_CHECK(tensors->size() == world->size() && tensors->rank() == world->rank(),
              "tensor communicator '" << tensors->name() << "': rank " << tensors->rank() << " of " << tensors->size()
                                      << ", the world's " << world->rank() << " of " << world->size());
    tensors_ = make_process_groups(*tensors, expert_parallel);
  }
}

double Parallel::mean(double v) {
  if (size() == 1) return v;
  groups_.world->all_reduce_sum(&v, 1);
  return v / size();
}

double Parallel::sum_expert_group(double v) {
  if (groups_.ep_size == 1) return v;
  groups_.expert_parallel->all_reduce_sum(&v, 1);
  return v;
}

bool Parallel::any(bool flag) {
  if (size() == 1) return flag;
  double v = flag ? 1.0 : 0.0;
  groups_.world->all_reduce_sum(&v, 1);
  return v > 0;
}

void Parallel::reduce_grads(ParamStore& ps) {
  if (size() == 1) return;
  const float inv = 1.0f / static_cast<float>(size());
  Backend& be = backend_for(ps.device());
  const bool direct = tensors_.world != nullptr;
  ProcessGroups& g = direct ? tensors_ : groups_;
  // 1. every non-expert gradient in one buffer, one all-reduce over the world
  std::vector<Param*> replicated;
  for (Param* p : ps.all())
    if (!p->expert_sharded) replicated.push_back(p);
  sum_scaled(g.world.get(), direct, be, replicated, inv);
  // 2. expert shards over their data-parallel replicas
  Communicator* dp = g.dp_size > 1 ? g.data_parallel.get() : nullptr;
  for (Param* p : ps.all()) {
    if (!p->expert_sharded) continue;
    if (p->row_sparse)
      reduce_rows(*p, inv);
    else
      sum_scaled(dp, direct, be, {p}, inv);
  }
}

void Parallel::all_reduce_on(Communicator* c, bool tensor_comm, Backend& be, float* buf, int64_t n) {
  if (!c || n == 0) return;
  if (tensor_comm || be.device() == Device::kCPU) {
    if (tensor_comm) be.sync();  // (the communicator's own stream reads it)
    c->all_reduce_sum(buf, static_cast<size_t>(n));
    return;
  }
  if (static_cast<int64_t>(flat_.size()) < n) flat_.resize(n);
  be.to_host(flat_.data(), buf, sizeof(float) * n);
  c->all_reduce_sum(flat_.data(), static_cast<size_t>(n));
  be.from_host(buf, flat_.data(), sizeof(float) * n);
}

float* Parallel::grown(Tensor& t, Backend& be, int64_t n) {
  if (t.numel() < n || t.device() != be.device()) t = Tensor::empty({n}, DType::kF32, be.device());
  return t.f32();
}

void Parallel::sum_scaled(Communicator* c, bool tensor_comm, Backend& be, const std::vector<Param*>& grads, float s) {
  int64_t n = 0;
  for (const Param* p : grads) n += p->grad.numel();
  if (n == 0) return;
  if (grads.size() == 1) {  // in place
    float* g = grads[0]->grad.f32();
    all_reduce_on(c, tensor_comm, be, g, n);
    be.scale_inplace(g, s, n);
    return;
  }
  float* buf = grown(packed_, be, n);
  int64_t off = 0;
  for (const Param* p : grads) {
    be.copy(buf + off, p->grad.f32(), p->grad.nbytes());
    off += p->grad.numel();
  }
  all_reduce_on(c, tensor_comm, be, buf, n);
  be.scale_inplace(buf, s, n);
  off = 0;
  for (Param* p : grads) {
    be.copy(p->grad.f32(), buf + off, p->grad.nbytes());
    off += p->grad.numel();
  }
}

void Parallel::reduce_rows(Param& p, float s) {
  Backend& be = backend_for(p.grad.device());
  const int64_t rs = p.row_size();
  // the row lists are host data (host groups); the rows themselves go over the tensor groups when there are some
  Communicator* dp = groups_.dp_size > 1 ? groups_.data_parallel.get() : nullptr;
  if (dp) {
    // union of the touched rows of all replicas: gather counts, then the (padded) row lists
    const int P = dp->size();
    int64_t mine = static_cast<int64_t>(p.touched.size());
    std::vector<int64_t> counts(P);
    dp->all_gather(&mine, counts.data(), sizeof(int64_t));
    const int64_t maxc = *std::max_element(counts.begin(), counts.end());
    std::vector<int64_t> send(maxc, -1), all(maxc * P);
    std::copy(p.touched.begin(), p.touched.end(), send.begin());
    if (maxc) dp->all_gather(send.data(), all.data(), sizeof(int64_t) * maxc);
    for (int64_t r : all)
      if (r >= 0) p.touch_row(r);
    std::vector<int32_t> rows(p.touched.begin(), p.touched.end());
    std::sort(rows.begin(), rows.end());
    const int64_t n = static_cast<int64_t>(rows.size());
    MOE_CHECK(rs <= INT32_MAX && n <= INT32_MAX, "row-sparse gradient '" << p.name << "': " << n << " rows of " << rs
                                                                           << " floats are too many to reduce");
    if (n) {  // the rows packed in the gradient's memory, summed, put back
      const bool direct = tensors_.world != nullptr;
      Communicator* c = direct ? tensors_.data_parallel.get() : dp;
      const int32_t* idx = readable_by(be, rows, [&](int64_t m) { return grown(index_, be, m); });
      float* buf = grown(packed_, be, n * rs);
      be.gather_rows(buf, p.grad.f32(), idx, nullptr, static_cast<int>(n), 1, static_cast<int>(rs));
      all_reduce_on(c, direct, be, buf, n * rs);
      be.scatter_rows(p.grad.f32(), buf, idx, static_cast<int>(n), static_cast<int>(rs));
    }
  }
  be.scale_rows(p.grad.f32(), s, p.touched.data(), static_cast<int64_t>(p.touched.size()), rs);
}

Tensor Parallel::gather_experts(const Tensor& local) {
  if (groups_.ep_size == 1) return local;
  Shape shape = local.shape();
  shape[0] *= groups_.ep_size;
  Tensor global = Tensor::empty(shape, local.dtype());
  groups_.expert_parallel->all_gather(local.raw(), global.raw(), local.nbytes());
  return global;
}

}  // namespace moe::comm
