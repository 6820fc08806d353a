// Config parsing, overrides by path, defaults and validation errors that name the field.
#include <gtest/gtest.h>

#include <functional>

#include "core/config.h"
#include "core/error.h"
#include "tests/unit/oracle.h"

namespace moe {
namespace {

using test::error_of;

const char* kGood = R"(
model { d_model: 64 n_layers: 2 n_heads: 4 n_kv_heads: 2 d_ff: 128 }
data { train_file: "/nonexistent/corpus.txt" seq_len: 32 batch_size: 4 }
optimizer { lr: 0.001 }
train { steps: 10 }
)";

Config good() {
  Config c = parse_config_text(kGood, "good.pbtxt");
  fill_defaults(c);
  return c;
}

TEST(Config, ParsesAndFillsDefaults) {
  Config c = good();
  EXPECT_EQ(c.model().d_model(), 64);
  EXPECT_EQ(c.model().max_seq_len(), 32);  // from data.seq_len
  EXPECT_FLOAT_EQ(c.model().rope_theta(), 10000.0f);
  EXPECT_FLOAT_EQ(c.optimizer().beta2(), 0.95f);
  EXPECT_NO_THROW(validate_config(c, false));
}

TEST(Config, UnknownFieldNamesFileLineAndField) {
  std::string e = error_of([] { parse_config_text("model {\n  d_modl: 3\n}\n", "x.pbtxt"); });
  EXPECT_NE(e.find("x.pbtxt:2"), std::string::npos) << e;
  EXPECT_NE(e.find("d_modl"), std::string::npos) << e;
}

TEST(Config, OverridesByPath) {
  Config c = good();
  apply_override(c, "model.d_model=256");
  apply_override(c, "data.train_file=/tmp/other.txt");
  apply_override(c, "model.activation=GELU");
  apply_override(c, "model.ffn_pattern=FFN_DENSE,FFN_MOE");
  apply_override(c, "optimizer.lr=3e-4");
  EXPECT_EQ(c.model().d_model(), 256);
  EXPECT_EQ(c.data().train_file(), "/tmp/other.txt");
  EXPECT_EQ(c.model().activation(), proto::GELU);
  ASSERT_EQ(c.model().ffn_pattern_size(), 2);
  EXPECT_EQ(c.model().ffn_pattern(1), proto::FFN_MOE);
  EXPECT_FLOAT_EQ(c.optimizer().lr(), 3e-4f);
  EXPECT_NE(error_of([&] { apply_override(c, "model.d_modl=3"); }).find("model.d_modl"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_override(c, "model.d_model=abc"); }).find("model.d_model"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_override(c, "model.d_model"); }).find("path.to.field=value"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_override(c, "model.d_model.x=1"); }).find("not a message"), std::string::npos);
}

TEST(Config, ValidationNamesTheField) {
  struct Bad {
    const char* set;
    const char* expect;
  } cases[] = {
      {"model.d_model=-8", "model.d_model = -8"},
      {"model.n_layers=0", "model.n_layers"},
      {"model.n_kv_heads=3", "divisible by model.n_kv_heads = 3"},
      {"model.d_ff=-1", "model.d_ff"},
      {"data.batch_size=-2", "data.batch_size"},
      {"data.seq_len=64", "model.max_seq_len"},
      {"optimizer.lr=-1", "optimizer.lr"},
      {"train.steps=0", "train.steps"},
      {"data.val_fraction=1.5", "data.val_fraction"},
      {"model.ffn_pattern=FFN_MOE", "model.moe.num_experts = 0"},
      {"model.ffn_pattern=FFN_WORD_EXPERT", "model.word_experts.num_experts = 0"},
  };
  for (const auto& b : cases) {
    Config c = good();
    apply_override(c, b.set);
    std::string e = error_of([&] { validate_config(c, false); });
    EXPECT_NE(e.find(b.expect), std::string::npos) << b.set << " -> '" << e << "'";
  }
}

TEST(Config, ExpertParallelLayoutErrors) {
  Config c = good();
  apply_override(c, "model.ffn_pattern=FFN_DENSE,FFN_MOE");
  apply_override(c, "model.moe.num_experts=6");
  apply_override(c, "parallel.expert_parallel=4");
  std::string e = error_of([&] { validate_config(c, false); });
  EXPECT_NE(e.find("model.moe.num_experts = 6: must be divisible by parallel.expert_parallel = 4"),
            std::string::npos) << e;
  apply_override(c, "parallel.expert_parallel=8");
  e = error_of([&] { validate_config(c, false); });
  EXPECT_NE(e.find("more expert-parallel ranks than experts"), std::string::npos) << e;
  apply_override(c, "parallel.expert_parallel=2");
  apply_override(c, "model.moe.top_k=7");
  e = error_of([&] { validate_config(c, false); });
  EXPECT_NE(e.find("model.moe.top_k = 7"), std::string::npos) << e;
  apply_override(c, "model.moe.top_k=2");
  EXPECT_NO_THROW(validate_config(c, false));
}

TEST(Config, MissingDataFileIsNamed) {
  Config c = good();
  std::string e = error_of([&] { validate_config(c, true); });
  EXPECT_NE(e.find("data.train_file"), std::string::npos) << e;
  EXPECT_NE(e.find("/nonexistent/corpus.txt"), std::string::npos) << e;
  EXPECT_NE(e.find("not found"), std::string::npos) << e;
}

TEST(Config, MissingConfigFile) {
  std::string e = error_of([] { load_config_file("/nonexistent/x.pbtxt"); });
  EXPECT_NE(e.find("/nonexistent/x.pbtxt"), std::string::npos) << e;
}

}  // namespace
}  // namespace moe
