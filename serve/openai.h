// The OpenAI wire format of `moe serve` (POST /v1/completions, POST /v1/chat/completions, GET /v1/models): request
// bodies parsed and validated into GenerationRequests, responses and server-sent-event chunks written as JSON, and
// the error object. Pure functions and one assembler class; no sockets (serve/http_server.h does the HTTP).
//
// Chat template. The served models are base models trained on plain text (such as Shakespeare's plays), so a chat
// is written as a play: each message becomes "<ROLE>:\n<content>\n\n" with ROLE = SYSTEM, USER or ASSISTANT (the
// message's `name` is accepted and not shown; content given as text parts is joined with "\n"), and the prompt ends
// with "ASSISTANT:\n". The assistant's turn ends at the next blank line, so a chat request stops at "\n\n" besides
// the client's stop strings.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "serve/api.h"

namespace moe::serve {

// ---- errors ----

// An error answered to the client: the HTTP status and OpenAI's error object. `type` follows the status
// (error_type); `param` and `code` are null in the JSON when empty.
struct ApiError {
  int status = 400;
  std::string message;
  std::string param;
  std::string code;
};

// The OpenAI error type of a status: 400 404 405 408 413 431 "invalid_request_error", 401 "authentication_error",
// 429 "rate_limit_error", 503 "service_unavailable_error", other 5xx "server_error".
std::string error_type(int status);

// {"error":{"message":...,"type":...,"param":...|null,"code":...|null}}
std::string error_json(const ApiError& e);

// Thrown by the request parsers with the error to answer (a 4xx).
class RequestError : public std::runtime_error {
 public:
  explicit RequestError(ApiError e) : std::runtime_error(e.message), error_(std::move(e)) {}
  const ApiError& error() const { return error_; }

 private:
  ApiError error_;
};

// ---- requests ----

inline constexpr int kMaxChoicesPerPrompt = 8;  // n
inline constexpr int kMaxPrompts = 32;          // prompts in one completions request
inline constexpr int kMaxStopStrings = 4;
inline constexpr int kMaxCompletionLogprobs = 5;  // completions `logprobs`
inline constexpr int kDefaultCompletionTokens = 16;
inline constexpr const char* kChatStop = "\n\n";  // the end of the assistant's turn (the chat template)

// Which endpoint a request came to: POST /v1/completions or POST /v1/chat/completions.
enum class ApiKind { kCompletion, kChat };

// What parsing needs to know of the server: the model (name, max_seq_len, vocab_size), its tokenizer (encode,
// decode) and the seed of a request that brings none.
struct ParseContext {
  ModelInfo info;
  const Tokenizer* tokenizer = nullptr;
  uint64_t default_seed = 0;  // choice i gets default_seed + i when the body has no "seed" (seed + i when it has)
};

// A validated request: one GenerationRequest per choice. Completions with several prompts: choice p*n + j is the
// j-th sample of prompt p (OpenAI's order). Chat: one prompt (the template), n choices.
struct ParsedRequest {
  ApiKind kind = ApiKind::kCompletion;
  std::string model;  // the served model's name (validated)
  int n = 1;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool logprobs = false;       // the response carries log-probabilities
  std::vector<GenerationRequest> choices;
  std::vector<int> prompt_of_choice;  // per choice: its prompt's index
  std::vector<int> prompt_tokens;     // per prompt: its token count (usage counts each prompt once)
  std::vector<std::string> echo;      // per choice: text put before the completion ("" unless `echo`)
};

// Parses and validates a POST /v1/completions body. Throws RequestError: 400 (malformed JSON, unknown field, wrong
// type or range: `param` names the field; empty prompt; token id outside the vocabulary; prompt + max_tokens over
// max_seq_len, code "context_length_exceeded"; unsupported option), 404 (unknown model, code "model_not_found").
ParsedRequest parse_completion_request(const std::string& body, const ParseContext& ctx);

// Parses and validates a POST /v1/chat/completions body (errors as parse_completion_request); the prompt is the
// chat template of the messages, max_tokens defaults to the rest of the context.
ParsedRequest parse_chat_request(const std::string& body, const ParseContext& ctx);

// One message of a chat, its content as text (text parts joined).
struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

// The chat template (see the top of this file): "SYSTEM:\n...\n\nUSER:\n...\n\nASSISTANT:\n".
std::string chat_prompt(const std::vector<ChatMessage>& messages);

// ---- responses ----

// s with every byte that is not part of a well-formed UTF-8 sequence replaced by U+FFFD (JSON text must be UTF-8;
// a token may be a lone byte of a multi-byte character). Well-formed text is returned unchanged.
std::string utf8_sanitize(const std::string& s);

// One server-sent event: "data: <json>\n\n".
std::string sse_event(const std::string& json);
inline constexpr const char* kSseDone = "data: [DONE]\n\n";  // the last event of every stream

// GET /v1/models: {"object":"list","data":[{"id":...,"object":"model","created":...,"owned_by":"moe",
// "max_model_len":...}]}
std::string models_json(const ModelInfo& info);

// The fields every response and chunk of one request shares.
struct ResponseMeta {
  std::string id;  // "cmpl-<hex>" or "chatcmpl-<hex>"
  int64_t created = 0;
  std::string model;
};

// Turns one request's engine events into its response: the whole JSON body (not streaming), or the bytes of the
// server-sent events (streaming), in order. Events of choice i come from that choice's sink. Single-threaded.
class ResponseAssembler {
 public:
  // Keeps what it needs of `req` (not its prompts); `tokenizer` (token texts for logprobs) must outlive it.
  ResponseAssembler(const ParsedRequest& req, ResponseMeta meta, const Tokenizer& tokenizer);
  // Streaming: the events to send before any token (chat: each choice's role chunk; echo: the prompt text).
  std::string stream_start();
  // A token of choice i: its stream events ("" when nothing is to be sent; always "" when not streaming).
  std::string on_token(int choice, const TokenEvent& ev);
  // Choice i finished: streaming, its last chunks; after the last choice, the usage chunk (include_usage) and
  // [DONE]. A finish with reason "abort" or an error fails the request (see failed()): streaming, an error event
  // and [DONE] (once; later events are ignored).
  std::string on_finish(int choice, const FinishEvent& ev);
  bool finished() const { return open_ == 0 || failed_; }  // every choice finished, or the request failed
  bool failed() const { return failed_; }
  const ApiError& error() const { return error_; }  // why it failed (500 engine error, 503 aborted)
  // Not streaming, once finished() and not failed(): the response body.
  std::string response_json() const;

 private:
  struct Record {           // one token's log-probabilities
    std::string text, raw;  // the token's text sanitized for JSON, and its bytes
    double logprob = 0;
    std::vector<std::pair<std::string, double>> top;  // sanitized texts
    std::vector<std::string> top_raw;                 // their bytes
    int64_t offset = 0;                               // completions text_offset
  };
  struct Choice {
    std::string text;  // echo + completion so far
    std::vector<Record> records;
    std::string finish_reason;
    int completion_tokens = 0;
    int64_t offset = 0;  // text offset of the next token (completions logprobs)
    bool done = false;
  };
  Record record(const TokenEvent& ev, int64_t offset) const;
  std::string chunk(int choice, const std::string& text, const std::vector<Record>& recs, const char* finish,
                    bool first) const;
  std::string usage_json() const;
  std::string logprobs_json(const std::vector<Record>& recs) const;
  std::string chunk_envelope(const std::string& choices_json, bool with_usage) const;
  std::string fail(const FinishEvent& ev);

  ParsedRequest req_;  // without its choices' prompts
  ResponseMeta meta_;
  const Tokenizer& tok_;
  std::vector<Choice> choices_;
  int open_ = 0;
  bool failed_ = false;
  ApiError error_;
};

}  // namespace moe::serve
