// The grouped FFN: forward, backward_data and backward_weights side by side (see grouped_ffn.h).
#include "core/grouped_ffn.h"

#include <omp.h>

#include <algorithm>
#include <climits>
#include <tuple>

#include "core/error.h"
#include "core/prefetch.h"

namespace moe {
namespace {

// Multiply-adds below which one group's GEMM gains little from BLAS threads (OpenBLAS itself stays on one thread
// below 65536 * 4 = 262144): there, running different groups on different threads is the only parallelism.
constexpr double kSmallGemm = double(1 << 21);

// Groups in parallel (each BLAS call single-threaded), or one after another with threaded BLAS. Group-level
// parallelism wins when the groups are small, or when there are at least as many busy groups as threads and none
// dominates (dynamic scheduling, largest first, then balances the load). A device runs its groups in order on its
// stream.
bool choose_parallel(const Backend& be, int active, int64_t max_rows, int64_t rows, int C, int F) {
  const int nth = omp_get_max_threads();
  if (be.device() != Device::kCPU || nth <= 1 || active < 2 || omp_in_parallel()) return false;
  if (double(max_rows) * C * F <= kSmallGemm) return true;
  return active >= nth && max_rows * nth <= 2 * rows;
}

float* ptr(Param* p) { return p ? p->value.f32() : nullptr; }
// the gradient a backward_weights writes: none for absent or frozen params
float* trained_grad(Param* p) { return p && !p->frozen ? p->grad.f32() : nullptr; }
// slot s of a gradient (null stays null)
float* at(float* g, int64_t s, int64_t n) { return g ? g + s * n : nullptr; }

// Row-sparse weights get the next group's slot prefetched while one group runs, when a slot's matrix is at most
// this many floats: longer ones stream well by themselves, and their prefetch would evict the current group's.
constexpr int64_t kPrefetchSlot = 65536;

}  // namespace

GroupedFfn::GroupedFfn(Workspace& ws, int C, int F, proto::Activation act, const FfnWeights& w,
                       std::shared_ptr<PackedFfn> packed)
    : be_(ws.backend()), C_(C), F_(F), act_(act), w_(w), gate_(ws.buffer()), up_(ws.buffer()), aout_(ws.buffer()),
      dact_(ws.buffer()),
      dgate_(ws.buffer()), dup_(ws.buffer()), bias_rows_(ws.buffer()),
      packed_(packed ? std::move(packed) : std::make_shared<PackedFfn>(ws)) {
  MOE_CHECK(C >= 1 && F >= 1, "grouped FFN: d_model and hidden size must be >= 1, got " << C << ", " << F);
  MOE_CHECK(act == proto::SWIGLU || act == proto::GELU, "grouped FFN: unsupported activation " << int(act));
  MOE_CHECK(w.w_up && w.w_down && (act != proto::SWIGLU || w.w_gate), "grouped FFN: missing weights");
}

void GroupedFfn::prepare_inference() {
  if (w_.w_gate) packed_->gate.pack(*w_.w_gate);
  packed_->up.pack(*w_.w_up);
  packed_->down.pack(*w_.w_down);
}

// fn(g, q): group g, and q the group whose weight rows to prefetch (row-sparse weights only; -1: none)
template <class Fn>
void GroupedFfn::for_each_group(const Fn& fn) {
  const int n = static_cast<int>(order_.size());
  const int ahead = parallel_ ? std::max(1, omp_get_max_threads()) : 1;
  const bool pf = sparse() && be_.device() == Device::kCPU && int64_t(F_) * C_ <= kPrefetchSlot;  // (host memory)
  if (parallel_) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; ++i) fn(order_[i], pf && i + ahead < n ? order_[i + ahead] : -1);
  } else {
    for (int i = 0; i < n; ++i) fn(order_[i], pf && i + ahead < n ? order_[i + ahead] : -1);
  }
}

bool GroupedFfn::grouped_gemms(bool batch_invariant) const {
  if (batch_invariant) return false;
  if (schedule_ == Schedule::kAuto) return be_.device() != Device::kCPU;
  return schedule_ == Schedule::kGrouped;
}

void GroupedFfn::grouped_rows(float* c, int c_width, const float* a, int a_width, const float* w, bool trans_b,
                              float beta) {
  const int64_t FC = int64_t(F_) * C_;
  gemms_.clear();
  for (int g : order_) {
    const int64_t r0 = offsets_[g];
    gemms_.push_back({c + r0 * c_width, a + r0 * a_width, w + slots_[g] * FC, static_cast<int>(offsets_[g + 1] - r0),
                      c_width, a_width});
  }
  be_.matmul_grouped(gemms_.data(), static_cast<int>(gemms_.size()), false, trans_b, 1.0f, beta);
}

void GroupedFfn::grouped_weights(float* dw, const float* dout, int out_width, const float* inp, int in_width) {
  const int64_t FC = int64_t(F_) * C_;
  gemms_.clear();
  for (int g : order_) {
    const int64_t r0 = offsets_[g];
    gemms_.push_back({dw + slots_[g] * FC, dout + r0 * out_width, inp + r0 * in_width, out_width, in_width,
                      static_cast<int>(offsets_[g + 1] - r0)});
  }
  be_.matmul_grouped(gemms_.data(), static_cast<int>(gemms_.size()), true, false, 1.0f, 1.0f);
}

void GroupedFfn::add_group_bias(float* out, const float* b, int width) {
  if (b) be_.combine_rows(out, b, row_slot_, nullptr, static_cast<int>(offsets_.back()), 1, width, true);
}

// db[s][1,width] += ones[1,n] @ dout[r0.., width] per group: one grouped GEMM
void GroupedFfn::grouped_bias_sums(float* db, const float* dout, int width) {
  if (!db) return;
  gemms_.clear();
  for (int g : order_) {
    const int64_t r0 = offsets_[g];
    gemms_.push_back({db + slots_[g] * width, ones_, dout + r0 * width, 1, width,
                      static_cast<int>(offsets_[g + 1] - r0)});
  }
  be_.matmul_grouped(gemms_.data(), static_cast<int>(gemms_.size()), false, false, 1.0f, 1.0f);
}

// up = x Wu^T (+ bu), gate = x Wg^T, act = swiglu(gate, up) or gelu(up) over all rows, y = act Wd^T (+ bd)
void GroupedFfn::forward_grouped(float* y, const float* x, float* gate, float* up, float* act) {
  const int64_t rows = offsets_.back();
  row_slot_ = nullptr;
  ones_ = nullptr;
  if (w_.b_up || w_.b_down) {  // each row's slot, and a row of ones for the bias gradients, on the device
    slot_of_.resize(static_cast<size_t>(rows));
    for (int g : order_) std::fill(slot_of_.begin() + offsets_[g], slot_of_.begin() + offsets_[g + 1], slots_[g]);
    ones_host_.assign(static_cast<size_t>(std::max<int64_t>(max_rows_, 1)), 1.0f);
    std::tie(row_slot_, ones_) = bias_rows_.upload_all(slot_of_, ones_host_);
  }
  grouped_rows(up, F_, x, C_, ptr(w_.w_up), true, 0.0f);
  add_group_bias(up, ptr(w_.b_up), F_);
  if (gate) {
    grouped_rows(gate, F_, x, C_, ptr(w_.w_gate), true, 0.0f);
    be_.swiglu_forward(act, gate, up, rows * F_);
  } else {
    be_.gelu_forward(act, up, rows * F_);
  }
  grouped_rows(y, C_, act, F_, ptr(w_.w_down), true, 0.0f);
  add_group_bias(y, ptr(w_.b_down), C_);
}

// dact = dy Wd, then d(gate), d(up) over all rows, dx = dgate Wg + dup Wu (or dup Wu)
void GroupedFfn::backward_data_grouped(float* dx, const float* dy, float* dact, float* dgate, float* dup) {
  const int64_t rows = offsets_.back();
  grouped_rows(dact, F_, dy, C_, ptr(w_.w_down), false, 0.0f);
  if (dgate) {
    be_.swiglu_backward(dgate, dup, dact, gate_.data(), up_.data(), rows * F_);
    grouped_rows(dx, C_, dgate, F_, ptr(w_.w_gate), false, 0.0f);
  } else {
    be_.gelu_backward(dup, dact, up_.data(), rows * F_);
  }
  grouped_rows(dx, C_, dup, F_, ptr(w_.w_up), false, dgate ? 1.0f : 0.0f);
}

// dWd[s] += dy^T act, dWg[s] += dgate^T x, dWu[s] += dup^T x (+ the bias sums) over each group's rows
void GroupedFfn::backward_weights_grouped(float* dwg, float* dwu, float* dwd, float* dbu, float* dbd) {
  if (dwd) grouped_weights(dwd, dy_, C_, aout_.data(), F_);
  grouped_bias_sums(dbd, dy_, C_);
  if (dwg) grouped_weights(dwg, dgate_.data(), F_, x_, C_);
  if (dwu) grouped_weights(dwu, dup_.data(), F_, x_, C_);
  grouped_bias_sums(dbu, dup_.data(), F_);
}

// y[rows,C] = ffn_{slots[g]}(x[rows,C]) group by group
void GroupedFfn::forward(float* y, const float* x, const int64_t* slots, const int64_t* offsets, int64_t n_groups,
                         bool batch_invariant) {
  const int64_t S = num_slots();
  MOE_CHECK(n_groups >= 0 && offsets[0] == 0, "grouped FFN: bad layout (" << n_groups << " groups, offsets[0] "
                                                                          << offsets[0] << ")");
  slots_.assign(slots, slots + n_groups);
  offsets_.assign(offsets, offsets + n_groups + 1);
  order_.clear();
  max_rows_ = 0;
  std::vector<int64_t> seen(slots_);
  std::sort(seen.begin(), seen.end());
  MOE_CHECK(std::adjacent_find(seen.begin(), seen.end()) == seen.end(),
            "grouped FFN: a weight slot appears in more than one group");
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t n = offsets_[g + 1] - offsets_[g];
    MOE_CHECK(slots_[g] >= 0 && slots_[g] < S, "grouped FFN: group " << g << " names slot " << slots_[g]
                                                                     << ", outside [0, " << S << ")");
    MOE_CHECK(n >= 0 && n <= INT_MAX, "grouped FFN: group " << g << " has rows " << offsets_[g] << ".."
                                                            << offsets_[g + 1]);
    if (n > 0) order_.push_back(static_cast<int>(g));
    max_rows_ = std::max(max_rows_, n);
  }
  std::stable_sort(order_.begin(), order_.end(), [&](int a, int b) {
    return offsets_[a + 1] - offsets_[a] > offsets_[b + 1] - offsets_[b];
  });
  const int64_t rows = offsets_[n_groups];
  x_ = x;
  stage_ = 1;
  parallel_ = choose_parallel(be_, static_cast<int>(order_.size()), max_rows_, rows, C_, F_);
  grouped_ = grouped_gemms(batch_invariant);
  const int C = C_, F = F_;
  const int64_t FC = int64_t(F) * C;
  const bool swiglu = act_ == proto::SWIGLU;
  float* gate = swiglu ? gate_.get(rows * F) : nullptr;  // [rows,F]
  float* up = up_.get(rows * F);                          // [rows,F]
  float* act = aout_.get(rows * F);                        // [rows,F]
  if (grouped_) return forward_grouped(y, x, gate, up, act);
  const float *wg = ptr(w_.w_gate), *wu = ptr(w_.w_up), *wd = ptr(w_.w_down);
  const float *bu = ptr(w_.b_up), *bd = ptr(w_.b_down);
  // slot s of a weight: its packed matrix (the inference path) or its row-major one (a row-sparse table's
  // bias-free slots through matmul_few_rows: see matmul_of)
  auto linear = [&](float* out, const float* in, const PackedWeight& pw, const float* w, int64_t s, const float* b,
                    int n, int ic, int oc) {
    const float* ws = w + s * int64_t(ic) * oc;
    if (batch_invariant)
      be_.linear_rows(out, in, pw.slot(s), b, n, ic, oc);
    else if (sparse() && !b)
      be_.matmul_few_rows(out, in, ws, n, oc, ic, false, true);
    else
      be_.linear_forward(out, in, ws, b, n, ic, oc);
  };
  for_each_group([&](int g, int q) {
    const int64_t r0 = offsets_[g], s = slots_[g];
    const int n = static_cast<int>(offsets_[g + 1] - r0);
    const float* xg = x + r0 * C;  // [n,C]
    float* ug = up + r0 * F;       // [n,F]
    float* ag = act + r0 * F;      // [n,F]
    const int64_t qs = q >= 0 && !batch_invariant ? slots_[q] * FC : -1;  // (the packed path reads other memory)
    if (qs >= 0) prefetch_read(wu + qs, FC);
    linear(ug, xg, packed_->up, wu, s, bu ? bu + s * F : nullptr, n, C, F);
    if (qs >= 0) prefetch_read(wd + qs, FC);
    if (swiglu) {
      float* gg = gate + r0 * F;  // [n,F]
      if (qs >= 0) prefetch_read(wg + qs, FC);
      linear(gg, xg, packed_->gate, wg, s, nullptr, n, C, F);
      be_.swiglu_forward(ag, gg, ug, int64_t(n) * F);
    } else {
      be_.gelu_forward(ag, ug, int64_t(n) * F);
    }
    linear(y + r0 * C, ag, packed_->down, wd, s, bd ? bd + s * C : nullptr, n, F, C);
  });
}

// dx[rows,C] written; d(act), d(gate), d(up) kept for backward_weights
void GroupedFfn::backward_data(float* dx, const float* dy) {
  MOE_CHECK(stage_ == 1, "grouped FFN: backward_data must follow exactly one forward");
  stage_ = 2;
  dy_ = dy;
  const int C = C_, F = F_;
  const int64_t FC = int64_t(F) * C, rows = offsets_.back();
  const bool swiglu = act_ == proto::SWIGLU;
  float* dact = dact_.get(rows * F);                       // [rows,F]
  float* dup = dup_.get(rows * F);                         // [rows,F]
  float* dgate = swiglu ? dgate_.get(rows * F) : nullptr;  // [rows,F]
  if (grouped_) return backward_data_grouped(dx, dy, dact, dgate, dup);
  const float *wg = ptr(w_.w_gate), *wu = ptr(w_.w_up), *wd = ptr(w_.w_down);
  const auto mm = matmul_of();
  for_each_group([&](int g, int q) {
    const int64_t r0 = offsets_[g], s = slots_[g];
    const int n = static_cast<int>(offsets_[g + 1] - r0);
    const int64_t qs = q >= 0 ? slots_[q] * FC : -1;
    float* dag = dact + r0 * F;  // [n,F]
    float* dug = dup + r0 * F;   // [n,F]
    float* dxg = dx + r0 * C;    // [n,C]
    if (qs >= 0) prefetch_read(wd + qs, FC);
    (be_.*mm)(dag, dy + r0 * C, wd + s * FC, n, F, C, false, false, 1.0f, 0.0f);  // dact = dy Wd
    if (swiglu) {
      float* dgg = dgate + r0 * F;  // [n,F]
      be_.swiglu_backward(dgg, dug, dag, gate_.data() + r0 * F, up_.data() + r0 * F, int64_t(n) * F);
      if (qs >= 0) prefetch_read(wg + qs, FC);
      (be_.*mm)(dxg, dgg, wg + s * FC, n, C, F, false, false, 1.0f, 0.0f);  // dx = dgate Wg
      if (qs >= 0) prefetch_read(wu + qs, FC);
      (be_.*mm)(dxg, dug, wu + s * FC, n, C, F, false, false, 1.0f, 1.0f);  // dx += dup Wu
    } else {
      be_.gelu_backward(dug, dag, up_.data() + r0 * F, int64_t(n) * F);
      if (qs >= 0) prefetch_read(wu + qs, FC);
      (be_.*mm)(dxg, dug, wu + s * FC, n, C, F, false, false, 1.0f, 0.0f);  // dx = dup Wu
    }
  });
}

// dWd += dy^T act, dWg += dgate^T x, dWu += dup^T x (+ bias sums) for the used slots; frozen params get none
void GroupedFfn::backward_weights() {
  MOE_CHECK(stage_ == 2, "grouped FFN: backward_weights must follow backward_data");
  stage_ = 0;
  const int C = C_, F = F_;
  const int64_t FC = int64_t(F) * C;
  const bool swiglu = act_ == proto::SWIGLU;
  float *dwg = trained_grad(w_.w_gate), *dwu = trained_grad(w_.w_up), *dwd = trained_grad(w_.w_down);
  float *dbu = trained_grad(w_.b_up), *dbd = trained_grad(w_.b_down);
  if (!dwg && !dwu && !dwd && !dbu && !dbd) return;
  if (grouped_) {
    backward_weights_grouped(swiglu ? dwg : nullptr, dwu, dwd, dbu, dbd);
    return touch_used_rows();
  }
  // dw[OC,IC] += dout[n,OC]^T inp[n,IC] (+ db[OC] += column sums of dout): a row-sparse table's bias-free slots go
  // through matmul_few_rows (see matmul_of)
  auto dweight = [&](float* dw, float* db, const float* dout, const float* inp, int n, int IC, int OC) {
    if (sparse() && !db)
      be_.matmul_few_rows(dw, dout, inp, OC, IC, n, true, false, 1.0f, 1.0f);
    else
      be_.linear_backward(nullptr, dw, db, dout, inp, nullptr, n, IC, OC);
  };
  for_each_group([&](int g, int q) {
    const int64_t r0 = offsets_[g], s = slots_[g];
    const int n = static_cast<int>(offsets_[g + 1] - r0);
    const int64_t qs = q >= 0 ? slots_[q] * FC : -1;
    const float* xg = x_ + r0 * C;  // [n,C]
    if (dwd || dbd) {
      if (qs >= 0 && dwd) prefetch_write(dwd + qs, FC);
      dweight(at(dwd, s, FC), at(dbd, s, C), dy_ + r0 * C, aout_.data() + r0 * F, n, F, C);
    }
    if (swiglu && dwg) {
      if (qs >= 0) prefetch_write(dwg + qs, FC);
      dweight(dwg + s * FC, nullptr, dgate_.data() + r0 * F, xg, n, C, F);
    }
    if (dwu || dbu) {
      if (qs >= 0 && dwu) prefetch_write(dwu + qs, FC);
      dweight(at(dwu, s, FC), at(dbu, s, F), dup_.data() + r0 * F, xg, n, C, F);
    }
  });
  touch_used_rows();
}

void GroupedFfn::touch_used_rows() {
  if (!sparse()) return;
  for (Param* p : {w_.w_gate, w_.w_up, w_.b_up, w_.w_down, w_.b_down})
    if (p && !p->frozen)
      for (int g : order_) p->touch_row(slots_[g]);
}

}  // namespace moe
