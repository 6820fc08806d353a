// `moe ckpt`: checkpoint utilities that run without mpirun.
//   inspect DIR   step, format, parallel layout at save time, model summary, and every tensor (shape, dtype, bytes,
//                 sharding, crc32c)
//   verify DIR    re-reads every dataset and recomputes its checksum; names the file and tensor of any mismatch,
//                 truncation or shape error and exits non-zero
#include "launcher/ckpt_tool.h"

#include <cstdio>
#include <string>

#include "checkpoints/checkpoint.h"
#include "core/error.h"

namespace moe::launcher {
namespace {

const char* kCkptUsage =
    "usage: moe ckpt <command> DIR\n"
    "  inspect DIR   summary and tensor table of a checkpoint (a step_<N> directory or a root with `latest`)\n"
    "  verify  DIR   recompute every tensor's CRC-32C; exit 1 naming the file and tensor on any mismatch\n";

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

}  // namespace

int ckpt_tool_main(int argc, char** argv) {
  const std::string cmd = argc >= 2 ? argv[1] : "";
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::printf("%s", kCkptUsage);
    return 0;
  }
  MOE_CHECK(argc == 3, "moe ckpt: expected a command and a directory\n" << kCkptUsage);
  if (cmd == "inspect") return inspect(argv[2]);
  if (cmd == "verify") return verify(argv[2]);
  MOE_THROW("moe ckpt: unknown command '" << cmd << "'\n" << kCkptUsage);
}

}  // namespace moe::launcher
