#include "serve/prometheus.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "core/error.h"

namespace moe::serve::prom {
namespace {

bool valid_name(const std::string& s, bool allow_colon) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (allow_colon && c == ':');
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

}  // namespace

std::string format_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[40];
  if (v == std::floor(v) && std::fabs(v) < 9.007199254740992e15) {
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(v));
    return buf;
  }
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

std::string escape_label_value(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::string escape_help(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::vector<double> latency_buckets() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
}

// ---- Family ----

Family::Family(std::string name, std::string help, std::vector<std::string> label_names)
    : name_(std::move(name)), help_(std::move(help)), label_names_(std::move(label_names)) {
  MOE_CHECK(valid_name(name_, true), "metric name '" << name_ << "' is not a valid Prometheus name");
  for (const auto& l : label_names_) {
    MOE_CHECK(valid_name(l, false) && l.rfind("__", 0) != 0 && l != "le",
              "label name '" << l << "' of metric " << name_ << " is not a valid Prometheus label name");
  }
}

void Family::write(std::string& out) const {
  out += "# HELP " + name_ + " " + escape_help(help_) + "\n";
  out += "# TYPE " + name_ + " " + type() + "\n";
  std::lock_guard<std::mutex> lock(mu_);
  write_series(out);
}

std::string Family::label_text(const LabelValues& values, const std::string& extra) const {
  std::string s;
  for (size_t i = 0; i < values.size(); ++i) {
    s += s.empty() ? "{" : ",";
    s += label_names_[i] + "=\"" + escape_label_value(values[i]) + "\"";
  }
  if (!extra.empty()) s += (s.empty() ? "{" : ",") + extra;
  return s.empty() ? s : s + "}";
}

void Family::check_labels(const LabelValues& values) const {
  MOE_CHECK(values.size() == label_names_.size(),
            "metric " << name_ << " has " << label_names_.size() << " labels, given " << values.size() << " values");
}

// ---- ValueFamily ----

ValueFamily::ValueFamily(std::string name, std::string help, std::vector<std::string> label_names, bool counter)
    : Family(std::move(name), std::move(help), std::move(label_names)), counter_(counter) {
  if (counter_)
    MOE_CHECK(this->name().size() > 6 && this->name().ends_with("_total"),
              "counter " << this->name() << ": counter names end in _total");
  if (label_count() == 0) series_[LabelValues{}] = 0;  // an unlabelled family always shows its one series
}

void ValueFamily::inc(const LabelValues& values, double delta) {
  check_labels(values);
  MOE_CHECK(!counter_ || delta >= 0, "counter " << name() << " cannot decrease (inc by " << delta << ")");
  std::lock_guard<std::mutex> lock(mu_);
  series_[values] += delta;
}

void ValueFamily::set(const LabelValues& values, double v) {
  check_labels(values);
  std::lock_guard<std::mutex> lock(mu_);
  series_[values] = v;
}

double ValueFamily::value(const LabelValues& values) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = series_.find(values);
  return it == series_.end() ? 0 : it->second;
}

void ValueFamily::write_series(std::string& out) const {
  for (const auto& [labels, v] : series_) out += name() + label_text(labels) + " " + format_value(v) + "\n";
}

// ---- Histogram ----

Histogram::Histogram(std::string name, std::string help, std::vector<double> upper_bounds)
    : Family(std::move(name), std::move(help), {}), bounds_(std::move(upper_bounds)) {
  MOE_CHECK(!bounds_.empty(), "histogram " << this->name() << " needs at least one bucket bound");
  for (size_t i = 0; i < bounds_.size(); ++i) {
    MOE_CHECK(std::isfinite(bounds_[i]) && (i == 0 || bounds_[i] > bounds_[i - 1]),
              "histogram " << this->name() << ": bucket bound " << bounds_[i] << " (#" << i
                           << ") must be finite and above the previous one");
  }
  counts_.assign(bounds_.size() + 1, 0);
}

void Histogram::observe(double v) {
  size_t b = 0;
  while (b < bounds_.size() && v > bounds_[b]) ++b;  // le: v <= bound
  std::lock_guard<std::mutex> lock(mu_);
  ++counts_[b];
  sum_ += v;
  ++count_;
}

uint64_t Histogram::count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return count_;
}

uint64_t Histogram::cumulative(size_t i) const {
  MOE_CHECK(i <= bounds_.size(), "histogram " << name() << " has no bucket #" << i);
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t c = 0;
  for (size_t b = 0; b <= i; ++b) c += counts_[b];
  return c;
}

void Histogram::write_series(std::string& out) const {
  uint64_t cum = 0;
  for (size_t b = 0; b <= bounds_.size(); ++b) {
    cum += counts_[b];
    const std::string le = b < bounds_.size() ? format_value(bounds_[b]) : "+Inf";
    out += name() + "_bucket{le=\"" + le + "\"} " + std::to_string(cum) + "\n";
  }
  out += name() + "_sum " + format_value(sum_) + "\n";
  out += name() + "_count " + std::to_string(count_) + "\n";
}

// ---- Registry ----

template <class F>
F& Registry::add(std::unique_ptr<F> f) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& g : families_) MOE_CHECK(g->name() != f->name(), "metric " << f->name() << " registered twice");
  F& ref = *f;
  families_.push_back(std::move(f));
  return ref;
}

ValueFamily& Registry::counter(const std::string& name, const std::string& help, std::vector<std::string> label_names) {
  return add(std::make_unique<ValueFamily>(name, help, std::move(label_names), true));
}

ValueFamily& Registry::gauge(const std::string& name, const std::string& help, std::vector<std::string> label_names) {
  return add(std::make_unique<ValueFamily>(name, help, std::move(label_names), false));
}

Histogram& Registry::histogram(const std::string& name, const std::string& help, std::vector<double> upper_bounds) {
  return add(std::make_unique<Histogram>(name, help, std::move(upper_bounds)));
}

std::string Registry::text() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  for (const auto& f : families_) f->write(out);
  return out;
}

}  // namespace moe::serve::prom
