#include "comm/parallel.h"

#include <algorithm>
#include <cstring>

#include "core/backend.h"
#include "core/kernels/cpu/kernels.h"

namespace moe::comm {

Parallel::Parallel(std::unique_ptr<Communicator> world, int expert_parallel)
    : groups_(make_process_groups(*world, expert_parallel)) {
  // make_process_groups keeps its own handle on the world; ours can go
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
  const float inv = 1.0f / static_cast<float>(size());
  if (size() == 1) return;
  // 1. every non-expert gradient in one flat host buffer (staged from a device's memory), one all-reduce over the
  // world, the mean copied back
  Backend& be = backend_for(ps.device());
  int64_t n = 0;
  for (const Param* p : ps.all())
    if (!p->expert_sharded) n += p->grad.numel();
  if (static_cast<int64_t>(flat_.size()) < n) flat_.resize(n);
  int64_t off = 0;
  for (const Param* p : ps.all())
    if (!p->expert_sharded) {
      be.to_host(flat_.data() + off, p->grad.f32(), p->grad.nbytes());
      off += p->grad.numel();
    }
  if (n) groups_.world->all_reduce_sum(flat_.data(), static_cast<size_t>(n));
  cpu::scale_inplace(flat_.data(), inv, n);
  off = 0;
  for (Param* p : ps.all())
    if (!p->expert_sharded) {
      be.from_host(p->grad.f32(), flat_.data() + off, p->grad.nbytes());
      off += p->grad.numel();
    }
  // 2. expert shards over their data-parallel replicas
  Communicator* dp = groups_.dp_size > 1 ? groups_.data_parallel.get() : nullptr;
  for (Param* p : ps.all()) {
    if (!p->expert_sharded) continue;
    if (!p->row_sparse) {  // in place on the host; a device's gradient staged through the host buffer
      const int64_t m = p->grad.numel();
      const bool staged = ps.device() != Device::kCPU;
      if (staged && static_cast<int64_t>(flat_.size()) < m) flat_.resize(m);
      float* g = staged ? flat_.data() : p->grad.f32();
      if (staged) be.to_host(g, p->grad.f32(), p->grad.nbytes());
      if (dp) dp->all_reduce_sum(g, static_cast<size_t>(m));
      cpu::scale_inplace(g, inv, m);
      if (staged) be.from_host(p->grad.f32(), g, p->grad.nbytes());
      continue;
    }
    MOE_CHECK(ps.device() == Device::kCPU,
              "row-sparse gradient '" << p->name << "': reduced for CPU parameters only so far");
    const int64_t rs = p->row_size();
    if (dp) {
      // union of the touched rows of all replicas: gather counts, then the (padded) row lists
      const int P = dp->size();
      int64_t mine = static_cast<int64_t>(p->touched.size());
      std::vector<int64_t> counts(P);
      dp->all_gather(&mine, counts.data(), sizeof(int64_t));
      const int64_t maxc = *std::max_element(counts.begin(), counts.end());
      std::vector<int64_t> send(maxc, -1), all(maxc * P);
      std::copy(p->touched.begin(), p->touched.end(), send.begin());
      if (maxc) dp->all_gather(send.data(), all.data(), sizeof(int64_t) * maxc);
      for (int64_t r : all)
        if (r >= 0) p->touch_row(r);
      std::vector<int64_t> rows(p->touched.begin(), p->touched.end());
      std::sort(rows.begin(), rows.end());
      std::vector<float> packed(rows.size() * rs);
      for (size_t i = 0; i < rows.size(); ++i)
        std::memcpy(packed.data() + i * rs, p->grad.f32() + rows[i] * rs, sizeof(float) * rs);
      if (!packed.empty()) dp->all_reduce_sum(packed.data(), packed.size());
      for (size_t i = 0; i < rows.size(); ++i)
        std::memcpy(p->grad.f32() + rows[i] * rs, packed.data() + i * rs, sizeof(float) * rs);
    }
    for (int64_t r : p->touched) cpu::scale_inplace(p->grad.f32() + r * rs, inv, rs);
  }
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
