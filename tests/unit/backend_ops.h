// One runner per Backend op (core/backend.h), shared by the backend test suites: a case holds seeded host inputs,
// run_*(backend, case) uploads them to the backend's device, runs the op(s) there and returns every output as a
// named host vector. test_backend.cpp checks the CPU backend against the plain references; test_cuda_backend.cpp
// checks the CUDA backend against the CPU backend on the same cases.
// Outputs that an op must WRITE are pre-filled with a sentinel, outputs it ACCUMULATES into start from random
// values, so both conventions are checked.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "core/backend.h"
#include "core/kernels/cpu/kernels.h"
#include "core/rng.h"
#include "tests/unit/oracle.h"

namespace moe::test {

using Vec = std::vector<float>;
using Ids = std::vector<int32_t>;
using Outputs = std::map<std::string, Vec>;  // output name -> host values

constexpr float kUnwritten = 1e30f;  // pre-fills outputs that must be written (=)

// Buffers on one backend's device, uploaded from / read back to host vectors; freed with the arena.
class DeviceArena {
 public:
  explicit DeviceArena(Backend& be) : be_(be) {}
  ~DeviceArena() {
    for (void* p : owned_) be_.free(p);
  }
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  template <class T>
  T* put(const std::vector<T>& host) {  // [host.size()] on the device
    T* p = static_cast<T*>(alloc(host.size() * sizeof(T)));
    be_.from_host(p, host.data(), host.size() * sizeof(T));
    return p;
  }
  float* unwritten(int64_t n) { return put(Vec(size_t(n), kUnwritten)); }  // [n] filled with kUnwritten
  template <class T>
  std::vector<T> get(const T* p, int64_t n) {  // p[n] read back
    std::vector<T> host(static_cast<size_t>(n));
    be_.to_host(host.data(), p, size_t(n) * sizeof(T));
    return host;
  }

 private:
  void* alloc(size_t bytes) {
    owned_.push_back(be_.alloc(bytes));
    return owned_.back();
  }
  Backend& be_;
  std::vector<void*> owned_;
};

inline Ids rand_ids(Rng& rng, int n, int hi) {
  Ids ids(n);
  for (auto& x : ids) x = static_cast<int32_t>(rng.below(hi));
  return ids;
}

// Every output of `want` present in `got`, finite, and within tol relative error (max_rel_err).
inline void expect_outputs_near(const Outputs& got, const Outputs& want, double tol) {
  EXPECT_EQ(got.size(), want.size());
  for (const auto& [name, w] : want) {
    auto it = got.find(name);
    if (it == got.end()) {
      ADD_FAILURE() << "missing output " << name;
      continue;
    }
    const Vec& g = it->second;
    ASSERT_EQ(g.size(), w.size()) << name;
    bool finite = true;
    for (float x : g) finite = finite && std::isfinite(x);
    EXPECT_TRUE(finite) << name << ": non-finite (or unwritten) value";
    EXPECT_LE(max_rel_err(g, w), tol) << name;
  }
}

// ---------------------------------------------------------------- matmul
struct MatmulCase {
  int M, N, K;
  bool ta, tb;
  float alpha, beta;
  Vec a, b, c0;  // a[M,K] or [K,M], b[K,N] or [N,K], c0[M,N]
};
inline MatmulCase make_matmul(Rng& rng, int M, int N, int K, bool ta, bool tb, float alpha, float beta) {
  return {M, N, K, ta, tb, alpha, beta, randn(rng, int64_t(M) * K), randn(rng, int64_t(K) * N),
          randn(rng, int64_t(M) * N)};
}
inline Outputs run_matmul(Backend& be, const MatmulCase& c) {
  DeviceArena d(be);
  float* out = d.put(c.c0);
  be.matmul(out, d.put(c.a), d.put(c.b), c.M, c.N, c.K, c.ta, c.tb, c.alpha, c.beta);
  return {{"c", d.get(out, int64_t(c.M) * c.N)}};
}
inline Outputs run_matmul_few_rows(Backend& be, const MatmulCase& c) {
  DeviceArena d(be);
  float* out = d.put(c.c0);
  be.matmul_few_rows(out, d.put(c.a), d.put(c.b), c.M, c.N, c.K, c.ta, c.tb, c.alpha, c.beta);
  return {{"c", d.get(out, int64_t(c.M) * c.N)}};
}

// "c<g>": the output name of group g (ostringstream: GCC 12 warns falsely on std::string concatenation, -Wrestrict)
inline std::string group_output(size_t g) {
  std::ostringstream o;
  o << 'c' << g;
  return o.str();
}
// Grouped GEMM: several products of different shapes (one empty) in one call, each from its own matmul case;
// outputs c0, c1, ... (the empty group's c is left as it was)
inline Outputs run_matmul_grouped(Backend& be, const std::vector<MatmulCase>& cases) {
  DeviceArena d(be);
  std::vector<Backend::GemmGroup> groups;
  for (const MatmulCase& c : cases) groups.push_back({d.put(c.c0), d.put(c.a), d.put(c.b), c.M, c.N, c.K});
  const MatmulCase& c0 = cases[0];
  be.matmul_grouped(groups.data(), static_cast<int>(groups.size()), c0.ta, c0.tb, c0.alpha, c0.beta);
  Outputs out;
  for (size_t g = 0; g < cases.size(); ++g)
    out[group_output(g)] = d.get(groups[g].c, int64_t(cases[g].M) * cases[g].N);
  return out;
}
// groups of shapes (M, N, K) drawn around the sizes of an expert bank, sharing the transposes and scalars
inline std::vector<MatmulCase> make_matmul_groups(Rng& rng, bool ta, bool tb, float beta) {
  std::vector<MatmulCase> cases;
  for (const auto& [M, N, K] : {std::tuple{17, 48, 32}, {1, 48, 32}, {0, 48, 32}, {40, 48, 32}})
    cases.push_back(make_matmul(rng, M, N, K, ta, tb, 1.0f, beta));
  return cases;
}

// ---------------------------------------------------------------- linear forward + backward
struct LinearCase {
  int N, IC, OC;
  bool bias, dinp;       // with a bias; with dinp (else null: skipped)
  Vec inp, w, b, dout;   // inp[N,IC], w[OC,IC], b[OC], dout[N,OC]
  Vec dw0, db0;          // initial dw[OC,IC], dbias[OC] (accumulated into)
};
inline LinearCase make_linear(Rng& rng, int N, int IC, int OC, bool bias, bool dinp) {
  return {N, IC, OC, bias, dinp, randn(rng, int64_t(N) * IC), randn(rng, int64_t(OC) * IC), randn(rng, OC),
          randn(rng, int64_t(N) * OC), randn(rng, int64_t(OC) * IC), randn(rng, OC)};
}
inline Outputs run_linear(Backend& be, const LinearCase& c) {
  DeviceArena d(be);
  const float* inp = d.put(c.inp);
  const float* w = d.put(c.w);
  float* out = d.unwritten(int64_t(c.N) * c.OC);
  float* dinp = c.dinp ? d.unwritten(int64_t(c.N) * c.IC) : nullptr;
  float* dw = d.put(c.dw0);
  float* db = c.bias ? d.put(c.db0) : nullptr;
  be.linear_forward(out, inp, w, c.bias ? d.put(c.b) : nullptr, c.N, c.IC, c.OC);
  be.linear_backward(dinp, dw, db, d.put(c.dout), inp, w, c.N, c.IC, c.OC);
  Outputs o{{"out", d.get(out, int64_t(c.N) * c.OC)}, {"dw", d.get(dw, int64_t(c.OC) * c.IC)}};
  if (dinp) o["dinp"] = d.get(dinp, int64_t(c.N) * c.IC);
  if (db) o["dbias"] = d.get(db, c.OC);
  return o;
}

// ---------------------------------------------------------------- embedding
struct EmbeddingCase {
  int V, N, C;
  Ids ids;             // [N], with repeats
  Vec wte, dout, dw0;  // wte[V,C], dout[N,C], initial dwte[V,C]
};
inline EmbeddingCase make_embedding(Rng& rng, int V, int N, int C) {
  return {V, N, C, rand_ids(rng, N, V), randn(rng, int64_t(V) * C), randn(rng, int64_t(N) * C),
          randn(rng, int64_t(V) * C)};
}
inline Outputs run_embedding(Backend& be, const EmbeddingCase& c) {
  DeviceArena d(be);
  const int32_t* ids = d.put(c.ids);
  float* out = d.unwritten(int64_t(c.N) * c.C);
  float* dwte = d.put(c.dw0);
  be.embedding_forward(out, ids, d.put(c.wte), c.N, c.C);
  be.embedding_backward(dwte, d.put(c.dout), ids, c.N, c.C);
  return {{"out", d.get(out, int64_t(c.N) * c.C)}, {"dwte", d.get(dwte, int64_t(c.V) * c.C)}};
}

// ---------------------------------------------------------------- RMSNorm / LayerNorm
struct NormCase {
  int N, C;
  float eps;
  Vec inp, w, b, dout, dw0, db0;  // inp[N,C], w[C], b[C], dout[N,C], initial dw[C], db[C]
};
inline NormCase make_norm(Rng& rng, int N, int C) {
  return {N, C, 1e-5f, randn(rng, int64_t(N) * C, 2.0f), randn(rng, C), randn(rng, C), randn(rng, int64_t(N) * C),
          randn(rng, C), randn(rng, C)};
}
inline Outputs run_rmsnorm(Backend& be, const NormCase& c) {
  DeviceArena d(be);
  const int64_t NC = int64_t(c.N) * c.C;
  const float* inp = d.put(c.inp);
  const float* w = d.put(c.w);
  float *out = d.unwritten(NC), *rstd = d.unwritten(c.N), *dinp = d.unwritten(NC), *dw = d.put(c.dw0);
  be.rmsnorm_forward(out, rstd, inp, w, c.N, c.C, c.eps);
  be.rmsnorm_backward(dinp, dw, d.put(c.dout), inp, w, rstd, c.N, c.C);
  return {{"out", d.get(out, NC)}, {"rstd", d.get(rstd, c.N)}, {"dinp", d.get(dinp, NC)}, {"dw", d.get(dw, c.C)}};
}
inline Outputs run_layernorm(Backend& be, const NormCase& c) {
  DeviceArena d(be);
  const int64_t NC = int64_t(c.N) * c.C;
  const float* inp = d.put(c.inp);
  const float* w = d.put(c.w);
  float *out = d.unwritten(NC), *mean = d.unwritten(c.N), *rstd = d.unwritten(c.N), *dinp = d.unwritten(NC);
  float *dw = d.put(c.dw0), *db = d.put(c.db0);
  be.layernorm_forward(out, mean, rstd, inp, w, d.put(c.b), c.N, c.C, c.eps);
  be.layernorm_backward(dinp, dw, db, d.put(c.dout), inp, w, mean, rstd, c.N, c.C);
  return {{"out", d.get(out, NC)},   {"mean", d.get(mean, c.N)}, {"rstd", d.get(rstd, c.N)},
          {"dinp", d.get(dinp, NC)}, {"dw", d.get(dw, c.C)},     {"db", d.get(db, c.C)}};
}

// ---------------------------------------------------------------- rotary position embedding
struct RopeCase {
  int B, T, nh, D, pos0;
  float theta;
  Vec x, dy;  // x[B,T,nh,D], dy[B,T,nh,D]
};
inline RopeCase make_rope(Rng& rng, int B, int T, int nh, int D, int pos0) {
  const int64_t n = int64_t(B) * T * nh * D;
  return {B, T, nh, D, pos0, 10000.0f, randn(rng, n), randn(rng, n)};
}
inline Outputs run_rope(Backend& be, const RopeCase& c) {
  DeviceArena d(be);
  float *x = d.put(c.x), *dy = d.put(c.dy);
  be.rope_forward(x, c.B, c.T, c.nh, c.D, c.pos0, c.theta);
  be.rope_backward(dy, c.B, c.T, c.nh, c.D, c.pos0, c.theta);
  return {{"fwd", d.get(x, int64_t(c.x.size()))}, {"bwd", d.get(dy, int64_t(c.dy.size()))}};
}

// ---------------------------------------------------------------- causal attention (forward + backward)
struct AttnCase {
  int B, T, H, Hkv, D;
  bool scratch;          // pass datt_scratch (else null)
  Vec q, k, v, dout;     // q[B,T,H,D], k/v[B,T,Hkv,D], dout[B,T,H,D]
  int64_t nq() const { return int64_t(B) * T * H * D; }
  int64_t nkv() const { return int64_t(B) * T * Hkv * D; }
  int64_t natt() const { return int64_t(B) * H * T * T; }
};
inline AttnCase make_attn(Rng& rng, int B, int T, int H, int Hkv, int D, bool scratch) {
  AttnCase c{B, T, H, Hkv, D, scratch, {}, {}, {}, {}};
  c.q = randn(rng, c.nq());
  c.k = randn(rng, c.nkv());
  c.v = randn(rng, c.nkv());
  c.dout = randn(rng, c.nq());
  return c;
}
inline Outputs run_attention(Backend& be, const AttnCase& c) {
  DeviceArena d(be);
  const float *q = d.put(c.q), *k = d.put(c.k), *v = d.put(c.v);
  float *out = d.unwritten(c.nq()), *att = d.unwritten(c.natt());
  float *dq = d.unwritten(c.nq()), *dk = d.unwritten(c.nkv()), *dv = d.unwritten(c.nkv());
  float* scratch = c.scratch ? d.unwritten(c.natt()) : nullptr;
  be.attention_forward(out, att, q, k, v, c.B, c.T, c.H, c.Hkv, c.D);
  be.attention_backward(dq, dk, dv, scratch, d.put(c.dout), q, k, v, att, c.B, c.T, c.H, c.Hkv, c.D);
  return {{"out", d.get(out, c.nq())}, {"att", d.get(att, c.natt())}, {"dq", d.get(dq, c.nq())},
          {"dk", d.get(dk, c.nkv())},  {"dv", d.get(dv, c.nkv())}};
}

// ---------------------------------------------------------------- the inference path
// attention over a paged KV cache: B sequences of T positions, their keys and values scattered over shuffled blocks
// of a pool (block_size = T: one contiguous block per sequence); rows (b, t) in order, row (b, t) at position t
struct PagedCase {
  int B, T, H, Hkv, D, block_size, slots;
  Vec q, k_pool, v_pool;    // q[B*T,H,D], pools [slots,Hkv,D]
  Ids pos, table, table_start;
  int rows() const { return B * T; }
};
// the paged layout of a causal attention case (its q, k, v): the same result as attention_forward's out
inline PagedCase make_paged(Rng& rng, const AttnCase& a, int block_size) {
  const int per = (a.T + block_size - 1) / block_size, nblk = a.B * per + 3;  // 3 blocks nobody uses
  PagedCase c{a.B, a.T, a.H, a.Hkv, a.D, block_size, nblk * block_size, a.q, {}, {}, {}, {}, {}};
  const int64_t row = int64_t(a.Hkv) * a.D;
  c.k_pool = randn(rng, c.slots * row);  // garbage where no sequence lives
  c.v_pool = randn(rng, c.slots * row);
  Ids order(nblk);
  for (int i = 0; i < nblk; ++i) order[i] = i;
  for (int i = nblk - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
  for (int b = 0; b < a.B; ++b) {
    const int start = static_cast<int>(c.table.size());
    for (int j = 0; j < per; ++j) c.table.push_back(order[b * per + j]);
    for (int t = 0; t < a.T; ++t) {
      const int64_t slot = int64_t(c.table[start + t / block_size]) * block_size + t % block_size;
      const int64_t src = (int64_t(b) * a.T + t) * row;
      std::copy(a.k.begin() + src, a.k.begin() + src + row, c.k_pool.begin() + slot * row);
      std::copy(a.v.begin() + src, a.v.begin() + src + row, c.v_pool.begin() + slot * row);
      c.pos.push_back(t);
      c.table_start.push_back(start);
    }
  }
  return c;
}
inline Outputs run_paged(Backend& be, const PagedCase& c) {
  DeviceArena d(be);
  float* out = d.unwritten(int64_t(c.rows()) * c.H * c.D);
  be.attention_paged(out, d.put(c.q), d.put(c.k_pool), d.put(c.v_pool), d.put(c.pos), d.put(c.table),
                     d.put(c.table_start), c.block_size, c.rows(), c.H, c.Hkv, c.D);
  return {{"out", d.get(out, int64_t(c.rows()) * c.H * c.D)}};
}
// the batch-invariant linear layer (the forward of a LinearCase), its weight packed into the inference layout first
inline Outputs run_linear_rows(Backend& be, const LinearCase& c) {
  DeviceArena d(be);
  float* out = d.unwritten(int64_t(c.N) * c.OC);
  float* packed = d.unwritten(be.packed_rows_floats(c.IC, c.OC));
  be.pack_rows(packed, d.put(c.w), c.IC, c.OC);
  be.linear_rows(out, d.put(c.inp), packed, c.bias ? d.put(c.b) : nullptr, c.N, c.IC, c.OC);
  return {{"out", d.get(out, int64_t(c.N) * c.OC)}};
}
// rope_rows at scattered positions, and scatter_rows of the rotated rows into a bigger pool
struct RowsCase {
  int N, nh, D, P;  // P positions in the table
  Vec x, cs, pool;  // x[N,nh,D], cs[P,D], pool[slots, nh*D]
  Ids pos, slot;    // [N] positions < P, distinct slots
};
inline RowsCase make_rows(Rng& rng, int N, int nh, int D, int P) {
  RowsCase c{N, nh, D, P, randn(rng, int64_t(N) * nh * D), Vec(size_t(P) * D), randn(rng, int64_t(2 * N) * nh * D),
             rand_ids(rng, N, P), {}};
  cpu::rope_cos_sin(c.cs.data(), P, D, 0, 10000.0f);
  for (int n = 0; n < N; ++n) c.slot.push_back(2 * N - 1 - 2 * n);
  return c;
}
inline Outputs run_rows(Backend& be, const RowsCase& c) {
  DeviceArena d(be);
  float *x = d.put(c.x), *pool = d.put(c.pool);
  be.rope_rows(x, d.put(c.pos), d.put(c.cs), c.N, c.nh, c.D);
  be.scatter_rows(pool, x, d.put(c.slot), c.N, c.nh * c.D);
  return {{"x", d.get(x, int64_t(c.x.size()))}, {"pool", d.get(pool, int64_t(c.pool.size()))}};
}

// ---------------------------------------------------------------- activations
struct ActCase {
  int64_t n;
  Vec x, up, dout;  // x[n] (gelu input, swiglu gate), up[n], dout[n]
};
inline ActCase make_act(Rng& rng, int64_t n) { return {n, randn(rng, n, 2.0f), randn(rng, n), randn(rng, n)}; }
inline Outputs run_gelu(Backend& be, const ActCase& c) {
  DeviceArena d(be);
  const float* x = d.put(c.x);
  float *out = d.unwritten(c.n), *dinp = d.unwritten(c.n);
  be.gelu_forward(out, x, c.n);
  be.gelu_backward(dinp, d.put(c.dout), x, c.n);
  return {{"out", d.get(out, c.n)}, {"dinp", d.get(dinp, c.n)}};
}
inline Outputs run_swiglu(Backend& be, const ActCase& c) {
  DeviceArena d(be);
  const float *gate = d.put(c.x), *up = d.put(c.up);
  float *out = d.unwritten(c.n), *dgate = d.unwritten(c.n), *dup = d.unwritten(c.n);
  be.swiglu_forward(out, gate, up, c.n);
  be.swiglu_backward(dgate, dup, d.put(c.dout), gate, up, c.n);
  return {{"out", d.get(out, c.n)}, {"dgate", d.get(dgate, c.n)}, {"dup", d.get(dup, c.n)}};
}

// ---------------------------------------------------------------- softmax cross-entropy
struct CrossEntropyCase {
  int N, V;
  float dloss;
  Vec logits;   // [N,V]
  Ids targets;  // [N], some < 0 (ignored)
};
inline CrossEntropyCase make_cross_entropy(Rng& rng, int N, int V, bool all_ignored = false) {
  CrossEntropyCase c{N, V, 0.7f, randn(rng, int64_t(N) * V, 3.0f), rand_ids(rng, N, V)};
  for (int n = 0; n < N; ++n)
    if (all_ignored || n % 5 == 2) c.targets[n] = -1;
  return c;
}
// outputs: losses, probs, mean (the returned value, one element), dlogits
inline Outputs run_cross_entropy(Backend& be, const CrossEntropyCase& c) {
  DeviceArena d(be);
  const int64_t NV = int64_t(c.N) * c.V;
  const int32_t* targets = d.put(c.targets);
  float *losses = d.unwritten(c.N), *probs = d.unwritten(NV), *dlogits = d.unwritten(NV);
  const float mean = be.cross_entropy_forward(losses, probs, d.put(c.logits), targets, c.N, c.V);
  be.cross_entropy_backward(dlogits, probs, targets, c.N, c.V, c.dloss);
  return {{"losses", d.get(losses, c.N)}, {"probs", d.get(probs, NV)}, {"mean", {mean}},
          {"dlogits", d.get(dlogits, NV)}};
}

// ---------------------------------------------------------------- elementwise
struct ElementwiseCase {
  int64_t n;
  float s;
  Vec x, y;  // x[n], y[n]
};
inline ElementwiseCase make_elementwise(Rng& rng, int64_t n) { return {n, -1.5f, randn(rng, n), randn(rng, n)}; }
// outputs: add_inplace (y + x), add (x + y), scale_inplace (y * s), mul (x * y, and in place y *= x);
// *sum_squares = sum of x^2
inline Outputs run_elementwise(Backend& be, const ElementwiseCase& c, double* sum_squares) {
  DeviceArena d(be);
  const float* x = d.put(c.x);
  float *acc = d.put(c.y), *sum = d.unwritten(c.n), *scaled = d.put(c.y), *prod = d.unwritten(c.n);
  float* prod_inplace = d.put(c.y);
  be.add_inplace(acc, x, c.n);
  be.add(sum, x, d.put(c.y), c.n);
  be.scale_inplace(scaled, c.s, c.n);
  be.mul(prod, x, d.put(c.y), c.n);
  be.mul(prod_inplace, prod_inplace, x, c.n);
  *sum_squares = be.sum_squares(x, c.n);
  return {{"add_inplace", d.get(acc, c.n)}, {"add", d.get(sum, c.n)}, {"scale_inplace", d.get(scaled, c.n)},
          {"mul", d.get(prod, c.n)}, {"mul_inplace", d.get(prod_inplace, c.n)}};
}

// ---------------------------------------------------------------- token dispatch
// N tokens with k slots; R kept slots in a shuffled order (slot[R]), the others dropped (row -1); row[s] the
// position of slot s in that order (the plan's order / row_of_slot), gates per slot
struct DispatchCase {
  int N, k, C, R;
  Vec x, y, gate, acc;  // x[N,C] token rows, y[R,C] permuted rows, gate[N*k], acc[N,C] (accumulated into)
  Ids slot, row;        // slot[R], row[N*k]
};
inline DispatchCase make_dispatch(Rng& rng, int N, int k, int C) {
  DispatchCase c{N, k, C, 0, randn(rng, int64_t(N) * C), {}, randn(rng, int64_t(N) * k), randn(rng, int64_t(N) * C),
                 {}, Ids(size_t(N) * k, -1)};
  for (int s = 0; s < N * k; ++s)
    if (rng.below(4) != 0) c.slot.push_back(s);  // about a quarter dropped
  for (size_t i = c.slot.size(); i > 1; --i) std::swap(c.slot[i - 1], c.slot[rng.below(i)]);
  c.R = static_cast<int>(c.slot.size());
  for (int r = 0; r < c.R; ++r) c.row[c.slot[r]] = r;
  c.y = randn(rng, int64_t(c.R) * C);
  return c;
}
// outputs: gathered (x rows of the slots), gated (times their gates), combined (= gated sum of y), accumulated
// (acc += ungated sum of y), dots (<x[token], y[row]> per slot)
inline Outputs run_dispatch(Backend& be, const DispatchCase& c) {
  DeviceArena d(be);
  const float *x = d.put(c.x), *y = d.put(c.y), *gate = d.put(c.gate);
  const int32_t *slot = d.put(c.slot), *row = d.put(c.row);
  const int64_t RC = int64_t(c.R) * c.C, NC = int64_t(c.N) * c.C;
  float *gathered = d.unwritten(RC), *gated = d.unwritten(RC), *combined = d.unwritten(NC), *acc = d.put(c.acc);
  float* dots = d.unwritten(int64_t(c.N) * c.k);
  be.gather_rows(gathered, x, slot, nullptr, c.R, c.k, c.C);
  be.gather_rows(gated, x, slot, gate, c.R, c.k, c.C);
  be.combine_rows(combined, y, row, gate, c.N, c.k, c.C, false);
  be.combine_rows(acc, y, row, nullptr, c.N, c.k, c.C, true);
  be.row_dots(dots, x, y, row, c.N, c.k, c.C);
  return {{"gathered", d.get(gathered, RC)}, {"gated", d.get(gated, RC)}, {"combined", d.get(combined, NC)},
          {"accumulated", d.get(acc, NC)}, {"dots", d.get(dots, int64_t(c.N) * c.k)}};
}

// ---------------------------------------------------------------- learned router
struct RouterCase {
  cpu::RouterDims d;
  Vec logits, bias;  // logits[N,E] (some rows with tied values); bias[E] or empty
  Ids row;           // [N*k] >= 0: kept, -1: dropped (about a quarter)
  Vec dgate, f;      // dgate[N*k], f[E]
  double aux_scale, z_scale;
};
inline RouterCase make_router(Rng& rng, int N, int E, int k, bool sigmoid, bool normalize, bool bias) {
  RouterCase c{{N, E, k, sigmoid, normalize}, randn(rng, int64_t(N) * E, 2.0f), {}, {},
               randn(rng, int64_t(N) * k), Vec(size_t(E)), 0.3, 0.02};
  for (int n = 0; n < N; n += 7) std::fill_n(c.logits.begin() + int64_t(n) * E, E / 2, 0.5f);  // ties
  if (bias) c.bias = randn(rng, E, 0.1f);
  for (int i = 0; i < N * k; ++i) c.row.push_back(rng.below(4) == 0 ? -1 : i);
  for (auto& x : c.f) x = rng.uniform();
  return c;
}
// outputs: choice (as floats), gate, score, lse, stats, dlogits
inline Outputs run_router(Backend& be, const RouterCase& c) {
  DeviceArena d(be);
  const int64_t Nk = int64_t(c.d.N) * c.d.k, NE = int64_t(c.d.N) * c.d.E;
  const float* logits = d.put(c.logits);
  auto* choice = reinterpret_cast<int32_t*>(d.unwritten(Nk));
  float *gate = d.unwritten(Nk), *score = d.unwritten(NE), *dlogits = d.unwritten(NE);
  auto* lse = reinterpret_cast<double*>(d.unwritten(2 * int64_t(c.d.N)));
  auto* stats = reinterpret_cast<double*>(d.unwritten(2 * int64_t(c.d.E + 2)));
  be.router_topk(c.d, choice, gate, score, lse, stats, logits, c.bias.empty() ? nullptr : d.put(c.bias));
  be.router_logits_grad(c.d, dlogits, logits, lse, choice, d.put(c.row), d.put(c.dgate), d.put(c.f), c.aux_scale,
                        c.z_scale);
  auto as_floats = [](const auto& v) { return Vec(v.begin(), v.end()); };
  return {{"choice", as_floats(d.get(choice, Nk))},        {"gate", d.get(gate, Nk)},
          {"score", d.get(score, NE)},                      {"lse", as_floats(d.get(lse, c.d.N))},
          {"stats", as_floats(d.get(stats, c.d.E + 2))},    {"dlogits", d.get(dlogits, NE)}};
}

// ---------------------------------------------------------------- AdamW
struct AdamWCase {
  int64_t rows, row_size;
  cpu::AdamWHyper h;
  float bc1, bc2;
  Vec w, g, m, v;              // [rows, row_size]; m and v start from an earlier step (v > 0)
  Ids row_t;                   // [rows] step counts
  std::vector<int64_t> touched;  // distinct rows, ascending with gaps
};
inline AdamWCase make_adamw(Rng& rng, int64_t rows, int64_t row_size) {
  const int64_t n = rows * row_size;
  AdamWCase c{rows, row_size, {1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f}, 1.0f - 0.9f * 0.9f, 1.0f - 0.95f * 0.95f,
              randn(rng, n), randn(rng, n), randn(rng, n), randn(rng, n), Ids(size_t(rows)), {}};
  for (float& x : c.v) x = x * x + 1e-3f;
  for (int64_t r = 0; r < rows; ++r) {
    c.row_t[r] = static_cast<int32_t>(rng.below(5));
    if (rng.below(3) != 0) c.touched.push_back(r);
  }
  return c;
}
// outputs: w, m, v after a dense update of everything, and w_rows, m_rows, v_rows, row_t after a lazy update of
// the touched rows (from the same start)
inline Outputs run_adamw(Backend& be, const AdamWCase& c) {
  DeviceArena d(be);
  const int64_t n = c.rows * c.row_size;
  const float* g = d.put(c.g);
  float *w = d.put(c.w), *m = d.put(c.m), *v = d.put(c.v);
  be.adamw(w, g, m, v, n, c.h, c.bc1, c.bc2);
  float *wr = d.put(c.w), *mr = d.put(c.m), *vr = d.put(c.v);
  int32_t* rt = d.put(c.row_t);
  be.adamw_rows(wr, g, mr, vr, rt, c.touched.data(), static_cast<int64_t>(c.touched.size()), c.row_size, c.h);
  const Ids steps = d.get(rt, c.rows);
  return {{"w", d.get(w, n)},        {"m", d.get(m, n)},   {"v", d.get(v, n)},
          {"w_rows", d.get(wr, n)},  {"m_rows", d.get(mr, n)}, {"v_rows", d.get(vr, n)},
          {"row_t", Vec(steps.begin(), steps.end())}};
}

// ---------------------------------------------------------------- row-sparse tables
// outputs over the touched rows of the AdamW case's table g: zeroed, scaled by -1.5, and their sum of squares
inline Outputs run_row_ops(Backend& be, const AdamWCase& c) {
  DeviceArena d(be);
  const int64_t n = c.rows * c.row_size, nt = static_cast<int64_t>(c.touched.size());
  float *zeroed = d.put(c.g), *scaled = d.put(c.g);
  be.zero_rows(zeroed, c.touched.data(), nt, c.row_size);
  be.scale_rows(scaled, -1.5f, c.touched.data(), nt, c.row_size);
  const double sq = be.sum_squares_rows(d.put(c.g), c.touched.data(), nt, c.row_size);
  return {{"zeroed", d.get(zeroed, n)}, {"scaled", d.get(scaled, n)}, {"sum_squares", {static_cast<float>(sq)}}};
}

}  // namespace moe::test
