#include "checkpoints/safetensors.h"
#include "core/json.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <set>
#include <sstream>

#include "checkpoints/checkpoint.h"
#include "core/error.h"

namespace moe::ckpt {
namespace {

constexpr uint64_t kMaxHeader = 100ull << 20;  // as the reference implementation: headers over 100 MB are refused

const char* st_dtype(DType dt) {
  switch (dt) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kI32: return "I32";
  }
  return "?";
}



// The safetensors header grammar: objects, arrays, strings and non-negative integers only.
void only_strings_and_integers(const JsonValue& v, const std::string& source) {
  MOE_CHECK(v.kind == JsonValue::kObject || v.kind == JsonValue::kArray || v.kind == JsonValue::kString ||
                v.kind == JsonValue::kInt,
            "safetensors file " << source << ": malformed JSON header: only objects, arrays, strings and non-negative "
                                             "integers are allowed (found a fraction, negative number, boolean or null)");
  for (const auto& [k, x] : v.object) only_strings_and_integers(x, source);
  for (const JsonValue& x : v.array) only_strings_and_integers(x, source);
}

}  // namespace

std::string safetensors_bytes(const std::vector<NamedTensor>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    for (const auto& [k, v] : metadata) {
      if (!first) header += ",";
      first = false;
      header += json_escape(k) + ":" + json_escape(v);
    }
    header += "}";
  }
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const NamedTensor& t : tensors) {
    MOE_CHECK(t.name != "__metadata__" && names.insert(t.name).second,
              "safetensors: duplicate or reserved tensor name '" << t.name << "'");
    MOE_CHECK(t.tensor.device() == Device::kCPU, "safetensors: tensor '" << t.name << "' must be on the CPU");
    if (header.size() > 1) header += ",";
    header += json_escape(t.name) + ":{\"dtype\":\"" + st_dtype(t.tensor.dtype()) + "\",\"shape\":[";
    for (size_t i = 0; i < t.tensor.shape().size(); ++i) {
      if (i) header += ',';
      header += std::to_string(t.tensor.shape()[i]);
    }
    const uint64_t end = offset + t.tensor.nbytes();
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(end) + "]}";
    offset = end;
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  out += header;
  out.reserve(out.size() + offset);
  for (const NamedTensor& t : tensors) out.append(static_cast<const char*>(t.tensor.raw()), t.tensor.nbytes());
  return out;
}

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string bytes = safetensors_bytes(tensors, metadata);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    MOE_CHECK(f.good(), "cannot write '" << tmp << "'");
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    f.close();
    if (!f.good()) {
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      MOE_THROW("writing '" << tmp << "' failed (disk full?)");
    }
  }
  fsync_file(tmp);
  std::filesystem::rename(tmp, path);
}

SafetensorsFile parse_safetensors(const std::string& bytes, const std::string& source) {
  const std::string src = "safetensors file " + source;
  MOE_CHECK(bytes.size() >= 8, src << ": truncated (" << bytes.size() << " bytes, the 8-byte header length is missing)");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  MOE_CHECK(n >= 2 && n <= kMaxHeader, src << ": header length " << n << " is out of range (2.." << kMaxHeader << ")");
  MOE_CHECK(n <= bytes.size() - 8, src << ": truncated: the header length is " << n << " bytes but only "
                                       << bytes.size() - 8 << " follow");
  const std::string header = bytes.substr(8, n);
  const JsonValue doc = parse_json(header, "safetensors file " + source + ": malformed JSON header");
  MOE_CHECK(doc.kind == JsonValue::kObject,
            "safetensors file " << source << ": malformed JSON header: the header must be a JSON object");
  only_strings_and_integers(doc, source);
  const uint64_t data_size = bytes.size() - 8 - n;
  const char* data = bytes.data() + 8 + n;

  SafetensorsFile out;
  struct Span {
    uint64_t begin, end;
    size_t index;
  };
  std::vector<Span> spans;
  for (const auto& [name, v] : doc.object) {
    if (name == "__metadata__") {
      MOE_CHECK(v.kind == JsonValue::kObject, src << ": __metadata__ must be an object of strings");
      for (const auto& [k, s] : v.object) {
        MOE_CHECK(s.kind == JsonValue::kString, src << ": __metadata__ value of \"" << k << "\" must be a string");
        out.metadata[k] = s.str;
      }
      continue;
    }
    const std::string tw = src + ": tensor '" + name + "'";
    MOE_CHECK(!name.empty(), src << ": empty tensor name");
    MOE_CHECK(v.kind == JsonValue::kObject, tw << ": entry must be an object");
    for (const auto& [k, unused] : v.object)
      MOE_CHECK(k == "dtype" || k == "shape" || k == "data_offsets", tw << ": unknown field \"" << k << "\"");
    const JsonValue* dt = v.field("dtype");
    const JsonValue* sh = v.field("shape");
    const JsonValue* off = v.field("data_offsets");
    MOE_CHECK(dt && dt->kind == JsonValue::kString, tw << ": missing or non-string \"dtype\"");
    MOE_CHECK(sh && sh->kind == JsonValue::kArray, tw << ": missing or non-array \"shape\"");
    MOE_CHECK(off && off->kind == JsonValue::kArray && off->array.size() == 2,
              tw << ": \"data_offsets\" must be an array [begin, end]");
    DType dtype;
    if (dt->str == "F32") dtype = DType::kF32;
    else if (dt->str == "BF16") dtype = DType::kBF16;
    else if (dt->str == "I32") dtype = DType::kI32;
    else MOE_THROW(tw << ": unsupported dtype \"" << dt->str << "\" (F32, BF16 or I32)");
    Shape shape;
    uint64_t numel = 1;
    for (const JsonValue& d : sh->array) {
      MOE_CHECK(d.kind == JsonValue::kInt, tw << ": shape entries must be non-negative integers");
      MOE_CHECK(d.num <= (1ull << 40) && (d.num == 0 || numel <= (1ull << 40) / d.num),
                tw << ": shape is too large");
      numel *= d.num;
      shape.push_back(static_cast<int64_t>(d.num));
    }
    for (const JsonValue& o : off->array) MOE_CHECK(o.kind == JsonValue::kInt, tw << ": data_offsets must be integers");
    const uint64_t begin = off->array[0].num, end = off->array[1].num;
    MOE_CHECK(begin <= end, tw << ": data_offsets [" << begin << ", " << end << "] are reversed");
    MOE_CHECK(end <= data_size, tw << ": data_offsets [" << begin << ", " << end << "] are out of range (the data "
                                   << "section has " << data_size << " bytes; file truncated?)");
    const uint64_t want = numel * dtype_size(dtype);
    MOE_CHECK(end - begin == want, tw << ": data_offsets [" << begin << ", " << end << "] hold " << end - begin
                                      << " bytes but shape " << shape_str(shape) << " of " << dt->str << " needs "
                                      << want);
    Tensor t = Tensor::empty(shape, dtype);
    if (want) std::memcpy(t.raw(), data + begin, want);
    spans.push_back({begin, end, out.tensors.size()});
    out.tensors.push_back({name, t});
  }
  // the tensors must tile the data section exactly (no overlaps, no holes), as the reference implementation checks
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin < b.begin || (a.begin == b.begin && a.end < b.end);
  });
  uint64_t pos = 0;
  for (const Span& s : spans) {
    MOE_CHECK(s.begin == pos, src << ": tensor '" << out.tensors[s.index].name << "' data_offsets [" << s.begin
                                  << ", " << s.end << "] " << (s.begin < pos ? "overlap another tensor" : "leave a hole")
                                  << " (expected begin " << pos << ")");
    pos = s.end;
  }
  MOE_CHECK(pos == data_size, src << ": " << data_size - pos << " trailing bytes after the last tensor");
  std::vector<NamedTensor> ordered;
  for (const Span& s : spans) ordered.push_back(out.tensors[s.index]);
  out.tensors = std::move(ordered);
  return out;
}

SafetensorsFile read_safetensors(const std::string& path) {
  MOE_CHECK(std::filesystem::is_regular_file(path), "safetensors file '" << path << "' does not exist");
  return parse_safetensors(read_file(path), path);
}

}  // namespace moe::ckpt
