// Choosing the next token from one row of logits (OpenAI semantics): greedy, or temperature / top-k / top-p
// sampling driven by a uniform draw the caller supplies (the scheduler draws it from the request's own stream on
// rank 0, so the choice is the same whichever rank holds the sequence), plus the log-probabilities a request
// asked for. Pure functions of their inputs.
#pragma once
#include <cstdint>
#include <vector>

#include "serve/api.h"

namespace moe::serve {

struct SampleChoice {
  float temperature = 0;  // 0: greedy
  float top_p = 1;
  int top_k = 0;      // 0: no top-k filter
  double u = 0;       // uniform draw in [0, 1) (sampling only)
  int logprobs = -1;  // -1: none; else that many alternatives (most likely first)
};

struct Sampled {
  int32_t token = 0;
  double logprob = 0;           // log-softmax of the raw logits at `token` (before temperature and filters); 0 when
                                // no logprobs were asked for (logprobs -1)
  std::vector<TopLogprob> top;  // the `logprobs` most likely tokens by raw logit (ties: lower id first)
};

// logits[V]. Greedy: the argmax (ties: the lowest id). Sampling: p_i ~ exp((l_i - max) / temperature), kept are
// the top_k largest (ties: lower id first; all when top_k is 0 or >= V), then of those in descending order the
// shortest prefix whose mass reaches top_p of the kept mass (at least one); the token is the first whose running
// sum of kept mass (in that order) exceeds u times the kept mass. Throws on a non-finite logit.
Sampled sample_token(const float* logits, int V, const SampleChoice& c);

}  // namespace moe::serve
