#include "core/json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <set>
#include <sstream>

#include "core/error.h"

namespace moe {
namespace {


class JsonParser {
 public:
  JsonParser(const std::string& text, const std::string& what) : s_(text), src_(what) {}
  JsonValue parse_document() {
    JsonValue v = value(0);
    ws();
    MOE_CHECK(i_ == s_.size(), where() << "unexpected trailing characters after the document");
    return v;
  }

 private:
  std::string where() const {
    std::ostringstream o;
    o << src_ << " at byte " << i_ << ": ";
    return o.str();
  }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  void expect(char c) {
    ws();
    MOE_CHECK(i_ < s_.size(), where() << "unexpected end of the document (expected '" << c << "')");
    MOE_CHECK(s_[i_] == c, where() << "expected '" << c << "', found '" << s_[i_] << "'");
    ++i_;
  }
  // After an element of an object or array: true if another element follows (a ',' consumed), false when the
  // closing bracket `close` is (consumed); anything else is an error naming `inside`.
  bool next_element(char close, const char* inside) {
    ws();
    MOE_CHECK(i_ < s_.size(), where() << "unexpected end of the document inside " << inside);
    if (s_[i_] == ',') {
      ++i_;
      return true;
    }
    MOE_CHECK(s_[i_] == close, where() << "expected ',' or '" << close << "', found '" << s_[i_] << "'");
    ++i_;
    return false;
  }
  JsonValue value(int depth) {
    MOE_CHECK(depth < 32, where() << "nesting too deep");
    ws();
    MOE_CHECK(i_ < s_.size(), where() << "unexpected end of the document");
    const char c = s_[i_];
    JsonValue v;
    if (c == '{') {
      v.kind = JsonValue::kObject;
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
        JsonValue item = value(depth + 1);
        v.object.emplace_back(std::move(key), std::move(item));
      } while (next_element('}', "an object"));
      return v;
    }
    if (c == '[') {
      v.kind = JsonValue::kArray;
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
      v.kind = JsonValue::kString;
      v.str = string();
      return v;
    }
    if ((c >= '0' && c <= '9') || c == '-') return number();
    if (literal("true")) return boolean(true);
    if (literal("false")) return boolean(false);
    if (literal("null")) {
      v.kind = JsonValue::kNull;
      return v;
    }
    MOE_THROW(where() << "unexpected character '" << c << "' (expected a JSON value)");
  }
  bool literal(const char* w) {
    const size_t n = std::strlen(w);
    if (s_.compare(i_, n, w) != 0) return false;
    i_ += n;
    return true;
  }
  static JsonValue boolean(bool b) {
    JsonValue v;
    v.kind = JsonValue::kBool;
    v.b = b;
    return v;
  }
  // RFC 8259 numbers: a non-negative integer without fraction or exponent is kInt (exact uint64), others kNumber
  JsonValue number() {
    const size_t start = i_;
    auto digits = [&] {
      const size_t d = i_;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
      MOE_CHECK(i_ > d, where() << "expected a digit");
    };
    const bool neg = s_[i_] == '-';
    if (neg) ++i_;
    MOE_CHECK(!(peek() == '0' && i_ + 1 < s_.size() && s_[i_ + 1] >= '0' && s_[i_ + 1] <= '9'),
              where() << "numbers must not have leading zeros");
    digits();
    bool integer = !neg;
    if (peek() == '.') {
      ++i_;
      digits();
      integer = false;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++i_;
      if (peek() == '+' || peek() == '-') ++i_;
      digits();
      integer = false;
    }
    const std::string tok = s_.substr(start, i_ - start);
    JsonValue v;
    v.dbl = std::strtod(tok.c_str(), nullptr);
    if (!integer) {
      v.kind = JsonValue::kNumber;
      return v;
    }
    v.kind = JsonValue::kInt;
    for (char ch : tok) {
      const uint64_t d = static_cast<uint64_t>(ch - '0');
      MOE_CHECK(v.num <= (std::numeric_limits<uint64_t>::max() - d) / 10, where() << "integer too large");
      v.num = v.num * 10 + d;
    }
    return v;
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


}  // namespace

JsonValue parse_json(const std::string& text, const std::string& what) { return JsonParser(text, what).parse_document(); }

const JsonValue* JsonValue::field(const std::string& key) const {
  for (const auto& [k, v] : object)
    if (k == key) return &v;
  return nullptr;
}

std::string json_escape(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::string json_array(const std::vector<std::string>& items) {
  std::string a = "[";
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) a += ',';
    a += items[i];
  }
  return a + "]";
}

JsonObject& JsonObject::raw(const std::string& key, const std::string& json) {
  if (!body_.empty()) body_ += ",";
  body_ += json_escape(key) + ":" + json;
  return *this;
}

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";  // JSON has no NaN / Infinity
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

JsonObject& JsonObject::num(const std::string& key, double v) { return raw(key, json_number(v)); }

JsonObject& JsonObject::num(const std::string& key, int64_t v) { return raw(key, std::to_string(v)); }
JsonObject& JsonObject::str(const std::string& key, const std::string& v) { return raw(key, json_escape(v)); }
JsonObject& JsonObject::boolean(const std::string& key, bool v) { return raw(key, v ? "true" : "false"); }
JsonObject& JsonObject::null(const std::string& key) { return raw(key, "null"); }

JsonObject& JsonObject::strs(const std::string& key, const std::vector<std::string>& v) {
  std::string a = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) a += ',';
    a += json_escape(v[i]);
  }
  a += ']';
  return raw(key, a);
}

JsonObject& JsonObject::obj(const std::string& key, const JsonObject& v) { return raw(key, v.text()); }

JsonObject& JsonObject::nums(const std::string& key, const std::vector<int64_t>& v) {
  std::string a = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) a += ',';
    a += std::to_string(v[i]);
  }
  a += ']';
  return raw(key, a);
}

JsonObject& JsonObject::objs(const std::string& key, const std::vector<JsonObject>& v) {
  std::string a = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) a += ',';
    a += v[i].text();
  }
  a += ']';
  return raw(key, a);
}

}  // namespace moe
