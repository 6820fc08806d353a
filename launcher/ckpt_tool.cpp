// `moe ckpt`: checkpoint utilities that run without mpirun (inspect, verify, reshard, convert). See kCkptUsage.
// Every command reads (and checksum-verifies) the source completely and validates the result against its config
// before anything is written; outputs are written atomically (ckpt::save: tmp dir + fsync + rename; safetensors:
// tmp file + rename), so a failed command leaves no partial output and never modifies the source.
#include "launcher/ckpt_tool.h"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "checkpoints/convert.h"
#include "checkpoints/hf.h"
#include "checkpoints/model_layout.h"
#include "checkpoints/naming.h"
#include "checkpoints/safetensors.h"
#include "core/config.h"
#include "core/error.h"

namespace fs = std::filesystem;

namespace moe::launcher {
namespace {

const char* kCkptUsage =
    "usage: moe ckpt <command> ...   (DIR: a step_<N> checkpoint directory or a checkpoint root with `latest`)\n"
    "  inspect DIR   step, format version, parallel layout at save time, model summary and every tensor\n"
    "                (name, shape, dtype, bytes, sharding, crc32c)\n"
    "  verify  DIR   re-read every dataset and recompute its CRC-32C (each shard of an expert tensor, then its\n"
    "                virtual dataset in model.h5), check the parameter shapes against the model config; prints\n"
    "                one OK line per tensor, exits 1 naming the file, tensor and shard otherwise\n"
    "  reshard DIR --ep M --out OUT\n"
    "                copy for expert-parallel size M: the expert tensors are rewritten as M shard files\n"
    "                (experts_<r>.h5, rank r's rows), M must divide every expert count; records\n"
    "                parallel.expert_parallel = M and world size M; resume it with --set parallel.expert_parallel=M\n"
    "  convert DIR --out OUT [--to-gqa G] [--upcycle E] [--dtype bf16|f32] [--seed S] [--set path=value ...]\n"
    "  convert DIR --to-safetensors FILE [--to-gqa G] [--upcycle E] [--dtype bf16|f32]\n"
    "  convert DIR --to-hf OUT_DIR [--max-shard-size BYTES] [--to-gqa G] [--upcycle E] [--dtype bf16|f32]\n"
    "  convert --from-safetensors FILE [--config CFG.pbtxt] [--tokenizer SPM.model] --out OUT [--dtype ...]\n"
    "  convert --from-hf DIR --out OUT [--dtype ...] [--set path=value ...]\n"
    "                write a NEW checkpoint (the source is never modified; OUT must not exist, be empty, or be a\n"
    "                checkpoint root without the same step; FILE must not exist):\n"
    "    --to-gqa G       multi-head (or any n_kv_heads divisible by G) -> grouped-query attention with G kv heads:\n"
    "                     each group of n_kv_heads/G consecutive key and value heads of wk/wv is mean-pooled\n"
    "                     (GQA uptraining, Ainslie et al. 2023); needs n_heads % G == 0; sets model.n_kv_heads = G\n"
    "    --upcycle E      every dense FFN layer -> MoE layer with E experts, each a copy of the dense FFN (sparse\n"
    "                     upcycling, Komatsuzaki et al. 2022); router weight [E, d_model] ~ N(0, 0.01^2) seeded by\n"
    "                     --seed (default 0); sets ffn_pattern FFN_MOE for those layers, moe.num_experts = E,\n"
    "                     moe.d_expert = d_ff, moe.top_k = 2 (or kept; at most E) and moe.dropless = true, so the\n"
    "                     converted model computes exactly the dense function (renormalised top-k gates sum to 1)\n"
    "    --dtype bf16|f32 cast the parameters (round to nearest even); optimizer moments stay f32\n"
    "    --set path=value config override applied to the output config (e.g. data.train_file=...)\n"
    "                     --to-gqa and --upcycle drop the optimizer state (its shapes no longer match): the result\n"
    "                     is for eval/generate or a new run from it: moe train --set train.init_from=OUT\n"
    "    --to-safetensors FILE   export the parameters instead of writing a checkpoint. Name mapping: the\n"
    "                     checkpoint dataset params/<name> becomes the safetensors tensor <name> (e.g.\n"
    "                     params/layers.0.attn.wq -> layers.0.attn.wq, params/tok_emb.weight -> tok_emb.weight);\n"
    "                     word-expert routing tables routing/<prefix> keep their name (I32), and so do the learned\n"
    "                     routers' load-balancing biases expert_bias/<prefix> (F32, model.moe.bias_balancing).\n"
    "                     Expert tensors keep their global shape [E, ...]. dtypes F32/BF16/I32. __metadata__:\n"
    "                     format=pt, moe.step, moe.config\n"
    "                     (the full run config, protobuf text)\n"
    "    --to-hf OUT_DIR  export a directory that transformers' AutoModelForCausalLM.from_pretrained loads (no\n"
    "                     custom code): dense models as llama, MoE models (every layer MoE) as mixtral; config.json,\n"
    "                     model.safetensors (sharded with an index past --max-shard-size, default 2 GiB),\n"
    "                     tokenizer.model and\n"
    "                     tokenizer_config.json. Word-expert layers, GELU, LayerNorm, mixed dense/MoE layers, sigmoid\n"
    "                     routers and un-normalised top-k gates are refused naming the layer and the reason\n"
    "                     (checkpoints/hf.h has the name mapping)\n"
    "    --from-hf DIR    import a transformers llama / mixtral directory (config.json, model.safetensors or its\n"
    "                     index + shards, tokenizer.model: SentencePiece only) as a step-0 checkpoint without\n"
    "                     optimizer state; the model comes from config.json, data/optimizer/train get placeholders\n"
    "                     (data.seq_len = max_position_embeddings, batch 8, lr 3e-4, 1000 steps) to set with --set\n"
    "    --from-safetensors FILE the inverse: a step-0 checkpoint without optimizer state from FILE and the config\n"
    "                     (--config, else the file's moe.config metadata; defaults filled and validated; every\n"
    "                     parameter the model expects must be present with its shape); the tokenizer comes from\n"
    "                     --tokenizer or data.tokenizer_model\n";

// ---------------------------------------------------------------------------------------------- argument parsing

struct Opts {
  std::string dir;
  std::map<std::string, std::string> kv;
  std::vector<std::string> sets;
  bool has(const std::string& k) const { return kv.count(k) > 0; }
  std::string get(const std::string& k) const {
    auto it = kv.find(k);
    return it == kv.end() ? std::string() : it->second;
  }
};

Opts parse_opts(const std::string& cmd, int argc, char** argv, const std::set<std::string>& allowed) {
  Opts o;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--", 0) == 0) {
      MOE_CHECK(allowed.count(a), "moe ckpt " << cmd << ": unknown option '" << a << "'\n" << kCkptUsage);
      MOE_CHECK(i + 1 < argc, "moe ckpt " << cmd << ": option " << a << " needs a value");
      const std::string v = argv[++i];
      if (a == "--set") {
        o.sets.push_back(v);
      } else {
        MOE_CHECK(!o.kv.count(a), "moe ckpt " << cmd << ": option " << a << " given twice");
        o.kv[a] = v;
      }
    } else {
      MOE_CHECK(o.dir.empty(), "moe ckpt " << cmd << ": unexpected argument '" << a << "'\n" << kCkptUsage);
      o.dir = a;
    }
  }
  return o;
}

int parse_int(const std::string& opt, const std::string& v, int min_value) {
  size_t pos = 0;
  long long n = 0;
  try {
    n = std::stoll(v, &pos);
  } catch (...) {
    pos = 0;
  }
  MOE_CHECK(pos == v.size() && !v.empty(), "moe ckpt: " << opt << " '" << v << "' is not an integer");
  MOE_CHECK(n >= min_value && n <= 1 << 30, "moe ckpt: " << opt << " " << n << " must be >= " << min_value);
  return static_cast<int>(n);
}

// ---------------------------------------------------------------------------------------------- helpers

std::string sharding_of(const proto::TensorEntry& e, bool sharded) {
  if (!sharded) return "replicated";
  return e.shards_size() ? "experts/" + std::to_string(e.shards_size()) : "experts";  // v1: one global dataset
}

Shape entry_shape(const proto::TensorEntry& e) { return Shape(e.shape().begin(), e.shape().end()); }

// The routing tables stored in a checkpoint (replicated, read whole and verified).
ckpt::RoutingTables read_routing(ckpt::Reader& reader, const proto::Manifest& m) {
  ckpt::RoutingTables out;
  for (const auto& e : m.tensors()) {
    const ckpt::ParsedKey k = ckpt::parse_key(e.name());
    if (!k.is_routing() || e.dtype() != "i32") continue;
    Tensor t = Tensor::empty(entry_shape(e), DType::kI32);
    reader.read(e.name(), t);
    out[k.name].assign(t.i32(), t.i32() + t.numel());
  }
  return out;
}

// Sharding of every tensor of a checkpoint (format 1: from the model of its config; a config that does not build
// leaves them all replicated here, verify reports it).
std::map<std::string, bool> sharding_of_checkpoint(const std::string& dir, const proto::Manifest& m) {
  if (m.format_version() >= 2) return ckpt::manifest_sharding(m, {});
  try {
    ckpt::Reader reader(dir, m);
    return ckpt::manifest_sharding(m, read_routing(reader, m));
  } catch (const Error&) {
    return {};
  }
}

// OUT must be absent, an empty directory, or a checkpoint root (with `latest`) that has no step_<step> yet; and it
// must not be (or contain as step_<step>) the source.
void check_out_root(const std::string& out, int64_t step, const std::string& src_dir) {
  MOE_CHECK(!out.empty(), "moe ckpt: --out OUT is required (the source is never modified)");
  const std::string step_dir = out + "/step_" + std::to_string(step);
  if (fs::exists(out)) {
    MOE_CHECK(fs::is_directory(out), "moe ckpt: --out '" << out << "' exists and is not a directory");
    const bool root = fs::is_regular_file(out + "/latest");
    MOE_CHECK(fs::is_empty(out) || root, "moe ckpt: --out '" << out << "' exists and is not empty (nor a checkpoint"
                                                             << " root with `latest`); refusing to overwrite it");
    MOE_CHECK(!fs::exists(step_dir), "moe ckpt: '" << step_dir << "' already exists; refusing to overwrite it");
  }
  if (!src_dir.empty()) {
    const auto a = fs::weakly_canonical(src_dir), b = fs::weakly_canonical(out);
    MOE_CHECK(a != b && a != fs::weakly_canonical(step_dir),
              "moe ckpt: --out '" << out << "' must differ from the source checkpoint " << src_dir);
  }
}

// ---------------------------------------------------------------------------------------------- commands

int inspect(const std::string& path) {
  const std::string dir = ckpt::resolve(path);
  const proto::Manifest m = ckpt::read_manifest(dir);
  const auto& mc = m.config().model();
  std::printf("checkpoint %s\n", dir.c_str());
  std::printf("format version %u | step %lld | saved on %d rank(s), expert parallel %d | optimizer step %lld\n",
              m.format_version(), static_cast<long long>(m.step()), m.world_size(), m.expert_parallel(),
              static_cast<long long>(m.optimizer_t()));
  std::printf("model: vocab %d, d_model %d, %d layers, heads %d/%d (q/kv), d_ff %d, %s, %s%s, ffn pattern [",
              mc.vocab_size(), mc.d_model(), mc.n_layers(), mc.n_heads(), mc.n_kv_heads(), mc.d_ff(),
              proto::Activation_Name(mc.activation()).c_str(), proto::NormKind_Name(mc.norm()).c_str(),
              mc.tie_embeddings() ? ", tied embeddings" : "");
  bool any_moe = false, any_word = false;
  for (int i = 0; i < mc.ffn_pattern_size(); ++i) {
    std::printf("%s%s", i ? ", " : "", proto::FfnKind_Name(mc.ffn_pattern(i)).c_str());
    any_moe |= mc.ffn_pattern(i) == proto::FFN_MOE;
    any_word |= mc.ffn_pattern(i) == proto::FFN_WORD_EXPERT;
  }
  std::printf("%s]\n", mc.ffn_pattern_size() ? "" : "all FFN_DENSE");
  if (any_moe)
    std::printf("moe: %d experts, top-%d, d_expert %d, %s, capacity factor %g%s%s\n", mc.moe().num_experts(),
                mc.moe().top_k(), mc.moe().d_expert(), proto::RouterScore_Name(mc.moe().score()).c_str(),
                mc.moe().capacity_factor(), mc.moe().dropless() ? " (dropless)" : "",
                mc.moe().bias_balancing() ? ", bias balancing" : "");
  if (any_word) {
    const proto::WordExpertConfig& w = mc.word_experts();
    std::string routing = w.hash_routing() ? "hash routing" : "token-id routing";
    if (w.routing_vocab_size() > 0)
      routing = "routing vocabulary of " + std::to_string(w.routing_vocab_size()) + " ids (" +
                std::to_string(w.routing_exact()) + " exact)";
    std::printf("word experts: %d experts, d_expert %d, %d frequent, %s, skip top %d%s%s\n", w.num_experts(),
                w.d_expert(), w.num_frequent(), routing.c_str(), w.skip_top(), w.share_table() ? ", one shared table" : "",
                w.freeze() ? ", frozen" : "");
  }
  std::printf("tokenizer: %s\n", m.tokenizer_file().empty() ? "(none)" : m.tokenizer_file().c_str());
  std::map<std::string, bool> is_sharded = sharding_of_checkpoint(dir, m);
  std::printf("%-52s %-18s %-5s %12s %-10s %10s\n", "tensor", "shape", "dtype", "bytes", "sharding", "crc32c");
  uint64_t total = 0;
  for (const auto& e : m.tensors()) {
    const Shape shape = entry_shape(e);
    const uint64_t bytes = static_cast<uint64_t>(shape_numel(shape)) * dtype_size(dtype_from_name(e.dtype()));
    total += bytes;
    std::printf("%-52s %-18s %-5s %12llu %-10s %10u\n", e.name().c_str(), shape_str(shape).c_str(), e.dtype().c_str(),
                static_cast<unsigned long long>(bytes), sharding_of(e, is_sharded[e.name()]).c_str(), e.crc32c());
  }
  std::printf("%d tensors, %.1f MiB\n", m.tensors_size(), total / 1048576.0);
  // the files: model.h5 (replicated + virtual datasets) and the expert shard files with their rows
  std::map<std::string, std::pair<int64_t, int64_t>> shard_rows;  // file -> rows of the first expert tensor
  int sharded = 0;
  for (const auto& e : m.tensors()) {
    if (!e.shards_size()) continue;
    if (!sharded++)
      for (const auto& sh : e.shards()) shard_rows[sh.file()] = {sh.row_offset(), sh.rows()};
  }
  if (sharded) {
    std::printf("files: model.h5 (replicated tensors, and a virtual dataset per expert tensor over the shards)");
    for (const auto& [file, rows] : shard_rows)
      std::printf(", %s (expert rows %lld..%lld)", file.c_str(), static_cast<long long>(rows.first),
                  static_cast<long long>(rows.first + rows.second - 1));
    std::printf("\n");
  } else {
    std::printf("files: model.h5\n");
  }
  return 0;
}

int verify(const std::string& path) {
  const std::string dir = ckpt::resolve(path);
  const proto::Manifest m = ckpt::read_manifest(dir);
  ckpt::Reader reader(dir, m);  // throws naming model.h5 if it is missing or not readable HDF5 (truncated)
  std::vector<std::string> problems;
  std::map<std::string, Shape> param_shapes;                // manifest shapes (checked against the datasets)
  std::map<std::string, std::vector<int32_t>> routing;     // word-expert tables (needed to build the model)
  for (const auto& e : m.tensors()) {
    if (e.shards_size()) {
      // an expert-sharded tensor: every shard against its own checksum, then the virtual dataset (what h5py sees)
      bool all_ok = true;
      for (int s = 0; s < e.shards_size(); ++s) {
        try {
          Shape ss = entry_shape(e);
          ss[0] = e.shards(s).rows();
          Tensor t = Tensor::empty(ss, dtype_from_name(e.dtype()));
          reader.read_shard(e.name(), s, t);  // throws naming the file, tensor and shard
        } catch (const Error& err) {
          std::printf("FAIL %s\n", err.what());
          problems.push_back(err.what());
          all_ok = false;
        }
      }
      if (all_ok) {
        try {
          reader.check_virtual(e.name());
          std::printf("OK   %-52s %-18s crc32c %u (%d shards + virtual dataset)\n", e.name().c_str(),
                      shape_str(entry_shape(e)).c_str(), e.crc32c(), e.shards_size());
        } catch (const Error& err) {
          std::printf("FAIL %s\n", err.what());
          problems.push_back(err.what());
        }
      }
    } else {
      try {
        Tensor t = Tensor::empty(entry_shape(e), dtype_from_name(e.dtype()));
        reader.read(e.name(), t);  // throws naming the file and tensor on a checksum, shape or read error
        std::printf("OK   %-52s %-18s crc32c %u\n", e.name().c_str(), shape_str(t.shape()).c_str(), e.crc32c());
        if (ckpt::is_routing_key(e.name()) && t.dtype() == DType::kI32)
          routing[ckpt::parse_key(e.name()).name].assign(t.i32(), t.i32() + t.numel());
      } catch (const Error& err) {
        std::printf("FAIL %s\n", err.what());
        problems.push_back(err.what());
      }
    }
    if (ckpt::is_param_key(e.name())) param_shapes[ckpt::parse_key(e.name()).name] = entry_shape(e);
  }
  for (const std::string& p : ckpt::param_problems(m.config(), param_shapes, routing, dir + "/manifest.pb")) {
    std::printf("FAIL %s\n", p.c_str());
    problems.push_back(p);
  }
  if (!m.tokenizer_file().empty() && !fs::is_regular_file(dir + "/" + m.tokenizer_file())) {
    problems.push_back("checkpoint " + dir + ": tokenizer file " + m.tokenizer_file() + " is missing");
    std::printf("FAIL %s\n", problems.back().c_str());
  }
  if (!problems.empty()) {
    std::ostringstream o;
    o << "verify failed: " << problems.size() << " problem(s) in " << dir << "; first: " << problems[0];
    MOE_THROW(o.str());
  }
  std::printf("OK: %d tensors in %s match their checksums and the model config\n", m.tensors_size(), dir.c_str());
  return 0;
}

int reshard(const Opts& o) {
  MOE_CHECK(!o.dir.empty(), "moe ckpt reshard: missing checkpoint directory\n" << kCkptUsage);
  MOE_CHECK(o.has("--ep"), "moe ckpt reshard: --ep M is required");
  const int ep = parse_int("--ep", o.get("--ep"), 1);
  const std::string out = o.get("--out");
  const std::string dir = ckpt::resolve(o.dir);
  const proto::Manifest m = ckpt::read_manifest(dir);
  Config cfg = m.config();
  cfg.mutable_parallel()->set_expert_parallel(ep);
  fill_defaults(cfg);
  validate_config(cfg, /*needs_data=*/false);  // names model.moe.num_experts / word_experts when ep does not divide
  check_out_root(out, m.step(), dir);
  const ckpt::CheckpointValue c = ckpt::reshard(ckpt::load_all(o.dir), ep);  // every tensor verified on the way
  std::printf("resharded %s for expert_parallel %d -> %s\n", dir.c_str(), ep, ckpt::write(out, c, ep).c_str());
  return 0;
}

// --from-safetensors FILE [--config CFG] [--tokenizer SPM]: a step-0 checkpoint value, every parameter present
ckpt::CheckpointValue safetensors_source(const Opts& o) {
  MOE_CHECK(o.dir.empty(), "moe ckpt convert --from-safetensors: unexpected checkpoint directory '" << o.dir << "'");
  const std::string st_path = o.get("--from-safetensors");
  const ckpt::SafetensorsFile st = ckpt::read_safetensors(st_path);
  Config cfg;
  if (o.has("--config")) {
    cfg = load_config_file(o.get("--config"));
  } else {
    auto it = st.metadata.find("moe.config");
    MOE_CHECK(it != st.metadata.end(), "moe ckpt convert --from-safetensors: --config CFG.pbtxt is required ("
                                           << st_path << " has no moe.config metadata)");
    cfg = parse_config_text(it->second, st_path + " (__metadata__ moe.config)");
  }
  for (const auto& s : o.sets) apply_override(cfg, s);
  ckpt::CheckpointValue c = ckpt::from_safetensors(st, cfg, st_path);
  std::string tok_path = o.get("--tokenizer");
  if (tok_path.empty()) tok_path = c.config().data().tokenizer_model();
  if (!tok_path.empty()) {
    MOE_CHECK(fs::is_regular_file(tok_path), "moe ckpt convert: tokenizer '" << tok_path << "' does not exist");
    c.tokenizer = ckpt::read_file(tok_path);
    c.has_tokenizer = true;
  } else {
    std::printf("note: no tokenizer (--tokenizer or data.tokenizer_model): eval/generate need one\n");
  }
  ckpt::require_consistent(c.config(), c.tensors, "safetensors file " + st_path);  // before any conversion
  return c;
}

// --from-hf DIR: a transformers llama / mixtral directory as a step-0 checkpoint value (--set applies to its config)
ckpt::CheckpointValue hf_source(const Opts& o) {
  MOE_CHECK(o.dir.empty(), "moe ckpt convert --from-hf: unexpected checkpoint directory '" << o.dir << "'");
  const std::string dir = o.get("--from-hf");
  ckpt::CheckpointValue c = ckpt::from_hf(ckpt::read_hf(dir), dir);
  for (const auto& s : o.sets) apply_override(c.mutable_config(), s);
  fill_defaults(c.mutable_config());
  validate_config(c.config(), false);
  return c;
}

// The converted value to its destination: --to-safetensors FILE, --to-hf DIR or a checkpoint under --out OUT.
int write_output(const Opts& o, const ckpt::CheckpointValue& c, bool from_st) {
  if (o.has("--to-safetensors")) {
    const std::string f = o.get("--to-safetensors");
    const ckpt::SafetensorsFile st = ckpt::to_safetensors(c);
    ckpt::write_safetensors(f, st.tensors, st.metadata);
    std::printf("exported %zu tensors of %s -> %s\n", st.tensors.size(), c.source.c_str(), f.c_str());
    return 0;
  }
  if (o.has("--to-hf")) {
    const ckpt::HfModel hf = ckpt::to_hf(c);
    const int64_t shard = o.has("--max-shard-size") ? parse_int("--max-shard-size", o.get("--max-shard-size"), 1)
                                                    : int64_t(2) << 30;
    ckpt::write_hf(o.get("--to-hf"), hf, shard);
    std::printf("exported %s as a transformers model (%zu tensors) -> %s\n", c.source.c_str(), hf.tensors.size(),
                o.get("--to-hf").c_str());
    return 0;
  }
  const std::string out = o.get("--out");
  if (from_st) check_out_root(out, 0, "");
  const int ws = c.manifest.world_size() > 0 ? c.manifest.world_size() : 1;
  std::printf("converted %s -> %s\n", c.source.c_str(), ckpt::write(out, c, ws).c_str());
  return 0;
}

int convert(const Opts& o) {
  const bool from_st = o.has("--from-safetensors"), to_st = o.has("--to-safetensors"), to_hf = o.has("--to-hf");
  const bool from_hf = o.has("--from-hf");
  MOE_CHECK(!(from_st && from_hf), "moe ckpt convert: --from-safetensors and --from-hf exclude each other");
  const std::string out = o.get("--out");
  MOE_CHECK(!(from_st && to_st), "moe ckpt convert: --from-safetensors and --to-safetensors exclude each other");
  MOE_CHECK(int(to_st) + int(to_hf) + int(!out.empty()) == 1,
            "moe ckpt convert: give exactly one of --out OUT, --to-safetensors FILE and --to-hf DIR");
  MOE_CHECK(from_st || !o.has("--config"), "moe ckpt convert: --config is only for --from-safetensors");
  MOE_CHECK(from_st || !o.has("--tokenizer"), "moe ckpt convert: --tokenizer is only for --from-safetensors");
  const int gqa = o.has("--to-gqa") ? parse_int("--to-gqa", o.get("--to-gqa"), 1) : 0;
  const int upcycle = o.has("--upcycle") ? parse_int("--upcycle", o.get("--upcycle"), 1) : 0;
  const uint64_t seed = o.has("--seed") ? static_cast<uint64_t>(parse_int("--seed", o.get("--seed"), 0)) : 0;
  std::string dtype_opt = o.get("--dtype");
  MOE_CHECK(dtype_opt.empty() || dtype_opt == "bf16" || dtype_opt == "f32",
            "moe ckpt convert: --dtype '" << dtype_opt << "' (bf16 or f32 expected)");

  ckpt::CheckpointValue c;
  std::string where;
  if (from_st || from_hf) {
    c = from_st ? safetensors_source(o) : hf_source(o);
    where = (from_st ? "safetensors file " : "transformers model ") + c.source;
  } else {
    MOE_CHECK(!o.dir.empty(), "moe ckpt convert: missing checkpoint directory\n" << kCkptUsage);
    c = ckpt::load_all(o.dir);
    where = "checkpoint " + c.source;
    for (const auto& s : o.sets) apply_override(c.mutable_config(), s);
    fill_defaults(c.mutable_config());
    if (!out.empty()) check_out_root(out, c.manifest.step(), c.source);  // fail early, before the conversions
  }
  if (to_st) {
    const std::string f = o.get("--to-safetensors");
    MOE_CHECK(!fs::exists(f), "moe ckpt convert: '" << f << "' already exists; refusing to overwrite it");
  }
  if (to_hf) {
    const std::string d = o.get("--to-hf");
    MOE_CHECK(!fs::exists(d) || (fs::is_directory(d) && fs::is_empty(d)),
              "moe ckpt convert: --to-hf '" << d << "' exists and is not an empty directory; refusing to overwrite it");
  }

  // parameters stay in their stored dtype unless --dtype is given (new tensors follow the parameters' dtype)
  DType param_dtype = DType::kF32;
  for (const auto& t : c.tensors)
    if (ckpt::is_param_key(t.name) && t.tensor.dtype() == DType::kBF16) param_dtype = DType::kBF16;
  if (!dtype_opt.empty()) param_dtype = dtype_from_name(dtype_opt);

  bool drop_optimizer = from_st || from_hf;
  if (upcycle) {
    std::vector<std::string> notes;
    c = ckpt::upcycle(std::move(c), upcycle, seed, where, &notes);
    for (const std::string& n : notes) std::printf("%s\n", n.c_str());
    drop_optimizer = true;
  }
  if (gqa) {
    c = ckpt::to_gqa(std::move(c), gqa, where);
    drop_optimizer = true;
  }
  c = ckpt::cast(std::move(c), param_dtype);
  if (drop_optimizer) c = ckpt::drop_optimizer(std::move(c));
  c = ckpt::finalize(std::move(c), where);

  return write_output(o, c, from_st || from_hf);
}

}  // namespace

int ckpt_tool_main(int argc, char** argv) {
  const std::string cmd = argc >= 2 ? argv[1] : "";
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::printf("%s", kCkptUsage);
    return 0;
  }
  for (int i = 2; i < argc; ++i)
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::printf("%s", kCkptUsage);
      return 0;
    }
  MOE_CHECK(!cmd.empty(), "moe ckpt: missing command\n" << kCkptUsage);
  if (cmd == "inspect" || cmd == "verify") {
    const Opts o = parse_opts(cmd, argc, argv, {});
    MOE_CHECK(!o.dir.empty(), "moe ckpt " << cmd << ": missing checkpoint directory\n" << kCkptUsage);
    return cmd == "inspect" ? inspect(o.dir) : verify(o.dir);
  }
  if (cmd == "reshard") return reshard(parse_opts(cmd, argc, argv, {"--ep", "--out"}));
  if (cmd == "convert")
    return convert(parse_opts(cmd, argc, argv,
                              {"--out", "--to-safetensors", "--to-hf", "--max-shard-size", "--from-hf", "--from-safetensors", "--config", "--tokenizer", "--set",
                               "--to-gqa", "--upcycle", "--dtype", "--seed"}));
  MOE_THROW("moe ckpt: unknown command '" << cmd << "'\n" << kCkptUsage);
}

}  // namespace moe::launcher
