// Checkpoint round trip (params + optimizer state + loader RNG), `latest`, retention, and corruption detection.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "checkpoints/checkpoint.h"
#include "launcher/model_state.h"
#include "core/model.h"
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
  Model a(cfg.model());
  a.init_weights(1);
  AdamW opt_a(a.params(), cfg.optimizer());
  for (Param* p : a.params().all()) p->grad.fill_(0.5f);
  opt_a.step(0.01f);
  const std::string tok = "not really a tokenizer";
  ckpt::SaveRequest req;
  req.config = &cfg;
  req.tensors = launcher::collect_state(a.params(), &opt_a, {{"layers.0.ffn", {3, 1, 4}}},
                                        [](const Tensor& t) { return t; });
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

  Model b(cfg.model());
  AdamW opt_b(b.params(), cfg.optimizer());
  ckpt::Reader reader(latest, m);
  launcher::restore_state(reader, b.params(), &opt_b, 0);
  opt_b.set_t(m.optimizer_t());
  auto tables = launcher::read_routing_tables(reader, m);
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
  req.tensors = {{"params/experts", global}};
  const std::string d = ckpt::save(dir.path(), req);
  proto::Manifest m = ckpt::read_manifest(d);
  ckpt::Reader r(d, m);
  Tensor slice = Tensor::empty({2, 3});
  r.read("params/experts", slice, 2);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(slice.f32()[i], 6.0f + i);
  Tensor bad = Tensor::empty({2, 3});
  EXPECT_NE(error_of([&] { r.read("params/experts", bad, 3); }).find("row offset 3"), std::string::npos);
  Tensor wrong = Tensor::empty({2, 4});
  EXPECT_NE(error_of([&] { r.read("params/experts", wrong, 0); }).find("shape"), std::string::npos);
}

TEST(Checkpoint, CorruptionShapeMismatchAndNonCheckpointAreClearErrors) {
  TempDir dir;
  Config cfg = small_config();
  Model a(cfg.model());
  a.init_weights(2);
  ckpt::SaveRequest req;
  req.config = &cfg;
  req.tensors = launcher::collect_state(a.params(), nullptr, {}, [](const Tensor& t) { return t; });
  req.step = 5;
  const std::string d = ckpt::save(dir.path(), req);
  proto::Manifest m = ckpt::read_manifest(d);

  // wrong shape: a model with a different d_ff
  Config other = cfg;
  other.mutable_model()->set_d_ff(32);
  Model c(other.model());
  std::string e = error_of([&] {
    ckpt::Reader r(d, m);
    launcher::restore_state(r, c.params(), nullptr, 0);
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
  Model b(cfg.model());
  e = error_of([&] {
    ckpt::Reader r(d, m);
    launcher::restore_state(r, b.params(), nullptr, 0);
  });
  EXPECT_NE(e.find("checksum mismatch"), std::string::npos) << e;
  EXPECT_NE(e.find("tok_emb.weight"), std::string::npos) << e;

  // truncated file
  std::filesystem::resize_file(h5, 100);
  e = error_of([&] {
    ckpt::Reader r(d, m);
    launcher::restore_state(r, b.params(), nullptr, 0);
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
