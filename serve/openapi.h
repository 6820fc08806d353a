// The OpenAPI 3.0.3 description of the `moe serve` HTTP API, served at GET /openapi.json. It is written for the
// running server: the served model's name, context length and vocabulary bound the request schemas, and the
// bearer-token security scheme is present only when the server has an API key. Every status code a route can
// answer is listed with its body schema and required headers (Retry-After on 429 and 503, WWW-Authenticate on 401).
#pragma once
#include <string>

namespace moe::serve {

struct OpenApiOptions {
  std::string model_name;  // the only accepted `model`; "" (not loaded yet): any string
  int max_seq_len = 0;     // upper bound of max_tokens; 0: none
  int vocab_size = 0;      // token ids are < vocab_size; 0: no bound
  int head_dim = 0;        // upper bound of sparq_r; 0: none
  bool auth = false;       // every route but /health needs `Authorization: Bearer <key>`
};

// The document as JSON text.
std::string openapi_json(const OpenApiOptions& opt);

}  // namespace moe::serve
