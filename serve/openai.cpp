#include "serve/openai.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <set>

#include "core/data.h"
#include "core/error.h"
#include "core/json.h"

namespace moe::serve {
namespace {

[[noreturn]] void bad(std::string message, std::string param = "", std::string code = "", int status = 400) {
  throw RequestError(ApiError{status, std::move(message), std::move(param), std::move(code)});
}

// The shortest text that reads back to v ("2", "0.1", "1e+30").
std::string shortest(double v) {
  char buf[40];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

// A log-probability as JSON (-inf, which JSON cannot write, as -9999 as vLLM does).
std::string logprob_text(double v) { return std::isfinite(v) ? shortest(v) : "-9999.0"; }

std::string kind_name(const JsonValue& v) {
  switch (v.kind) {
    case JsonValue::kObject:
      return "an object";
    case JsonValue::kArray:
      return "an array";
    case JsonValue::kString:
      return "a string";
    case JsonValue::kInt:
      return "an integer";
    case JsonValue::kNumber:
      return "a number";
    case JsonValue::kBool:
      return "a boolean";
    case JsonValue::kNull:
      return "null";
  }
  return "a value";
}

std::string value_text(const JsonValue& v) {
  if (v.kind == JsonValue::kInt) return std::to_string(v.num);
  if (v.kind == JsonValue::kNumber) return shortest(v.dbl);
  if (v.kind == JsonValue::kBool) return v.b ? "true" : "false";
  return kind_name(v);
}

bool is_integral(const JsonValue& v) {
  return v.kind == JsonValue::kInt ||
         (v.kind == JsonValue::kNumber && std::isfinite(v.dbl) && v.dbl == std::floor(v.dbl));
}

// An integral value saturated to int64 (range checks then reject what does not fit).
int64_t saturate(const JsonValue& v) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max(), kMin = std::numeric_limits<int64_t>::min();
  if (v.kind == JsonValue::kInt) return v.num > static_cast<uint64_t>(kMax) ? kMax : static_cast<int64_t>(v.num);
  if (v.dbl >= 9.2e18) return kMax;
  if (v.dbl <= -9.2e18) return kMin;
  return static_cast<int64_t>(v.dbl);
}

std::string range_text(double lo, double hi, bool lo_open) {
  if (hi == std::numeric_limits<double>::infinity()) return std::string(lo_open ? "> " : ">= ") + shortest(lo);
  return std::string(lo_open ? "in (" : "in [") + shortest(lo) + ", " + shortest(hi) + "]";
}

// The fields of one JSON object of a request, read with their type and range checked. `prefix` names a nested
// object in the errors' messages and params ("stream_options.").
class Fields {
 public:
  Fields(const JsonValue& obj, std::string prefix) : obj_(obj), prefix_(std::move(prefix)) {}
  // Rejects a field not in `known` (OpenAI's message).
  void only(std::initializer_list<const char*> known) const {
    for (const auto& [key, value] : obj_.object) {
      bool ok = false;
      for (const char* k : known) ok = ok || key == k;
      if (!ok) bad("Unrecognized request argument supplied: " + prefix_ + key, prefix_ + key);
    }
  }
  std::string param(const char* key) const { return prefix_ + key; }
  // The field's value; null when absent or JSON null (every optional field takes null for "not given").
  const JsonValue* get(const char* key) const {
    const JsonValue* v = obj_.field(key);
    return v && v->kind != JsonValue::kNull ? v : nullptr;
  }
  [[noreturn]] void type_error(const char* key, const std::string& want, const JsonValue& v) const {
    bad("'" + param(key) + "' must be " + want + ", got " + kind_name(v), param(key));
  }
  [[noreturn]] void range_error(const char* key, const std::string& range, const JsonValue& v) const {
    bad("'" + param(key) + "' must be " + range + ", got " + value_text(v), param(key));
  }
  std::optional<int64_t> integer(const char* key, int64_t lo, int64_t hi) const {
    const JsonValue* v = get(key);
    if (!v) return std::nullopt;
    if (!is_integral(*v)) type_error(key, "an integer", *v);
    const int64_t x = saturate(*v);
    if (x < lo || x > hi || (v->kind == JsonValue::kInt && v->num > static_cast<uint64_t>(hi))) {
      const bool open_top = hi >= std::numeric_limits<int32_t>::max();  // a technical bound: not worth naming
      range_error(key, open_top ? ">= " + std::to_string(lo) : range_text(double(lo), double(hi), false), *v);
    }
    return x;
  }
  std::optional<double> number(const char* key, double lo, double hi, bool lo_open = false) const {
    const JsonValue* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_number()) type_error(key, "a number", *v);
    if (!(lo_open ? v->dbl > lo : v->dbl >= lo) || !(v->dbl <= hi)) range_error(key, range_text(lo, hi, lo_open), *v);
    return v->dbl;
  }
  std::optional<bool> boolean(const char* key) const {
    const JsonValue* v = get(key);
    if (!v) return std::nullopt;
    if (v->kind != JsonValue::kBool) type_error(key, "a boolean", *v);
    return v->b;
  }
  std::optional<std::string> string(const char* key) const {
    const JsonValue* v = get(key);
    if (!v) return std::nullopt;
    if (v->kind != JsonValue::kString) type_error(key, "a string", *v);
    return v->str;
  }
  const JsonValue* object(const char* key) const {
    const JsonValue* v = get(key);
    if (v && v->kind != JsonValue::kObject) type_error(key, "an object", *v);
    return v;
  }

 private:
  const JsonValue& obj_;
  std::string prefix_;
};

JsonValue parse_body(const std::string& body) {
  JsonValue doc;
  try {
    doc = parse_json(body, "the request body");
  } catch (const Error& e) {
    bad(std::string("We could not parse the JSON body of your request: ") + e.what());
  }
  if (doc.kind != JsonValue::kObject) bad("the request body must be a JSON object, got " + kind_name(doc));
  return doc;
}

std::string check_model(const Fields& f, const ModelInfo& info) {
  const std::optional<std::string> model = f.string("model");
  if (model && *model != info.name) {
    bad("The model '" + *model + "' does not exist (this server serves '" + info.name + "')", "model",
        "model_not_found", 404);
  }
  return info.name;
}

// The options both endpoints share.
struct Common {
  SamplingParams sampling;
  int n = 1;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool stream = false, include_usage = false, ignore_eos = false;
  std::optional<SparqParams> sparq;
};

std::optional<uint64_t> parse_seed(const Fields& f) {
  const JsonValue* v = f.get("seed");
  if (!v) return std::nullopt;
  if (!is_integral(*v)) f.type_error("seed", "an integer", *v);
  if (v->kind == JsonValue::kInt) return v->num;  // 0 .. 2^64-1
  if (v->dbl < -9223372036854775808.0 || v->dbl >= 18446744073709551616.0) {
    f.range_error("seed", "in [-9223372036854775808, 18446744073709551615]", *v);
  }
  if (v->dbl >= 0) return static_cast<uint64_t>(v->dbl);
  return static_cast<uint64_t>(static_cast<int64_t>(v->dbl));  // negative seeds wrap (two's complement)
}

std::vector<std::string> parse_stop(const Fields& f) {
  const JsonValue* v = f.get("stop");
  if (!v) return {};
  std::vector<std::string> stop;
  if (v->kind == JsonValue::kString) {
    stop.push_back(v->str);
  } else if (v->kind == JsonValue::kArray) {
    if (v->array.size() > size_t(kMaxStopStrings)) {
      bad("'stop' may hold at most " + std::to_string(kMaxStopStrings) + " strings, got " +
              std::to_string(v->array.size()),
          "stop");
    }
    for (size_t i = 0; i < v->array.size(); ++i) {
      if (v->array[i].kind != JsonValue::kString) {
        bad("'stop[" + std::to_string(i) + "]' must be a string, got " + kind_name(v->array[i]), "stop");
      }
      stop.push_back(v->array[i].str);
    }
  } else {
    f.type_error("stop", "a string or an array of strings", *v);
  }
  for (const auto& s : stop)
    if (s.empty()) bad("'stop' strings must not be empty", "stop");
  return stop;
}

void parse_stream(const Fields& f, Common& c) {
  c.stream = f.boolean("stream").value_or(false);
  const JsonValue* so = f.object("stream_options");
  if (!so) return;
  if (!c.stream) bad("'stream_options' is only allowed when 'stream' is true", "stream_options");
  Fields opts(*so, "stream_options.");
  opts.only({"include_usage"});
  c.include_usage = opts.boolean("include_usage").value_or(false);
}

// Options accepted with their neutral value only: a penalty of 0, an empty logit_bias.
void reject_unsupported_common(const Fields& f) {
  for (const char* key : {"presence_penalty", "frequency_penalty"}) {
    const std::optional<double> p = f.number(key, -2.0, 2.0);
    if (p && *p != 0) bad("'" + std::string(key) + "' is not supported (only 0), got " + shortest(*p), key);
  }
  const JsonValue* lb = f.object("logit_bias");
  if (lb && !lb->object.empty()) bad("'logit_bias' is not supported (only null or {})", "logit_bias");
}

// The SparQ extension fields: both or neither (neither: the server's default), sparq_r in [0, head_dim] and
// sparq_k in [0, max_seq_len], both 0 (full attention) or both > 0.
std::optional<SparqParams> parse_sparq(const Fields& f, const ModelInfo& info) {
  const std::optional<int64_t> r = f.integer("sparq_r", 0, info.head_dim);
  const std::optional<int64_t> k = f.integer("sparq_k", 0, info.max_seq_len);
  if (!r && !k) return std::nullopt;
  if (!r) bad("'sparq_r' is required with 'sparq_k' (SparQ attention takes both; 0 and 0: full attention)", "sparq_r");
  if (!k) bad("'sparq_k' is required with 'sparq_r' (SparQ attention takes both; 0 and 0: full attention)", "sparq_k");
  if ((*r == 0) != (*k == 0)) {
    bad("'sparq_r' and 'sparq_k' must both be 0 (full attention) or both > 0, got " + std::to_string(*r) + " and " +
            std::to_string(*k),
        *r == 0 ? "sparq_r" : "sparq_k");
  }
  if (*r > 0 && !info.sparq) bad("'sparq_r': this server's backend has no SparQ attention (only 0)", "sparq_r");
  return SparqParams{static_cast<int>(*r), static_cast<int>(*k)};
}

Common parse_common(const Fields& f, const ModelInfo& info) {
  Common c;
  c.sampling.temperature = static_cast<float>(f.number("temperature", 0, 2).value_or(1));
  c.sampling.top_p = static_cast<float>(f.number("top_p", 0, 1, true).value_or(1));
  const int64_t top_k = f.integer("top_k", -1, std::numeric_limits<int32_t>::max()).value_or(0);
  c.sampling.top_k = top_k <= 0 ? 0 : static_cast<int>(std::min<int64_t>(top_k, std::max(info.vocab_size, 1)));
  c.n = static_cast<int>(f.integer("n", 1, kMaxChoicesPerPrompt).value_or(1));
  c.seed = parse_seed(f);
  c.stop = parse_stop(f);
  parse_stream(f, c);
  c.ignore_eos = f.boolean("ignore_eos").value_or(false);
  c.sparq = parse_sparq(f, info);
  f.string("user");  // accepted (type-checked) and not used
  reject_unsupported_common(f);
  return c;
}

struct Prompt {
  std::vector<int32_t> tokens;
  std::string text;  // the prompt as text (for echo)
};

std::vector<int32_t> token_prompt(const JsonValue& arr, const std::string& where, const ModelInfo& info) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < arr.array.size(); ++i) {
    const JsonValue& t = arr.array[i];
    if (!is_integral(t)) bad("'" + where + "[" + std::to_string(i) + "]' must be a token id (an integer)", "prompt");
    const int64_t id = saturate(t);
    if (id < 0 || id >= info.vocab_size) {
      bad("token id " + value_text(t) + " at " + where + "[" + std::to_string(i) + "] is outside the vocabulary (" +
              std::to_string(info.vocab_size) + " tokens: ids 0.." + std::to_string(info.vocab_size - 1) + ")",
          "prompt");
    }
    ids.push_back(static_cast<int32_t>(id));
  }
  if (ids.empty()) bad("'" + where + "' is empty: a prompt needs at least one token", "prompt");
  return ids;
}

Prompt text_prompt(const std::string& text, const std::string& where, const Tokenizer& tok) {
  if (text.empty()) bad("'" + where + "' is empty: a prompt needs at least one token", "prompt");
  Prompt p{tok.encode(text), text};
  if (p.tokens.empty()) bad("'" + where + "' encodes to no tokens", "prompt");
  return p;
}

std::vector<Prompt> parse_prompts(const Fields& f, const ParseContext& ctx, bool echo) {
  const JsonValue* v = f.get("prompt");
  if (!v) bad("'prompt' is required", "prompt");
  const Tokenizer& tok = *ctx.tokenizer;
  if (v->kind == JsonValue::kString) return {text_prompt(v->str, "prompt", tok)};
  if (v->kind != JsonValue::kArray) f.type_error("prompt", "a string or an array", *v);
  if (v->array.empty()) bad("'prompt' is empty: a prompt needs at least one token", "prompt");
  const JsonValue::Kind k0 = v->array[0].kind;
  if (k0 != JsonValue::kString && k0 != JsonValue::kArray) {  // one prompt of token ids
    Prompt p{token_prompt(*v, "prompt", ctx.info), ""};
    if (echo) p.text = tok.decode(p.tokens);
    return {p};
  }
  if (v->array.size() > size_t(kMaxPrompts)) {
    bad("'prompt' may hold at most " + std::to_string(kMaxPrompts) + " prompts, got " + std::to_string(v->array.size()),
        "prompt");
  }
  std::vector<Prompt> out;
  for (size_t i = 0; i < v->array.size(); ++i) {
    const JsonValue& e = v->array[i];
    const std::string where = "prompt[" + std::to_string(i) + "]";
    if (e.kind != k0) {
      bad("'prompt' must be a string, an array of token ids, an array of strings or an array of token-id arrays; " +
              where + " is " + kind_name(e),
          "prompt");
    }
    if (e.kind == JsonValue::kString) {
      out.push_back(text_prompt(e.str, where, tok));
    } else {
      out.push_back(Prompt{token_prompt(e, where, ctx.info), ""});
      if (echo) out.back().text = tok.decode(out.back().tokens);
    }
  }
  return out;
}

// The completion length of a prompt of `prompt_len` tokens: `requested` or `dflt` (-1: the rest of the context),
// checked against the context (OpenAI's message and code).
int completion_budget(int prompt_len, std::optional<int64_t> requested, int dflt, const ModelInfo& info,
                      const std::string& param) {
  const int64_t limit = info.max_seq_len;
  if (!requested && dflt < 0) {
    if (prompt_len >= limit) {
      bad("This model's maximum context length is " + std::to_string(limit) + " tokens, however your messages " +
              "resulted in " + std::to_string(prompt_len) + " tokens, which leaves no room for the completion. " +
              "Please reduce the length of the messages.",
          param, "context_length_exceeded");
    }
    return static_cast<int>(limit - prompt_len);
  }
  const int64_t m = requested ? *requested : dflt;
  if (prompt_len + m > limit) {
    bad("This model's maximum context length is " + std::to_string(limit) + " tokens, however you requested " +
            std::to_string(prompt_len + m) + " tokens (" + std::to_string(prompt_len) + " in your prompt; " +
            std::to_string(m) + " for the completion). Please reduce your prompt; or completion length.",
        param, "context_length_exceeded");
  }
  return static_cast<int>(m);
}

GenerationRequest make_request(const Common& c, std::vector<int32_t> prompt, int max_tokens, int logprobs,
                               uint64_t seed) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.sampling = c.sampling;
  r.sampling.seed = seed;
  r.max_tokens = max_tokens;
  r.stop = c.stop;
  r.logprobs = logprobs;
  r.ignore_eos = c.ignore_eos;
  r.sparq = c.sparq;
  return r;
}

ParsedRequest start(ApiKind kind, const Common& c, std::string model) {
  ParsedRequest pr;
  pr.kind = kind;
  pr.model = std::move(model);
  pr.n = c.n;
  pr.stream = c.stream;
  pr.include_usage = c.include_usage;
  return pr;
}

// Completions options accepted only with their neutral values.
void reject_unsupported_completion(const Fields& f, int n) {
  const std::optional<int64_t> best_of = f.integer("best_of", 1, 64);
  if (best_of && *best_of != n) {
    bad("'best_of' is not supported unless it equals n (" + std::to_string(n) + "), got " + std::to_string(*best_of),
        "best_of");
  }
  const std::optional<std::string> suffix = f.string("suffix");
  if (suffix && !suffix->empty()) bad("'suffix' is not supported (only null)", "suffix");
}

// ---- chat messages ----

std::string message_content(const JsonValue& c, const std::string& where) {
  if (c.kind == JsonValue::kString) return c.str;
  if (c.kind != JsonValue::kArray) {
    bad("'" + where + "' must be a string or an array of text parts, got " + kind_name(c), where);
  }
  std::string text;
  for (size_t i = 0; i < c.array.size(); ++i) {
    const std::string pw = where + "[" + std::to_string(i) + "]";
    const JsonValue& part = c.array[i];
    if (part.kind != JsonValue::kObject) bad("'" + pw + "' must be an object, got " + kind_name(part), pw);
    Fields pf(part, pw + ".");
    pf.only({"type", "text"});
    const std::optional<std::string> type = pf.string("type");
    if (!type) bad("'" + pw + ".type' is required", pw + ".type");
    if (*type != "text") bad("'" + pw + ".type' '" + *type + "' is not supported: only text parts", pw + ".type");
    const std::optional<std::string> t = pf.string("text");
    if (!t) bad("'" + pw + ".text' is required", pw + ".text");
    text += (i ? "\n" : "") + *t;
  }
  return text;
}

std::vector<ChatMessage> parse_messages(const Fields& f) {
  const JsonValue* v = f.get("messages");
  if (!v) bad("'messages' is required", "messages");
  if (v->kind != JsonValue::kArray) f.type_error("messages", "an array", *v);
  if (v->array.empty()) bad("'messages' must not be empty", "messages");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < v->array.size(); ++i) {
    const std::string where = "messages[" + std::to_string(i) + "]";
    const JsonValue& m = v->array[i];
    if (m.kind != JsonValue::kObject) bad("'" + where + "' must be an object, got " + kind_name(m), where);
    Fields mf(m, where + ".");
    mf.only({"role", "content", "name"});
    const std::optional<std::string> role = mf.string("role");
    if (!role) bad("'" + where + ".role' is required", where + ".role");
    if (*role != "system" && *role != "user" && *role != "assistant") {
      bad("'" + where + ".role' '" + *role + "' is not supported: use system, user or assistant", where + ".role");
    }
    mf.string("name");  // accepted, not shown (the template has no names)
    const JsonValue* content = mf.get("content");
    if (!content) bad("'" + where + ".content' is required", where + ".content");
    out.push_back({*role, message_content(*content, where + ".content")});
  }
  return out;
}

// Chat options accepted only with their neutral values: no tools or functions, plain-text responses.
void reject_unsupported_chat(const Fields& f) {
  for (const char* key : {"tools", "functions"}) {
    const JsonValue* v = f.get(key);
    if (v && v->kind != JsonValue::kArray) f.type_error(key, "an array", *v);
    if (v && !v->array.empty()) bad("'" + std::string(key) + "' is not supported (this model has no tool calls)", key);
  }
  for (const char* key : {"tool_choice", "function_call"}) {
    const JsonValue* v = f.get(key);
    if (v && !(v->kind == JsonValue::kString && v->str == "none")) {
      bad("'" + std::string(key) + "' is not supported (only null or \"none\")", key);
    }
  }
  f.boolean("parallel_tool_calls");  // accepted: there are no tool calls
  if (const JsonValue* rf = f.object("response_format")) {
    Fields rff(*rf, "response_format.");
    rff.only({"type"});
    const std::optional<std::string> type = rff.string("type");
    if (!type) bad("'response_format.type' is required", "response_format.type");
    if (*type != "text") {
      bad("'response_format.type' '" + *type + "' is not supported: only 'text'", "response_format.type");
    }
  }
}

// Chat `logprobs` (bool) and `top_logprobs` (0..20, needs logprobs): the GenerationRequest's logprobs.
int chat_logprobs(const Fields& f) {
  const bool lp = f.boolean("logprobs").value_or(false);
  const std::optional<int64_t> top = f.integer("top_logprobs", 0, kMaxTopLogprobs);
  if (top && !lp) bad("'top_logprobs' requires 'logprobs' to be true", "top_logprobs");
  return lp ? static_cast<int>(top.value_or(0)) : -1;
}

std::optional<int64_t> chat_max_tokens(const Fields& f) {
  const std::optional<int64_t> a = f.integer("max_tokens", 1, std::numeric_limits<int32_t>::max());
  const std::optional<int64_t> b = f.integer("max_completion_tokens", 1, std::numeric_limits<int32_t>::max());
  if (a && b && *a != *b) {
    bad("give 'max_tokens' or 'max_completion_tokens', not both with different values (" + std::to_string(*a) +
            " and " + std::to_string(*b) + ")",
        "max_completion_tokens");
  }
  return b ? b : a;
}

}  // namespace

std::string error_type(int status) {
  switch (status) {
    case 401:
      return "authentication_error";
    case 429:
      return "rate_limit_error";
    case 503:
      return "service_unavailable_error";
    default:
      return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

std::string error_json(const ApiError& e) {
  JsonObject err;
  err.str("message", e.message).str("type", error_type(e.status));
  if (e.param.empty())
    err.null("param");
  else
    err.str("param", e.param);
  if (e.code.empty())
    err.null("code");
  else
    err.str("code", e.code);
  return JsonObject().obj("error", err).text();
}

ParsedRequest parse_completion_request(const std::string& body, const ParseContext& ctx) {
  MOE_CHECK(ctx.tokenizer, "parse_completion_request: no tokenizer");
  const JsonValue doc = parse_body(body);
  const Fields f(doc, "");
  f.only({"model",
          "prompt",
          "max_tokens",
          "temperature",
          "top_p",
          "top_k",
          "n",
          "seed",
          "stop",
          "stream",
          "stream_options",
          "logprobs",
          "echo",
          "ignore_eos",
          "sparq_r",
          "sparq_k",
          "user",
          "presence_penalty",
          "frequency_penalty",
          "best_of",
          "logit_bias",
          "suffix"});
  std::string model = check_model(f, ctx.info);
  const Common c = parse_common(f, ctx.info);
  reject_unsupported_completion(f, c.n);
  const std::optional<int64_t> logprobs = f.integer("logprobs", 0, kMaxCompletionLogprobs);
  const bool echo = f.boolean("echo").value_or(false);
  if (echo && logprobs) {
    bad("'echo' together with 'logprobs' is not supported: prompt log-probabilities are not computed", "echo");
  }
  const std::optional<int64_t> max_tokens = f.integer("max_tokens", 1, std::numeric_limits<int32_t>::max());
  const std::vector<Prompt> prompts = parse_prompts(f, ctx, echo);
  ParsedRequest pr = start(ApiKind::kCompletion, c, std::move(model));
  pr.logprobs = logprobs.has_value();
  const uint64_t seed = c.seed.value_or(ctx.default_seed);
  for (size_t p = 0; p < prompts.size(); ++p) {
    const int len = static_cast<int>(prompts[p].tokens.size());
    const int m =
        completion_budget(len, max_tokens, kDefaultCompletionTokens, ctx.info, max_tokens ? "max_tokens" : "prompt");
    pr.prompt_tokens.push_back(len);
    for (int j = 0; j < c.n; ++j) {
      const uint64_t index = pr.choices.size();
      pr.choices.push_back(make_request(c, prompts[p].tokens, m, logprobs ? int(*logprobs) : -1, seed + index));
      pr.prompt_of_choice.push_back(static_cast<int>(p));
      pr.echo.push_back(echo ? prompts[p].text : "");
    }
  }
  return pr;
}

ParsedRequest parse_chat_request(const std::string& body, const ParseContext& ctx) {
  MOE_CHECK(ctx.tokenizer, "parse_chat_request: no tokenizer");
  const JsonValue doc = parse_body(body);
  const Fields f(doc, "");
  f.only({"model",
          "messages",
          "max_tokens",
          "max_completion_tokens",
          "temperature",
          "top_p",
          "top_k",
          "n",
          "seed",
          "stop",
          "stream",
          "stream_options",
          "logprobs",
          "top_logprobs",
          "ignore_eos",
          "sparq_r",
          "sparq_k",
          "user",
          "presence_penalty",
          "frequency_penalty",
          "logit_bias",
          "response_format",
          "tools",
          "tool_choice",
          "functions",
          "function_call",
          "parallel_tool_calls"});
  std::string model = check_model(f, ctx.info);
  const std::vector<ChatMessage> messages = parse_messages(f);
  Common c = parse_common(f, ctx.info);
  reject_unsupported_chat(f);
  const int logprobs = chat_logprobs(f);
  const std::optional<int64_t> max_tokens = chat_max_tokens(f);
  std::vector<int32_t> tokens = ctx.tokenizer->encode(chat_prompt(messages));
  const int len = static_cast<int>(tokens.size());
  const int m = completion_budget(len, max_tokens, -1, ctx.info, max_tokens ? "max_tokens" : "messages");
  bool has_turn_end = false;
  for (const auto& s : c.stop) has_turn_end = has_turn_end || s == kChatStop;
  if (!has_turn_end) c.stop.push_back(kChatStop);
  ParsedRequest pr = start(ApiKind::kChat, c, std::move(model));
  pr.logprobs = logprobs >= 0;
  pr.prompt_tokens.push_back(len);
  const uint64_t seed = c.seed.value_or(ctx.default_seed);
  for (int j = 0; j < c.n; ++j) {
    pr.choices.push_back(make_request(c, tokens, m, logprobs, seed + static_cast<uint64_t>(j)));
    pr.prompt_of_choice.push_back(0);
    pr.echo.push_back("");
  }
  return pr;
}

std::string chat_prompt(const std::vector<ChatMessage>& messages) {
  std::string out;
  for (const auto& m : messages) {
    std::string role = m.role;
    for (char& ch : role) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    out += role + ":\n" + m.content + "\n\n";
  }
  return out + "ASSISTANT:\n";
}

// ---- responses ----

std::string utf8_sanitize(const std::string& s) {
  static const char kReplacement[] = "\xef\xbf\xbd";
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int len = 0;
    uint32_t cp = 0, min = 0;
    if (c < 0x80)
      len = 1, cp = c;
    else if ((c & 0xE0) == 0xC0)
      len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0)
      len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0)
      len = 4, cp = c & 0x07, min = 0x10000;
    bool ok = len > 0 && i + len <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      ok = (cc & 0xC0) == 0x80;
      cp = (cp << 6) | (cc & 0x3F);
    }
    ok = ok && cp >= min && cp <= 0x10FFFF && !(cp >= 0xD800 && cp < 0xE000);
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      out += kReplacement;
      ++i;
    }
  }
  return out;
}

std::string sse_event(const std::string& json) { return "data: " + json + "\n\n"; }

std::string models_json(const ModelInfo& info) {
  JsonObject m;
  m.str("id", info.name).str("object", "model").num("created", info.created).str("owned_by", "moe");
  m.num("max_model_len", int64_t(info.max_seq_len));
  JsonObject list;
  list.str("object", "list").objs("data", {m});
  return list.text();
}

namespace {

ParsedRequest shape_of(const ParsedRequest& r) {
  ParsedRequest s;
  s.kind = r.kind;
  s.model = r.model;
  s.n = r.n;
  s.stream = r.stream;
  s.include_usage = r.include_usage;
  s.logprobs = r.logprobs;
  s.prompt_of_choice = r.prompt_of_choice;
  s.prompt_tokens = r.prompt_tokens;
  s.echo = r.echo;
  return s;
}

std::string bytes_json(const std::string& raw) {
  std::vector<std::string> b;
  for (unsigned char c : raw) b.push_back(std::to_string(int(c)));
  return json_array(b);
}

}  // namespace

ResponseAssembler::ResponseAssembler(const ParsedRequest& req, ResponseMeta meta, const Tokenizer& tokenizer)
    : req_(shape_of(req)), meta_(std::move(meta)), tok_(tokenizer) {
  choices_.resize(req.prompt_of_choice.size());
  for (size_t i = 0; i < choices_.size(); ++i) {
    choices_[i].text = req.echo[i];
    choices_[i].offset = static_cast<int64_t>(req.echo[i].size());
  }
  open_ = static_cast<int>(choices_.size());
}

ResponseAssembler::Record ResponseAssembler::record(const TokenEvent& ev, int64_t offset) const {
  Record r;
  r.raw = tok_.token_text(ev.token);
  r.text = utf8_sanitize(r.raw);
  r.logprob = ev.logprob;
  r.offset = offset;
  for (const TopLogprob& t : ev.top) {
    r.top_raw.push_back(tok_.token_text(t.token));
    r.top.emplace_back(utf8_sanitize(r.top_raw.back()), t.logprob);
  }
  return r;
}

std::string ResponseAssembler::logprobs_json(const std::vector<Record>& recs) const {
  if (req_.kind == ApiKind::kChat) {
    std::vector<std::string> content;
    for (const Record& r : recs) {
      std::vector<std::string> top;
      for (size_t k = 0; k < r.top.size(); ++k) {
        top.push_back(JsonObject()
                          .str("token", r.top[k].first)
                          .json("logprob", logprob_text(r.top[k].second))
                          .json("bytes", bytes_json(r.top_raw[k]))
                          .text());
      }
      content.push_back(JsonObject()
                            .str("token", r.text)
                            .json("logprob", logprob_text(r.logprob))
                            .json("bytes", bytes_json(r.raw))
                            .json("top_logprobs", json_array(top))
                            .text());
    }
    return JsonObject().json("content", json_array(content)).text();
  }
  std::vector<std::string> tokens, lps, tops, offsets;
  for (const Record& r : recs) {
    tokens.push_back(json_escape(r.text));
    lps.push_back(logprob_text(r.logprob));
    offsets.push_back(std::to_string(r.offset));
    JsonObject top;  // a dict: the first (most likely) of equal texts wins; the sampled token is always in it
    std::set<std::string> seen;
    for (const auto& [text, lp] : r.top)
      if (seen.insert(text).second) top.json(text, logprob_text(lp));
    if (seen.insert(r.text).second) top.json(r.text, logprob_text(r.logprob));
    tops.push_back(top.text());
  }
  return JsonObject()
      .json("tokens", json_array(tokens))
      .json("token_logprobs", json_array(lps))
      .json("top_logprobs", json_array(tops))
      .json("text_offset", json_array(offsets))
      .text();
}

std::string ResponseAssembler::chunk_envelope(const std::string& choices_json, bool with_usage) const {
  JsonObject o;
  o.str("id", meta_.id)
      .str("object", req_.kind == ApiKind::kChat ? "chat.completion.chunk" : "text_completion")
      .num("created", meta_.created)
      .str("model", meta_.model)
      .json("choices", choices_json);
  if (with_usage)
    o.json("usage", usage_json());
  else if (req_.include_usage)
    o.null("usage");
  return sse_event(o.text());
}

// One chunk of choice i: `text` (chat: the delta's content), the records' logprobs (null without), a finish
// reason (null: none yet); chat's first chunk carries the role, its last an empty delta.
std::string ResponseAssembler::chunk(int i, const std::string& text, const std::vector<Record>& recs,
                                     const char* finish, bool first) const {
  JsonObject c;
  c.num("index", int64_t(i));
  if (req_.kind == ApiKind::kChat) {
    JsonObject delta;
    if (first)
      delta.str("role", "assistant").str("content", "");
    else if (!finish)
      delta.str("content", text);
    c.obj("delta", delta);
  } else {
    c.str("text", text);
  }
  c.json("logprobs", req_.logprobs && !recs.empty() ? logprobs_json(recs) : "null");
  if (finish)
    c.str("finish_reason", finish);
  else
    c.null("finish_reason");
  return chunk_envelope(json_array({c.text()}), false);
}

std::string ResponseAssembler::usage_json() const {
  int64_t prompt = 0, completion = 0;
  for (int p : req_.prompt_tokens) prompt += p;
  for (const Choice& c : choices_) completion += c.completion_tokens;
  return JsonObject()
      .num("prompt_tokens", prompt)
      .num("completion_tokens", completion)
      .num("total_tokens", prompt + completion)
      .text();
}

std::string ResponseAssembler::stream_start() {
  std::string out;
  for (size_t i = 0; i < choices_.size(); ++i) {
    if (req_.kind == ApiKind::kChat)
      out += chunk(int(i), "", {}, nullptr, true);
    else if (!req_.echo[i].empty())
      out += chunk(int(i), utf8_sanitize(req_.echo[i]), {}, nullptr, false);
  }
  return out;
}

std::string ResponseAssembler::on_token(int i, const TokenEvent& ev) {
  MOE_CHECK(i >= 0 && size_t(i) < choices_.size(), "token event for choice " << i << " of " << choices_.size());
  Choice& c = choices_[i];
  if (failed_ || c.done) return "";
  std::vector<Record> recs;
  if (req_.logprobs) {
    recs.push_back(record(ev, c.offset));
    c.offset += static_cast<int64_t>(recs.back().raw.size());
  }
  ++c.completion_tokens;
  if (!req_.stream) {
    c.text += ev.text;
    c.records.insert(c.records.end(), recs.begin(), recs.end());
    return "";
  }
  if (ev.text.empty() && recs.empty()) return "";
  return chunk(i, utf8_sanitize(ev.text), recs, nullptr, false);
}

std::string ResponseAssembler::fail(const FinishEvent& ev) {
  failed_ = true;
  if (!ev.error.empty())
    error_ = ApiError{500, "the engine failed the request: " + ev.error, "", "engine_error"};
  else
    error_ = ApiError{503, "the request was aborted before it finished (the server is shutting down)", "", "aborted"};
  return req_.stream ? sse_event(error_json(error_)) + kSseDone : "";
}

std::string ResponseAssembler::on_finish(int i, const FinishEvent& ev) {
  MOE_CHECK(i >= 0 && size_t(i) < choices_.size(), "finish event for choice " << i << " of " << choices_.size());
  Choice& c = choices_[i];
  if (failed_ || c.done) return "";
  if (ev.reason == "abort" || !ev.error.empty()) return fail(ev);
  c.done = true;
  --open_;
  c.finish_reason = ev.reason;
  c.completion_tokens = ev.usage.completion_tokens;
  c.text += ev.text;
  if (!req_.stream) return "";
  std::string out;
  if (req_.kind == ApiKind::kChat) {
    if (!ev.text.empty()) out += chunk(i, utf8_sanitize(ev.text), {}, nullptr, false);
    out += chunk(i, "", {}, c.finish_reason.c_str(), false);
  } else {
    out += chunk(i, utf8_sanitize(ev.text), {}, c.finish_reason.c_str(), false);
  }
  if (open_ > 0) return out;
  if (req_.include_usage) out += chunk_envelope("[]", true);
  return out + kSseDone;
}

std::string ResponseAssembler::response_json() const {
  MOE_CHECK(open_ == 0 && !failed_, "response_json: the request has not finished (" << open_ << " choices open)");
  std::vector<std::string> choices;
  for (size_t i = 0; i < choices_.size(); ++i) {
    const Choice& c = choices_[i];
    JsonObject o;
    o.num("index", int64_t(i));
    if (req_.kind == ApiKind::kChat)
      o.obj("message", JsonObject().str("role", "assistant").str("content", utf8_sanitize(c.text)));
    else
      o.str("text", utf8_sanitize(c.text));
    o.json("logprobs", req_.logprobs ? logprobs_json(c.records) : "null");
    o.str("finish_reason", c.finish_reason);
    choices.push_back(o.text());
  }
  JsonObject r;
  r.str("id", meta_.id)
      .str("object", req_.kind == ApiKind::kChat ? "chat.completion" : "text_completion")
      .num("created", meta_.created)
      .str("model", meta_.model)
      .json("choices", json_array(choices))
      .json("usage", usage_json());
  return r.text();
}

}  // namespace moe::serve
