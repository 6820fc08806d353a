#include "comm/parallel.h"

#include <algorithm>
#include <cstring>

#include "core/backend.h"
#include "core/error.h"
#include "core/kernels/cpu/kernels.h"

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

void Parallel::sum_scaled(Communicator* c, bool tensor_comm, Backend& be, const std::vector<Param*>& grads, float s) {
  int64_t n = 0;
  for (const Param* p : grads) n += p->grad.numel();
  if (n == 0) return;
  const bool host_memory = be.device() == Device::kCPU;
  if (grads.size() == 1 && (tensor_comm || host_memory)) {  // one gradient the communicator can reach: in place
    float* g = grads[0]->grad.f32();
    if (c) {
      if (tensor_comm) be.sync();  // (the communicator's own stream reads it)
      c->all_reduce_sum(g, static_cast<size_t>(n));
    }
    be.scale_inplace(g, s, n);
    return;
  }
  float* buf = nullptr;
  if (tensor_comm) {
    if (flat_tensor_.numel() < n) flat_tensor_ = Tensor::empty({n}, DType::kF32, be.device());
    buf = flat_tensor_.f32();
  } else {
    if (static_cast<int64_t>(flat_.size()) < n) flat_.resize(n);
    buf = flat_.data();
  }
  int64_t off = 0;
  for (const Param* p : grads) {
    if (tensor_comm)
      be.copy(buf + off, p->grad.f32(), p->grad.nbytes());
    else
      be.to_host(buf + off, p->grad.f32(), p->grad.nbytes());
    off += p->grad.numel();
  }
  if (c) {
    if (tensor_comm) be.sync();
    c->all_reduce_sum(buf, static_cast<size_t>(n));
  }
  if (tensor_comm)
    be.scale_inplace(buf, s, n);
  else
    cpu::scale_inplace(buf, s, n);
  off = 0;
  for (Param* p : grads) {
    if (tensor_comm)
      be.copy(p->grad.f32(), buf + off, p->grad.nbytes());
    else
      be.from_host(p->grad.f32(), buf + off, p->grad.nbytes());
    off += p->grad.numel();
  }
}

void Parallel::reduce_rows(Param& p, float s) {
  MOE_CHECK(p.grad.device() == Device::kCPU,
            "row-sparse gradient '" << p.name << "': reduced for CPU parameters only so far");
  Communicator* dp = groups_.dp_size > 1 ? groups_.data_parallel.get() : nullptr;
  const int64_t rs = p.row_size();
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
    std::vector<int64_t> rows(p.touched.begin(), p.touched.end());
    std::sort(rows.begin(), rows.end());
    std::vector<float> packed(rows.size() * rs);
    for (size_t i = 0; i < rows.size(); ++i)
      std::memcpy(packed.data() + i * rs, p.grad.f32() + rows[i] * rs, sizeof(float) * rs);
    if (!packed.empty()) dp->all_reduce_sum(packed.data(), packed.size());
    for (size_t i = 0; i < rows.size(); ++i)
      std::memcpy(p.grad.f32() + rows[i] * rs, packed.data() + i * rs, sizeof(float) * rs);
  }
  for (int64_t r : p.touched) cpu::scale_inplace(p.grad.f32() + r * rs, s, rs);
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
