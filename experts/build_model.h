// The one way to make a model: build_model turns a config into a fully initialised model (dense, MoE and
// word-expert FFN units per model.ffn_pattern; expert rows sharded over the expert-parallel group and drawn by
// global expert id; routing tables built from the corpus or restored from a checkpoint, with the routers' RNGs).
// Train, eval, generate, the ckpt tools, benches and tests all use it.
//
// estimate_memory sizes a config per rank before anything is allocated (parameters, gradients and AdamW state
// from the layers' own parameter declarations, one sized-only block per FFN kind; activations from the batch), and
// check_memory refuses a config that cannot fit, naming the estimate, the memory available and the fields
// that drive it.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/config.h"
#include "core/model.h"

namespace moe::experts {

struct ModelInputs {
  comm::Communicator* ep = nullptr;                    // expert-parallel group; null: this rank holds every expert
  comm::Communicator* ep_rows = nullptr;  // the same over the model's tensors (NCCL; comm::Parallel::expert_rows_group)
  const std::vector<int64_t>* token_counts = nullptr;  // corpus token counts: the vocabulary routing tables
  // The training corpus's token stream and the word classes of the token ids (core/data.h word_classes): the MoWE
  // routing vocabulary of model.word_experts.routing_vocab_size (new models; a checkpoint brings its own)
  const std::vector<int32_t>* corpus = nullptr;
  const std::vector<int32_t>* word_classes = nullptr;
  const UnitState* state = nullptr;  // extra state from a checkpoint (routing tables, router RNGs), restored
  bool init = true;                  // draw the weights from train.seed (false: the caller loads them next)
  bool sized_only = false;           // parameters with shapes but no storage: the model's layout only (no init)
  bool inference = false;            // no gradient storage: generation and serving (backward is impossible)
};

// Throws unless the model can run on model.device here (a CUDA device visible), and sets the device's GEMM precision
// (model.matmul_precision). Run it before any work: the CLI does.
void check_device(const proto::ModelConfig& m);

// cfg must be validated (validate_config) with model.vocab_size set. The learned routers' jitter streams are
// seeded from train.seed and the layer.
std::unique_ptr<Model> build_model(const Config& cfg, const ModelInputs& in = {});

// Bytes one rank needs for a run of `cfg` with world size `world` (data.batch_size / world sequences per rank)
// and parallel.expert_parallel, by kind.
struct MemoryEstimate {
  double params = 0;             // parameter count on this rank
  double weight_bytes = 0;       // f32 weights
  double grad_bytes = 0;         // f32 gradients
  double optimizer_bytes = 0;    // AdamW m and v (+ per-row step counts of row-sparse tables)
  double activation_bytes = 0;   // activations kept for backward and their gradients (balanced routing)
  double total() const { return weight_bytes + grad_bytes + optimizer_bytes + activation_bytes; }
  std::string breakdown() const;  // "weights 1.2 GiB + gradients ... (N parameters)"
};
MemoryEstimate estimate_memory(const Config& cfg, int world);

// Throws, before anything is allocated, when ranks_on_node ranks of this estimate exceed the memory available on
// this node (MemAvailable, or the cgroup limit if lower); for a model on CUDA, when the node's ranks sharing one GPU
// exceed its free memory. `what` names the command ("training", "evaluation").
void check_memory(const Config& cfg, int world, int ranks_on_node, const std::string& what);
// Bytes available to this process now: min(MemAvailable, cgroup memory.max - memory.current).
double available_memory();
std::string format_bytes(double bytes);

}  // namespace moe::experts
