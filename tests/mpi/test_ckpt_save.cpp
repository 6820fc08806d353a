// Per-rank checkpoint writes (checkpoints/saver.h) at every expert-parallel size that divides the world (1, 2, 4
// ranks): rank 0 writes model.h5 + tokenizer, expert-parallel rank r of data-parallel replica 0 writes
// experts_<r>.h5, no other rank writes anything; a synchronous and an asynchronous save of the same state hold
// byte-identical tensors; every rank restores exactly its live state from it, and a one-rank model restores the
// gathered global state; one rank's failed write fails the save on every rank, naming the rank and the file, and
// leaves `latest` and the directory as they were.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>
#include <thread>

#include "core/config.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "experts/moe_layer.h"
#include "checkpoints/saver.h"
#include "launcher/run_state.h"
#include "experts/build_model.h"
#include "comm/parallel.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {
namespace fs = std::filesystem;

int world_rank() {
  int r;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int n;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

// One temporary directory for all ranks (made by rank 0, removed by rank 0 at the end).
struct SharedDir {
  std::string path;
  SharedDir() {
    char buf[512] = {0};
    if (world_rank() == 0) {
      std::string tmpl = (fs::temp_directory_path() / "moe_ckpt_save_XXXXXX").string();
      std::strncpy(buf, mkdtemp(tmpl.data()), sizeof buf - 1);
    }
    MPI_Bcast(buf, sizeof buf, MPI_CHAR, 0, MPI_COMM_WORLD);
    path = buf;
  }
  ~SharedDir() {
    MPI_Barrier(MPI_COMM_WORLD);
    std::error_code ec;
    if (world_rank() == 0) fs::remove_all(path, ec);
  }
};

Config save_config(int ep) {
  Config c;
  auto* m = c.mutable_model();
  m->set_vocab_size(41);
  m->set_d_model(16);
  m->set_n_layers(2);
  m->set_n_heads(4);
  m->set_n_kv_heads(2);
  m->set_d_ff(24);
  m->set_max_seq_len(8);
  m->set_init_std(0.1f);
  m->add_ffn_pattern(proto::FFN_MOE);
  m->add_ffn_pattern(proto::FFN_WORD_EXPERT);
  auto* e = m->mutable_moe();
  e->set_num_experts(8);
  e->set_top_k(2);
  e->set_d_expert(12);
  e->set_dropless(true);
  e->set_jitter_eps(0.05f);  // a learned router with a jitter stream (its state goes into the manifest)
  auto* w = m->mutable_word_experts();
  w->set_num_experts(16);
  w->set_d_expert(6);
  w->set_num_frequent(5);
  c.mutable_optimizer()->set_lr(0.01f);
  c.mutable_parallel()->set_expert_parallel(ep);
  fill_defaults(c);
  return c;
}

std::vector<int64_t> counts_for(int V) {
  std::vector<int64_t> c(V);
  for (int i = 0; i < V; ++i) c[i] = (i * 7919) % 23;
  return c;
}

// A model (this rank's experts), trained for one step so the optimizer state is not trivial.
struct Trained {
  Config cfg;
  std::vector<int64_t> counts;
  std::unique_ptr<Model> model;
  std::unique_ptr<AdamW> opt;
  Trained(comm::Parallel* par, int ep) : cfg(save_config(ep)), counts(counts_for(41)) {
    cfg.mutable_train()->set_seed(5);
    model = experts::build_model(cfg, {.ep = par ? par->expert_group() : nullptr, .token_counts = &counts});
    opt = std::make_unique<AdamW>(model->params(), cfg.optimizer());
  }
  void step(comm::Parallel& par) {
    const int B = 8, T = 6, W = par.size(), Bl = B / W;
    Rng rng(99);
    std::vector<int32_t> in(B * T), tg(B * T);
    for (auto& x : in) x = static_cast<int32_t>(rng.below(41));
    for (auto& x : tg) x = static_cast<int32_t>(rng.below(41));
    model->params().zero_grad();
    const size_t off = size_t(par.rank()) * Bl * T;
    model->forward(in.data() + off, tg.data() + off, Bl, T, true);
    model->backward();
    par.reduce_grads(model->params());
    opt->step(0.01f);
  }
};

ckpt::SaveState state_of(Trained& t, comm::Parallel& par, int64_t step, const std::string* tok) {
  ckpt::SaveRequest base;
  base.config = &t.cfg;
  base.step = step;
  base.optimizer_t = t.opt->t();
  base.loader_rng = {1, 2, 3, 4};
  base.tokenizer_blob = tok;
  base.world_size = par.size();
  ckpt::SaveState st;
  st.step = step;
  const launcher::RunState rs{step, t.opt->t(), {1, 2, 3, 4}, t.model->unit_state()};
  st.tensors = launcher::collect_local_state(t.model->params(), t.opt.get());
  for (auto& r : rs.tensors()) st.tensors.push_back(r);
  st.manifest = ckpt::base_manifest(base);
  rs.to_manifest(st.manifest);
  st.tokenizer_blob = tok;
  return st;
}

std::string latest_of(const std::string& root) {
  std::string s = ckpt::read_file(root + "/latest");
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

// Every rank's list of the files it wrote, on every rank.
std::vector<std::set<std::string>> gather_written(const std::vector<std::string>& mine) {
  std::string joined;
  for (const auto& f : mine) joined += fs::path(f).filename().string() + "\n";
  const int W = world_size();
  int len = static_cast<int>(joined.size());
  std::vector<int> lens(W), displs(W);
  MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, MPI_COMM_WORLD);
  int total = 0;
  for (int r = 0; r < W; ++r) displs[r] = total, total += lens[r];
  std::string all(total, '\0');
  MPI_Allgatherv(joined.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR, MPI_COMM_WORLD);
  std::vector<std::set<std::string>> out(W);
  for (int r = 0; r < W; ++r) {
    std::string s = all.substr(displs[r], lens[r]);
    for (size_t p = 0, q; (q = s.find('\n', p)) != std::string::npos; p = q + 1) out[r].insert(s.substr(p, q - p));
  }
  return out;
}

void expect_same_bytes(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.nbytes(), b.nbytes()) << what;
  EXPECT_EQ(0, std::memcmp(a.raw(), b.raw(), a.nbytes())) << what;
}

// The world as data x expert parallel groups of `ep`, every collective under a 60 s deadline.
comm::Parallel trained_parallel(int ep) {
  auto world = comm::Communicator::world();
  world->set_deadline(60);
  return comm::Parallel(std::move(world), ep);
}

TEST(CheckpointSave, PerRankShardsSyncAndAsyncAgreeAndRestore) {
  const int W = world_size(), rank = world_rank();
  const std::string tok = "a tokenizer";
  for (int ep = 1; ep <= W; ep *= 2) {
    if (W % ep) continue;
    SCOPED_TRACE("world " + std::to_string(W) + " expert-parallel " + std::to_string(ep));
    SharedDir dir;
    comm::Parallel par = trained_parallel(ep);
    Trained t(&par, ep);
    t.step(par);
    std::mutex mu;
    std::vector<std::string> written;
    auto record = [&](const std::string& p) {
      std::lock_guard<std::mutex> lock(mu);
      written.push_back(p);
    };
    // synchronous save of step 1, asynchronous save of the same state as step 2
    ckpt::CheckpointSaver sync(par, {dir.path, false, 0, {}, record});
    const std::string d1 = sync.save(state_of(t, par, 1, &tok), false);
    EXPECT_EQ(fs::path(d1).filename(), "step_1");
    const auto files1 = gather_written(written);
    written.clear();
    ckpt::CheckpointSaver async(par, {dir.path, true, 0, {}, record});
    EXPECT_EQ(async.save(state_of(t, par, 2, &tok), false), "");
    EXPECT_TRUE(async.pending());
    std::string d2;
    for (int i = 0; i < 100000 && d2.empty(); ++i) {  // poll's answer is the same on every rank
      d2 = async.poll();
      if (d2.empty()) std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    ASSERT_EQ(fs::path(d2).filename(), "step_2");
    EXPECT_FALSE(async.pending());
    const auto files2 = gather_written(written);

    // who wrote what: rank 0 model.h5 + tokenizer; rank r < ep (replica 0) experts_<r>.h5; nobody else anything
    for (const auto& files : {files1, files2})
      for (int r = 0; r < W; ++r) {
        std::set<std::string> want;
        if (r == 0) want = {"model.h5", "tokenizer.model"};
        if (r < ep) want.insert("experts_" + std::to_string(r) + ".h5");
        EXPECT_EQ(files[r], want) << "files written by rank " << r;
      }
    if (rank == 0) {
      std::set<std::string> in_dir;
      for (const auto& e : fs::directory_iterator(dir.path + "/step_2")) in_dir.insert(e.path().filename().string());
      std::set<std::string> want = {"model.h5", "tokenizer.model", "manifest.pb", "manifest.txt"};
      for (int r = 0; r < ep; ++r) want.insert("experts_" + std::to_string(r) + ".h5");
      EXPECT_EQ(in_dir, want);
      EXPECT_EQ(latest_of(dir.path), "step_2");
      // sync and async: the same tensors, byte for byte (same checksums, shards included)
      const proto::Manifest m1 = ckpt::read_manifest(dir.path + "/step_1");
      const proto::Manifest m2 = ckpt::read_manifest(dir.path + "/step_2");
      ASSERT_EQ(m1.tensors_size(), m2.tensors_size());
      for (int i = 0; i < m1.tensors_size(); ++i)
        EXPECT_EQ(m1.tensors(i).SerializeAsString(), m2.tensors(i).SerializeAsString()) << m1.tensors(i).name();
      EXPECT_EQ(m2.expert_parallel(), ep);
      EXPECT_EQ(m2.world_size(), W);
      int sharded = 0;
      for (const auto& e : m2.tensors()) {
        if (e.shards_size() == 0) continue;
        ++sharded;
        EXPECT_EQ(e.shards_size(), ep) << e.name();
      }
      EXPECT_EQ(sharded, 2 * 3 * 3 + 3);  // 2 layers x 3 expert weights x (param, m, v) + word experts' row_t
      ASSERT_EQ(m2.router_rng_size(), 1);
      EXPECT_EQ(m2.router_rng(0).name(), "layers.0.ffn");
      // the virtual datasets (what h5py sees) agree with the shards
      ckpt::Reader r(dir.path + "/step_2", m2);
      for (const auto& e : m2.tensors()) EXPECT_NO_THROW(r.check_virtual(e.name())) << e.name();
    }

    // every rank restores exactly its live state (its own expert rows) from the asynchronous checkpoint
    {
      const proto::Manifest m = ckpt::read_manifest(dir.path + "/step_2");
      ckpt::Reader r(dir.path + "/step_2", m);
      Trained back(&par, ep);
      launcher::restore_state(r, back.model->params(), back.opt.get());
      EXPECT_EQ(back.model->restore_unit_state(launcher::RunState::read(r, m).units), 0);
      const auto& pa = t.model->params().all();
      const auto& pb = back.model->params().all();
      for (size_t i = 0; i < pa.size(); ++i) {
        expect_same_bytes(pa[i]->value, pb[i]->value, pa[i]->name);
        expect_same_bytes(t.opt->m()[i], back.opt->m()[i], "m of " + pa[i]->name);
        expect_same_bytes(t.opt->v()[i], back.opt->v()[i], "v of " + pa[i]->name);
        if (pa[i]->row_sparse) expect_same_bytes(t.opt->row_t()[i], back.opt->row_t()[i], "row_t of " + pa[i]->name);
      }
      const auto sa = t.model->unit_state().rngs, sb = back.model->unit_state().rngs;
      ASSERT_EQ(sa.size(), 1u);
      EXPECT_EQ(sa, sb);
    }
    // a one-rank model (every expert) restores the gathered global state
    std::vector<Tensor> global;
    for (const Param* p : t.model->params().all())
      global.push_back(p->expert_sharded ? par.gather_experts(p->value) : p->value);
    if (rank == 0) {
      const proto::Manifest m = ckpt::read_manifest(dir.path + "/step_1");
      ckpt::Reader r(dir.path + "/step_1", m);
      Trained one(nullptr, 1);
      launcher::restore_state(r, one.model->params(), one.opt.get());
      const auto& ps = one.model->params().all();
      for (size_t i = 0; i < ps.size(); ++i) expect_same_bytes(ps[i]->value, global[i], "global " + ps[i]->name);
    }
  }
}

TEST(CheckpointSave, OneRankFailingFailsTheSaveEverywhere) {
  const int W = world_size(), rank = world_rank();
  const std::string tok = "tok";
  const int ep = W;  // every rank writes a shard
  for (bool async : {false, true}) {
    for (int failing : std::set<int>{0, W - 1}) {
      if (failing == 0 && W > 1 && async) continue;  // (rank 0 failing is covered synchronously)
      SCOPED_TRACE(std::string(async ? "async" : "sync") + ", rank " + std::to_string(failing) + " fails");
      SharedDir dir;
      auto world = comm::Communicator::world();
      world->set_deadline(60);
      comm::Parallel par(std::move(world), ep);
      Trained t(&par, ep);
      ckpt::SaverOptions o{dir.path, async, 0, {}, {}};
      o.fault.mode = ckpt::SaveFault::kError;
      o.fault.rank = failing;
      o.fault.step = 5;
      o.fault.after = 1;  // after one dataset of its file
      ckpt::CheckpointSaver saver(par, o);
      saver.save(state_of(t, par, 4, &tok), true);  // not the faulty step
      const std::string e = error_of([&] {
        saver.save(state_of(t, par, 5, &tok), false);
        for (int i = 0; i < 100000 && saver.poll().empty(); ++i)
          std::this_thread::sleep_for(std::chrono::microseconds(200));
      });
      const std::string file = failing == 0 ? "model.h5" : "experts_" + std::to_string(failing) + ".h5";
      EXPECT_NE(e.find("checkpoint of step 5 failed"), std::string::npos) << e;
      EXPECT_NE(e.find("rank " + std::to_string(failing) + " failed writing"), std::string::npos) << e;
      EXPECT_NE(e.find("step_5.tmp/" + file), std::string::npos) << e;
      EXPECT_NE(e.find("injected write failure"), std::string::npos) << e;
      EXPECT_FALSE(saver.pending());
      MPI_Barrier(MPI_COMM_WORLD);
      if (rank == 0) {
        EXPECT_EQ(latest_of(dir.path), "step_4");
        EXPECT_FALSE(fs::exists(dir.path + "/step_5"));
        EXPECT_FALSE(fs::exists(dir.path + "/step_5.tmp"));
      }
      // the job goes on: the next save works
      EXPECT_EQ(fs::path(saver.save(state_of(t, par, 6, &tok), true)).filename(), "step_6");
    }
  }
}

}  // namespace
}  // namespace moe::test

namespace moe::test {
namespace {

// The one-process save (ckpt::save of the GLOBAL state, S = expert_parallel shard files written by one process)
// and the collective save over W ranks (ep = W, each rank writing its own shard) are the same save path: the
// same manifest (shard checksums included) and byte-identical datasets in every file.
TEST(CheckpointSave, OneProcessSaveEqualsCollectiveSave) {
  const int W = world_size(), rank = world_rank();
  const std::string tok = "tokenizer bytes";
  const int ep = W;
  SharedDir dir;
  comm::Parallel par = trained_parallel(ep);
  Trained t(&par, ep);
  t.step(par);
  ckpt::SaveState st = state_of(t, par, 3, &tok);
  // the global state of the same run (the gathers are collective)
  std::vector<ckpt::NamedTensor> global;
  for (const ckpt::LocalTensor& lt : st.tensors)
    global.push_back({lt.name, lt.sharded ? par.gather_experts(lt.tensor) : lt.tensor.clone(), lt.sharded});
  ckpt::CheckpointSaver saver(par, {dir.path + "/ranks", false, 0, {}, {}});
  const std::string d_ranks = saver.save(st, false);
  if (rank != 0) return;
  ckpt::SaveRequest req;
  req.config = &t.cfg;
  req.step = 3;
  req.optimizer_t = t.opt->t();
  req.loader_rng = {1, 2, 3, 4};
  req.router_rng.assign(st.manifest.router_rng().begin(), st.manifest.router_rng().end());
  req.tokenizer_blob = &tok;
  req.world_size = W;
  req.tensors = global;
  const std::string d_one = ckpt::save(dir.path + "/one", req);
  const proto::Manifest m1 = ckpt::read_manifest(d_ranks), m2 = ckpt::read_manifest(d_one);
  EXPECT_EQ(m1.SerializeAsString(), m2.SerializeAsString());
  std::set<std::string> f1, f2;
  for (const auto& e : fs::directory_iterator(d_ranks)) f1.insert(e.path().filename().string());
  for (const auto& e : fs::directory_iterator(d_one)) f2.insert(e.path().filename().string());
  EXPECT_EQ(f1, f2);
  EXPECT_EQ(f1.count("experts_" + std::to_string(ep - 1) + ".h5"), 1u);
  ckpt::Reader r1(d_ranks, m1), r2(d_one, m2);
  int sharded = 0;
  for (const auto& e : m1.tensors()) {
    const Shape shape(e.shape().begin(), e.shape().end());
    const DType dt = dtype_from_name(e.dtype());
    if (e.shards_size() == 0) {
      Tensor a = Tensor::empty(shape, dt), b = Tensor::empty(shape, dt);
      r1.read(e.name(), a);
      r2.read(e.name(), b);
      expect_same_bytes(a, b, e.name());
      continue;
    }
    ++sharded;
    for (int s = 0; s < e.shards_size(); ++s) {
      Shape ss = shape;
      ss[0] = e.shards(s).rows();
      Tensor a = Tensor::empty(ss, dt), b = Tensor::empty(ss, dt);
      r1.read_shard(e.name(), s, a);
      r2.read_shard(e.name(), s, b);
      expect_same_bytes(a, b, e.name() + " shard " + std::to_string(s));
    }
    EXPECT_NO_THROW(r2.check_virtual(e.name()));
  }
  EXPECT_GT(sharded, 0);
  EXPECT_EQ(ckpt::read_file(d_ranks + "/tokenizer.model"), ckpt::read_file(d_one + "/tokenizer.model"));
}

}  // namespace
}  // namespace moe::test
