// serve/prometheus.h: the registry and its text exposition (format 0.0.4): values, label escaping, cumulative
// histogram buckets, the refusals of bad names and uses, thread safety.
#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "serve/prometheus.h"
#include "tests/unit/oracle.h"

namespace moe::test {
namespace {

using serve::prom::Registry;

TEST(Prometheus, ValuesAndEscaping) {
  using serve::prom::format_value;
  EXPECT_EQ(format_value(3), "3");
  EXPECT_EQ(format_value(-7), "-7");
  EXPECT_EQ(format_value(0.25), "0.25");
  EXPECT_EQ(format_value(1e-5), "1e-05");
  EXPECT_EQ(format_value(0.1), "0.1");
  EXPECT_EQ(format_value(INFINITY), "+Inf");
  EXPECT_EQ(format_value(-INFINITY), "-Inf");
  EXPECT_EQ(format_value(NAN), "NaN");
  EXPECT_EQ(serve::prom::escape_label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
  EXPECT_EQ(serve::prom::escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
}

TEST(Prometheus, CountersAndGaugesExposition) {
  Registry r;
  auto& req = r.counter("moe_test_requests_total", "Requests.\nSecond line.", {"route", "code"});
  auto& conn = r.gauge("moe_test_connections", "Open connections.");
  auto& empty = r.counter("moe_test_empty_total", "Never touched.", {"x"});
  (void)empty;
  req.inc({"/v1/completions", "200"});
  req.inc({"/v1/completions", "200"}, 2);
  req.inc({"/a\"b\\c\nd", "404"});
  conn.set(5);
  conn.inc({}, -2);
  EXPECT_DOUBLE_EQ(req.value({"/v1/completions", "200"}), 3);
  EXPECT_DOUBLE_EQ(conn.value(), 3);
  const std::string expected =
      "# HELP moe_test_requests_total Requests.\\nSecond line.\n"
      "# TYPE moe_test_requests_total counter\n"
      "moe_test_requests_total{route=\"/a\\\"b\\\\c\\nd\",code=\"404\"} 1\n"
      "moe_test_requests_total{route=\"/v1/completions\",code=\"200\"} 3\n"
      "# HELP moe_test_connections Open connections.\n"
      "# TYPE moe_test_connections gauge\n"
      "moe_test_connections 3\n"
      "# HELP moe_test_empty_total Never touched.\n"
      "# TYPE moe_test_empty_total counter\n";
  EXPECT_EQ(r.text(), expected);
}

TEST(Prometheus, HistogramBucketsAreCumulative) {
  Registry r;
  auto& h = r.histogram("moe_test_latency_seconds", "Latency.", {0.01, 0.1, 1});
  for (double v : {0.005, 0.01, 0.05, 0.5, 0.7, 3.0}) h.observe(v);
  EXPECT_EQ(h.count(), 6u);
  EXPECT_EQ(h.cumulative(0), 2u);  // le is inclusive: 0.01 counts in the 0.01 bucket
  EXPECT_EQ(h.cumulative(1), 3u);
  EXPECT_EQ(h.cumulative(2), 5u);
  EXPECT_EQ(h.cumulative(3), 6u);
  const std::string expected =
      "# HELP moe_test_latency_seconds Latency.\n"
      "# TYPE moe_test_latency_seconds histogram\n"
      "moe_test_latency_seconds_bucket{le=\"0.01\"} 2\n"
      "moe_test_latency_seconds_bucket{le=\"0.1\"} 3\n"
      "moe_test_latency_seconds_bucket{le=\"1\"} 5\n"
      "moe_test_latency_seconds_bucket{le=\"+Inf\"} 6\n"
      "moe_test_latency_seconds_sum 4.265\n"
      "moe_test_latency_seconds_count 6\n";
  EXPECT_EQ(r.text(), expected);
}

TEST(Prometheus, RefusesBadNamesAndUses) {
  Registry r;
  EXPECT_NE(error_of([&] { r.counter("1bad_total", "x"); }).find("'1bad_total' is not a valid"), std::string::npos);
  EXPECT_NE(error_of([&] { r.counter("moe_requests", "x"); }).find("end in _total"), std::string::npos);
  EXPECT_NE(error_of([&] { r.gauge("moe_g", "x", {"le"}); }).find("label name 'le'"), std::string::npos);
  EXPECT_NE(error_of([&] { r.gauge("moe_g", "x", {"__x"}); }).find("label name '__x'"), std::string::npos);
  auto& c = r.counter("moe_c_total", "x", {"a"});
  EXPECT_NE(error_of([&] { r.gauge("moe_c_total", "y"); }).find("registered twice"), std::string::npos);
  EXPECT_NE(error_of([&] { c.inc({"1", "2"}); }).find("has 1 labels, given 2"), std::string::npos);
  EXPECT_NE(error_of([&] { c.inc({"1"}, -1); }).find("cannot decrease"), std::string::npos);
  EXPECT_NE(error_of([&] { r.histogram("moe_h", "x", {1, 1}); }).find("must be finite and above"), std::string::npos);
  EXPECT_NE(error_of([&] { r.histogram("moe_h2", "x", {}); }).find("at least one bucket"), std::string::npos);
}

TEST(Prometheus, ConcurrentUpdatesAreNotLost) {
  Registry r;
  auto& c = r.counter("moe_c_total", "x", {"t"});
  auto& h = r.histogram("moe_h_seconds", "x", serve::prom::latency_buckets());
  auto work = [&] {
    for (int i = 0; i < 20000; ++i) {
      c.inc({"a"});
      h.observe(0.001 * (i % 7));
      if (i % 1000 == 0) (void)r.text();
    }
  };
  std::thread t1(work), t2(work);
  t1.join();
  t2.join();
  EXPECT_DOUBLE_EQ(c.value({"a"}), 40000);
  EXPECT_EQ(h.count(), 40000u);
  EXPECT_EQ(h.cumulative(serve::prom::latency_buckets().size()), 40000u);
}

}  // namespace
}  // namespace moe::test
