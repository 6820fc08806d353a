// Checkpoint round trip (params + optimizer state + loader RNG), `latest`, retention, and corruption detection.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "checkpoints/checkpoint.h"
#include "checkpoints/naming.h"
#include "launcher/run_state.h"
#include "experts/build_model.h"
#include "core/bf16.h"
#include "core/model.h"
#include "experts/moe_layer.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

Config small_config() {
  Config c;
  auto* m = c.mutable_model();
  m->set_vocab_size(29);
  m->set_d_model(16);
  m->set_n_layers(1);
  m->set_n_heads(2);
  m->set_n_kv_heads(1);
  m->set_d_ff(24);
  m->set_max_seq_len(8);
  c.mutable_optimizer()->set_lr(0.01f);
  fill_defaults(c);
  return c;
}

TEST(Checkpoint, RoundTripLatestAndRetention) {
  TempDir dir;
  Config cfg = small_config();
  Config a_cfg = cfg;
  a_cfg.mutable_train()->set_seed(1);
  auto a_owned = experts::build_model(a_cfg);
  Model& a = *a_owned;
  AdamW opt_a(a.params(), cfg.optimizer());
  for (Param* p : a.params().all()) p->grad.fill_(0.5f);
  opt_a.step(0.01f);
  const std::string tok = "not really a tokenizer";
  ckpt::SaveRequest req;
  req.config = &cfg;
  req.tensors = launcher::collect_state(a.params(), &opt_a, {{"layers.0.ffn", {3, 1, 4}}});
  req.optimizer_t = opt_a.t();
  req.loader_rng = {1, 2, 3, 4};
  req.tokenizer_blob = &tok;
  req.keep_last = 2;
  for (int step : {10, 20, 30}) {
    req.step = step;
    ckpt::save(dir.path(), req);
  }
  namespace fs = std::filesystem;
  EXPECT_FALSE(fs::exists(dir.file("step_10")));  // keep_last = 2
  EXPECT_TRUE(fs::exists(dir.file("step_20")));
  EXPECT_FALSE(fs::exists(dir.file("step_30.tmp")));
  const std::string latest = ckpt::resolve(dir.path());
  EXPECT_EQ(fs::path(latest).filename(), "step_30");
  proto::Manifest m = ckpt::read_manifest(latest);
  EXPECT_EQ(m.step(), 30);
  EXPECT_EQ(m.loader_rng_size(), 4);
  EXPECT_EQ(m.optimizer_t(), 1);
  EXPECT_EQ(m.config().model().d_model(), 16);

  auto b_owned = experts::build_model(cfg);
  Model& b = *b_owned;
  AdamW opt_b(b.params(), cfg.optimizer());
  ckpt::Reader reader(latest, m);
  launcher::restore_state(reader, b.params(), &opt_b);
  opt_b.set_t(m.optimizer_t());
  auto tables = launcher::RunState::read(reader, m).units.tables;
  ASSERT_EQ(tables.size(), 1u);
  EXPECT_EQ(tables["layers.0.ffn"], (std::vector<int32_t>{3, 1, 4}));
  for (size_t i = 0; i < a.params().all().size(); ++i) {
    const Param* pa = a.params().all()[i];
    const Param* pb = b.params().all()[i];
    ASSERT_EQ(0, std::memcmp(pa->value.raw(), pb->value.raw(), pa->value.nbytes())) << pa->name;
    ASSERT_EQ(0, std::memcmp(opt_a.m()[i].raw(), opt_b.m()[i].raw(), pa->value.nbytes())) << pa->name;
    ASSERT_EQ(0, std::memcmp(opt_a.v()[i].raw(), opt_b.v()[i].raw(), pa->value.nbytes())) << pa->name;
  }
  EXPECT_EQ(opt_b.t(), 1);
}

// Expert-sharded tensors are stored globally and read back as row slices (the basis of resharding).
TEST(Checkpoint, RowSliceReads) {
  TempDir dir;
  Config cfg = small_config();
  Tensor global = Tensor::empty({4, 3});
  for (int i = 0; i < 12; ++i) global.f32()[i] = static_cast<float>(i);
  ckpt::SaveRequest req;
  req.config = &cfg;
  req.tensors = {{ckpt::param_key("experts"), global}};
  const std::string d = ckpt::save(dir.path(), req);
  proto::Manifest m = ckpt::read_manifest(d);
  ckpt::Reader r(d, m);
  Tensor slice = Tensor::empty({2, 3});
  r.read(ckpt::param_key("experts"), slice, 2);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(slice.f32()[i], 6.0f + i);
  Tensor bad = Tensor::empty({2, 3});
  EXPECT_NE(error_of([&] { r.read(ckpt::param_key("experts"), bad, 3); }).find("row offset 3"), std::string::npos);
  Tensor wrong = Tensor::empty({2, 4});
  EXPECT_NE(error_of([&] { r.read(ckpt::param_key("experts"), wrong, 0); }).find("shape"), std::string::npos);
}

TEST(Checkpoint, CorruptionShapeMismatchAndNonCheckpointAreClearErrors) {
  TempDir dir;
  Config cfg = small_config();
  Config a_cfg = cfg;
  a_cfg.mutable_train()->set_seed(2);
  auto a_owned = experts::build_model(a_cfg);
  Model& a = *a_owned;
  ckpt::SaveRequest req;
  req.config = &cfg;
  req.tensors = launcher::collect_state(a.params(), nullptr, {});
  req.step = 5;
  const std::string d = ckpt::save(dir.path(), req);
  proto::Manifest m = ckpt::read_manifest(d);

  // wrong shape: a model with a different d_ff
  Config other = cfg;
  other.mutable_model()->set_d_ff(32);
  auto c_owned = experts::build_model(other);
  Model& c = *c_owned;
  std::string e = error_of([&] {
    ckpt::Reader r(d, m);
    launcher::restore_state(r, c.params(), nullptr);
  });
  EXPECT_NE(e.find("layers.0.ffn.w_gate"), std::string::npos) << e;
  EXPECT_NE(e.find("shape"), std::string::npos) << e;

  // flipped byte in the tensor data -> checksum error naming the tensor: find tok_emb's first value in the file
  const std::string h5 = d + "/model.h5";
  std::string bytes;
  {
    std::ifstream f(h5, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), {});
  }
  const float* w = a.params().get("tok_emb.weight").value.f32();
  const std::string needle(reinterpret_cast<const char*>(w), 64);
  const size_t pos = bytes.find(needle);
  ASSERT_NE(pos, std::string::npos);
  bytes[pos + 1] ^= 0x10;
  {
    std::ofstream f(h5, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), bytes.size());
  }
  auto b_owned = experts::build_model(cfg);
  Model& b = *b_owned;
  e = error_of([&] {
    ckpt::Reader r(d, m);
    launcher::restore_state(r, b.params(), nullptr);
  });
  EXPECT_NE(e.find("checksum mismatch"), std::string::npos) << e;
  EXPECT_NE(e.find("tok_emb.weight"), std::string::npos) << e;

  // truncated file
  std::filesystem::resize_file(h5, 100);
  e = error_of([&] {
    ckpt::Reader r(d, m);
    launcher::restore_state(r, b.params(), nullptr);
  });
  EXPECT_NE(e.find("model.h5"), std::string::npos) << e;

  e = error_of([&] { ckpt::resolve(dir.path() + "/step_5/.."); });
  EXPECT_TRUE(e.empty()) << e;  // the root resolves through `latest`
  e = error_of([&] { ckpt::resolve("/tmp"); });
  EXPECT_NE(e.find("not a checkpoint"), std::string::npos) << e;
}

}  // namespace
}  // namespace moe::test

#include "checkpoints/crc32c.h"

namespace moe::test {
namespace {

// CRC-32C: the standard check value, chaining, and the fast path against the byte-wise reference at odd lengths.
TEST(Checkpoint, Crc32cMatchesReference) {
  const char* s = "123456789";
  EXPECT_EQ(ckpt::crc32c(s, 9), 0xE3069283u);
  EXPECT_EQ(ckpt::crc32c_reference(s, 9), 0xE3069283u);
  EXPECT_EQ(ckpt::crc32c(s + 4, 5, ckpt::crc32c(s, 4)), 0xE3069283u);
  Rng rng(3);
  std::vector<uint8_t> buf(1000);
  for (auto& b : buf) b = static_cast<uint8_t>(rng.below(256));
  for (size_t n : {0, 1, 7, 8, 9, 63, 64, 999, 1000}) {
    for (size_t off : {0, 1, 3}) {
      if (off + n > buf.size()) continue;
      EXPECT_EQ(ckpt::crc32c(buf.data() + off, n), ckpt::crc32c_reference(buf.data() + off, n)) << n << "+" << off;
    }
  }
}

}  // namespace
}  // namespace moe::test

namespace moe::test {
namespace {
namespace fs = std::filesystem;

// The checksum of a concatenation from its parts' checksums (how a sharded tensor's global checksum is formed).
// Buffers of >= 1 MiB take the three-chain path: it must equal the byte-wise reference at every length
// remainder and with a chained initial value.
TEST(Checkpoint, Crc32cThreeWayMatchesReference) {
  Rng rng(11);
  std::vector<uint8_t> buf((size_t(1) << 20) + 100);
  for (auto& b : buf) b = static_cast<uint8_t>(rng.below(256));
  for (size_t n : {size_t(1) << 20, (size_t(1) << 20) + 1, (size_t(1) << 20) + 23, (size_t(1) << 20) + 100}) {
    EXPECT_EQ(ckpt::crc32c(buf.data(), n), ckpt::crc32c_reference(buf.data(), n)) << n;
    EXPECT_EQ(ckpt::crc32c(buf.data() + 3, n - 3, 0x12345678u),
              ckpt::crc32c_reference(buf.data() + 3, n - 3, 0x12345678u));
  }
}

TEST(Checkpoint, Crc32cCombineEqualsTheWholeBuffer) {
  Rng rng(7);
  std::vector<uint8_t> buf(4099);
  for (auto& b : buf) b = static_cast<uint8_t>(rng.below(256));
  for (size_t cut : {0, 1, 8, 1000, 4098, 4099}) {
    const uint32_t a = ckpt::crc32c(buf.data(), cut), b = ckpt::crc32c(buf.data() + cut, buf.size() - cut);
    EXPECT_EQ(ckpt::crc32c_combine(a, b, buf.size() - cut), ckpt::crc32c(buf.data(), buf.size())) << cut;
  }
}

// A one-process save with parallel.expert_parallel = 4 writes the layout of a 4-rank run: expert tensors in
// experts_0..3.h5 (2 rows each), a virtual dataset per expert tensor in model.h5, per-shard checksums that combine
// to the global one. Reads of any row range, across shard boundaries, with bf16 widening, match the source.
struct ShardedFixture {
  TempDir dir;
  Config cfg;
  Tensor experts = Tensor::empty({8, 3, 2});      // f32, sharded
  Tensor row_t = Tensor::empty({8}, DType::kI32); // i32, sharded
  Tensor bf = Tensor::empty({4, 5}, DType::kBF16);// bf16, sharded
  Tensor norm = Tensor::empty({3});               // replicated
  std::string step_dir;
  ShardedFixture() {
    for (int i = 0; i < 48; ++i) experts.f32()[i] = 0.5f * i - 3;
    for (int i = 0; i < 8; ++i) row_t.i32()[i] = 100 + i;
    for (int i = 0; i < 20; ++i) bf.bf()[i] = float_to_bf16(0.25f * i);
    for (int i = 0; i < 3; ++i) norm.f32()[i] = 1 + i;
    cfg.mutable_model()->set_d_model(1);
    cfg.mutable_parallel()->set_expert_parallel(4);
    ckpt::SaveRequest req;
    req.config = &cfg;
    req.step = 7;
    req.tensors = {{ckpt::param_key("layers.0.ffn.experts.w_up"), experts, true},
                   {ckpt::param_key("final_norm.weight"), norm},
                   {ckpt::optim_row_t_key("layers.0.ffn.experts.w_up"), row_t, true},
                   {ckpt::param_key("layers.1.ffn.experts.w_up"), bf, true}};
    step_dir = ckpt::save(dir.path(), req);
  }
};

TEST(Checkpoint, ShardedLayoutRowSlicesAcrossShards) {
  ShardedFixture fx;
  for (int s = 0; s < 4; ++s) EXPECT_TRUE(fs::is_regular_file(fx.step_dir + "/experts_" + std::to_string(s) + ".h5"));
  EXPECT_FALSE(fs::exists(fx.step_dir + "/experts_4.h5"));
  const proto::Manifest m = ckpt::read_manifest(fx.step_dir);
  EXPECT_EQ(m.format_version(), ckpt::kFormatVersion);
  EXPECT_EQ(m.expert_parallel(), 4);
  ckpt::Reader r(fx.step_dir, m);
  EXPECT_EQ(r.num_shards(ckpt::param_key("layers.0.ffn.experts.w_up")), 4);
  EXPECT_EQ(r.num_shards(ckpt::param_key("final_norm.weight")), 0);
  for (const auto& e : m.tensors()) {
    if (e.name() == ckpt::param_key("layers.0.ffn.experts.w_up")) {
      // the global checksum is the checksum of the global bytes
      EXPECT_EQ(e.crc32c(), ckpt::crc32c(fx.experts.raw(), fx.experts.nbytes()));
      ASSERT_EQ(e.shards_size(), 4);
      EXPECT_EQ(e.shards(2).file(), "experts_2.h5");
      EXPECT_EQ(e.shards(2).row_offset(), 4);
      EXPECT_EQ(e.shards(2).rows(), 2);
      EXPECT_EQ(e.shards(2).crc32c(), ckpt::crc32c(fx.experts.f32() + 24, 12 * sizeof(float)));
    }
  }
  // whole tensors
  Tensor all = Tensor::empty({8, 3, 2});
  r.read(ckpt::param_key("layers.0.ffn.experts.w_up"), all);
  EXPECT_EQ(0, std::memcmp(all.raw(), fx.experts.raw(), fx.experts.nbytes()));
  Tensor norm = Tensor::empty({3});
  r.read(ckpt::param_key("final_norm.weight"), norm);
  EXPECT_EQ(norm.f32()[2], 3.0f);
  // every row range, straddling shard boundaries
  for (int64_t off = 0; off < 8; ++off)
    for (int64_t n = 1; off + n <= 8; ++n) {
      Tensor t = Tensor::empty({n, 3, 2});
      r.read(ckpt::param_key("layers.0.ffn.experts.w_up"), t, off);
      ASSERT_EQ(0, std::memcmp(t.raw(), fx.experts.f32() + off * 6, t.nbytes())) << off << "+" << n;
      Tensor ti = Tensor::empty({n}, DType::kI32);
      r.read(ckpt::optim_row_t_key("layers.0.ffn.experts.w_up"), ti, off);
      ASSERT_EQ(ti.i32()[0], 100 + off);
    }
  // bf16 shards widened into f32 rows 1..2 (shards 1 and 2)
  Tensor w = Tensor::empty({2, 5});
  r.read(ckpt::param_key("layers.1.ffn.experts.w_up"), w, 1);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(w.f32()[i], 0.25f * (5 + i));
  // one shard alone, and the virtual datasets (the global view h5py sees)
  Tensor s2 = Tensor::empty({2, 3, 2});
  r.read_shard(ckpt::param_key("layers.0.ffn.experts.w_up"), 2, s2);
  EXPECT_EQ(s2.f32()[0], fx.experts.f32()[24]);
  for (const auto& e : m.tensors()) EXPECT_NO_THROW(r.check_virtual(e.name())) << e.name();
}

TEST(Checkpoint, ShardsThatDoNotDivideAreRefusedBeforeWriting) {
  TempDir dir;
  Config cfg;
  cfg.mutable_parallel()->set_expert_parallel(3);
  ckpt::SaveRequest req;
  req.config = &cfg;
  req.tensors = {{ckpt::param_key("layers.0.ffn.experts.w_up"), Tensor::zeros({4, 2}), true}};
  const std::string e = error_of([&] { ckpt::save(dir.path(), req); });
  EXPECT_NE(e.find(ckpt::param_key("layers.0.ffn.experts.w_up")), std::string::npos) << e;
  EXPECT_NE(e.find("3 expert-parallel shards"), std::string::npos) << e;
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

// A flipped byte in one shard names the tensor, the shard and its file; reads that do not touch that shard still
// work (a rank reads only its own shards). A missing shard file is an error for our reader, and the virtual
// dataset (which HDF5 fills with NaN for a missing source) fails its checksum.
TEST(Checkpoint, ShardCorruptionAndMissingShardNameTheShard) {
  ShardedFixture fx;
  const std::string f2 = fx.step_dir + "/experts_2.h5";
  std::string bytes = ckpt::read_file(f2);
  const std::string needle(reinterpret_cast<const char*>(fx.experts.f32() + 24), 48);
  const size_t pos = bytes.find(needle);
  ASSERT_NE(pos, std::string::npos);
  bytes[pos + 5] ^= 0x01;
  std::ofstream(f2, std::ios::binary | std::ios::trunc) << bytes;
  const proto::Manifest m = ckpt::read_manifest(fx.step_dir);
  {
    ckpt::Reader r(fx.step_dir, m);
    Tensor t = Tensor::empty({8, 3, 2});
    std::string e = error_of([&] { r.read(ckpt::param_key("layers.0.ffn.experts.w_up"), t); });
    EXPECT_NE(e.find("experts_2.h5"), std::string::npos) << e;
    EXPECT_NE(e.find("checksum mismatch in tensor 'params/layers.0.ffn.experts.w_up' shard 2"), std::string::npos)
        << e;
    Tensor rows01 = Tensor::empty({4, 3, 2});  // shards 0 and 1 only
    EXPECT_NO_THROW(r.read(ckpt::param_key("layers.0.ffn.experts.w_up"), rows01, 0));
    e = error_of([&] { r.check_virtual(ckpt::param_key("layers.0.ffn.experts.w_up")); });
    EXPECT_NE(e.find("virtual dataset"), std::string::npos) << e;
  }
  fs::remove(fx.step_dir + "/experts_3.h5");
  ckpt::Reader r(fx.step_dir, m);
  Tensor t = Tensor::empty({2, 3, 2});
  std::string e = error_of([&] { r.read(ckpt::param_key("layers.0.ffn.experts.w_up"), t, 6); });
  EXPECT_NE(e.find("experts_3.h5 is missing"), std::string::npos) << e;
  e = error_of([&] { r.check_virtual(ckpt::optim_row_t_key("layers.0.ffn.experts.w_up")); });
  EXPECT_NE(e.find("checksum mismatch"), std::string::npos) << e;
  EXPECT_NE(e.find("shard file(s)"), std::string::npos) << e;
}

// A manifest whose shards do not tile the tensor, or whose shard checksums do not combine to the tensor's, is
// refused when read.
TEST(Checkpoint, InconsistentShardManifestIsRefused) {
  ShardedFixture fx;
  proto::Manifest m = ckpt::read_manifest(fx.step_dir);
  auto write = [&](const proto::Manifest& mm) {
    std::string bin;
    ASSERT_TRUE(mm.SerializeToString(&bin));
    std::ofstream(fx.step_dir + "/manifest.pb", std::ios::binary | std::ios::trunc) << bin;
  };
  proto::Manifest bad = m;
  bad.mutable_tensors(0)->mutable_shards(1)->set_row_offset(3);
  write(bad);
  std::string e = error_of([&] { ckpt::read_manifest(fx.step_dir); });
  EXPECT_NE(e.find("shard 1 (experts_1.h5, rows from 3) does not continue at row 2"), std::string::npos) << e;
  bad = m;
  bad.mutable_tensors(0)->mutable_shards(3)->set_crc32c(12345);
  write(bad);
  e = error_of([&] { ckpt::read_manifest(fx.step_dir); });
  EXPECT_NE(e.find("do not combine"), std::string::npos) << e;
  EXPECT_NE(e.find(ckpt::param_key("layers.0.ffn.experts.w_up")), std::string::npos) << e;
}

// Datasets over 4 MiB are read in blocks of rows, each checksummed while in the cache: the result and the
// checksum chain must equal a whole read, for plain and sharded tensors, and a flipped byte in the last block is
// still caught.
TEST(Checkpoint, LargeDatasetsAreReadInBlocks) {
  TempDir dir;
  Config cfg;
  cfg.mutable_parallel()->set_expert_parallel(2);
  Tensor big = Tensor::empty({3001, 1000});  // 12 MB: blocks of 1048 rows, the last one partial
  Tensor experts = Tensor::empty({4, 1100, 1000});  // shards of 2 x 4.4 MB
  Rng rng(5);
  for (int64_t i = 0; i < big.numel(); ++i) big.f32()[i] = rng.uniform();
  for (int64_t i = 0; i < experts.numel(); ++i) experts.f32()[i] = rng.uniform();
  ckpt::SaveRequest req;
  req.config = &cfg;
  req.tensors = {{ckpt::param_key("big"), big}, {ckpt::param_key("layers.0.ffn.experts.w_up"), experts, true}};
  const std::string d = ckpt::save(dir.path(), req);
  proto::Manifest m = ckpt::read_manifest(d);
  {
    ckpt::Reader r(d, m);
    Tensor a = Tensor::empty({3001, 1000});
    r.read(ckpt::param_key("big"), a);
    EXPECT_EQ(0, std::memcmp(a.raw(), big.raw(), big.nbytes()));
    Tensor e = Tensor::empty({2, 1100, 1000});
    r.read(ckpt::param_key("layers.0.ffn.experts.w_up"), e, 1);  // straddles the two shards
    EXPECT_EQ(0, std::memcmp(e.raw(), experts.f32() + 1100 * 1000, e.nbytes()));
    EXPECT_NO_THROW(r.check_virtual(ckpt::param_key("layers.0.ffn.experts.w_up")));
  }
  // flip a byte of the last row of params/big
  const std::string h5 = d + "/model.h5";
  std::string bytes = ckpt::read_file(h5);
  const std::string needle(reinterpret_cast<const char*>(big.f32() + 3000 * 1000), 64);
  const size_t pos = bytes.find(needle);
  ASSERT_NE(pos, std::string::npos);
  bytes[pos + 7] ^= 0x40;
  std::ofstream(h5, std::ios::binary | std::ios::trunc) << bytes;
  ckpt::Reader r(d, m);
  Tensor a = Tensor::empty({3001, 1000});
  const std::string e = error_of([&] { r.read(ckpt::param_key("big"), a); });
  EXPECT_NE(e.find("checksum mismatch in tensor 'params/big'"), std::string::npos) << e;
}

// Stale step_<N>.tmp directories (an interrupted save) are removed; complete checkpoints are not.
TEST(Checkpoint, RemoveStaleSaves) {
  ShardedFixture fx;
  fs::create_directories(fx.dir.file("step_9.tmp"));
  std::ofstream(fx.dir.file("step_9.tmp/model.h5")) << "partial";
  std::ofstream(fx.dir.file("latest.tmp")) << "step_9";
  const auto removed = ckpt::remove_stale_saves(fx.dir.path());
  EXPECT_EQ(removed, (std::vector<std::string>{"latest.tmp", "step_9.tmp"}));
  EXPECT_TRUE(fs::exists(fx.step_dir + "/manifest.pb"));
  EXPECT_EQ(ckpt::resolve(fx.dir.path()), fx.step_dir);
}

}  // namespace
}  // namespace moe::test

namespace moe::test {
namespace {

// A real format-version-1 checkpoint (tests/data/ckpt_v1, written before per-rank shard files): every tensor is
// one plain dataset in model.h5, expert tensors with their global shape; it still loads, row slices included.
TEST(Checkpoint, FormatVersion1StillLoads) {
  const std::string root = std::string(MOE_TEST_SOURCE_DIR) + "/tests/data/ckpt_v1";
  const std::string dir = ckpt::resolve(root);
  const proto::Manifest m = ckpt::read_manifest(dir);
  EXPECT_EQ(m.format_version(), 1u);
  EXPECT_EQ(m.expert_parallel(), 2);
  // its word-expert table was stored with the placement of that time (the manifest predates the field)
  EXPECT_EQ(m.config().model().word_experts().placement(), proto::WordExpertConfig::PLACEMENT_MULTIPLICATIVE);
  ckpt::Reader r(dir, m);
  const std::string name = ckpt::param_key("layers.0.ffn.experts.w_up");
  EXPECT_EQ(r.num_shards(name), 0);
  const Shape shape = r.shape(name);
  ASSERT_EQ(shape, (Shape{4, 16, 16}));
  Tensor all = Tensor::empty(shape);
  r.read(name, all);
  Tensor half = Tensor::empty({2, 16, 16});
  r.read(name, half, 2);  // what expert-parallel rank 1 of 2 loads
  EXPECT_EQ(0, std::memcmp(half.raw(), all.f32() + 2 * 256, half.nbytes()));
  // the whole model with its optimizer state restores on one rank
  Config cfg = m.config();
  cfg.mutable_parallel()->set_expert_parallel(1);
  const launcher::RunState rs = launcher::RunState::read(r, m);
  auto model = experts::build_model(cfg, {.state = &rs.units, .init = false});
  AdamW opt(model->params(), cfg.optimizer());
  EXPECT_NO_THROW(launcher::restore_state(r, model->params(), &opt));
}

}  // namespace
}  // namespace moe::test
