// A small thread-safe metrics registry and its Prometheus text exposition (format 0.0.4): counters and gauges with
// labels, histograms with fixed buckets. The HTTP server (serve/http_server.h) keeps one and serves it at /metrics.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace moe::serve::prom {

// The Content-Type of the exposition.
inline constexpr const char* kContentType = "text/plain; version=0.0.4; charset=utf-8";

// Label values, in the order of the family's label names.
using LabelValues = std::vector<std::string>;

// A number as the exposition writes it: integers exactly ("3"), others in the shortest form that reads back to the
// same double ("0.25", "1e-05"), "+Inf", "-Inf", "NaN".
std::string format_value(double v);

// A label value escaped for the exposition: backslash, double quote and newline as \\, \" and \n.
std::string escape_label_value(const std::string& v);

// A HELP text escaped for the exposition: backslash and newline as \\ and \n.
std::string escape_help(const std::string& v);

// What every metric family has: a name, a help text, label names; it writes its lines into the exposition.
class Family {
 public:
  // Throws moe::Error naming the metric when the name or a label name is not a valid Prometheus name ("le" and
  // names starting with "__" are reserved).
  Family(std::string name, std::string help, std::vector<std::string> label_names);
  virtual ~Family() = default;
  const std::string& name() const { return name_; }
  // Appends "# HELP", "# TYPE" and every series' lines to `out`.
  void write(std::string& out) const;

 protected:
  virtual const char* type() const = 0;
  virtual void write_series(std::string& out) const = 0;  // called with mu_ held
  // `{a="x",b="y"}` for these values (`extra` appended as one more label, e.g. le="0.5"); "" without labels.
  std::string label_text(const LabelValues& values, const std::string& extra = "") const;
  // Throws moe::Error naming the metric when the number of values differs from the number of label names.
  void check_labels(const LabelValues& values) const;
  size_t label_count() const { return label_names_.size(); }

  mutable std::mutex mu_;

 private:
  std::string name_, help_;
  std::vector<std::string> label_names_;
};

// Counters or gauges of one name, one series per label-value tuple (a family without labels always has its one
// series, starting at 0; a labelled one shows the series that were touched, in label order).
class ValueFamily : public Family {
 public:
  // counter: a counter (its name must end in _total), else a gauge.
  ValueFamily(std::string name, std::string help, std::vector<std::string> label_names, bool counter);
  // Adds `delta` (a counter: >= 0, else moe::Error) to the series of `values`.
  void inc(const LabelValues& values = {}, double delta = 1);
  // Sets the series of `values` (a counter: the running total of a monotonic source, such as the engine's stats).
  void set(const LabelValues& values, double v);
  void set(double v) { set({}, v); }                   // the one series of a family without labels
  double value(const LabelValues& values = {}) const;  // 0 for a series never touched

 protected:
  const char* type() const override { return counter_ ? "counter" : "gauge"; }
  void write_series(std::string& out) const override;

 private:
  bool counter_;
  std::map<LabelValues, double> series_;
};

// A histogram without labels: fixed upper bounds (strictly increasing, finite), a +Inf bucket, sum and count.
class Histogram : public Family {
 public:
  // Throws moe::Error naming the metric when the bounds are empty, not finite or not strictly increasing.
  Histogram(std::string name, std::string help, std::vector<double> upper_bounds);
  void observe(double v);  // counts v in the first bucket whose bound is >= v (+Inf above the last)
  uint64_t count() const;  // observations so far
  // Cumulative count of observations <= upper_bounds[i] (i == upper_bounds.size(): all of them).
  uint64_t cumulative(size_t i) const;

 protected:
  const char* type() const override { return "histogram"; }
  void write_series(std::string& out) const override;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket (not cumulative), the last one is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

// The registry: families in registration order; names unique (a second registration of a name throws).
// Registration and writing are thread-safe; the returned references live as long as the registry.
class Registry {
 public:
  ValueFamily& counter(const std::string& name, const std::string& help, std::vector<std::string> label_names = {});
  ValueFamily& gauge(const std::string& name, const std::string& help, std::vector<std::string> label_names = {});
  Histogram& histogram(const std::string& name, const std::string& help, std::vector<double> upper_bounds);
  // The whole exposition (every family's lines, each line ending in "\n").
  std::string text() const;

 private:
  template <class F>
  F& add(std::unique_ptr<F> f);
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Family>> families_;
};

// Latency buckets in seconds, from 0.5 ms to 10 s (1-2.5-5 steps).
std::vector<double> latency_buckets();

}  // namespace moe::serve::prom
