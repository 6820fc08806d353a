// `moe ckpt`: checkpoint utilities that run without mpirun.
//   inspect DIR   step, format, parallel layout at save time, model summary, and every tensor (shape, dtype, bytes,
//                 sharding, crc32c)
//   verify DIR    re-reads every dataset and recomputes its checksum; names the file and tensor of any mismatch,
//                 truncation or shape error and exits non-zero
//   reshard DIR --ep M --out ROOT
//                 a copy for expert-parallel size M: expert tensors are stored with their global shape, so resharding
//                 checks that M divides every expert count and rewrites the layout in the manifest (atomically)
#include "launcher/ckpt_tool.h"

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include <filesystem>

#include "checkpoints/checkpoint.h"
#include "core/config.h"
#include "core/error.h"

namespace moe::launcher {
namespace {

const char* kCkptUsage =
    "usage: moe ckpt <command> DIR\n"
    "  inspect DIR   summary and tensor table of a checkpoint (a step_<N> directory or a root with `latest`)\n"
    "  verify  DIR   recompute every tensor's CRC-32C; exit 1 naming the file and tensor on any mismatch\n"
    "  reshard DIR --ep M --out ROOT   copy for expert-parallel size M (resume it with parallel.expert_parallel=M)\n";

std::string sharding_of(const std::string& name) {
  return name.find(".ffn.experts.") != std::string::npos ? "experts (global rows)" : "replicated";
}

int inspect(const std::string& path) {
  const std::string dir = ckpt::resolve(path);
  const proto::Manifest m = ckpt::read_manifest(dir);
  const auto& mc = m.config().model();
  std::printf("checkpoint %s\n", dir.c_str());
  std::printf("format version %u | step %lld | saved on %d rank(s), expert parallel %d | optimizer step %lld\n",
              m.format_version(), static_cast<long long>(m.step()), m.world_size(), m.expert_parallel(),
              static_cast<long long>(m.optimizer_t()));
  std::printf("model: vocab %d, d_model %d, %d layers, heads %d/%d (q/kv), d_ff %d, ffn pattern [", mc.vocab_size(),
              mc.d_model(), mc.n_layers(), mc.n_heads(), mc.n_kv_heads(), mc.d_ff());
  for (int i = 0; i < mc.ffn_pattern_size(); ++i)
    std::printf("%s%s", i ? ", " : "", proto::FfnKind_Name(mc.ffn_pattern(i)).c_str());
  std::printf("]\ntokenizer: %s\n", m.tokenizer_file().empty() ? "(none)" : m.tokenizer_file().c_str());
  std::printf("%-52s %-18s %-5s %12s %-22s %10s\n", "tensor", "shape", "dtype", "bytes", "sharding", "crc32c");
  uint64_t total = 0;
  for (const auto& e : m.tensors()) {
    const Shape shape(e.shape().begin(), e.shape().end());
    const uint64_t bytes = static_cast<uint64_t>(shape_numel(shape)) * dtype_size(dtype_from_name(e.dtype()));
    total += bytes;
    std::printf("%-52s %-18s %-5s %12llu %-22s %10u\n", e.name().c_str(), shape_str(shape).c_str(), e.dtype().c_str(),
                static_cast<unsigned long long>(bytes), sharding_of(e.name()).c_str(), e.crc32c());
  }
  std::printf("%d tensors, %.1f MiB\n", m.tensors_size(), total / 1048576.0);
  return 0;
}

int verify(const std::string& path) {
  const std::string dir = ckpt::resolve(path);
  const proto::Manifest m = ckpt::read_manifest(dir);
  ckpt::Reader reader(dir, m);
  for (const auto& e : m.tensors()) {
    Tensor t = Tensor::empty(Shape(e.shape().begin(), e.shape().end()), dtype_from_name(e.dtype()));
    reader.read(e.name(), t);  // throws naming the file and tensor on a checksum, shape or read error
  }
  std::printf("OK: %d tensors in %s match their checksums\n", m.tensors_size(), dir.c_str());
  return 0;
}

int reshard(const std::string& path, int ep, const std::string& out) {
  const std::string dir = ckpt::resolve(path);
  const proto::Manifest m = ckpt::read_manifest(dir);
  MOE_CHECK(ep >= 1, "moe ckpt reshard: --ep " << ep << " must be >= 1");
  MOE_CHECK(!out.empty(), "moe ckpt reshard: --out ROOT is required (the source is never modified)");
  MOE_CHECK(std::filesystem::weakly_canonical(out) != std::filesystem::weakly_canonical(dir) &&
                std::filesystem::weakly_canonical(out) != std::filesystem::weakly_canonical(path),
            "moe ckpt reshard: --out must differ from the source checkpoint");
  Config cfg = m.config();
  cfg.mutable_parallel()->set_expert_parallel(ep);
  validate_config(cfg, /*needs_data=*/false);  // names model.moe.num_experts / word_experts when ep does not divide
  ckpt::SaveRequest req;
  req.config = &cfg;
  req.step = m.step();
  req.optimizer_t = m.optimizer_t();
  MOE_CHECK(m.loader_rng_size() == 4 || m.loader_rng_size() == 0, "checkpoint " << dir << ": bad loader state");
  for (int i = 0; i < m.loader_rng_size(); ++i) req.loader_rng[i] = m.loader_rng(i);
  req.world_size = ep;
  ckpt::Reader reader(dir, m);
  for (const auto& e : m.tensors()) {  // every tensor verified on the way
    Tensor t = Tensor::empty(Shape(e.shape().begin(), e.shape().end()), dtype_from_name(e.dtype()));
    reader.read(e.name(), t);
    req.tensors.push_back({e.name(), t});
  }
  std::string tok;
  if (!m.tokenizer_file().empty()) {
    std::ifstream f(dir + "/" + m.tokenizer_file(), std::ios::binary);
    MOE_CHECK(f.good(), "checkpoint " << dir << ": cannot read " << m.tokenizer_file());
    std::stringstream ss;
    ss << f.rdbuf();
    tok = ss.str();
    req.tokenizer_blob = &tok;
  }
  std::printf("resharded %s for expert_parallel %d -> %s\n", dir.c_str(), ep, ckpt::save(out, req).c_str());
  return 0;
}

}  // namespace

int ckpt_tool_main(int argc, char** argv) {
  const std::string cmd = argc >= 2 ? argv[1] : "";
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::printf("%s", kCkptUsage);
    return 0;
  }
  if (cmd == "reshard") {
    std::string dir, out;
    int ep = 0;
    for (int i = 2; i < argc; ++i) {
      const std::string a = argv[i];
      if ((a == "--ep" || a == "--out") && i + 1 < argc) {
        if (a == "--ep") {
          try {
            ep = std::stoi(argv[++i]);
          } catch (...) {
            MOE_THROW("moe ckpt reshard: --ep '" << argv[i] << "' is not an integer");
          }
        } else {
          out = argv[++i];
        }
      } else if (dir.empty() && a.rfind("--", 0) != 0) {
        dir = a;
      } else {
        MOE_THROW("moe ckpt reshard: unexpected argument '" << a << "'\n" << kCkptUsage);
      }
    }
    MOE_CHECK(!dir.empty(), "moe ckpt reshard: missing checkpoint directory\n" << kCkptUsage);
    return reshard(dir, ep, out);
  }
  MOE_CHECK(argc == 3, "moe ckpt: expected a command and a directory\n" << kCkptUsage);
  if (cmd == "inspect") return inspect(argv[2]);
  if (cmd == "verify") return verify(argv[2]);
  MOE_THROW("moe ckpt: unknown command '" << cmd << "'\n" << kCkptUsage);
}

}  // namespace moe::launcher
