// Config parsing, overrides by path, defaults and validation errors that name the field.
#include <gtest/gtest.h>

#include <google/protobuf/descriptor.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include "core/config.h"
#include "core/error.h"
#include "tests/unit/oracle.h"

namespace moe {
namespace {

using test::error_of;
namespace fs = std::filesystem;

const char* kGood = R"(
model { d_model: 64 n_layers: 2 n_heads: 4 n_kv_heads: 2 d_ff: 128 }
data { train_file: "/nonexistent/corpus.txt" seq_len: 32 batch_size: 4 }
optimizer { lr: 0.001 }
train { steps: 10 }
)";

// kGood with `extra` added to its model block
std::string good_with_model(const std::string& extra) {
  std::string s = kGood;
  const std::string end = "d_ff: 128 }";
  s.replace(s.find(end), end.size(), "d_ff: 128 " + extra + " }");
  return s;
}

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

TEST(Config, RoutingVocabularySkipListAndSparqFieldsAreValidated) {
  struct Bad {
    std::vector<const char*> set;
    const char* expect;
  } cases[] = {
      {{"model.word_experts.routing_vocab_size=100", "model.word_experts.hash_routing=true",
        "model.word_experts.skip_top=0"},
       "needs model.word_experts.hash_routing = false"},
      {{"model.word_experts.routing_vocab_size=100", "model.word_experts.routing_exact=101"},
       "model.word_experts.routing_exact = 101"},
      {{"model.word_experts.routing_vocab_size=-1"}, "model.word_experts.routing_vocab_size = -1"},
      {{"model.word_experts.skip_top=40"}, "model.word_experts.skip_top = 40: must be in [0, "},
      {{"model.moe.bias_update_rate=-1"}, "model.moe.bias_update_rate = -1"},
      {{"serving.sparq_r=4"}, "set together"},
      {{"serving.sparq_k=-1"}, "serving.sparq_k = -1"},
  };
  for (const auto& b : cases) {
    Config c = parse_config_text("model { word_experts {} }", "x.pbtxt");
    c.MergeFrom(good());
    for (const char* s : {"model.ffn_pattern=FFN_MOE,FFN_WORD_EXPERT", "model.moe.num_experts=4",
                          "model.word_experts.num_experts=64", "model.word_experts.d_expert=8",
                          "model.word_experts.num_frequent=32"})
      apply_override(c, s);
    for (const char* s : b.set) apply_override(c, s);
    fill_defaults(c);
    std::string e = error_of([&] { validate_config(c, false); });
    EXPECT_NE(e.find(b.expect), std::string::npos) << b.set[0] << " -> '" << e << "'";
  }
  Config c = parse_config_text("model { word_experts { routing_vocab_size: 4096 num_experts: 64 } }", "y.pbtxt");
  fill_defaults(c);
  EXPECT_EQ(c.model().word_experts().routing_exact(), 4096 - 256);
  EXPECT_EQ(c.model().word_experts().skip_top(), 16);
  EXPECT_FLOAT_EQ(c.model().moe().bias_update_rate(), 1e-3f);
  Config d = parse_config_text("model { word_experts { num_experts: 64 } }", "z.pbtxt");
  fill_defaults(d);
  EXPECT_EQ(d.model().word_experts().skip_top(), 0);  // token-id routing keeps its old behaviour
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

// ---- field presence: absent -> the default, explicit (0 included) -> kept and validated ----

TEST(Config, EmptyConfigGetsEveryDocumentedDefault) {
  Config c = parse_config_text("model { n_heads: 6 d_ff: 96 word_experts {} }\ndata { seq_len: 48 }", "empty.pbtxt");
  fill_defaults(c);
  const auto& m = c.model();
  EXPECT_EQ(m.n_kv_heads(), 6);     // n_heads
  EXPECT_EQ(m.max_seq_len(), 48);   // data.seq_len
  EXPECT_FLOAT_EQ(m.rope_theta(), 10000.0f);
  EXPECT_FLOAT_EQ(m.norm_eps(), 1e-5f);
  EXPECT_FLOAT_EQ(m.init_std(), 0.02f);
  EXPECT_EQ(m.device(), proto::DEVICE_CPU);
  EXPECT_EQ(m.moe().top_k(), 2);
  EXPECT_EQ(m.moe().d_expert(), 96);  // model.d_ff
  EXPECT_FLOAT_EQ(m.moe().capacity_factor(), 1.25f);
  EXPECT_EQ(m.word_experts().placement(), proto::WordExpertConfig::PLACEMENT_INTERLEAVED);
  EXPECT_EQ(c.data().tokenizer_vocab_size(), 1024);
  EXPECT_EQ(c.data().tokenizer_type(), "bpe");
  EXPECT_FLOAT_EQ(c.data().val_fraction(), 0.1f);
  EXPECT_FLOAT_EQ(c.optimizer().beta1(), 0.9f);
  EXPECT_FLOAT_EQ(c.optimizer().beta2(), 0.95f);
  EXPECT_FLOAT_EQ(c.optimizer().eps(), 1e-8f);
  EXPECT_EQ(c.train().log_every(), 10);
  EXPECT_EQ(c.train().eval_batches(), 8);
  EXPECT_EQ(c.train().out_dir(), "runs/default");
  EXPECT_EQ(c.parallel().expert_parallel(), 1);
  EXPECT_FLOAT_EQ(c.parallel().collective_timeout_s(), 600.0f);
  EXPECT_EQ(c.parallel().communicator(), "mpi");
  EXPECT_EQ(c.generate().max_new_tokens(), 200);
  // a dense config gets no word_experts block
  Config dense = parse_config_text("", "dense.pbtxt");
  fill_defaults(dense);
  EXPECT_FALSE(dense.model().has_word_experts());
}

// Every field declared `optional` (= has a default, config.proto) is filled; filling twice changes nothing.
void expect_every_optional_present(const google::protobuf::Message& msg, const std::string& path) {
  namespace pb = google::protobuf;
  const pb::Descriptor* d = msg.GetDescriptor();
  const pb::Reflection* r = msg.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* f = d->field(i);
    const std::string name = path + f->name();
    EXPECT_TRUE(!f->has_optional_keyword() || r->HasField(msg, f)) << name << " has no default filled in";
    if (f->type() == pb::FieldDescriptor::TYPE_MESSAGE && !f->is_repeated() && r->HasField(msg, f))
      expect_every_optional_present(r->GetMessage(msg, f), name + ".");
  }
}

TEST(Config, EveryOptionalFieldHasOneDefaultAndFillingIsIdempotent) {
  Config c = parse_config_text("model { word_experts {} }", "empty.pbtxt");
  fill_defaults(c);
  expect_every_optional_present(c, "");
  const std::string once = c.SerializeAsString();
  fill_defaults(c);
  EXPECT_EQ(c.SerializeAsString(), once);
}

TEST(Config, ExplicitValuesAreKeptNotDefaulted) {
  Config c = parse_config_text(R"(
model { n_heads: 4 n_kv_heads: 1 max_seq_len: 16 rope_theta: 500 norm_eps: 1e-6 init_std: 0.1 d_ff: 64
        moe { top_k: 1 d_expert: 8 capacity_factor: 2 bias_update_rate: 0.01 }
        word_experts { placement: PLACEMENT_MULTIPLICATIVE routing_exact: 5 skip_top: 0 } }
data { seq_len: 8 tokenizer_vocab_size: 300 tokenizer_type: "unigram" val_fraction: 0.2 }
optimizer { beta1: 0.8 beta2: 0.99 eps: 1e-6 }
train { log_every: 3 eval_batches: 2 out_dir: "x" }
parallel { expert_parallel: 2 collective_timeout_s: 5 communicator: "nccl" }
generate { max_new_tokens: 7 }
serving { host: "0.0.0.0" port: 0 max_batch_tokens: 9 max_running: 3 max_queue: 4 kv_block_size: 8
          kv_cache_bytes: 4096 max_connections: 5 max_body_bytes: 100 drain_timeout_s: 0 request_timeout_s: 2
          idle_timeout_s: 3 })", "explicit.pbtxt");
  const std::string before = c.SerializeAsString();
  fill_defaults(c);
  EXPECT_EQ(c.SerializeAsString(), before);
}

TEST(Config, ExplicitZeroIsKeptAndRejected) {
  struct Zero {
    const char* set;
    const char* expect;
  } cases[] = {
      {"model.n_kv_heads=0", "config field model.n_kv_heads = 0: must be > 0"},
      {"model.max_seq_len=0", "config field model.max_seq_len = 0: must be > 0"},
      {"model.norm_eps=0", "config field model.norm_eps = 0: must be > 0"},
      {"model.init_std=0", "config field model.init_std = 0: must be > 0"},
      {"data.val_fraction=0", "config field data.val_fraction = 0: must be in (0, 1)"},
      {"data.tokenizer_vocab_size=0", "config field data.tokenizer_vocab_size = 0: must be >= 32"},
      {"data.tokenizer_type=", "config field data.tokenizer_type = '': must be \"bpe\" or \"unigram\""},
      {"optimizer.beta1=0", "config field optimizer.beta1 = 0: must be in (0, 1)"},
      {"optimizer.eps=0", "config field optimizer.eps = 0: must be > 0"},
      {"train.log_every=0", "config field train.log_every = 0: must be > 0"},
      {"train.eval_batches=0", "config field train.eval_batches = 0: must be > 0"},
      {"parallel.expert_parallel=0", "config field parallel.expert_parallel = 0: must be > 0"},
      {"parallel.collective_timeout_s=0", "config field parallel.collective_timeout_s = 0: must be > 0"},
      {"generate.max_new_tokens=0", "config field generate.max_new_tokens = 0: must be > 0"},
      {"serving.max_batch_tokens=0", "config field serving.max_batch_tokens = 0: must be > 0"},
      {"serving.max_running=0", "config field serving.max_running = 0: must be > 0"},
      {"serving.max_queue=0", "config field serving.max_queue = 0: must be > 0"},
      {"serving.kv_block_size=0", "config field serving.kv_block_size = 0: must be > 0"},
      {"serving.kv_cache_bytes=0", "config field serving.kv_cache_bytes = 0: must be > 0"},
      {"serving.max_connections=0", "config field serving.max_connections = 0: must be > 0"},
      {"serving.request_timeout_s=0", "config field serving.request_timeout_s = 0: must be > 0"},
      {"serving.host=", "config field serving.host = \"\": must name an address"},
  };
  for (const auto& z : cases) {
    Config c = parse_config_text(kGood, "good.pbtxt");
    apply_override(c, z.set);  // before the defaults, as the CLI does
    fill_defaults(c);
    std::string e = error_of([&] { validate_config(c, false); });
    EXPECT_NE(e.find(z.expect), std::string::npos) << z.set << " -> '" << e << "'";
  }
}

TEST(Config, MoeTopKZeroIsAnErrorNotTwo) {
  Config c = parse_config_text(good_with_model("ffn_pattern: [FFN_MOE] moe { num_experts: 4 top_k: 0 }"), "moe.pbtxt");
  fill_defaults(c);
  EXPECT_EQ(c.model().moe().top_k(), 0);
  std::string e = error_of([&] { validate_config(c, false); });
  EXPECT_NE(e.find("config field model.moe.top_k = 0: must be in [1, model.moe.num_experts = 4]"), std::string::npos)
      << e;
  // absent: the default
  Config d = parse_config_text(good_with_model("ffn_pattern: [FFN_MOE] moe { num_experts: 4 }"), "moe.pbtxt");
  fill_defaults(d);
  EXPECT_EQ(d.model().moe().top_k(), 2);
  EXPECT_EQ(d.model().moe().d_expert(), 128);  // model.d_ff
  EXPECT_NO_THROW(validate_config(d, false));
}

TEST(Config, WordExpertPlacementUnsetGivenExplicitlyIsRejected) {
  Config c = parse_config_text(good_with_model("ffn_pattern: [FFN_WORD_EXPERT] word_experts { num_experts: 8 "
                                               "d_expert: 4 placement: PLACEMENT_UNSET }"),
                               "w.pbtxt");
  fill_defaults(c);
  std::string e = error_of([&] { validate_config(c, false); });
  EXPECT_NE(e.find("model.word_experts.placement = PLACEMENT_UNSET"), std::string::npos) << e;
  c.mutable_model()->mutable_word_experts()->clear_placement();
  fill_defaults(c);
  EXPECT_EQ(c.model().word_experts().placement(), proto::WordExpertConfig::PLACEMENT_INTERLEAVED);
  EXPECT_NO_THROW(validate_config(c, false));
}

// ---- model.device and parallel.communicator, validated together ----

TEST(Config, DeviceAndCommunicator) {
  struct Combo {
    const char* device;
    const char* communicator;  // nullptr: absent (default "mpi")
    const char* expect;        // nullptr: valid
  } cases[] = {
      {"DEVICE_CPU", nullptr, nullptr},
      {"DEVICE_CPU", "mpi", nullptr},
      {"DEVICE_CUDA", "mpi", nullptr},  // host-staged collectives
      {"DEVICE_CUDA", "nccl", nullptr},
      {"DEVICE_CUDA", nullptr, nullptr},
      {"DEVICE_CPU", "nccl", "parallel.communicator = 'nccl': needs model.device = DEVICE_CUDA (model.device is DEVICE_CPU)"},
      {"DEVICE_CUDA", "gloo", "parallel.communicator = 'gloo': must be \"mpi\" or \"nccl\""},
      {"DEVICE_CPU", "", "parallel.communicator = '': must be \"mpi\" or \"nccl\""},
      {"DEVICE_CPU", "MPI", "parallel.communicator = 'MPI': must be \"mpi\" or \"nccl\""},
  };
  for (const auto& k : cases) {
    Config c = parse_config_text(kGood, "good.pbtxt");
    apply_override(c, std::string("model.device=") + k.device);
    if (k.communicator) apply_override(c, std::string("parallel.communicator=") + k.communicator);
    fill_defaults(c);
    const std::string what = std::string(k.device) + " + " + (k.communicator ? k.communicator : "(absent)");
    if (!k.expect) {
      EXPECT_NO_THROW(validate_config(c, false)) << what;
      continue;
    }
    std::string e = error_of([&] { validate_config(c, false); });
    EXPECT_NE(e.find(k.expect), std::string::npos) << what << " -> '" << e << "'";
  }
  Config c = good();
  c.mutable_model()->set_device(static_cast<proto::Device>(7));
  EXPECT_NE(error_of([&] { validate_config(c, false); }).find("model.device = 7"), std::string::npos);
}

// ---- relative data paths: against the config file's directory, or --data-dir; overrides stay as typed ----

struct ConfigTree {
  test::TempDir tmp;
  std::string root = fs::weakly_canonical(tmp.path()).string();
  ConfigTree() {
    fs::create_directories(root + "/repo/deploy/configs");
    fs::create_directories(root + "/shared/data");
    fs::create_directories(root + "/elsewhere");
    std::ofstream(root + "/shared/data/corpus.txt") << "some text\n";
    std::ofstream(root + "/shared/data/tok.model") << "x";
    std::ofstream(root + "/elsewhere/corpus.txt") << "other text\n";
    write("repo/deploy/configs/run.pbtxt", "../../../shared/data/corpus.txt", "../../../shared/data/tok.model");
  }
  void write(const std::string& rel, const std::string& train_file, const std::string& tokenizer_model) const {
    std::ofstream(root + "/" + rel) << "data { train_file: \"" << train_file << "\" tokenizer_model: \""
                                    << tokenizer_model << "\" seq_len: 32 batch_size: 4 }\n"
                                    << "model { d_model: 64 n_layers: 2 n_heads: 4 d_ff: 128 }\n"
                                    << "optimizer { lr: 0.001 }\ntrain { steps: 10 }\n";
  }
};

TEST(Config, DataPathsAreRelativeToTheConfigFile) {
  ConfigTree t;
  ASSERT_NE(fs::current_path().string().rfind(t.root, 0), 0u);  // the working directory is elsewhere
  Config c = load_config_file(t.root + "/repo/deploy/configs/run.pbtxt");
  EXPECT_EQ(c.data().train_file(), t.root + "/shared/data/corpus.txt");
  EXPECT_EQ(c.data().tokenizer_model(), t.root + "/shared/data/tok.model");
  fill_defaults(c);
  EXPECT_NO_THROW(validate_config(c, /*needs_data=*/true));
  // a config path relative to the working directory works the same
  const fs::path cwd = fs::current_path();
  fs::current_path(t.root + "/repo");
  Config r = load_config_file("deploy/configs/run.pbtxt");
  fs::current_path(cwd);
  EXPECT_EQ(r.data().train_file(), t.root + "/shared/data/corpus.txt");
}

TEST(Config, DataDirReplacesTheConfigDirectory) {
  ConfigTree t;
  t.write("repo/deploy/configs/plain.pbtxt", "corpus.txt", "");
  Config c = load_config_file(t.root + "/repo/deploy/configs/plain.pbtxt", t.root + "/elsewhere");
  EXPECT_EQ(c.data().train_file(), t.root + "/elsewhere/corpus.txt");
  EXPECT_EQ(c.data().tokenizer_model(), "");  // empty stays empty (train one)
  fill_defaults(c);
  EXPECT_NO_THROW(validate_config(c, true));
  // a relative --data-dir is relative to the working directory
  const fs::path cwd = fs::current_path();
  fs::current_path(t.root);
  Config r = load_config_file("repo/deploy/configs/plain.pbtxt", "shared/data");
  fs::current_path(cwd);
  EXPECT_EQ(r.data().train_file(), t.root + "/shared/data/corpus.txt");
}

TEST(Config, AbsoluteDataPathsAreKept) {
  ConfigTree t;
  t.write("repo/deploy/configs/abs.pbtxt", "/nonexistent/corpus.txt", "/nonexistent/tok.model");
  for (const std::string data_dir : {"", "/somewhere"}) {
    Config c = load_config_file(t.root + "/repo/deploy/configs/abs.pbtxt", data_dir);
    EXPECT_EQ(c.data().train_file(), "/nonexistent/corpus.txt");
    EXPECT_EQ(c.data().tokenizer_model(), "/nonexistent/tok.model");
  }
}

TEST(Config, OverriddenDataPathsStayRelativeToTheWorkingDirectory) {
  ConfigTree t;
  Config c = load_config_file(t.root + "/repo/deploy/configs/run.pbtxt");
  apply_override(c, "data.train_file=typed/here.txt");  // as the CLI does: load (resolve), then --set
  fill_defaults(c);
  EXPECT_EQ(c.data().train_file(), "typed/here.txt");
  EXPECT_EQ(c.data().tokenizer_model(), t.root + "/shared/data/tok.model");  // not overridden: resolved
  std::string e = error_of([&] { validate_config(c, true); });
  EXPECT_NE(e.find("data.train_file = 'typed/here.txt': file not found"), std::string::npos) << e;
  // parse_config_text (no file) resolves nothing
  EXPECT_EQ(parse_config_text("data { train_file: \"a/b.txt\" }", "text").data().train_file(), "a/b.txt");
}

}  // namespace
}  // namespace moe
