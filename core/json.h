// JSON: string escaping and an object built field by field (the metrics stream, safetensors headers,
// config.json of transformers models), and a strict reader (RFC 8259; duplicate keys rejected).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace moe {

// A parsed JSON value. Numbers: a non-negative integer without fraction or exponent is kInt (exact, `num`; `dbl`
// holds it too), any other number kNumber (`dbl`).
struct JsonValue {
  enum Kind { kObject, kArray, kString, kInt, kNumber, kBool, kNull } kind = kNull;
  std::vector<std::pair<std::string, JsonValue>> object;  // keys in document order
  std::vector<JsonValue> array;
  std::string str;
  uint64_t num = 0;
  double dbl = 0;
  bool b = false;
  const JsonValue* field(const std::string& key) const;  // null if absent (or not an object)
  bool is_number() const { return kind == kInt || kind == kNumber; }
};

// Parses a whole JSON document; errors read "<what> at byte N: <problem>".
JsonValue parse_json(const std::string& text, const std::string& what);

// s as a JSON string literal, quotes included (\" \\ \n \r \t \b \f, other control characters as \u00XX;
// bytes >= 0x80 pass through: UTF-8 stays UTF-8).
std::string json_escape(const std::string& s);

// A JSON array of values given as JSON texts: json_array({"1", "null", "\"a\""}) == "[1,null,\"a\"]".
std::string json_array(const std::vector<std::string>& items);
// v as a JSON number (%.9g: a float round-trips), null when not finite (JSON has no NaN or Infinity).
std::string json_number(double v);

// A JSON object built field by field (numbers, strings, nested objects and arrays; keys in insertion order).
// Non-finite numbers are written as null (JSON has no NaN or Infinity).
class JsonObject {
 public:
  JsonObject& num(const std::string& key, double v);
  JsonObject& num(const std::string& key, int64_t v);
  JsonObject& str(const std::string& key, const std::string& v);
  JsonObject& boolean(const std::string& key, bool v);
  JsonObject& null(const std::string& key);
  JsonObject& strs(const std::string& key, const std::vector<std::string>& v);
  JsonObject& nums(const std::string& key, const std::vector<int64_t>& v);
  JsonObject& obj(const std::string& key, const JsonObject& v);
  JsonObject& objs(const std::string& key, const std::vector<JsonObject>& v);
  // A value given as JSON text, written as is (the caller vouches for it: an array of mixed values from
  // json_array, a number that must be written exactly).
  JsonObject& json(const std::string& key, const std::string& json_text) { return raw(key, json_text); }
  std::string text() const { return "{" + body_ + "}"; }

 private:
  JsonObject& raw(const std::string& key, const std::string& json);
  std::string body_;
};

}  // namespace moe
