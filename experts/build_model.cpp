// build_model (the one model constructor) and the memory estimate of a config.
#include "experts/build_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include "core/config.h"
#include "core/error.h"
#include "core/rng.h"
#include "experts/moe_layer.h"

namespace moe::experts {
namespace {

// What the word-expert layers share, with the routing vocabulary built from the corpus when the config asks for one
// and the inputs bring the corpus (else it comes from a checkpoint's state, or forward names what is missing).
std::shared_ptr<WordExpertShared> word_expert_shared(const ModelInputs& in, const proto::ModelConfig& cfg) {
  auto shared = std::make_shared<WordExpertShared>();
  const auto& w = cfg.word_experts();
  if (w.routing_vocab_size() > 0 && in.corpus && in.word_classes) {
    MOE_CHECK(static_cast<int>(in.word_classes->size()) == cfg.vocab_size(),
              "word classes cover " << in.word_classes->size() << " ids, model.vocab_size is " << cfg.vocab_size());
    shared->vocab.emplace(router::RoutingVocabulary::build(*in.corpus, *in.word_classes,
                                                           {w.routing_vocab_size(), w.routing_exact()}));
  }
  return shared;
}

// Dense, MoE or word-expert FFN per layer (model.ffn_pattern).
FfnFactory ffn_factory(const ModelInputs& in, uint64_t seed) {
  std::shared_ptr<WordExpertShared> shared;  // made by the first word-expert layer
  return [in, seed, shared](ParamStore& ps, Workspace& ws, const std::string& prefix, const proto::ModelConfig& cfg,
                            int layer) mutable -> std::unique_ptr<FfnUnit> {
    switch (layer_ffn_kind(cfg, layer)) {
      case proto::FFN_MOE:
        return std::make_unique<MoeFfn>(ps, ws, prefix, cfg, ExpertComm{in.ep, in.ep_rows}, seed ^ hash_name(prefix));
      case proto::FFN_WORD_EXPERT: {
        if (!shared) shared = word_expert_shared(in, cfg);
        // the routes' corpus counts: the routing vocabulary's ids (none when it comes from a checkpoint), or token ids
        const std::vector<int64_t>* counts = cfg.word_experts().routing_vocab_size() == 0 ? in.token_counts
                                             : shared->vocab                            ? &shared->vocab->id_counts()
                                                                                        : nullptr;
        return std::make_unique<WordExpertFfn>(ps, ws, prefix, cfg, ExpertComm{in.ep, in.ep_rows}, counts, shared);
      }
      default:
        return std::make_unique<DenseFfn>(ps, ws, prefix, cfg.d_model(), cfg.d_ff(), cfg.activation());
    }
  };
}

}  // namespace

void check_device(const proto::ModelConfig& m) {
  if (m.device() != proto::DEVICE_CUDA) return;
  backend_for(Device::kCUDA).set_matmul_bf16(m.matmul_precision() == proto::MATMUL_BF16);  // (no CUDA: its error)
}

std::unique_ptr<Model> build_model(const Config& cfg, const ModelInputs& in) {
  check_device(cfg.model());
  auto model =
      std::make_unique<Model>(cfg.model(), ffn_factory(in, cfg.train().seed()), in.sized_only, !in.inference);
  if (in.init && !in.sized_only) model->init_weights(cfg.train().seed());
  if (in.state) model->restore_unit_state(*in.state);
  return model;
}

// ------------------------------------------------------------------------------------------------ memory
namespace {

// Layers of each FFN kind: pattern entry i covers layers i, i + P, ... (no loop over the layers themselves).
std::map<proto::FfnKind, std::pair<int, double>> layers_by_kind(const proto::ModelConfig& m) {
  std::map<proto::FfnKind, std::pair<int, double>> out;  // kind -> (first layer, count)
  const int L = m.n_layers(), P = std::max(1, m.ffn_pattern_size());
  for (int i = 0; i < P && i < L; ++i) {
    const proto::FfnKind kind = layer_ffn_kind(m, i);
    const double count = L / P + (i < L % P ? 1 : 0);
    auto it = out.find(kind);
    if (it == out.end()) out[kind] = {i, count};
    else it->second.second += count;
  }
  return out;
}

// Activation floats per token of one layer of `kind` (kept for backward plus their gradients), balanced routing.
double activation_floats(const proto::ModelConfig& m, proto::FfnKind kind, int T) {
  const double C = m.d_model(), H = m.n_heads(), Hkv = m.n_kv_heads(), D = C / H;
  double f = 8 * C + 4;                                // residual, norms, block temporaries
  f += 2 * (2 * H * D + 2 * Hkv * D) + 2 * H * T;      // q, k, v, y and gradients; scores and their gradients
  if (kind == proto::FFN_MOE) {
    const double k = m.moe().top_k(), E = m.moe().num_experts();
    f += k * (6 * m.moe().d_expert() + 10 * C) + 3 * E + C;  // grouped FFN + dispatch buffers per routed row
  } else if (kind == proto::FFN_WORD_EXPERT) {
    f += 6 * m.word_experts().d_expert() + 8 * C;
  } else {
    f += 6 * m.d_ff();
  }
  return f;
}

}  // namespace

MemoryEstimate estimate_memory(const Config& cfg, int world) {
  const proto::ModelConfig& m = cfg.model();
  const double V = m.vocab_size() > 0 ? m.vocab_size() : cfg.data().tokenizer_vocab_size(), C = m.d_model();
  const int ep = std::max(1, cfg.parallel().expert_parallel());
  double params = V * C * (m.tie_embeddings() ? 1 : 2) + C * (m.norm() == proto::LAYERNORM ? 2 : 1), rows = 0;
  double seqs = double(cfg.data().batch_size()) / std::max(1, world);  // one forward: the share, or a micro-batch
  if (cfg.train().micro_batch_size() > 0) seqs = std::min(seqs, double(cfg.train().micro_batch_size()));
  const double tokens = seqs * cfg.data().seq_len();
  double act = tokens * (3 * V + 4 * C);
  proto::ModelConfig one = m;  // a sized-only block per kind: the layers' own parameter declarations
  one.set_vocab_size(static_cast<int>(V));
  for (const auto& [kind, first_count] : layers_by_kind(m)) {
    ParamStore ps(/*sized_only=*/true);
    Workspace ws{cpu_backend()};
    Block block(ps, ws, one, first_count.first, ffn_factory({}, 0));
    double n = 0;
    for (const Param* p : ps.all()) {
      const double share = p->expert_sharded ? 1.0 / ep : 1.0;  // this rank's rows
      n += p->value.numel() * share;
      if (p->row_sparse) rows += p->value.dim(0) * share * first_count.second;
    }
    params += n * first_count.second;
    act += tokens * activation_floats(m, kind, cfg.data().seq_len()) * first_count.second;
  }
  MemoryEstimate e;
  e.params = params;
  e.weight_bytes = 4 * params;
  e.grad_bytes = 4 * params;
  e.optimizer_bytes = 8 * params + 4 * rows;
  e.activation_bytes = 4 * act;
  return e;
}

std::string format_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (b >= 1024 && u < 6) {
    b /= 1024;
    ++u;
  }
  char buf[48];
  std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", b, units[u]);
  return buf;
}

std::string MemoryEstimate::breakdown() const {
  std::ostringstream o;
  char count[32];
  std::snprintf(count, sizeof count, "%.4g", params);
  o << "weights " << format_bytes(weight_bytes) << " + gradients " << format_bytes(grad_bytes) << " + AdamW state "
    << format_bytes(optimizer_bytes) << " + activations " << format_bytes(activation_bytes) << "; " << count
    << " parameters";
  return o.str();
}

double available_memory() {
  double avail = 0;
  std::ifstream mi("/proc/meminfo");
  std::string key, unit;
  double v = 0;
  while (mi >> key >> v >> unit)
    if (key == "MemAvailable:") avail = v * 1024;
  std::ifstream mx("/sys/fs/cgroup/memory.max"), cur("/sys/fs/cgroup/memory.current");
  std::string limit;
  double used = 0;
  if (mx >> limit && limit != "max" && cur >> used) avail = std::min(avail, std::stod(limit) - used);
  return avail;
}

void check_memory(const Config& cfg, int world, int ranks_on_node, const std::string& what) {
  const MemoryEstimate e = estimate_memory(cfg, world);
  // a device model: the free memory of this rank's GPU, shared by the node's ranks on the same GPU
  const bool gpu = cfg.model().device() == proto::DEVICE_CUDA;
  const int gpus = std::max(1, cuda_device_count()), ranks = std::max(1, ranks_on_node);
  const int sharing = gpu ? (ranks + gpus - 1) / gpus : ranks;
  const double need = e.total() * sharing, avail = gpu ? cuda_free_bytes() : available_memory();
  if (avail <= 0 || need <= avail) return;
  const auto& m = cfg.model();
  std::ostringstream ffn;
  for (const auto& [kind, fc] : layers_by_kind(m)) {
    if (kind == proto::FFN_MOE)
      ffn << ", model.moe.num_experts = " << m.moe().num_experts() << ", model.moe.d_expert = " << m.moe().d_expert();
    else if (kind == proto::FFN_WORD_EXPERT)
      ffn << ", model.word_experts.num_experts = " << m.word_experts().num_experts()
          << ", model.word_experts.d_expert = " << m.word_experts().d_expert();
    else
      ffn << ", model.d_ff = " << m.d_ff();
  }
  MOE_THROW(what << " needs an estimated " << format_bytes(need)
                 << (gpu ? " of GPU memory (" : " of memory on this node (") << sharing << " rank(s) x " << format_bytes(e.total()) << ": " << e.breakdown()
                 << ") but " << format_bytes(avail) << " is available; it is driven by model.n_layers = "
                 << m.n_layers() << ", model.d_model = " << m.d_model() << ffn.str() << ", model.vocab_size = "
                 << m.vocab_size() << ", data.batch_size = " << cfg.data().batch_size() << ", data.seq_len = "
                 << cfg.data().seq_len() << ", parallel.expert_parallel = " << cfg.parallel().expert_parallel()
                 << " (world size " << world << ")");
}

}  // namespace moe::experts
