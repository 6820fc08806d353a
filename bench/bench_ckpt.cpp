// Checkpoint I/O benchmark: save (HDF5 + manifest + CRC-32C + fsync + rename) and load (read + checksum verify)
// throughput vs raw sequential write (+fsync) and read of the same bytes on the same disk, side by side.
// usage: bench_ckpt [--mib 512] [--tensors 16] [--dir /tmp/moe_bench_ckpt] [--reps 3]
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "core/config.h"

using namespace moe;
using clk = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {
double since(clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); }

void drop_page_cache_of(const std::string& path) {  // so reads come from the disk, not the page cache
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}
}  // namespace

int main(int argc, char** argv) {
  int mib = 512, ntensors = 16, reps = 3;
  std::string dir = "/tmp/moe_bench_ckpt";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--mib") mib = std::atoi(argv[i + 1]);
    else if (a == "--tensors") ntensors = std::atoi(argv[i + 1]);
    else if (a == "--dir") dir = argv[i + 1];
    else if (a == "--reps") reps = std::atoi(argv[i + 1]);
  }
  fs::remove_all(dir);
  fs::create_directories(dir);
  const int64_t per = int64_t(mib) * 1048576 / 4 / ntensors;  // floats per tensor
  Config cfg;
  cfg.mutable_model()->set_d_model(1);
  ckpt::SaveRequest req;
  req.config = &cfg;
  for (int t = 0; t < ntensors; ++t) {
    Tensor x = Tensor::empty({per});
    for (int64_t i = 0; i < per; ++i) x.f32()[i] = static_cast<float>((i * 2654435761u + t) % 1000) * 0.001f;
    req.tensors.push_back({"params/t" + std::to_string(t), x});
  }
  const double bytes = double(per) * 4 * ntensors;
  double save_s = 1e30, load_s = 1e30, raw_w = 1e30, raw_r = 1e30;
  for (int r = 0; r < reps; ++r) {
    // ours: save
    req.step = r + 1;
    auto t0 = clk::now();
    const std::string d = ckpt::save(dir + "/ckpt", req);
    save_s = std::min(save_s, since(t0));
    // ours: load (cold cache)
    drop_page_cache_of(d + "/model.h5");
    t0 = clk::now();
    {
      const proto::Manifest m = ckpt::read_manifest(d);
      ckpt::Reader reader(d, m);
      for (auto& nt : req.tensors) {
        Tensor y = Tensor::empty(nt.tensor.shape());
        reader.read(nt.name, y);
      }
    }
    load_s = std::min(load_s, since(t0));
    fs::remove_all(d);
    // raw: one file, sequential write of the same bytes + fsync
    const std::string raw = dir + "/raw.bin";
    t0 = clk::now();
    {
      int fd = ::open(raw.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      for (auto& nt : req.tensors) {
        const char* p = static_cast<const char*>(nt.tensor.raw());
        size_t left = nt.tensor.nbytes();
        while (left) {
          ssize_t w = ::write(fd, p, left);
          if (w <= 0) { std::perror("write"); return 1; }
          p += w;
          left -= static_cast<size_t>(w);
        }
      }
      ::fsync(fd);
      ::close(fd);
    }
    raw_w = std::min(raw_w, since(t0));
    drop_page_cache_of(raw);
    t0 = clk::now();
    {
      int fd = ::open(raw.c_str(), O_RDONLY);
      std::vector<char> buf(size_t(per) * 4);
      for (int t = 0; t < ntensors; ++t) {
        size_t got = 0;
        while (got < buf.size()) {
          ssize_t n = ::read(fd, buf.data() + got, buf.size() - got);
          if (n <= 0) break;
          got += static_cast<size_t>(n);
        }
      }
      ::close(fd);
    }
    raw_r = std::min(raw_r, since(t0));
    fs::remove(raw);
  }
  std::printf("bench_ckpt: %d tensors, %.0f MiB, best of %d, dir %s\n", ntensors, bytes / 1048576, reps, dir.c_str());
  std::printf("%-52s %10s %10s %8s\n", "", "GB/s", "s", "ratio");
  std::printf("%-52s %10.2f %10.3f %7.2fx\n", "save: HDF5 + crc32c + manifest + fsync + rename", bytes / save_s * 1e-9,
              save_s, raw_w / save_s);
  std::printf("%-52s %10.2f %10.3f %7.2fx\n", "raw sequential write + fsync", bytes / raw_w * 1e-9, raw_w, 1.0);
  std::printf("%-52s %10.2f %10.3f %7.2fx\n", "load: HDF5 read + crc32c verify (cold cache)", bytes / load_s * 1e-9,
              load_s, raw_r / load_s);
  std::printf("%-52s %10.2f %10.3f %7.2fx\n", "raw sequential read (cold cache)", bytes / raw_r * 1e-9, raw_r, 1.0);
  std::printf("(target: save and load >= 0.70x of raw)\n");
  fs::remove_all(dir);
  return 0;
}
