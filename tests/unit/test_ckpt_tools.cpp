// `moe ckpt` tools: safetensors round trip and strict header parsing, GQA conversion numerics, sparse upcycling
// (the upcycled MoE model computes the dense model's function), bf16 casting, reshard validation and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "checkpoints/convert.h"
#include "checkpoints/naming.h"
#include "checkpoints/safetensors.h"
#include "core/model.h"
#include "experts/moe_layer.h"
#include "launcher/ckpt_tool.h"
#include "launcher/run_state.h"
#include "experts/build_model.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;

// Runs `moe ckpt <args...>` in-process; errors propagate as moe::Error.
int ckpt_cli(std::vector<std::string> args) {
  args.insert(args.begin(), "ckpt");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return launcher::ckpt_tool_main(static_cast<int>(argv.size()), argv.data());
}

Config tool_config(int n_heads, int n_kv_heads, proto::Activation act = proto::SWIGLU) {
  Config c;
  auto* m = c.mutable_model();
  m->set_vocab_size(37);
  m->set_d_model(32);
  m->set_n_layers(2);
  m->set_n_heads(n_heads);
  m->set_n_kv_heads(n_kv_heads);
  m->set_d_ff(40);
  m->set_max_seq_len(16);
  m->set_activation(act);
  c.mutable_data()->set_seq_len(16);
  c.mutable_data()->set_batch_size(2);
  c.mutable_optimizer()->set_lr(0.01f);
  c.mutable_train()->set_steps(1);
  fill_defaults(c);
  validate_config(c, false);
  return c;
}

// Builds a model of `cfg` (initialised with `seed`), saves it with AdamW state under root; returns the step dir.
std::string save_model(const Config& cfg, const std::string& root, uint64_t seed = 7) {
  Config seeded = cfg;
  seeded.mutable_train()->set_seed(seed);
  auto owned = experts::build_model(seeded);
  Model& model = *owned;
  AdamW opt(model.params(), cfg.optimizer());
  for (Param* p : model.params().all()) p->grad.fill_(0.25f);
  opt.step(0.01f);
  ckpt::SaveRequest req;
  req.config = &cfg;
  req.step = 3;
  req.tensors = launcher::collect_state(model.params(), &opt, {});
  req.optimizer_t = opt.t();
  req.loader_rng = {1, 2, 3, 4};
  return ckpt::save(root, req);
}

// Loads a checkpoint into a single-rank model built from its manifest config.
std::unique_ptr<Model> load_model(const std::string& path, proto::Manifest* manifest_out = nullptr) {
  const std::string dir = ckpt::resolve(path);
  proto::Manifest m = ckpt::read_manifest(dir);
  ckpt::Reader reader(dir, m);
  const launcher::RunState rs = launcher::RunState::read(reader, m);
  auto model = experts::build_model(m.config(), {.state = &rs.units, .init = false});
  launcher::restore_state(reader, model->params(), nullptr);
  if (manifest_out) *manifest_out = m;
  return model;
}

Tensor read_tensor(const std::string& path, const std::string& name, DType dt = DType::kF32) {
  const std::string dir = ckpt::resolve(path);
  proto::Manifest m = ckpt::read_manifest(dir);
  ckpt::Reader reader(dir, m);
  Tensor t = Tensor::empty(reader.shape(name), dt);
  reader.read(name, t);
  return t;
}

// ------------------------------------------------------------------------------------------------- safetensors

TEST(CkptToolSafetensors, RoundTripF32Bf16I32AndMetadata) {
  TempDir dir;
  Rng rng(3);
  Tensor f = Tensor::from_vector(randn(rng, 12), {3, 4});
  Tensor b = Tensor::from_vector(randn(rng, 6), {6}).to_dtype(DType::kBF16);
  Tensor i = Tensor::from_vector(std::vector<int32_t>{5, -1, 7, 2147483647}, {2, 2});
  Tensor empty = Tensor::empty({0, 3});
  const std::map<std::string, std::string> meta{{"format", "pt"}, {"note", "quote \" backslash \\ newline \n tab \t"}};
  const std::string path = dir.file("m.safetensors");
  ckpt::write_safetensors(path, {{"layers.0.w", f}, {"b16", b}, {"routing/x", i}, {"empty", empty}}, meta);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  const ckpt::SafetensorsFile st = ckpt::read_safetensors(path);
  ASSERT_EQ(st.tensors.size(), 4u);
  EXPECT_EQ(st.metadata, meta);
  std::map<std::string, Tensor> got;
  for (const auto& t : st.tensors) got[t.name] = t.tensor;
  for (const auto& [name, want] : std::map<std::string, Tensor>{{"layers.0.w", f}, {"b16", b}, {"routing/x", i},
                                                                 {"empty", empty}}) {
    ASSERT_TRUE(got.count(name)) << name;
    EXPECT_EQ(got[name].dtype(), want.dtype()) << name;
    EXPECT_EQ(got[name].shape(), want.shape()) << name;
    EXPECT_EQ(std::memcmp(got[name].raw(), want.raw(), want.nbytes()), 0) << name;
  }
  // the header is 8-byte aligned and starts with '{'
  const std::string bytes = ckpt::safetensors_bytes({{"a", f}});
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
  EXPECT_EQ(bytes.size(), 8 + n + f.nbytes());
}

std::string with_header(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

TEST(CkptToolSafetensors, MalformedHeadersAreClearErrors) {
  const std::string good = ckpt::safetensors_bytes({{"w", Tensor::from_vector(std::vector<float>{1, 2, 3}, {3})}});
  EXPECT_NO_THROW(ckpt::parse_safetensors(good, "good"));
  auto err = [](const std::string& bytes) {
    return error_of([&] { ckpt::parse_safetensors(bytes, "bad.safetensors"); });
  };
  // truncated: no length, header longer than the file, data cut off
  EXPECT_NE(err(good.substr(0, 5)).find("truncated"), std::string::npos);
  EXPECT_NE(err(good.substr(0, 20)).find("truncated"), std::string::npos);
  EXPECT_NE(err(good.substr(0, good.size() - 4)).find("out of range"), std::string::npos);
  const std::string data(12, '\0');
  const std::string ok = R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})";
  EXPECT_NO_THROW(ckpt::parse_safetensors(with_header(ok, data), "x"));
  // bad JSON
  for (const std::string h : {R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]})",    // missing brace
                              R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}x)",  // trailing garbage
                              R"({"w":{"dtype":"F32","shape":[3.5],"data_offsets":[0,12]}})",  // float
                              R"({"w":{"dtype":F32,"shape":[3],"data_offsets":[0,12]}})",     // bare word
                              R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12],}})",  // trailing comma
                              R"({"w":{"dtype":"F32","dtype":"F32","shape":[3],"data_offsets":[0,12]}})",
                              R"([1,2])"}) {
    const std::string e = err(with_header(h, data));
    EXPECT_NE(e.find("bad.safetensors"), std::string::npos) << h << " -> " << e;
    EXPECT_NE(e.find("malformed JSON header"), std::string::npos) << h << " -> " << e;
  }
  // structurally valid JSON, bad content: each error names the tensor
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", "out of range"},
      {R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}})", "needs 16"},
      {R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[12,0]}})", "reversed"},
      {R"({"w":{"dtype":"F64","shape":[3],"data_offsets":[0,12]}})", "unsupported dtype"},
      {R"({"w":{"dtype":"F32","shape":[3]}})", "data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
       "overlap"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "trailing bytes"},
  };
  for (const auto& [h, what] : cases) {
    const std::string e = err(with_header(h, data));
    EXPECT_NE(e.find(what), std::string::npos) << h << " -> " << e;
    if (std::string(what) != "trailing bytes") {
      EXPECT_NE(e.find("tensor '"), std::string::npos) << h << " -> " << e;
    }
  }
  // absurd header length
  std::string huge(8, '\xff');
  EXPECT_NE(err(huge + "{}").find("header length"), std::string::npos);
}

// ------------------------------------------------------------------------------------------------- convert

TEST(CkptToolConvert, ToGqaMeanPoolsConsecutiveKvHeads) {
  TempDir dir;
  const Config cfg = tool_config(4, 4);  // MHA, head dim 8
  const std::string src = save_model(cfg, dir.file("src"));
  ASSERT_EQ(ckpt_cli({"convert", src, "--to-gqa", "2", "--out", dir.file("gqa")}), 0);
  proto::Manifest m;
  auto gqa = load_model(dir.file("gqa"), &m);
  EXPECT_EQ(m.config().model().n_kv_heads(), 2);
  EXPECT_EQ(m.optimizer_t(), 0);
  for (const auto& e : m.tensors()) EXPECT_NE(e.name().rfind("optim/", 0), 0u) << "optimizer state kept: " << e.name();
  const int D = 8, C = 32, r = 2;
  for (int l = 0; l < 2; ++l)
    for (const char* w : {"wk", "wv"}) {
      const std::string name = "layers." + std::to_string(l) + ".attn." + w;
      const Tensor a = read_tensor(src, "params/" + name);
      const Tensor& b = gqa->params().get(name).value;
      ASSERT_EQ(b.shape(), (Shape{2 * D, C}));
      for (int g = 0; g < 2; ++g)
        for (int row = 0; row < D; ++row)
          for (int c = 0; c < C; ++c) {
            double s = 0;
            for (int j = 0; j < r; ++j) s += a.f32()[((g * r + j) * D + row) * C + c];
            ASSERT_EQ(b.f32()[(g * D + row) * C + c], static_cast<float>(s / r)) << name << " g" << g;
          }
    }
  // the other tensors are copied unchanged
  const Tensor q0 = read_tensor(src, ckpt::param_key("layers.0.attn.wq"));
  EXPECT_EQ(std::memcmp(q0.raw(), gqa->params().get("layers.0.attn.wq").value.raw(), q0.nbytes()), 0);
  // the converted model runs
  std::vector<int32_t> tokens(16);
  for (int i = 0; i < 16; ++i) tokens[i] = (i * 7) % 37;
  EXPECT_TRUE(std::isfinite(gqa->forward(tokens.data(), tokens.data(), 1, 16, false)));
  // to MQA, from the GQA result (any n_kv_heads divisible by G)
  EXPECT_EQ(ckpt_cli({"convert", dir.file("gqa"), "--to-gqa", "1", "--out", dir.file("mqa")}), 0);
  // errors: G does not divide n_heads / n_kv_heads, G == n_kv_heads; OUT is not created
  EXPECT_NE(error_of([&] { ckpt_cli({"convert", src, "--to-gqa", "3", "--out", dir.file("bad")}); })
                .find("model.n_heads = 4 is not divisible by 3"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ckpt_cli({"convert", src, "--to-gqa", "4", "--out", dir.file("bad")}); })
                .find("already has model.n_kv_heads = 4"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ckpt_cli({"convert", dir.file("gqa"), "--to-gqa", "4", "--out", dir.file("bad")}); })
                .find("must be a multiple of 4"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(dir.file("bad")));
}

// The key correctness check of sparse upcycling: every expert is a copy of the dense FFN and the top-2 gates are
// renormalised to sum to 1, so the MoE model computes the dense model's function (up to f32 rounding).
void check_upcycle(proto::Activation act) {
  TempDir dir;
  Config cfg = tool_config(4, 2, act);
  const std::string src = save_model(cfg, dir.file("src"));
  ASSERT_EQ(ckpt_cli({"convert", src, "--upcycle", "4", "--seed", "5", "--out", dir.file("up")}), 0);
  proto::Manifest m;
  auto dense = load_model(src);
  auto up = load_model(dir.file("up"), &m);
  const auto& mc = m.config().model();
  ASSERT_EQ(mc.ffn_pattern_size(), 2);
  EXPECT_EQ(mc.ffn_pattern(0), proto::FFN_MOE);
  EXPECT_EQ(mc.ffn_pattern(1), proto::FFN_MOE);
  EXPECT_EQ(mc.moe().num_experts(), 4);
  EXPECT_EQ(mc.moe().d_expert(), 40);
  EXPECT_EQ(mc.moe().top_k(), 2);
  EXPECT_EQ(up->params().get("layers.1.ffn.experts.w_up").value.shape(), (Shape{4, 40, 32}));
  EXPECT_EQ(up->params().get("layers.0.ffn.router.weight").value.shape(), (Shape{4, 32}));
  EXPECT_EQ(up->params().find("layers.0.ffn.w_up"), nullptr);
  // router weights are small and not all equal (seeded noise breaks the symmetry between the experts)
  const Tensor& rw = up->params().get("layers.0.ffn.router.weight").value;
  float mx = 0;
  for (int64_t i = 0; i < rw.numel(); ++i) mx = std::max(mx, std::fabs(rw.f32()[i]));
  EXPECT_GT(mx, 0.0f);
  EXPECT_LT(mx, 0.1f);

  const int B = 2, T = 16, V = 37;
  std::vector<int32_t> in(B * T), tgt(B * T);
  Rng rng(11);
  for (int i = 0; i < B * T; ++i) in[i] = static_cast<int32_t>(rng.below(V)), tgt[i] = static_cast<int32_t>(rng.below(V));
  for (bool training : {false, true}) {
    const float ld = dense->forward(in.data(), tgt.data(), B, T, training);
    const float lu = up->forward(in.data(), tgt.data(), B, T, training);
    EXPECT_NEAR(ld, lu, 1e-5f * std::max(1.0f, std::fabs(ld)));
    double max_diff = 0, max_abs = 0;
    for (int64_t i = 0; i < int64_t(B) * T * V; ++i) {
      max_diff = std::max(max_diff, double(std::fabs(dense->logits()[i] - up->logits()[i])));
      max_abs = std::max(max_abs, double(std::fabs(dense->logits()[i])));
    }
    EXPECT_LE(max_diff, 1e-5 * std::max(1.0, max_abs)) << "training " << training;
  }
}

TEST(CkptToolConvert, UpcycledSwigluModelMatchesDenseForward) { check_upcycle(proto::SWIGLU); }
TEST(CkptToolConvert, UpcycledGeluModelMatchesDenseForward) { check_upcycle(proto::GELU); }

TEST(CkptToolConvert, Bf16CastWithinRoundingBoundAndCombinesWithGqa) {
  TempDir dir;
  const Config cfg = tool_config(4, 2);
  const std::string src = save_model(cfg, dir.file("src"));
  ASSERT_EQ(ckpt_cli({"convert", src, "--dtype", "bf16", "--out", dir.file("b")}), 0);
  proto::Manifest m;
  auto b = load_model(dir.file("b"), &m);  // bf16 datasets read into the f32 model (converted)
  for (const auto& e : m.tensors()) {
    if (e.name().rfind("params/", 0) == 0) {
      EXPECT_EQ(e.dtype(), "bf16") << e.name();
    } else if (e.name().rfind("optim/", 0) == 0) {
      EXPECT_EQ(e.dtype(), "f32") << e.name();  // moments kept in f32
    }
  }
  EXPECT_EQ(m.optimizer_t(), 1);  // a pure cast keeps the optimizer state
  auto a = load_model(src);
  for (const Param* p : a->params().all()) {
    const Tensor& x = p->value;
    const Tensor& y = b->params().get(p->name).value;
    for (int64_t i = 0; i < x.numel(); ++i) {
      // round to nearest even with 8 significant bits: |error| <= half an ulp <= 2^-8 |x|
      ASSERT_LE(std::fabs(x.f32()[i] - y.f32()[i]), std::ldexp(std::fabs(x.f32()[i]), -8)) << p->name << "[" << i << "]";
      ASSERT_EQ(y.f32()[i], bf16_to_float(float_to_bf16(x.f32()[i])));
    }
  }
  // a bf16 tensor reads back as bf16 too, and f32 -> bf16 -> f32 is exact
  const Tensor raw = read_tensor(dir.file("b"), ckpt::param_key("tok_emb.weight"), DType::kBF16);
  EXPECT_EQ(raw.dtype(), DType::kBF16);
  ASSERT_EQ(ckpt_cli({"convert", dir.file("b"), "--dtype", "f32", "--out", dir.file("f")}), 0);
  const Tensor back = read_tensor(dir.file("f"), ckpt::param_key("tok_emb.weight"));
  for (int64_t i = 0; i < back.numel(); ++i) ASSERT_EQ(back.f32()[i], bf16_to_float(raw.bf()[i]));
  ASSERT_EQ(ckpt_cli({"verify", dir.file("b")}), 0);
  // options combine: GQA on the bf16 checkpoint keeps bf16
  ASSERT_EQ(ckpt_cli({"convert", dir.file("b"), "--to-gqa", "1", "--out", dir.file("g")}), 0);
  proto::Manifest mg = ckpt::read_manifest(ckpt::resolve(dir.file("g")));
  EXPECT_EQ(mg.config().model().n_kv_heads(), 1);
  for (const auto& e : mg.tensors()) EXPECT_EQ(e.dtype(), "bf16") << e.name();
  // safetensors export of bf16 params keeps BF16
  ASSERT_EQ(ckpt_cli({"convert", dir.file("b"), "--to-safetensors", dir.file("b.safetensors")}), 0);
  const auto st = ckpt::read_safetensors(dir.file("b.safetensors"));
  for (const auto& t : st.tensors) EXPECT_EQ(t.tensor.dtype(), DType::kBF16) << t.name;
}

TEST(CkptToolConvert, SafetensorsExportImportRoundTrip) {
  TempDir dir;
  const Config cfg = tool_config(4, 2);
  const std::string src = save_model(cfg, dir.file("src"));
  ASSERT_EQ(ckpt_cli({"convert", src, "--to-safetensors", dir.file("m.safetensors")}), 0);
  const auto st = ckpt::read_safetensors(dir.file("m.safetensors"));
  EXPECT_EQ(st.metadata.at("moe.step"), "3");
  auto a = load_model(src);
  ASSERT_EQ(st.tensors.size(), a->params().all().size());
  for (const auto& t : st.tensors) {
    const Param& p = a->params().get(t.name);  // names: parameter names without "params/"
    ASSERT_EQ(t.tensor.shape(), p.value.shape());
    EXPECT_EQ(std::memcmp(t.tensor.raw(), p.value.raw(), p.value.nbytes()), 0) << t.name;
  }
  // refuses to overwrite the file
  EXPECT_NE(error_of([&] { ckpt_cli({"convert", src, "--to-safetensors", dir.file("m.safetensors")}); })
                .find("already exists"),
            std::string::npos);
  // back, with an explicit config file
  {
    std::ofstream f(dir.file("cfg.pbtxt"));
    f << config_to_text(cfg);
  }
  ASSERT_EQ(ckpt_cli({"convert", "--from-safetensors", dir.file("m.safetensors"), "--config", dir.file("cfg.pbtxt"),
                      "--out", dir.file("back")}),
            0);
  proto::Manifest m;
  auto b = load_model(dir.file("back"), &m);
  EXPECT_EQ(m.step(), 0);
  for (const Param* p : a->params().all())
    EXPECT_EQ(std::memcmp(p->value.raw(), b->params().get(p->name).value.raw(), p->value.nbytes()), 0) << p->name;
  // ... and from the embedded config metadata
  ASSERT_EQ(ckpt_cli({"convert", "--from-safetensors", dir.file("m.safetensors"), "--out", dir.file("back2")}), 0);
  // a config that does not match: error naming the tensor, nothing written
  std::ofstream(dir.file("wrong.pbtxt")) << config_to_text(tool_config(4, 4));
  const std::string e = error_of([&] {
    ckpt_cli({"convert", "--from-safetensors", dir.file("m.safetensors"), "--config", dir.file("wrong.pbtxt"), "--out",
              dir.file("bad")});
  });
  EXPECT_NE(e.find("layers.0.attn.wk"), std::string::npos) << e;
  EXPECT_NE(e.find("m.safetensors"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir.file("bad")));
}

// ------------------------------------------------------------------------------------------------- reshard, bad input

TEST(CkptToolReshard, ValidatesExpertParallelSize) {
  TempDir dir;
  Config cfg = tool_config(4, 2);
  cfg.mutable_model()->add_ffn_pattern(proto::FFN_DENSE);
  cfg.mutable_model()->add_ffn_pattern(proto::FFN_MOE);
  cfg.mutable_model()->mutable_moe()->set_num_experts(6);
  const std::string src = save_model(cfg, dir.file("src"));
  const std::string e = error_of([&] { ckpt_cli({"reshard", src, "--ep", "4", "--out", dir.file("r4")}); });
  EXPECT_NE(e.find("model.moe.num_experts = 6"), std::string::npos) << e;
  EXPECT_NE(e.find("parallel.expert_parallel = 4"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir.file("r4")));
  ASSERT_EQ(ckpt_cli({"reshard", src, "--ep", "3", "--out", dir.file("r3")}), 0);
  const proto::Manifest m = ckpt::read_manifest(ckpt::resolve(dir.file("r3")));
  EXPECT_EQ(m.expert_parallel(), 3);
  EXPECT_EQ(m.world_size(), 3);
  EXPECT_EQ(m.config().parallel().expert_parallel(), 3);
  EXPECT_EQ(m.optimizer_t(), 1);  // resharding keeps the optimizer state
  // never overwrites: the same step under the same root, or the source itself
  EXPECT_NE(error_of([&] { ckpt_cli({"reshard", src, "--ep", "2", "--out", dir.file("r3")}); }).find("already exists"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ckpt_cli({"reshard", src, "--ep", "2", "--out", src}); }).find("refusing"),
            std::string::npos);
}

TEST(CkptToolVerify, BadInputIsAClearError) {
  TempDir dir;
  const Config cfg = tool_config(4, 2);
  const std::string src = save_model(cfg, dir.file("src"));
  EXPECT_EQ(ckpt_cli({"verify", dir.file("src")}), 0);
  EXPECT_EQ(ckpt_cli({"inspect", dir.file("src")}), 0);
  // not a checkpoint
  EXPECT_NE(error_of([&] { ckpt_cli({"verify", dir.path()}); }).find("is not a checkpoint"), std::string::npos);
  // newer format version
  fs::copy(src, dir.file("v2"), fs::copy_options::recursive);
  proto::Manifest m = ckpt::read_manifest(dir.file("v2"));
  m.set_format_version(ckpt::kFormatVersion + 1);
  std::string bin;
  ASSERT_TRUE(m.SerializeToString(&bin));
  std::ofstream(dir.file("v2/manifest.pb"), std::ios::binary | std::ios::trunc) << bin;
  std::string e = error_of([&] { ckpt_cli({"verify", dir.file("v2")}); });
  EXPECT_NE(e.find("format version " + std::to_string(ckpt::kFormatVersion + 1) + " is not supported"),
            std::string::npos)
      << e;
  // manifest checksum disagrees with the data
  fs::copy(src, dir.file("crc"), fs::copy_options::recursive);
  m = ckpt::read_manifest(dir.file("crc"));
  for (auto& t : *m.mutable_tensors())
    if (t.name() == ckpt::param_key("layers.1.attn.wv")) t.set_crc32c(t.crc32c() ^ 1);
  ASSERT_TRUE(m.SerializeToString(&bin));
  std::ofstream(dir.file("crc/manifest.pb"), std::ios::binary | std::ios::trunc) << bin;
  e = error_of([&] { ckpt_cli({"verify", dir.file("crc")}); });
  EXPECT_NE(e.find("checksum mismatch in tensor 'params/layers.1.attn.wv'"), std::string::npos) << e;
  EXPECT_NE(e.find("model.h5"), std::string::npos) << e;
  // convert of a bad checkpoint writes nothing
  EXPECT_NE(error_of([&] { ckpt_cli({"convert", dir.file("crc"), "--dtype", "bf16", "--out", dir.file("o")}); }),
            "");
  EXPECT_FALSE(fs::exists(dir.file("o")));
  // manifest shapes that disagree with the config
  fs::copy(src, dir.file("cfg"), fs::copy_options::recursive);
  m = ckpt::read_manifest(dir.file("cfg"));
  m.mutable_config()->mutable_model()->set_d_ff(48);
  ASSERT_TRUE(m.SerializeToString(&bin));
  std::ofstream(dir.file("cfg/manifest.pb"), std::ios::binary | std::ios::trunc) << bin;
  e = error_of([&] { ckpt_cli({"verify", dir.file("cfg")}); });
  EXPECT_NE(e.find("params/layers.0.ffn.w_gate"), std::string::npos) << e;
  EXPECT_NE(e.find("expects [48, 32]"), std::string::npos) << e;
  // truncated HDF5
  fs::copy(src, dir.file("trunc"), fs::copy_options::recursive);
  fs::resize_file(dir.file("trunc/model.h5"), fs::file_size(dir.file("trunc/model.h5")) / 2);
  e = error_of([&] { ckpt_cli({"verify", dir.file("trunc")}); });
  EXPECT_NE(e.find("model.h5"), std::string::npos) << e;
  // usage errors
  EXPECT_NE(error_of([&] { ckpt_cli({"convert", src, "--bogus", "1", "--out", dir.file("x")}); }).find("unknown option"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ckpt_cli({"frobnicate", src}); }).find("unknown command"), std::string::npos);
  EXPECT_EQ(ckpt_cli({"--help"}), 0);
}


// ---- the conversions as pure functions (checkpoints/convert.h), without the command line

// A format-1 checkpoint has no shard information: its sharding comes from the model's parameter declarations
// (optimizer state inherits its parameter's), never from a tensor's name.
TEST(CkptConvert, FormatV1ShardingComesFromTheModel) {
  const ckpt::CheckpointValue c = ckpt::load_all(std::string(MOE_TEST_SOURCE_DIR) + "/tests/data/ckpt_v1");
  EXPECT_EQ(c.manifest.tensors_size(), 0);
  int sharded = 0;
  for (const auto& t : c.tensors) {
    const ckpt::ParsedKey k = ckpt::parse_key(t.name);
    const bool expert = k.param().find(".ffn.experts.") != std::string::npos;  // this fixture's expert parameters
    EXPECT_EQ(t.sharded, expert) << t.name;
    EXPECT_FALSE(k.is_routing() && t.sharded) << t.name;
    sharded += t.sharded;
  }
  EXPECT_GT(sharded, 0);
  TempDir dir;
  const std::string out = ckpt::write(dir.file("ep1"), ckpt::reshard(c, 1), 1);
  const proto::Manifest m = ckpt::read_manifest(out);
  for (const auto& e : m.tensors()) {
    bool want = false;
    for (const auto& t : c.tensors)
      if (t.name == e.name()) want = t.sharded;
    EXPECT_EQ(e.shards_size(), want ? 1 : 0) << e.name();
  }
}

// safetensors in memory: value -> tensors + metadata -> bytes -> parsed -> value, parameters byte for byte; the
// sharding of the round-tripped value comes from the model (finalize).
TEST(CkptConvert, SafetensorsRoundTripInMemory) {
  TempDir dir;
  Config cfg = tool_config(4, 4);
  cfg.mutable_model()->clear_ffn_pattern();
  cfg.mutable_model()->add_ffn_pattern(proto::FFN_DENSE);
  cfg.mutable_model()->add_ffn_pattern(proto::FFN_MOE);
  cfg.mutable_model()->mutable_moe()->set_num_experts(4);
  cfg.mutable_model()->mutable_moe()->set_top_k(2);
  cfg.mutable_parallel()->set_expert_parallel(2);
  fill_defaults(cfg);
  const ckpt::CheckpointValue src = ckpt::load_all(save_model(cfg, dir.file("src")));
  const ckpt::SafetensorsFile st = ckpt::to_safetensors(src);
  EXPECT_EQ(st.metadata.at("moe.step"), "3");
  const std::string bytes = ckpt::safetensors_bytes(st.tensors, st.metadata);
  const ckpt::SafetensorsFile parsed = ckpt::parse_safetensors(bytes, "memory");
  ckpt::CheckpointValue back =
      ckpt::finalize(ckpt::from_safetensors(parsed, parse_config_text(parsed.metadata.at("moe.config"), "meta"),
                                            "memory"),
                     "memory");
  EXPECT_EQ(back.manifest.step(), 0);
  std::map<std::string, const ckpt::NamedTensor*> have;
  for (const auto& t : back.tensors) have[t.name] = &t;
  int params = 0;
  for (const auto& t : src.tensors) {
    if (!ckpt::is_param_key(t.name)) continue;
    ++params;
    ASSERT_TRUE(have.count(t.name)) << t.name;
    const ckpt::NamedTensor& b = *have[t.name];
    EXPECT_EQ(b.sharded, t.sharded) << t.name;
    ASSERT_EQ(b.tensor.nbytes(), t.tensor.nbytes()) << t.name;
    EXPECT_EQ(0, std::memcmp(b.tensor.raw(), t.tensor.raw(), t.tensor.nbytes())) << t.name;
  }
  EXPECT_EQ(static_cast<int>(back.tensors.size()), params);
  // the transforms are pure: the source value is untouched by a cast
  const ckpt::CheckpointValue b16 = ckpt::cast(src, DType::kBF16);
  for (size_t i = 0; i < src.tensors.size(); ++i) {
    EXPECT_EQ(src.tensors[i].tensor.dtype(), DType::kF32);
    if (ckpt::is_param_key(b16.tensors[i].name)) {
      EXPECT_EQ(b16.tensors[i].tensor.dtype(), DType::kBF16);
    }
  }
}

// Upcycled expert tensors are sharded (from the new model's declarations), so they are written as shard files.
TEST(CkptConvert, UpcycledExpertsAreSharded) {
  TempDir dir;
  const ckpt::CheckpointValue dense = ckpt::load_all(save_model(tool_config(4, 4), dir.file("src")));
  std::vector<std::string> notes;
  ckpt::CheckpointValue up = ckpt::finalize(
      ckpt::drop_optimizer(ckpt::upcycle(dense, 4, 1, "test", &notes)), "test");
  EXPECT_TRUE(notes.empty());
  up.mutable_config().mutable_parallel()->set_expert_parallel(2);
  int sharded = 0;
  for (const auto& t : up.tensors) {
    EXPECT_FALSE(ckpt::is_optim_key(t.name)) << t.name;
    sharded += t.sharded;
  }
  EXPECT_EQ(sharded, 2 * 3);  // 2 layers x (w_gate, w_up, w_down)
  const proto::Manifest m = ckpt::read_manifest(ckpt::write(dir.file("up"), up, 2));
  for (const auto& e : m.tensors()) EXPECT_EQ(e.shards_size() > 0, e.name().find(".experts.") != std::string::npos);
  EXPECT_TRUE(fs::is_regular_file(dir.file("up/step_3/experts_1.h5")));
}

}  // namespace
}  // namespace moe::test
