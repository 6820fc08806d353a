// core/json.h: the writer's escaping and the strict reader (numbers, literals, nesting, errors with positions).
#include <gtest/gtest.h>

#include "core/json.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

TEST(Json, ReaderValuesAndWriterRoundTrip) {
  const JsonValue v = parse_json(
      R"({"a": 1, "b": -2.5e-3, "c": [true, false, null], "d": "x\"\n\u00e9", "e": 1e5, "f": 0, "g": {}})", "t");
  ASSERT_EQ(v.kind, JsonValue::kObject);
  EXPECT_EQ(v.field("a")->kind, JsonValue::kInt);
  EXPECT_EQ(v.field("a")->num, 1u);
  EXPECT_EQ(v.field("b")->kind, JsonValue::kNumber);
  EXPECT_DOUBLE_EQ(v.field("b")->dbl, -2.5e-3);
  EXPECT_EQ(v.field("e")->kind, JsonValue::kNumber);  // an exponent makes it a general number
  EXPECT_DOUBLE_EQ(v.field("e")->dbl, 1e5);
  EXPECT_EQ(v.field("f")->num, 0u);
  const auto& c = v.field("c")->array;
  ASSERT_EQ(c.size(), 3u);
  EXPECT_TRUE(c[0].kind == JsonValue::kBool && c[0].b);
  EXPECT_TRUE(c[1].kind == JsonValue::kBool && !c[1].b);
  EXPECT_EQ(c[2].kind, JsonValue::kNull);
  EXPECT_EQ(v.field("d")->str, "x\"\n\xc3\xa9");
  EXPECT_EQ(v.field("missing"), nullptr);
  // the writer's output reads back to the same values
  JsonObject o;
  o.str("s", "a\"b\\c\n\t\x01").num("n", 0.25).num("i", int64_t(7)).boolean("t", true).null("z");
  o.strs("l", {"x", "y"});
  const JsonValue back = parse_json(o.text(), "round trip");
  EXPECT_EQ(back.field("s")->str, "a\"b\\c\n\t\x01");
  EXPECT_DOUBLE_EQ(back.field("n")->dbl, 0.25);
  EXPECT_EQ(back.field("i")->num, 7u);
  EXPECT_TRUE(back.field("t")->b);
  EXPECT_EQ(back.field("z")->kind, JsonValue::kNull);
  EXPECT_EQ(back.field("l")->array[1].str, "y");
}

TEST(Json, ReaderRejectsMalformedDocuments) {
  for (const char* bad : {R"({"a":1,})", R"({"a":01})", R"({"a":1} x)", R"({"a":tru})", R"({"a":1,"a":2})",
                          R"({"a":-})", R"({"a":1.})", R"({"a":"x)", R"([1,2)", "", R"({"a":.5})"}) {
    const std::string e = error_of([&] { parse_json(bad, "doc.json"); });
    EXPECT_NE(e.find("doc.json at byte "), std::string::npos) << bad << " -> " << e;
  }
}

}  // namespace
}  // namespace moe::test
