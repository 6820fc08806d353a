#include "serve/openapi.h"

#include <cstdint>
#include <utility>
#include <vector>

#include "core/json.h"
#include "serve/api.h"
#include "serve/openai.h"
#include "serve/prometheus.h"

namespace moe::serve {
namespace {

using Props = std::vector<std::pair<std::string, JsonObject>>;

JsonObject type(const char* t) { return JsonObject().str("type", t); }

JsonObject described(JsonObject o, const std::string& d) { return o.str("description", d); }

JsonObject nullable(JsonObject o) { return o.boolean("nullable", true); }

constexpr int64_t kNoMax = INT64_MAX;

JsonObject integer(int64_t lo, int64_t hi = kNoMax) {
  JsonObject o = type("integer").num("minimum", lo);
  if (hi != kNoMax) o.num("maximum", hi);
  return o;
}

JsonObject number(double lo, double hi) { return type("number").num("minimum", lo).num("maximum", hi); }

JsonObject string_enum(const std::vector<std::string>& values) { return type("string").strs("enum", values); }

JsonObject array(const JsonObject& items, int64_t min_items = 0, int64_t max_items = -1) {
  JsonObject o = type("array").obj("items", items);
  if (min_items > 0) o.num("minItems", min_items);
  if (max_items >= 0) o.num("maxItems", max_items);
  return o;
}

JsonObject object(const Props& props, const std::vector<std::string>& required, bool closed) {
  JsonObject p;
  for (const auto& [name, schema] : props) p.obj(name, schema);
  JsonObject o = type("object");
  if (!required.empty()) o.strs("required", required);
  o.obj("properties", p);
  if (closed) o.boolean("additionalProperties", false);
  return o;
}

JsonObject one_of(const std::vector<JsonObject>& options) { return JsonObject().objs("oneOf", options); }

JsonObject ref(const std::string& schema) { return JsonObject().str("$ref", "#/components/schemas/" + schema); }

// ---- response schemas ----

JsonObject error_schema() {
  const JsonObject inner = object({{"message", type("string")},
                                   {"type", type("string")},
                                   {"param", nullable(type("string"))},
                                   {"code", nullable(type("string"))}},
                                  {"message", "type", "param", "code"}, false);
  return object({{"error", inner}}, {"error"}, false);
}

JsonObject usage_schema() {
  return object({{"prompt_tokens", integer(0)}, {"completion_tokens", integer(0)}, {"total_tokens", integer(0)}},
                {"prompt_tokens", "completion_tokens", "total_tokens"}, false);
}

JsonObject completion_logprobs_schema() {
  return nullable(object({{"tokens", array(type("string"))},
                          {"token_logprobs", array(type("number"))},
                          {"top_logprobs", array(type("object").obj("additionalProperties", type("number")))},
                          {"text_offset", array(integer(0))}},
                         {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, false));
}

JsonObject chat_logprobs_schema() {
  const JsonObject bytes = array(integer(0, 255));
  const JsonObject top = object({{"token", type("string")}, {"logprob", type("number")}, {"bytes", bytes}},
                                {"token", "logprob", "bytes"}, false);
  const JsonObject entry =
      object({{"token", type("string")}, {"logprob", type("number")}, {"bytes", bytes}, {"top_logprobs", array(top)}},
             {"token", "logprob", "bytes", "top_logprobs"}, false);
  return nullable(object({{"content", array(entry)}}, {"content"}, false));
}

JsonObject response_schema(bool chat) {
  JsonObject choice;
  const JsonObject finish = string_enum({"stop", "length"});
  if (chat) {
    const JsonObject message =
        object({{"role", string_enum({"assistant"})}, {"content", type("string")}}, {"role", "content"}, false);
    choice = object(
        {{"index", integer(0)}, {"message", message}, {"logprobs", chat_logprobs_schema()}, {"finish_reason", finish}},
        {"index", "message", "logprobs", "finish_reason"}, false);
  } else {
    choice = object({{"index", integer(0)},
                     {"text", type("string")},
                     {"logprobs", completion_logprobs_schema()},
                     {"finish_reason", finish}},
                    {"index", "text", "logprobs", "finish_reason"}, false);
  }
  return object({{"id", type("string")},
                 {"object", string_enum({chat ? "chat.completion" : "text_completion"})},
                 {"created", integer(0)},
                 {"model", type("string")},
                 {"choices", array(choice)},
                 {"usage", ref("Usage")}},
                {"id", "object", "created", "model", "choices", "usage"}, false);
}

JsonObject models_schema() {
  const JsonObject model = object({{"id", type("string")},
                                   {"object", string_enum({"model"})},
                                   {"created", integer(0)},
                                   {"owned_by", type("string")},
                                   {"max_model_len", integer(0)}},
                                  {"id", "object", "created", "owned_by", "max_model_len"}, false);
  return object({{"object", string_enum({"list"})}, {"data", array(model)}}, {"object", "data"}, false);
}

JsonObject health_schema() {
  return object({{"status", string_enum({"ok", "loading", "draining"})}}, {"status"}, false);
}

// ---- request schemas ----

JsonObject token_ids(const OpenApiOptions& o, int64_t min_items) {
  return array(integer(0, o.vocab_size > 0 ? o.vocab_size - 1 : kNoMax), min_items);
}

JsonObject max_tokens_schema(const OpenApiOptions& o, const std::string& what) {
  return described(nullable(integer(1, o.max_seq_len > 0 ? o.max_seq_len : kNoMax)),
                   what + " The prompt's tokens plus these must fit max_model_len.");
}

// The fields both endpoints share.
Props common_props(const OpenApiOptions& o) {
  JsonObject model = type("string");
  if (!o.model_name.empty()) model.strs("enum", {o.model_name});
  const JsonObject stop_string = type("string").num("minLength", int64_t(1));
  const JsonObject seed =
      type("integer").json("minimum", "-9223372036854775808").json("maximum", "18446744073709551615");
  const JsonObject stream_options = nullable(object({{"include_usage", nullable(type("boolean"))}}, {}, true));
  const JsonObject zero = nullable(number(0, 0));
  return {
      {"model", described(nullable(model), "The served model (the default when omitted).")},
      {"temperature", nullable(number(0, 2))},
      {"top_p", nullable(type("number").num("minimum", 0.0).boolean("exclusiveMinimum", true).num("maximum", 1.0))},
      {"top_k", described(nullable(integer(-1, INT32_MAX)), "Sample from the k most likely tokens; -1 or 0: all.")},
      {"n", nullable(integer(1, kMaxChoicesPerPrompt))},
      {"seed", nullable(seed)},
      {"stop", nullable(one_of({stop_string, array(stop_string, 0, kMaxStopStrings)}))},
      {"stream", nullable(type("boolean"))},
      {"stream_options", described(stream_options, "Only with stream: true.")},
      {"ignore_eos", nullable(type("boolean"))},
      {"sparq_r", described(nullable(integer(0, o.head_dim > 0 ? o.head_dim : kNoMax)),
                            "Extension: SparQ attention (Ribar et al., 2024) for the generated tokens: the sparq_r "
                            "largest-|q| components of each query rank the cached keys, the sparq_k best are attended "
                            "to exactly and blended with the mean value. Give both or neither (neither: the "
                            "server's default, serving.sparq_r / sparq_k); both 0: full attention. The prompt always "
                            "uses full attention.")},
      {"sparq_k", described(nullable(integer(0, o.max_seq_len > 0 ? o.max_seq_len : kNoMax)),
                            "Extension: the number of keys SparQ attends to (with sparq_r).")},
      {"user", nullable(type("string"))},
      {"presence_penalty", described(zero, "Not supported: only 0.")},
      {"frequency_penalty", described(zero, "Not supported: only 0.")},
      {"logit_bias", described(nullable(type("object").num("maxProperties", int64_t(0))), "Not supported: only {}.")},
  };
}

JsonObject completion_request_schema(const OpenApiOptions& o) {
  Props p = common_props(o);
  const JsonObject text = type("string").num("minLength", int64_t(1));
  p.emplace_back("prompt",
                 one_of({text, token_ids(o, 1), array(text, 1, kMaxPrompts), array(token_ids(o, 1), 1, kMaxPrompts)}));
  p.emplace_back("max_tokens", max_tokens_schema(o, "Default 16."));
  p.emplace_back("logprobs", nullable(integer(0, kMaxCompletionLogprobs)));
  p.emplace_back("echo", described(nullable(type("boolean")), "Not together with logprobs."));
  p.emplace_back("best_of", described(nullable(integer(1, kMaxChoicesPerPrompt)), "Only equal to n."));
  p.emplace_back("suffix", described(nullable(type("string").num("maxLength", int64_t(0))), "Not supported."));
  return object(p, {"prompt"}, true);
}

JsonObject chat_request_schema(const OpenApiOptions& o) {
  Props p = common_props(o);
  const JsonObject part = object({{"type", string_enum({"text"})}, {"text", type("string")}}, {"type", "text"}, true);
  const JsonObject message = object({{"role", string_enum({"system", "user", "assistant"})},
                                     {"content", one_of({type("string"), array(part)})},
                                     {"name", nullable(type("string"))}},
                                    {"role", "content"}, true);
  p.emplace_back("messages", array(message, 1));
  p.emplace_back("max_tokens", max_tokens_schema(o, "Default: the rest of the context."));
  p.emplace_back("max_completion_tokens", max_tokens_schema(o, "The same as max_tokens."));
  p.emplace_back("logprobs", nullable(type("boolean")));
  p.emplace_back("top_logprobs", described(nullable(integer(0, kMaxTopLogprobs)), "Needs logprobs: true."));
  p.emplace_back("response_format", nullable(object({{"type", string_enum({"text"})}}, {"type"}, true)));
  for (const char* k : {"tools", "functions"})
    p.emplace_back(k, described(nullable(type("array").num("maxItems", int64_t(0))), "Not supported."));
  for (const char* k : {"tool_choice", "function_call"})
    p.emplace_back(k, described(nullable(string_enum({"none"})), "Not supported."));
  p.emplace_back("parallel_tool_calls", nullable(type("boolean")));
  return object(p, {"messages"}, true);
}

// ---- operations ----

JsonObject json_content(const JsonObject& schema) {
  return JsonObject().obj("application/json", JsonObject().obj("schema", schema));
}

JsonObject header(const std::string& description) {
  return JsonObject().str("description", description).boolean("required", true).obj("schema", type("string"));
}

JsonObject response(const std::string& description, const JsonObject& content) {
  return JsonObject().str("description", description).obj("content", content);
}

JsonObject error_response(const std::string& description, const char* required_header = nullptr,
                          const std::string& header_text = "") {
  JsonObject r = response(description, json_content(ref("Error")));
  if (required_header) r.obj("headers", JsonObject().obj(required_header, header(header_text)));
  return r;
}

// The responses every route can give besides its own: limits of the connection layer, auth, draining.
void add_common_responses(JsonObject& r, bool secured, bool health) {
  if (secured) {
    r.obj("401", error_response("Missing or wrong API key.", "WWW-Authenticate", "Bearer"));
  }
  r.obj("408", error_response("The request did not arrive within the request timeout."));
  r.obj("413", error_response("The request body is over the size limit."));
  r.obj("429", error_response("Too many open connections, or the engine's queue is full.", "Retry-After",
                              "Seconds to wait before retrying."));
  r.obj("431", error_response("The request headers are over the size limit."));
  JsonObject unavailable = health ? response("Loading or draining.", json_content(ref("Health")))
                                  : error_response("The model is loading, or the server is draining.");
  unavailable.obj("headers", JsonObject().obj("Retry-After", header("Seconds to wait before retrying.")));
  r.obj("503", unavailable);
}

JsonObject get_operation(const std::string& id, const std::string& summary, const JsonObject& ok, bool secured,
                         bool health) {
  JsonObject r;
  r.obj("200", ok);
  add_common_responses(r, secured, health);
  JsonObject op;
  op.str("operationId", id).str("summary", summary).obj("responses", r);
  if (health) op.json("security", "[]");
  return JsonObject().obj("get", op);
}

JsonObject post_operation(const std::string& id, const std::string& summary, const std::string& request,
                          const std::string& reply, bool secured) {
  JsonObject ok_content = json_content(ref(reply));
  ok_content.obj("text/event-stream",
                 JsonObject().obj("schema", described(type("string"),
                                                      "With stream: server-sent events, each "
                                                      "`data: <chunk JSON>`, ending `data: [DONE]`.")));
  JsonObject r;
  r.obj("200", response("The completion (JSON), or its chunks (stream).", ok_content));
  r.obj("400", error_response("Malformed JSON, an unknown field, a value of the wrong type or range, an empty "
                              "prompt, a prompt with max_tokens beyond the context, or an unsupported option."));
  r.obj("404", error_response("Unknown model (code model_not_found)."));
  r.obj("500", error_response("The engine failed the request."));
  add_common_responses(r, secured, false);
  JsonObject body;
  body.boolean("required", true).obj("content", json_content(ref(request)));
  JsonObject op;
  op.str("operationId", id).str("summary", summary).obj("requestBody", body).obj("responses", r);
  return JsonObject().obj("post", op);
}

JsonObject paths(const OpenApiOptions& o) {
  const bool s = o.auth;
  JsonObject p;
  p.obj("/health", get_operation("health", "Readiness: ok once the model is loaded.",
                                 response("Ready.", json_content(ref("Health"))), false, true));
  p.obj("/v1/models", get_operation("listModels", "The served model.",
                                    response("The model list.", json_content(ref("ModelList"))), s, false));
  const JsonObject text = JsonObject().obj(prom::kContentType, JsonObject().obj("schema", type("string")));
  p.obj("/metrics",
        get_operation("metrics", "Prometheus metrics (text format 0.0.4).", response("The metrics.", text), s, false));
  p.obj("/openapi.json", get_operation("openapi", "This document.",
                                       response("The OpenAPI document.", json_content(type("object"))), s, false));
  p.obj("/v1/completions",
        post_operation("createCompletion", "Text completion.", "CompletionRequest", "Completion", s));
  p.obj("/v1/chat/completions", post_operation("createChatCompletion", "Chat completion (the chat template).",
                                               "ChatCompletionRequest", "ChatCompletion", s));
  return p;
}

}  // namespace

std::string openapi_json(const OpenApiOptions& o) {
  JsonObject schemas;
  schemas.obj("Error", error_schema())
      .obj("Health", health_schema())
      .obj("Usage", usage_schema())
      .obj("ModelList", models_schema())
      .obj("Completion", response_schema(false))
      .obj("ChatCompletion", response_schema(true))
      .obj("CompletionRequest", completion_request_schema(o))
      .obj("ChatCompletionRequest", chat_request_schema(o));
  JsonObject components;
  components.obj("schemas", schemas);
  JsonObject doc;
  doc.str("openapi", "3.0.3");
  doc.obj("info", JsonObject()
                      .str("title", "moe serve")
                      .str("version", "1.0.0")
                      .str("description",
                           "OpenAI-compatible completions and chat completions of a Mixture-of-"
                           "Experts model, with health, metrics and this description."));
  if (o.auth) {
    components.obj("securitySchemes",
                   JsonObject().obj("bearerAuth", JsonObject().str("type", "http").str("scheme", "bearer")));
    doc.json("security", json_array({JsonObject().json("bearerAuth", "[]").text()}));
  }
  doc.obj("paths", paths(o)).obj("components", components);
  return doc.text();
}

}  // namespace moe::serve
