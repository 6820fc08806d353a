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

// ---- a strict parser for the safetensors header: objects, arrays, strings and non-negative integers ----
struct JValue {
  enum Kind { kObject, kArray, kString, kInt } kind = kInt;
  std::vector<std::pair<std::string, JValue>> object;  // keys in file order (duplicates are rejected)
  std::vector<JValue> array;
  std::string str;
  uint64_t num = 0;
};

class JsonParser {
 public:
  JsonParser(const std::string& text, const std::string& source) : s_(text), src_(source) {}
  JValue parse_document() {
    ws();
    MOE_CHECK(peek() == '{', where() << "the header must be a JSON object");
    JValue v = value(0);
    ws();
    MOE_CHECK(i_ == s_.size(), where() << "unexpected trailing characters after the header object");
    return v;
  }

 private:
  std::string where() const {
    std::ostringstream o;
    o << "safetensors file " << src_ << ": malformed JSON header at byte " << i_ << ": ";
    return o.str();
  }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  void expect(char c) {
    ws();
    MOE_CHECK(i_ < s_.size(), where() << "unexpected end of header (expected '" << c << "')");
    MOE_CHECK(s_[i_] == c, where() << "expected '" << c << "', found '" << s_[i_] << "'");
    ++i_;
  }
  // After an element of an object or array: true if another element follows (a ',' consumed), false when the
  // closing bracket `close` is (consumed); anything else is an error naming `inside`.
  bool next_element(char close, const char* inside) {
    ws();
    MOE_CHECK(i_ < s_.size(), where() << "unexpected end of header inside " << inside);
    if (s_[i_] == ',') {
      ++i_;
      return true;
    }
    MOE_CHECK(s_[i_] == close, where() << "expected ',' or '" << close << "', found '" << s_[i_] << "'");
    ++i_;
    return false;
  }
  JValue value(int depth) {
    MOE_CHECK(depth < 8, where() << "nesting too deep");
    ws();
    MOE_CHECK(i_ < s_.size(), where() << "unexpected end of header");
    const char c = s_[i_];
    JValue v;
    if (c == '{') {
      v.kind = JValue::kObject;
      ++i_;
      ws();
      if (peek() == '}') {
        ++i_;
        return v;
      }
      std::set<std::string> seen;
      do {
        ws();
        MOE_CHECK(peek() == '"', where() << "expected a string key");
        std::string key = string();
        MOE_CHECK(seen.insert(key).second, where() << "duplicate key \"" << key << "\"");
        expect(':');
        JValue item = value(depth + 1);
        v.object.emplace_back(std::move(key), std::move(item));
      } while (next_element('}', "an object"));
      return v;
    }
    if (c == '[') {
      v.kind = JValue::kArray;
      ++i_;
      ws();
      if (peek() == ']') {
        ++i_;
        return v;
      }
      do v.array.push_back(value(depth + 1));
      while (next_element(']', "an array"));
      return v;
    }
    if (c == '"') {
      v.kind = JValue::kString;
      v.str = string();
      return v;
    }
    if (c >= '0' && c <= '9') {
      v.kind = JValue::kInt;
      MOE_CHECK(!(c == '0' && i_ + 1 < s_.size() && s_[i_ + 1] >= '0' && s_[i_ + 1] <= '9'),
                where() << "numbers must not have leading zeros");
      uint64_t n = 0;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') {
        const uint64_t d = static_cast<uint64_t>(s_[i_] - '0');
        MOE_CHECK(n <= (std::numeric_limits<uint64_t>::max() - d) / 10, where() << "integer too large");
        n = n * 10 + d;
        ++i_;
      }
      MOE_CHECK(i_ >= s_.size() || (s_[i_] != '.' && s_[i_] != 'e' && s_[i_] != 'E'),
                where() << "only non-negative integers are allowed here");
      v.num = n;
      return v;
    }
    MOE_THROW(where() << "unexpected character '" << c << "' (expected an object, array, string or integer)");
  }
  std::string string() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      MOE_CHECK(i_ < s_.size(), where() << "unterminated string");
      const unsigned char c = static_cast<unsigned char>(s_[i_++]);
      if (c == '"') return out;
      MOE_CHECK(c >= 0x20, where() << "control character inside a string");
      if (c != '\\') {
        out += static_cast<char>(c);
        continue;
      }
      MOE_CHECK(i_ < s_.size(), where() << "unterminated escape");
      const char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {  // surrogate pair
            MOE_CHECK(i_ + 1 < s_.size() && s_[i_] == '\\' && s_[i_ + 1] == 'u', where() << "lone surrogate");
            i_ += 2;
            const uint32_t lo = hex4();
            MOE_CHECK(lo >= 0xDC00 && lo < 0xE000, where() << "bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else {
            MOE_CHECK(!(cp >= 0xDC00 && cp < 0xE000), where() << "lone surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default: MOE_THROW(where() << "bad escape '\\" << e << "'");
      }
    }
  }
  uint32_t hex4() {
    MOE_CHECK(i_ + 4 <= s_.size(), where() << "truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = s_[i_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= h - '0';
      else if (h >= 'a' && h <= 'f') v |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') v |= h - 'A' + 10;
      else MOE_THROW(where() << "bad hex digit in \\u escape");
    }
    return v;
  }
  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  const std::string& s_;
  const std::string& src_;
  size_t i_ = 0;
};

const JValue* field(const JValue& obj, const std::string& key) {
  for (const auto& [k, v] : obj.object)
    if (k == key) return &v;
  return nullptr;
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
  const JValue doc = JsonParser(header, source).parse_document();
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
      MOE_CHECK(v.kind == JValue::kObject, src << ": __metadata__ must be an object of strings");
      for (const auto& [k, s] : v.object) {
        MOE_CHECK(s.kind == JValue::kString, src << ": __metadata__ value of \"" << k << "\" must be a string");
        out.metadata[k] = s.str;
      }
      continue;
    }
    const std::string tw = src + ": tensor '" + name + "'";
    MOE_CHECK(!name.empty(), src << ": empty tensor name");
    MOE_CHECK(v.kind == JValue::kObject, tw << ": entry must be an object");
    for (const auto& [k, unused] : v.object)
      MOE_CHECK(k == "dtype" || k == "shape" || k == "data_offsets", tw << ": unknown field \"" << k << "\"");
    const JValue* dt = field(v, "dtype");
    const JValue* sh = field(v, "shape");
    const JValue* off = field(v, "data_offsets");
    MOE_CHECK(dt && dt->kind == JValue::kString, tw << ": missing or non-string \"dtype\"");
    MOE_CHECK(sh && sh->kind == JValue::kArray, tw << ": missing or non-array \"shape\"");
    MOE_CHECK(off && off->kind == JValue::kArray && off->array.size() == 2,
              tw << ": \"data_offsets\" must be an array [begin, end]");
    DType dtype;
    if (dt->str == "F32") dtype = DType::kF32;
    else if (dt->str == "BF16") dtype = DType::kBF16;
    else if (dt->str == "I32") dtype = DType::kI32;
    else MOE_THROW(tw << ": unsupported dtype \"" << dt->str << "\" (F32, BF16 or I32)");
    Shape shape;
    uint64_t numel = 1;
    for (const JValue& d : sh->array) {
      MOE_CHECK(d.kind == JValue::kInt, tw << ": shape entries must be non-negative integers");
      MOE_CHECK(d.num <= (1ull << 40) && (d.num == 0 || numel <= (1ull << 40) / d.num),
                tw << ": shape is too large");
      numel *= d.num;
      shape.push_back(static_cast<int64_t>(d.num));
    }
    for (const JValue& o : off->array) MOE_CHECK(o.kind == JValue::kInt, tw << ": data_offsets must be integers");
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
