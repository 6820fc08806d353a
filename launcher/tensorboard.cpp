#include "launcher/tensorboard.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>

#include "checkpoints/crc32c.h"
#include "core/error.h"
#include "proto/tensorboard.pb.h"

namespace moe::launcher {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void add_scalar(tensorflow::Summary* s, const std::string& tag, double v) {
  tensorflow::Summary::Value* val = s->add_value();
  val->set_tag(tag);
  val->set_simple_value(static_cast<float>(v));
}

// One bucket per expert: bucket e covers (e - 1, e] on the expert axis and counts the slots expert e received.
void add_expert_load(tensorflow::Summary* s, const std::string& tag, const std::vector<int64_t>& load) {
  tensorflow::HistogramProto* h = s->add_value()->mutable_histo();
  s->mutable_value(s->value_size() - 1)->set_tag(tag);
  double num = 0, sum = 0, sq = 0;
  for (size_t e = 0; e < load.size(); ++e) {
    num += load[e];
    sum += double(e) * load[e];
    sq += double(e) * e * load[e];
    h->add_bucket_limit(double(e));
    h->add_bucket(double(load[e]));
  }
  h->set_min(0);
  h->set_max(load.empty() ? 0 : double(load.size() - 1));
  h->set_num(num);
  h->set_sum(sum);
  h->set_sum_squares(sq);
}

}  // namespace

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t crc = ckpt::crc32c(data, n);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  MOE_CHECK(!ec, "--tensorboard: cannot create the directory '" << dir << "': " << ec.message());
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  path_ = dir + "/events.out.tfevents." + std::to_string(static_cast<int64_t>(now_s())) + "." + host;
  out_.open(path_, std::ios::binary | std::ios::app);
  MOE_CHECK(out_.good(), "--tensorboard: cannot create the event file '" << path_ << "'");
  tensorflow::Event e;
  e.set_wall_time(now_s());
  e.set_file_version("brain.Event:2");
  write_event(e);
}

void TensorBoardWriter::write_event(const tensorflow::Event& e) {
  const std::string data = e.SerializeAsString();
  const uint64_t len = data.size();  // little endian on every platform we build for (x86-64, aarch64)
  const uint32_t len_crc = masked_crc32c(&len, sizeof len), data_crc = masked_crc32c(data.data(), data.size());
  out_.write(reinterpret_cast<const char*>(&len), sizeof len);
  out_.write(reinterpret_cast<const char*>(&len_crc), sizeof len_crc);
  out_.write(data.data(), static_cast<std::streamsize>(data.size()));
  out_.write(reinterpret_cast<const char*>(&data_crc), sizeof data_crc);
  out_.flush();
  MOE_CHECK(out_.good(), "--tensorboard: writing '" << path_ << "' failed");
}

void TensorBoardWriter::write(const LogRecord& r) {
  if (!enabled()) return;
  tensorflow::Event e;
  e.set_wall_time(now_s());
  e.set_step(r.step);
  tensorflow::Summary* s = e.mutable_summary();
  add_scalar(s, "train/loss", r.loss);
  add_scalar(s, "train/lr", r.lr);
  add_scalar(s, "train/grad_norm", r.grad_norm);
  add_scalar(s, "train/tokens_per_s", r.tokens_per_s);
  add_scalar(s, "train/router_loss", r.router_loss);
  for (size_t l = 0; l < r.layers.size(); ++l) {
    const FfnStats& st = r.layers[l];
    if (!st.has_router) continue;
    const std::string pre = "layer" + std::to_string(l) + "/";
    add_scalar(s, pre + "router_loss", r.layer_router_loss[l]);
    add_scalar(s, pre + "aux_loss", st.aux_loss);
    add_scalar(s, pre + "dropped_fraction", st.dropped_fraction);
    if (!st.expert_load.empty()) add_expert_load(s, pre + "expert_load", st.expert_load);
    if (!st.expert_routed.empty()) {
      add_scalar(s, pre + "max_overload", max_overload(st.expert_routed));
      add_expert_load(s, pre + "expert_routed", st.expert_routed);
    }
  }
  write_event(e);
}

void TensorBoardWriter::write(const EvalRecord& r) {
  if (!enabled()) return;
  tensorflow::Event e;
  e.set_wall_time(now_s());
  e.set_step(r.step);
  add_scalar(e.mutable_summary(), "eval/val_loss", r.val_loss);
  add_scalar(e.mutable_summary(), "eval/val_ppl", std::exp(r.val_loss));
  write_event(e);
}

}  // namespace moe::launcher
