// The seam between the HTTP front end (serve/http_server.h, serve/openai.h) and the inference engine
// (serve/engine.h): a validated generation request goes in, a stream of token events comes out through the
// request's sink. The engine runs on rank 0's engine thread; the HTTP layer on its own I/O thread. Everything the
// engine calls on a sink happens on the engine thread and must not block (post to the connection's strand).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moe {
class Tokenizer;
}

namespace moe::serve {

// How the next token is chosen (OpenAI semantics). temperature 0: greedy (argmax, ties to the lower id); else
// softmax(logits / temperature) restricted to the top_k most likely tokens (0: all) and then to the smallest set
// whose probability reaches top_p (1: all), sampled with the request's own random stream (seed).
struct SamplingParams {
  float temperature = 1.0f;  // >= 0
  float top_p = 1.0f;        // (0, 1]
  int top_k = 0;             // >= 0
  uint64_t seed = 0;         // the request's random stream (the server draws one when the client gives none)
};

// SparQ attention for a request's generated tokens (Ribar et al., 2024; core/kernels/cpu/kernels.h
// attention_sparq): r query components pick the k keys each new token attends to. r = 0 and k = 0: full attention.
// The prompt is always read with full attention.
struct SparqParams {
  int r = 0;  // 0..head_dim
  int k = 0;  // >= 0, 0 exactly when r is
};

// Most alternatives a request may ask for with each token (OpenAI's limit for chat top_logprobs).
inline constexpr int kMaxTopLogprobs = 20;

struct GenerationRequest {
  std::vector<int32_t> prompt;     // token ids, non-empty, each < vocab size
  SamplingParams sampling;
  int max_tokens = 16;             // >= 1; prompt.size() + max_tokens <= max_seq_len (validated by the HTTP layer)
  std::vector<std::string> stop;   // stop strings: generation ends before the first occurrence (not included)
  int logprobs = -1;               // -1: none; 0..kMaxTopLogprobs: each token's log-probability and that many
                                   // most likely alternatives
  bool ignore_eos = false;         // keep generating past the tokenizer's end-of-sequence token
  std::optional<SparqParams> sparq;  // unset: the server's serving.sparq_r / sparq_k
};

struct TopLogprob {
  int32_t token = 0;
  double logprob = 0;
};

// One generated token. Log-probabilities are log-softmax of the model's logits (before temperature, top-k, top-p).
struct TokenEvent {
  int32_t token = 0;
  std::string text;       // the new text this token completes; may be empty (a UTF-8 character still incomplete,
                          // or text held back because it may start a stop string) and may hold text of earlier
                          // tokens released now. The concatenation of every event's text is the completion.
  double logprob = 0;     // when the request asked for logprobs (else 0)
  std::vector<TopLogprob> top;  // the request's `logprobs` most likely tokens, most likely first
};

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
};

struct FinishEvent {
  std::string reason;  // "stop" (a stop string or end-of-sequence), "length" (max_tokens or the context), "abort"
                       // (cancelled, server draining past its deadline, or an engine error: see `error`)
  std::string text;    // the rest of the completion held back until now (appended after every event's text)
  Usage usage;
  std::string error;   // non-empty when the engine failed the request
};

// Receives one request's events, on the engine thread, in order: on_token for each generated token (after the
// first, the time between calls is the inter-token latency), then exactly one on_finish. Never called again after
// on_finish. cancelled() is polled by the engine before each step: true (the client went away) ends the request
// with on_finish("abort") and frees its KV blocks.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  virtual void on_token(const TokenEvent& ev) = 0;
  virtual void on_finish(const FinishEvent& ev) = 0;
  virtual bool cancelled() const = 0;
};

enum class SubmitStatus {
  kAccepted,
  kQueueFull,     // serving.max_queue requests are waiting: HTTP 429 with Retry-After
  kShuttingDown,  // the server is draining (SIGTERM): HTTP 503
  kNotReady,      // the model is still loading: HTTP 503
};

// What the HTTP layer shows of the engine (/metrics, /health, /v1/models). Thread-safe to read at any time.
struct EngineStats {
  int64_t queue_depth = 0;        // requests waiting for their first step
  int64_t running = 0;            // sequences in the running batch
  int64_t kv_blocks_total = 0;    // over all ranks
  int64_t kv_blocks_used = 0;
  int64_t preemptions = 0;        // sequences preempted (and recomputed later) because KV blocks ran out
  int64_t prompt_tokens = 0;      // prompt tokens of finished and running requests
  int64_t generated_tokens = 0;
  int64_t steps = 0;              // engine steps run
  // tokens routed to each expert of each MoE layer (summed over ranks, since start): [layer][expert];
  // moe_layers[i] is the model layer of row i
  std::vector<int> moe_layers;
  std::vector<std::vector<int64_t>> expert_tokens;
};

struct ModelInfo {
  std::string name;      // the served model's id (serving.model_name, default: the run directory's name)
  int max_seq_len = 0;   // prompt + max_tokens must fit
  int vocab_size = 0;
  int64_t created = 0;   // unix seconds of the checkpoint
  int eos_id = -1;       // the tokenizer's end-of-sequence id, -1 if none
  int head_dim = 0;      // the attention head dim: SparQ's r is at most this (set by Engine::attach)
  bool sparq = false;    // the backend has SparQ attention, requests may ask for it (set by Engine::attach)
};

class EngineApi {
 public:
  virtual ~EngineApi() = default;
  // Hands a validated request to the engine; its events go to `sink`. Thread-safe.
  virtual SubmitStatus submit(GenerationRequest req, std::shared_ptr<RequestSink> sink) = 0;
  virtual bool ready() const = 0;  // the model is loaded on every rank and the engine runs
  virtual EngineStats stats() const = 0;
  virtual ModelInfo info() const = 0;  // valid once ready()
  // The tokenizer (encode prompts, decode tokens for logprobs); valid once ready(); thread-safe for encode/decode.
  virtual const Tokenizer& tokenizer() const = 0;
};

}  // namespace moe::serve
