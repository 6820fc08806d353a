// safetensors files (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes
// of JSON header {"<name>": {"dtype": "F32"|"BF16"|"I32", "shape": [..], "data_offsets": [begin, end]}, ...,
// "__metadata__": {"<key>": "<string>", ...}}, then the raw little-endian tensor bytes (offsets relative to the end
// of the header). The reader is strict: it accepts exactly this header format (a small JSON parser, no external
// library), checks every offset against the file size and the dtype/shape, and rejects overlaps, holes and
// duplicate names with an error naming the file (and tensor).
#pragma once
#include <map>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"

namespace moe::ckpt {

struct SafetensorsFile {
  std::vector<NamedTensor> tensors;              // in data-offset order
  std::map<std::string, std::string> metadata;   // "__metadata__" (string values only)
};

// Serialises tensors (f32, bf16 or i32, CPU) in the given order; the header is space-padded to a multiple of 8.
std::string safetensors_bytes(const std::vector<NamedTensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {});
// Writes `path` atomically (path.tmp, fsync, rename).
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Parses a whole file's bytes; `source` names it in errors.
SafetensorsFile parse_safetensors(const std::string& bytes, const std::string& source);
SafetensorsFile read_safetensors(const std::string& path);

}  // namespace moe::ckpt
