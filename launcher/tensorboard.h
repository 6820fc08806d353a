// TensorBoard event files for the metrics stream (`moe train --tensorboard DIR`): the standard format, so the
// `tensorboard` tool and its event reader load them. A file DIR/events.out.tfevents.<seconds>.<host> is a sequence
// of TFRecords (uint64 length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes; little
// endian) each holding a tensorflow.Event (proto/tensorboard.proto): first the file version, then one event per
// logged step and per evaluation. Written by the lead rank, appended and flushed record by record.
//
// Tags: train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/router_loss (means since the previous
// logged step); per routed layer l: layer<l>/router_loss, layer<l>/aux_loss, layer<l>/dropped_fraction and the
// histogram layer<l>/expert_load (one bucket per expert, the tokens slots it received, learned MoE layers); learned
// MoE layers also layer<l>/max_overload (max / mean of the routed loads) and the histogram layer<l>/expert_routed
// (the slots that chose each expert before capacity drops, over the whole step);
// eval/val_loss, eval/val_ppl.
#pragma once
#include <cstdint>
#include <fstream>
#include <string>

#include "core/trainer.h"

namespace tensorflow {
class Event;
}

namespace moe::launcher {

// The mask TensorFlow applies to a record's CRC-32C: ((crc >> 15) | (crc << 17)) + 0xa282ead8.
uint32_t masked_crc32c(const void* data, size_t n);

class TensorBoardWriter {
 public:
  TensorBoardWriter() = default;
  // Creates DIR (and parents) and a new event file in it; throws naming the path when it cannot.
  explicit TensorBoardWriter(const std::string& dir);
  bool enabled() const { return out_.is_open(); }
  const std::string& path() const { return path_; }
  void write(const LogRecord& r);
  void write(const EvalRecord& r);

 private:
  void write_event(const tensorflow::Event& e);
  std::ofstream out_;
  std::string path_;
};

}  // namespace moe::launcher
