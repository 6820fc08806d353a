#include "core/json.h"

#include <cmath>
#include <cstdio>

namespace moe {

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

JsonObject& JsonObject::raw(const std::string& key, const std::string& json) {
  if (!body_.empty()) body_ += ",";
  body_ += json_escape(key) + ":" + json;
  return *this;
}

JsonObject& JsonObject::num(const std::string& key, double v) {
  if (!std::isfinite(v)) return raw(key, "null");  // JSON has no NaN / Infinity
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return raw(key, buf);
}

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
