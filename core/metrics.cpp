#include "core/metrics.h"

#include <cmath>
#include <cstdio>

#include "core/error.h"

namespace moe {
namespace {
std::string json_floats(const std::vector<float>& v) {
  std::string a = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) a += ',';
    a += json_number(v[i]);
  }
  a += ']';
  return a;
}
}  // namespace

MetricsSink::MetricsSink(const std::string& path) : out_(path, std::ios::app), path_(path) {
  MOE_CHECK(out_.good(), "--metrics: cannot open '" << path << "' for appending");
}

void MetricsSink::write(const JsonObject& record) {
  if (!enabled()) return;
  out_ << record.text() << '\n' << std::flush;
  MOE_CHECK(out_.good(), "metrics stream '" << path_ << "': write failed");
}

JsonObject train_record(const LogRecord& r) {
  std::vector<JsonObject> layers;
  for (size_t l = 0; l < r.layers.size(); ++l) {
    const FfnStats& s = r.layers[l];
    JsonObject o;
    o.num("layer", int64_t(l));
    if (s.has_router) {
      o.num("router_loss", r.layer_router_loss[l]).num("aux_loss", s.aux_loss);
      o.num("dropped_fraction", s.dropped_fraction).num("load_min", s.load_min).num("load_max", s.load_max);
      o.num("experts_used", s.experts_used);
      if (!s.expert_load.empty()) o.nums("expert_load", s.expert_load);
      if (!s.expert_routed.empty())
        o.nums("expert_routed", s.expert_routed).num("max_overload", max_overload(s.expert_routed));
      if (!s.expert_bias.empty()) o.json("expert_bias", json_floats(s.expert_bias));
    }
    layers.push_back(o);
  }
  JsonObject o;
  o.str("type", "train").num("step", int64_t(r.step)).num("total_steps", int64_t(r.total)).num("loss", r.loss);
  o.num("router_loss", r.router_loss).num("lr", r.lr).num("grad_norm", r.grad_norm);
  o.num("tokens_per_s", r.tokens_per_s).num("elapsed_s", r.elapsed_s).objs("layers", layers);
  return o;
}

JsonObject eval_record(const EvalRecord& r) {
  JsonObject o;
  o.str("type", "eval").num("step", int64_t(r.step)).num("val_loss", r.val_loss).num("val_ppl", std::exp(r.val_loss));
  return o;
}

}  // namespace moe
