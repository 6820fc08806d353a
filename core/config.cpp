#include "core/config.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
namespace pb = google::protobuf;

class CollectErrors : public pb::io::ErrorCollector {
 public:
  explicit CollectErrors(std::string source) : source_(std::move(source)) {}
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    if (first_.empty())
      first_ = source_ + ":" + std::to_string(line + 1) + ":" + std::to_string(column + 1) + ": " + message;
  }
  void AddWarning(int, pb::io::ColumnNumber, const std::string&) override {}
  const std::string& first() const { return first_; }

 private:
  std::string source_;
  std::string first_;
};

}  // namespace

Config parse_config_text(const std::string& text, const std::string& source_name) {
  Config cfg;
  pb::TextFormat::Parser parser;
  CollectErrors errors(source_name);
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &cfg))
    MOE_THROW("invalid config " << (errors.first().empty() ? source_name : errors.first()));
  return cfg;
}

Config load_config_file(const std::string& path, const std::string& data_dir) {
  std::ifstream f(path);
  MOE_CHECK(f.good(), "cannot open config file '" << path << "'");
  std::stringstream ss;
  ss << f.rdbuf();
  Config cfg = parse_config_text(ss.str(), path);
  resolve_data_paths(cfg.mutable_data(), data_dir.empty() ? fs::path(path).parent_path().string() : data_dir);
  return cfg;
}

namespace {

// `p` relative to `base_dir`, made absolute. The '..' steps are resolved by the file system (the directory is made
// canonical, symbolic links followed as the kernel would), the file name itself is kept as written.
std::string resolve_path(const std::string& p, const std::string& base_dir) {
  if (p.empty() || fs::path(p).is_absolute()) return p;
  const fs::path joined = fs::absolute(fs::path(base_dir) / p);
  std::error_code ec;
  const fs::path dir = fs::weakly_canonical(joined.parent_path(), ec);
  return ec ? joined.string() : (dir / joined.filename()).string();
}

}  // namespace

void resolve_data_paths(proto::DataConfig* d, const std::string& base_dir) {
  if (!d->train_file().empty()) d->set_train_file(resolve_path(d->train_file(), base_dir));
  if (!d->tokenizer_model().empty()) d->set_tokenizer_model(resolve_path(d->tokenizer_model(), base_dir));
}

void apply_override(Config& cfg, const std::string& assignment) {
  auto eq = assignment.find('=');
  MOE_CHECK(eq != std::string::npos && eq > 0,
            "override '" << assignment << "' must have the form path.to.field=value (e.g. model.d_model=256)");
  std::string path = assignment.substr(0, eq);
  std::string value = assignment.substr(eq + 1);
  pb::Message* msg = &cfg;
  std::stringstream ps(path);
  std::string part;
  std::vector<std::string> parts;
  while (std::getline(ps, part, '.')) parts.push_back(part);
  for (size_t i = 0; i < parts.size(); ++i) {
    const pb::FieldDescriptor* fd = msg->GetDescriptor()->FindFieldByName(parts[i]);
    MOE_CHECK(fd, "unknown config field '" << path << "': " << msg->GetDescriptor()->name() << " has no field '"
                                           << parts[i] << "'");
    if (i + 1 < parts.size()) {
      MOE_CHECK(fd->type() == pb::FieldDescriptor::TYPE_MESSAGE && !fd->is_repeated(),
                "config field '" << path << "': '" << parts[i] << "' is not a message");
      msg = msg->GetReflection()->MutableMessage(msg, fd);
      continue;
    }
    // the leaf: reuse the text-format parser so every scalar/enum type is handled as in config files
    std::string text;
    if (fd->is_repeated()) {
      msg->GetReflection()->ClearField(msg, fd);
      std::stringstream vs(value);
      std::string item;
      text = parts[i] + ": [";
      bool first = true;
      while (std::getline(vs, item, ',')) {
        text += (first ? "" : ", ") + item;
        first = false;
      }
      text += "]";
    } else if (fd->type() == pb::FieldDescriptor::TYPE_STRING) {
      text = parts[i] + ": \"" + pb::CEscape(value) + "\"";
    } else {
      text = parts[i] + ": " + value;
    }
    std::unique_ptr<pb::Message> tmp(msg->New());
    pb::TextFormat::Parser parser;
    CollectErrors errors("--set " + assignment);
    parser.RecordErrorsTo(&errors);
    MOE_CHECK(parser.ParseFromString(text, tmp.get()),
              "bad value for config field '" << path << "': '" << value << "' (" << errors.first() << ")");
    msg->GetReflection()->ClearField(msg, fd);
    msg->MergeFrom(*tmp);
  }
}

// ---- defaults: one function per message; each default value is written here once ----

void fill_defaults(proto::MoeConfig* e, int d_ff) {
  if (!e->has_top_k()) e->set_top_k(2);
  if (!e->has_d_expert()) e->set_d_expert(d_ff);
  if (!e->has_capacity_factor()) e->set_capacity_factor(1.25f);
  if (!e->has_bias_update_rate()) e->set_bias_update_rate(1e-3f);
}

void fill_defaults(proto::WordExpertConfig* w) {
  if (!w->has_placement()) w->set_placement(proto::WordExpertConfig::PLACEMENT_INTERLEAVED);
  const int R = w->routing_vocab_size();
  if (!w->has_routing_exact()) w->set_routing_exact(R - R / 16);
  if (!w->has_skip_top()) w->set_skip_top(R > 0 ? 16 : 0);
}

void fill_defaults(proto::ModelConfig* m, int data_seq_len) {
  if (!m->has_n_kv_heads()) m->set_n_kv_heads(m->n_heads());
  if (!m->has_max_seq_len()) m->set_max_seq_len(data_seq_len);
  if (!m->has_rope_theta()) m->set_rope_theta(10000.0f);
  if (!m->has_norm_eps()) m->set_norm_eps(1e-5f);
  if (!m->has_init_std()) m->set_init_std(0.02f);
  fill_defaults(m->mutable_moe(), m->d_ff());
  if (m->has_word_experts()) fill_defaults(m->mutable_word_experts());  // dense configs get no word_experts block
}

void fill_defaults(proto::DataConfig* d) {
  if (!d->has_tokenizer_vocab_size()) d->set_tokenizer_vocab_size(1024);
  if (!d->has_tokenizer_type()) d->set_tokenizer_type("bpe");
  if (!d->has_val_fraction()) d->set_val_fraction(0.1f);
}

void fill_defaults(proto::OptimizerConfig* o) {
  if (!o->has_beta1()) o->set_beta1(0.9f);
  if (!o->has_beta2()) o->set_beta2(0.95f);
  if (!o->has_eps()) o->set_eps(1e-8f);
}

void fill_defaults(proto::TrainConfig* t) {
  if (!t->has_log_every()) t->set_log_every(10);
  if (!t->has_eval_batches()) t->set_eval_batches(8);
  if (!t->has_out_dir()) t->set_out_dir("runs/default");
}

void fill_defaults(proto::ParallelConfig* p) {
  if (!p->has_expert_parallel()) p->set_expert_parallel(1);
  if (!p->has_collective_timeout_s()) p->set_collective_timeout_s(600);
  if (!p->has_communicator()) p->set_communicator("mpi");
}

void fill_defaults(proto::GenerateConfig* g) {
  if (!g->has_max_new_tokens()) g->set_max_new_tokens(200);
}

void fill_defaults(proto::ServingConfig* s) {
  if (!s->has_host()) s->set_host("127.0.0.1");
  if (!s->has_port()) s->set_port(8000);
  if (!s->has_max_batch_tokens()) s->set_max_batch_tokens(512);
  if (!s->has_max_running()) s->set_max_running(64);
  if (!s->has_max_queue()) s->set_max_queue(256);
  if (!s->has_kv_block_size()) s->set_kv_block_size(16);
  if (!s->has_kv_cache_bytes()) s->set_kv_cache_bytes(int64_t(256) << 20);
  if (!s->has_max_connections()) s->set_max_connections(256);
  if (!s->has_max_body_bytes()) s->set_max_body_bytes(int64_t(1) << 20);
  if (!s->has_drain_timeout_s()) s->set_drain_timeout_s(30);
  if (!s->has_request_timeout_s()) s->set_request_timeout_s(30);
  if (!s->has_idle_timeout_s()) s->set_idle_timeout_s(60);
}

void fill_defaults(Config& cfg) {
  fill_defaults(cfg.mutable_model(), cfg.data().seq_len());
  fill_defaults(cfg.mutable_data());
  fill_defaults(cfg.mutable_optimizer());
  fill_defaults(cfg.mutable_train());
  fill_defaults(cfg.mutable_parallel());
  fill_defaults(cfg.mutable_generate());
  fill_defaults(cfg.mutable_serving());
}

// ---- validation: one function per subsystem ----

#define MOE_CHECK_FIELD(cond, field, value, why) \
  MOE_CHECK(cond, "config field " << field << " = " << value << ": " << why)

namespace {

// (the pattern repeats: its first min(n_layers, pattern size) entries are all the kinds there are)
bool has_layers_of(const proto::ModelConfig& m, proto::FfnKind kind) {
  for (int l = 0; l < std::min(m.n_layers(), std::max(1, m.ffn_pattern_size())); ++l)
    if (layer_ffn_kind(m, l) == kind) return true;
  return false;
}

void validate_moe(const proto::MoeConfig& e) {
  MOE_CHECK_FIELD(e.num_experts() > 0, "model.moe.num_experts", e.num_experts(),
                  "must be > 0 (model.ffn_pattern has FFN_MOE layers)");
  MOE_CHECK_FIELD(e.top_k() >= 1 && e.top_k() <= e.num_experts(), "model.moe.top_k", e.top_k(),
                  "must be in [1, model.moe.num_experts = " << e.num_experts() << "]");
  MOE_CHECK_FIELD(e.d_expert() > 0, "model.moe.d_expert", e.d_expert(), "must be > 0");
  MOE_CHECK_FIELD(e.dropless() || e.capacity_factor() > 0, "model.moe.capacity_factor", e.capacity_factor(),
                  "must be > 0 (or set model.moe.dropless)");
  MOE_CHECK_FIELD(e.aux_loss_coef() >= 0, "model.moe.aux_loss_coef", e.aux_loss_coef(), "must be >= 0");
  MOE_CHECK_FIELD(e.z_loss_coef() >= 0, "model.moe.z_loss_coef", e.z_loss_coef(), "must be >= 0");
  MOE_CHECK_FIELD(e.jitter_eps() >= 0 && e.jitter_eps() < 1, "model.moe.jitter_eps", e.jitter_eps(),
                  "must be in [0, 1)");
  MOE_CHECK_FIELD(e.bias_update_rate() >= 0 && std::isfinite(e.bias_update_rate()), "model.moe.bias_update_rate",
                  e.bias_update_rate(), "must be >= 0");
}

void validate_word_experts(const proto::WordExpertConfig& w) {
  MOE_CHECK_FIELD(w.num_experts() > 0, "model.word_experts.num_experts", w.num_experts(),
                  "must be > 0 (model.ffn_pattern has FFN_WORD_EXPERT layers)");
  MOE_CHECK_FIELD(w.d_expert() > 0, "model.word_experts.d_expert", w.d_expert(), "must be > 0");
  MOE_CHECK_FIELD(w.num_frequent() >= 0 && w.num_frequent() <= w.num_experts(), "model.word_experts.num_frequent",
                  w.num_frequent(), "must be in [0, model.word_experts.num_experts = " << w.num_experts() << "]");
  MOE_CHECK_FIELD(w.placement() == proto::WordExpertConfig::PLACEMENT_INTERLEAVED ||
                      w.placement() == proto::WordExpertConfig::PLACEMENT_MULTIPLICATIVE,
                  "model.word_experts.placement", proto::WordExpertConfig::Placement_Name(w.placement()),
                  "must be PLACEMENT_INTERLEAVED or PLACEMENT_MULTIPLICATIVE (leave it out for the default)");
  const int R = w.routing_vocab_size();
  MOE_CHECK_FIELD(R >= 0 && R <= (1 << 24), "model.word_experts.routing_vocab_size", R, "must be in [0, 2^24]");
  MOE_CHECK_FIELD(R == 0 || !w.hash_routing(), "model.word_experts.routing_vocab_size", R,
                  "needs model.word_experts.hash_routing = false (hash routing ignores the routing vocabulary)");
  MOE_CHECK_FIELD(R == 0 || (w.routing_exact() >= 1 && w.routing_exact() <= R), "model.word_experts.routing_exact",
                  w.routing_exact(), "must be in [1, model.word_experts.routing_vocab_size = " << R << "]");
  MOE_CHECK_FIELD(w.skip_top() >= 0 && w.skip_top() <= w.num_frequent(), "model.word_experts.skip_top", w.skip_top(),
                  "must be in [0, model.word_experts.num_frequent = "
                      << w.num_frequent() << "] (the skipped routes are the most frequent ones, which have their own "
                                             "experts)");
  MOE_CHECK_FIELD(w.skip_top() == 0 || !w.hash_routing(), "model.word_experts.skip_top", w.skip_top(),
                  "must be 0 with hash routing (no frequency order to skip by)");
}

std::string device_name(proto::Device d) {
  return proto::Device_IsValid(d) ? proto::Device_Name(d) : std::to_string(static_cast<int>(d));
}

}  // namespace

void validate(const proto::ModelConfig& m) {
  MOE_CHECK_FIELD(m.vocab_size() >= 0, "model.vocab_size", m.vocab_size(), "must be >= 0 (0: from the tokenizer)");
  MOE_CHECK_FIELD(m.d_model() > 0, "model.d_model", m.d_model(), "must be > 0");
  MOE_CHECK_FIELD(m.n_layers() > 0, "model.n_layers", m.n_layers(), "must be > 0");
  MOE_CHECK_FIELD(m.n_heads() > 0, "model.n_heads", m.n_heads(), "must be > 0");
  MOE_CHECK_FIELD(m.n_kv_heads() > 0, "model.n_kv_heads", m.n_kv_heads(), "must be > 0");
  MOE_CHECK_FIELD(m.n_heads() % m.n_kv_heads() == 0, "model.n_heads", m.n_heads(),
                  "must be divisible by model.n_kv_heads = " << m.n_kv_heads());
  MOE_CHECK_FIELD(m.d_model() % m.n_heads() == 0, "model.d_model", m.d_model(),
                  "must be divisible by model.n_heads = " << m.n_heads());
  MOE_CHECK_FIELD((m.d_model() / m.n_heads()) % 2 == 0, "model.d_model", m.d_model(),
                  "head dim d_model / n_heads = " << m.d_model() / m.n_heads() << " must be even (rotary embedding)");
  MOE_CHECK_FIELD(m.d_ff() > 0, "model.d_ff", m.d_ff(), "must be > 0");
  MOE_CHECK_FIELD(m.max_seq_len() > 0, "model.max_seq_len", m.max_seq_len(), "must be > 0");
  MOE_CHECK_FIELD(m.norm_eps() > 0, "model.norm_eps", m.norm_eps(), "must be > 0");
  MOE_CHECK_FIELD(m.init_std() > 0, "model.init_std", m.init_std(), "must be > 0");
  MOE_CHECK_FIELD(proto::Device_IsValid(m.device()), "model.device", device_name(m.device()),
                  "must be DEVICE_CPU or DEVICE_CUDA");
  MOE_CHECK_FIELD(proto::MatmulPrecision_IsValid(m.matmul_precision()), "model.matmul_precision",
                  static_cast<int>(m.matmul_precision()), "must be MATMUL_FP32 or MATMUL_BF16");
  MOE_CHECK_FIELD(m.matmul_precision() != proto::MATMUL_BF16 || m.device() == proto::DEVICE_CUDA,
                  "model.matmul_precision", "MATMUL_BF16",
                  "needs model.device = DEVICE_CUDA (the CPU kernels compute in fp32 only)");
  if (has_layers_of(m, proto::FFN_MOE)) validate_moe(m.moe());
  if (has_layers_of(m, proto::FFN_WORD_EXPERT)) validate_word_experts(m.word_experts());
}

void validate(const proto::DataConfig& d, int max_seq_len, bool needs_data) {
  MOE_CHECK_FIELD(d.seq_len() > 0, "data.seq_len", d.seq_len(), "must be > 0");
  MOE_CHECK_FIELD(d.seq_len() <= max_seq_len, "data.seq_len", d.seq_len(),
                  "must be <= model.max_seq_len = " << max_seq_len);
  MOE_CHECK_FIELD(d.batch_size() > 0, "data.batch_size", d.batch_size(), "must be > 0");
  MOE_CHECK_FIELD(d.val_fraction() > 0 && d.val_fraction() < 1, "data.val_fraction", d.val_fraction(),
                  "must be in (0, 1)");
  MOE_CHECK_FIELD(d.tokenizer_vocab_size() >= 32, "data.tokenizer_vocab_size", d.tokenizer_vocab_size(),
                  "must be >= 32");
  MOE_CHECK_FIELD(d.tokenizer_type() == "bpe" || d.tokenizer_type() == "unigram", "data.tokenizer_type",
                  "'" << d.tokenizer_type() << "'", "must be \"bpe\" or \"unigram\"");
  if (!needs_data) return;
  MOE_CHECK_FIELD(!d.train_file().empty(), "data.train_file", "\"\"", "must name a text file");
  MOE_CHECK_FIELD(std::filesystem::is_regular_file(d.train_file()), "data.train_file", "'" << d.train_file() << "'",
                  "file not found");
  if (!d.tokenizer_model().empty())
    MOE_CHECK_FIELD(std::filesystem::is_regular_file(d.tokenizer_model()), "data.tokenizer_model",
                    "'" << d.tokenizer_model() << "'", "file not found");
}

void validate(const proto::OptimizerConfig& o) {
  MOE_CHECK_FIELD(o.lr() > 0, "optimizer.lr", o.lr(), "must be > 0");
  MOE_CHECK_FIELD(o.min_lr() >= 0 && o.min_lr() <= o.lr(), "optimizer.min_lr", o.min_lr(),
                  "must be in [0, optimizer.lr]");
  MOE_CHECK_FIELD(o.beta1() > 0 && o.beta1() < 1, "optimizer.beta1", o.beta1(), "must be in (0, 1)");
  MOE_CHECK_FIELD(o.beta2() > 0 && o.beta2() < 1, "optimizer.beta2", o.beta2(), "must be in (0, 1)");
  MOE_CHECK_FIELD(o.eps() > 0, "optimizer.eps", o.eps(), "must be > 0");
  MOE_CHECK_FIELD(o.weight_decay() >= 0, "optimizer.weight_decay", o.weight_decay(), "must be >= 0");
  MOE_CHECK_FIELD(o.grad_clip() >= 0, "optimizer.grad_clip", o.grad_clip(), "must be >= 0");
  MOE_CHECK_FIELD(o.warmup_steps() >= 0, "optimizer.warmup_steps", o.warmup_steps(), "must be >= 0");
}

// whether `path` is `dir` or lies below it (lexically, after resolving what exists of both)
bool path_within(const std::string& path, const std::string& dir) {
  const auto p = std::filesystem::weakly_canonical(path), d = std::filesystem::weakly_canonical(dir);
  return std::mismatch(d.begin(), d.end(), p.begin(), p.end()).first == d.end();
}

void validate(const proto::TrainConfig& t) {
  MOE_CHECK_FIELD(t.steps() > 0, "train.steps", t.steps(), "must be > 0");
  // the run's saves would replace the root's `latest` and rotate the source checkpoint away (checkpoint.keep_last)
  const std::string own = t.out_dir() + "/checkpoints";
  MOE_CHECK_FIELD(t.init_from().empty() || !path_within(t.init_from(), own), "train.init_from",
                  "'" << t.init_from() << "'",
                  "lies inside this run's own checkpoints (train.out_dir/checkpoints = '"
                      << own << "'): start from a checkpoint outside it or set another train.out_dir");
  MOE_CHECK_FIELD(t.log_every() > 0, "train.log_every", t.log_every(), "must be > 0");
  MOE_CHECK_FIELD(t.eval_every() >= 0, "train.eval_every", t.eval_every(), "must be >= 0");
  MOE_CHECK_FIELD(t.eval_batches() > 0, "train.eval_batches", t.eval_batches(), "must be > 0");
  MOE_CHECK_FIELD(t.threads() >= 0, "train.threads", t.threads(), "must be >= 0");
  MOE_CHECK_FIELD(t.micro_batch_size() >= 0, "train.micro_batch_size", t.micro_batch_size(), "must be >= 0");
}

void validate(const proto::ParallelConfig& p, const proto::ModelConfig& m) {
  const int ep = p.expert_parallel();
  MOE_CHECK_FIELD(ep > 0, "parallel.expert_parallel", ep, "must be > 0");
  if (has_layers_of(m, proto::FFN_MOE)) {
    const int E = m.moe().num_experts();
    MOE_CHECK_FIELD(ep <= E, "parallel.expert_parallel", ep,
                    "more expert-parallel ranks than experts (model.moe.num_experts = " << E << ")");
    MOE_CHECK_FIELD(E % ep == 0, "model.moe.num_experts", E, "must be divisible by parallel.expert_parallel = " << ep);
  }
  if (has_layers_of(m, proto::FFN_WORD_EXPERT)) {
    const int E = m.word_experts().num_experts();
    MOE_CHECK_FIELD(ep <= E, "parallel.expert_parallel", ep,
                    "more expert-parallel ranks than word experts (" << E << ")");
    MOE_CHECK_FIELD(E % ep == 0, "model.word_experts.num_experts", E,
                    "must be divisible by parallel.expert_parallel = " << ep);
  }
  MOE_CHECK_FIELD(p.collective_timeout_s() > 0, "parallel.collective_timeout_s", p.collective_timeout_s(),
                  "must be > 0");
  MOE_CHECK_FIELD(p.communicator() == "mpi" || p.communicator() == "nccl", "parallel.communicator",
                  "'" << p.communicator() << "'", "must be \"mpi\" or \"nccl\"");
  // whether a GPU is actually there is the backend's check at run time
  MOE_CHECK_FIELD(p.communicator() != "nccl" || m.device() == proto::DEVICE_CUDA, "parallel.communicator",
                  "'" << p.communicator() << "'",
                  "needs model.device = DEVICE_CUDA (model.device is " << device_name(m.device()) << ")");
}

void validate(const proto::CheckpointConfig& c) {
  MOE_CHECK_FIELD(c.every() >= 0, "checkpoint.every", c.every(), "must be >= 0");
  MOE_CHECK_FIELD(c.keep_last() >= 0, "checkpoint.keep_last", c.keep_last(), "must be >= 0");
}

void validate(const proto::GenerateConfig& g) {
  MOE_CHECK_FIELD(g.temperature() >= 0, "generate.temperature", g.temperature(), "must be >= 0");
  MOE_CHECK_FIELD(g.top_k() >= 0, "generate.top_k", g.top_k(), "must be >= 0");
  MOE_CHECK_FIELD(g.max_new_tokens() > 0, "generate.max_new_tokens", g.max_new_tokens(), "must be > 0");
}

void validate(const proto::ServingConfig& s) {
  MOE_CHECK_FIELD(!s.host().empty(), "serving.host", "\"\"", "must name an address (e.g. 127.0.0.1 or 0.0.0.0)");
  MOE_CHECK_FIELD(s.port() >= 0 && s.port() <= 65535, "serving.port", s.port(), "must be in [0, 65535]");
  MOE_CHECK_FIELD(s.max_batch_tokens() > 0, "serving.max_batch_tokens", s.max_batch_tokens(), "must be > 0");
  MOE_CHECK_FIELD(s.max_running() > 0, "serving.max_running", s.max_running(), "must be > 0");
  MOE_CHECK_FIELD(s.max_queue() > 0, "serving.max_queue", s.max_queue(), "must be > 0");
  MOE_CHECK_FIELD(s.kv_block_size() > 0, "serving.kv_block_size", s.kv_block_size(), "must be > 0");
  MOE_CHECK_FIELD(s.kv_cache_bytes() > 0, "serving.kv_cache_bytes", s.kv_cache_bytes(), "must be > 0");
  MOE_CHECK_FIELD(s.max_connections() > 0, "serving.max_connections", s.max_connections(), "must be > 0");
  MOE_CHECK_FIELD(s.max_body_bytes() > 0, "serving.max_body_bytes", s.max_body_bytes(), "must be > 0");
  MOE_CHECK_FIELD(s.drain_timeout_s() >= 0, "serving.drain_timeout_s", s.drain_timeout_s(), "must be >= 0");
  MOE_CHECK_FIELD(s.request_timeout_s() > 0, "serving.request_timeout_s", s.request_timeout_s(), "must be > 0");
  MOE_CHECK_FIELD(s.idle_timeout_s() > 0, "serving.idle_timeout_s", s.idle_timeout_s(), "must be > 0");
  MOE_CHECK_FIELD(s.sparq_r() >= 0, "serving.sparq_r", s.sparq_r(), "must be >= 0 (0: full attention)");
  MOE_CHECK_FIELD(s.sparq_k() >= 0, "serving.sparq_k", s.sparq_k(), "must be >= 0 (0: full attention)");
  MOE_CHECK_FIELD((s.sparq_r() == 0) == (s.sparq_k() == 0), "serving.sparq_k", s.sparq_k(),
                  "serving.sparq_r and serving.sparq_k are set together (both 0: full attention)");
}

void validate_config(const Config& cfg, bool needs_data) {
  validate(cfg.model());
  validate(cfg.data(), cfg.model().max_seq_len(), needs_data);
  validate(cfg.optimizer());
  validate(cfg.train());
  validate(cfg.parallel(), cfg.model());
  validate(cfg.checkpoint());
  validate(cfg.generate());
  validate(cfg.serving());
}

std::string config_to_text(const google::protobuf::Message& cfg) {
  std::string out;
  google::protobuf::TextFormat::PrintToString(cfg, &out);
  return out;
}

proto::FfnKind layer_ffn_kind(const proto::ModelConfig& m, int layer) {
  if (m.ffn_pattern_size() == 0) return proto::FFN_DENSE;
  return m.ffn_pattern(layer % m.ffn_pattern_size());
}

}  // namespace moe
