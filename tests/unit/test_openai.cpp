// serve/openai.h: validation of completions and chat bodies (status, param, message of every refusal), the
// GenerationRequests they become, the chat template, and the response / chunk / error JSON read back with
// parse_json; serve/openapi.h: the document's shape.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "core/data.h"
#include "core/json.h"
#include "serve/openai.h"
#include "serve/openapi.h"
#include "tests/unit/serve_helpers.h"

namespace moe::test {
namespace {

using serve::ApiError;
using serve::ParsedRequest;

serve::ParseContext context() {
  serve::ParseContext ctx;
  ctx.info.name = "moe-test";
  ctx.info.max_seq_len = 64;
  ctx.info.vocab_size = serve_tokenizer().vocab_size();
  ctx.info.created = 1700000000;
  ctx.tokenizer = &serve_tokenizer();
  ctx.default_seed = 1000;
  return ctx;
}

ParsedRequest completion(const std::string& body) { return serve::parse_completion_request(body, context()); }
ParsedRequest chat(const std::string& body) { return serve::parse_chat_request(body, context()); }

// The error a parse throws (a failed test when it throws none).
ApiError refusal(const std::function<void()>& f) {
  try {
    f();
  } catch (const serve::RequestError& e) {
    return e.error();
  }
  ADD_FAILURE() << "no RequestError thrown";
  return {};
}

// Expects a completions body to be refused with `status`, `param` and a message containing `fragment`.
void expect_completion_refused(const std::string& body, int status, const std::string& param,
                               const std::string& fragment) {
  const ApiError e = refusal([&] { completion(body); });
  EXPECT_EQ(e.status, status) << body << " -> " << e.message;
  EXPECT_EQ(e.param, param) << body << " -> " << e.message;
  EXPECT_NE(e.message.find(fragment), std::string::npos) << body << " -> " << e.message;
}

void expect_chat_refused(const std::string& body, int status, const std::string& param, const std::string& fragment) {
  const ApiError e = refusal([&] { chat(body); });
  EXPECT_EQ(e.status, status) << body << " -> " << e.message;
  EXPECT_EQ(e.param, param) << body << " -> " << e.message;
  EXPECT_NE(e.message.find(fragment), std::string::npos) << body << " -> " << e.message;
}

TEST(Openai, CompletionDefaultsAndFields) {
  const ParsedRequest d = completion(R"({"prompt": "ROMEO:"})");
  EXPECT_EQ(d.kind, serve::ApiKind::kCompletion);
  EXPECT_EQ(d.model, "moe-test");  // model omitted: the served one
  ASSERT_EQ(d.choices.size(), 1u);
  const serve::GenerationRequest& r = d.choices[0];
  EXPECT_EQ(r.prompt, serve_tokenizer().encode("ROMEO:"));
  EXPECT_EQ(r.max_tokens, 16);
  EXPECT_FLOAT_EQ(r.sampling.temperature, 1);
  EXPECT_FLOAT_EQ(r.sampling.top_p, 1);
  EXPECT_EQ(r.sampling.top_k, 0);
  EXPECT_EQ(r.sampling.seed, 1000u);  // the server's seed when the body has none
  EXPECT_EQ(r.logprobs, -1);
  EXPECT_TRUE(r.stop.empty());
  EXPECT_FALSE(r.ignore_eos);
  EXPECT_FALSE(d.stream);
  EXPECT_EQ(d.prompt_tokens, std::vector<int>{int(r.prompt.size())});

  const ParsedRequest f = completion(
      R"({"model": "moe-test", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0.5, "top_p": 0.9,
          "top_k": 40, "n": 2, "seed": 7, "stop": ["\n", "END"], "stream": true,
          "stream_options": {"include_usage": true}, "logprobs": 2, "ignore_eos": true, "user": "u",
          "presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 2, "logit_bias": {}, "suffix": null,
          "echo": null})");
  ASSERT_EQ(f.choices.size(), 2u);
  EXPECT_EQ(f.choices[1].prompt, (std::vector<int32_t>{5, 6, 7}));
  EXPECT_EQ(f.choices[1].max_tokens, 3);
  EXPECT_FLOAT_EQ(f.choices[1].sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(f.choices[1].sampling.top_p, 0.9f);
  EXPECT_EQ(f.choices[1].sampling.top_k, 40);
  EXPECT_EQ(f.choices[0].sampling.seed, 7u);  // choice i: seed + i
  EXPECT_EQ(f.choices[1].sampling.seed, 8u);
  EXPECT_EQ(f.choices[1].stop, (std::vector<std::string>{"\n", "END"}));
  EXPECT_EQ(f.choices[1].logprobs, 2);
  EXPECT_TRUE(f.choices[1].ignore_eos);
  EXPECT_TRUE(f.stream && f.include_usage && f.logprobs);
}

TEST(Openai, CompletionPromptForms) {
  const ParsedRequest m = completion(R"({"prompt": ["To be", "or not"], "n": 2, "seed": 10})");
  ASSERT_EQ(m.choices.size(), 4u);  // prompt p's j-th sample is choice p*n + j
  EXPECT_EQ(m.prompt_of_choice, (std::vector<int>{0, 0, 1, 1}));
  EXPECT_EQ(m.choices[1].prompt, serve_tokenizer().encode("To be"));
  EXPECT_EQ(m.choices[2].prompt, serve_tokenizer().encode("or not"));
  EXPECT_EQ(m.choices[3].sampling.seed, 13u);
  EXPECT_EQ(m.prompt_tokens.size(), 2u);
  const ParsedRequest t = completion(R"({"prompt": [[1, 2], [3]], "echo": true})");
  ASSERT_EQ(t.choices.size(), 2u);
  EXPECT_EQ(t.choices[1].prompt, std::vector<int32_t>{3});
  EXPECT_EQ(t.echo[1], serve_tokenizer().decode({3}));
  EXPECT_EQ(completion(R"({"prompt": "Hi", "echo": true})").echo[0], "Hi");
  EXPECT_EQ(completion(R"({"prompt": [1.0, 2], "n": 3.0})").choices.size(), 3u);  // integral numbers are integers
  EXPECT_EQ(completion(R"({"prompt": "x", "top_k": -1})").choices[0].sampling.top_k, 0);
  EXPECT_EQ(completion(R"({"prompt": "x", "seed": -1})").choices[0].sampling.seed, ~uint64_t(0));
  EXPECT_EQ(completion(R"({"prompt": "x", "seed": 18446744073709551615})").choices[0].sampling.seed, ~uint64_t(0));
  EXPECT_EQ(completion(R"({"prompt": "x", "stop": "the"})").choices[0].stop, std::vector<std::string>{"the"});
}

TEST(Openai, CompletionRefusals) {
  expect_completion_refused(R"({"prompt": "x",})", 400, "", "could not parse the JSON body");
  expect_completion_refused(R"(["x"])", 400, "", "must be a JSON object, got an array");
  expect_completion_refused(R"({"prompt": "x", "foo": 1})", 400, "foo", "Unrecognized request argument supplied: foo");
  expect_completion_refused(R"({"prompt": "x", "model": "gpt-4"})", 404, "model", "'gpt-4' does not exist");
  EXPECT_EQ(refusal([] { completion(R"({"prompt": "x", "model": "gpt-4"})"); }).code, "model_not_found");
  expect_completion_refused(R"({"prompt": "x", "model": 3})", 400, "model", "must be a string, got an integer");
  expect_completion_refused(R"({})", 400, "prompt", "'prompt' is required");
  expect_completion_refused(R"({"prompt": ""})", 400, "prompt", "'prompt' is empty");
  expect_completion_refused(R"({"prompt": []})", 400, "prompt", "'prompt' is empty");
  expect_completion_refused(R"({"prompt": [[]]})", 400, "prompt", "'prompt[0]' is empty");
  expect_completion_refused(R"({"prompt": 5})", 400, "prompt", "must be a string or an array");
  expect_completion_refused(R"({"prompt": ["a", [1]]})", 400, "prompt", "prompt[1] is an array");
  expect_completion_refused(R"({"prompt": [1, "a"]})", 400, "prompt", "'prompt[1]' must be a token id");
  expect_completion_refused(R"({"prompt": [1, 256]})", 400, "prompt",
                            "token id 256 at prompt[1] is outside the vocabulary (256 tokens");
  expect_completion_refused(R"({"prompt": [-1]})", 400, "prompt", "token id -1 at prompt[0] is outside");
  expect_completion_refused(R"({"prompt": "x", "temperature": "hot"})", 400, "temperature",
                            "'temperature' must be a number, got a string");
  expect_completion_refused(R"({"prompt": "x", "temperature": 2.5})", 400, "temperature", "must be in [0, 2], got 2.5");
  expect_completion_refused(R"({"prompt": "x", "top_p": 0})", 400, "top_p", "must be in (0, 1], got 0");
  expect_completion_refused(R"({"prompt": "x", "top_p": 1.01})", 400, "top_p", "got 1.01");
  expect_completion_refused(R"({"prompt": "x", "top_k": -2})", 400, "top_k", "got -2");
  expect_completion_refused(R"({"prompt": "x", "n": 9})", 400, "n", "must be in [1, 8], got 9");
  expect_completion_refused(R"({"prompt": "x", "n": 1.5})", 400, "n", "must be an integer, got a number");
  expect_completion_refused(R"({"prompt": "x", "max_tokens": 0})", 400, "max_tokens", "must be >= 1, got 0");
  expect_completion_refused(R"({"prompt": "x", "max_tokens": true})", 400, "max_tokens", "got a boolean");
  expect_completion_refused(R"({"prompt": "x", "seed": 1.5})", 400, "seed", "must be an integer");
  expect_completion_refused(R"({"prompt": "x", "stop": ["a","b","c","d","e"]})", 400, "stop",
                            "at most 4 strings, got 5");
  expect_completion_refused(R"({"prompt": "x", "stop": ""})", 400, "stop", "must not be empty");
  expect_completion_refused(R"({"prompt": "x", "stop": [1]})", 400, "stop", "'stop[0]' must be a string");
  expect_completion_refused(R"({"prompt": "x", "stream": "yes"})", 400, "stream", "must be a boolean");
  expect_completion_refused(R"({"prompt": "x", "stream_options": {"include_usage": true}})", 400, "stream_options",
                            "only allowed when 'stream' is true");
  expect_completion_refused(R"({"prompt": "x", "stream": true, "stream_options": {"x": 1}})", 400, "stream_options.x",
                            "Unrecognized request argument supplied: stream_options.x");
  expect_completion_refused(R"({"prompt": "x", "logprobs": 6})", 400, "logprobs", "must be in [0, 5], got 6");
  expect_completion_refused(R"({"prompt": "x", "logprobs": 1, "echo": true})", 400, "echo",
                            "prompt log-probabilities are not computed");
  expect_completion_refused(R"({"prompt": "x", "presence_penalty": 0.5})", 400, "presence_penalty",
                            "not supported (only 0), got 0.5");
  expect_completion_refused(R"({"prompt": "x", "frequency_penalty": -1})", 400, "frequency_penalty", "not supported");
  expect_completion_refused(R"({"prompt": "x", "best_of": 2})", 400, "best_of", "unless it equals n (1), got 2");
  expect_completion_refused(R"({"prompt": "x", "logit_bias": {"5": 1}})", 400, "logit_bias", "not supported");
  expect_completion_refused(R"({"prompt": "x", "suffix": "end"})", 400, "suffix", "not supported");
  expect_completion_refused(R"({"prompt": "x", "user": 1})", 400, "user", "must be a string");
}

TEST(Openai, CompletionContextLimit) {
  std::string prompt = "1";
  for (int i = 1; i < 60; ++i) prompt += ",1";  // 60 token ids
  expect_completion_refused(R"({"prompt": [)" + prompt + R"(], "max_tokens": 10})", 400, "max_tokens",
                            "maximum context length is 64 tokens, however you requested 70 tokens (60 in your prompt; "
                            "10 for the completion)");
  // the default of 16 counts too, and the error names the prompt then
  const ApiError e = refusal([&] { completion(R"({"prompt": [)" + prompt + "]}"); });
  EXPECT_EQ(e.param, "prompt");
  EXPECT_EQ(e.code, "context_length_exceeded");
  EXPECT_NE(e.message.find("76 tokens (60 in your prompt; 16 for the completion)"), std::string::npos) << e.message;
  EXPECT_EQ(completion(R"({"prompt": [)" + prompt + R"(], "max_tokens": 4})").choices[0].max_tokens, 4);
}

TEST(Openai, ChatTemplate) {
  EXPECT_EQ(serve::chat_prompt(
                {{"system", "Be brief."}, {"user", "Who art thou?"}, {"assistant", "A ghost."}, {"user", "Speak!"}}),
            "SYSTEM:\nBe brief.\n\nUSER:\nWho art thou?\n\nASSISTANT:\nA ghost.\n\nUSER:\nSpeak!\n\nASSISTANT:\n");
  const ParsedRequest p = chat(
      R"({"model": "moe-test", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
          {"type": "text", "text": "b"}], "name": "ROMEO"}], "stop": "x"})");
  ASSERT_EQ(p.choices.size(), 1u);
  EXPECT_EQ(p.kind, serve::ApiKind::kChat);
  EXPECT_EQ(p.choices[0].prompt, serve_tokenizer().encode("USER:\na\nb\n\nASSISTANT:\n"));  // parts joined by \n
  EXPECT_EQ(p.choices[0].stop, (std::vector<std::string>{"x", "\n\n"}));     // the turn ends at a blank line
  EXPECT_EQ(p.choices[0].max_tokens, 64 - int(p.choices[0].prompt.size()));  // default: the rest of the context
  EXPECT_EQ(p.choices[0].logprobs, -1);
  EXPECT_EQ(chat(R"({"messages": [{"role": "user", "content": "hi"}], "stop": ["\n\n"]})").choices[0].stop,
            std::vector<std::string>{"\n\n"});
}

TEST(Openai, ChatFields) {
  const ParsedRequest p = chat(
      R"({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "max_tokens": 5,
          "n": 3, "seed": 4, "logprobs": true, "top_logprobs": 3, "response_format": {"type": "text"},
          "tools": [], "tool_choice": "none", "parallel_tool_calls": false, "stream": true,
          "stream_options": {"include_usage": false}, "top_k": 2, "temperature": 0})");
  ASSERT_EQ(p.choices.size(), 3u);
  EXPECT_EQ(p.choices[2].max_tokens, 5);
  EXPECT_EQ(p.choices[2].sampling.seed, 6u);
  EXPECT_EQ(p.choices[2].logprobs, 3);
  EXPECT_FLOAT_EQ(p.choices[0].sampling.temperature, 0);
  EXPECT_TRUE(p.logprobs && p.stream && !p.include_usage);
  EXPECT_EQ(chat(R"({"messages": [{"role": "user", "content": "u"}], "logprobs": true})").choices[0].logprobs, 0);
  EXPECT_EQ(
      chat(R"({"messages": [{"role": "user", "content": "u"}], "max_completion_tokens": 7})").choices[0].max_tokens, 7);
}

TEST(Openai, ChatRefusals) {
  const std::string m = R"("messages": [{"role": "user", "content": "hi"}])";
  expect_chat_refused(R"({})", 400, "messages", "'messages' is required");
  expect_chat_refused(R"({"messages": []})", 400, "messages", "must not be empty");
  expect_chat_refused(R"({"messages": "hi"})", 400, "messages", "must be an array, got a string");
  expect_chat_refused(R"({"messages": [3]})", 400, "messages[0]", "'messages[0]' must be an object");
  expect_chat_refused(R"({"messages": [{"content": "hi"}]})", 400, "messages[0].role", "is required");
  expect_chat_refused(R"({"messages": [{"role": "tool", "content": "hi"}]})", 400, "messages[0].role",
                      "'tool' is not supported: use system, user or assistant");
  expect_chat_refused(R"({"messages": [{"role": "user"}]})", 400, "messages[0].content", "is required");
  expect_chat_refused(R"({"messages": [{"role": "user", "content": 5}]})", 400, "messages[0].content",
                      "must be a string or an array of text parts");
  expect_chat_refused(R"({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})", 400,
                      "messages[0].content[0].image_url", "Unrecognized request argument");
  expect_chat_refused(R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", 400,
                      "messages[0].content[0].type", "'image_url' is not supported: only text parts");
  expect_chat_refused(R"({"messages": [{"role": "user", "content": "x", "tool_calls": []}]})", 400,
                      "messages[0].tool_calls", "Unrecognized request argument supplied: messages[0].tool_calls");
  expect_chat_refused("{" + m + R"(, "prompt": "x"})", 400, "prompt", "Unrecognized request argument");
  expect_chat_refused("{" + m + R"(, "model": "other"})", 404, "model", "does not exist");
  expect_chat_refused("{" + m + R"(, "top_logprobs": 2})", 400, "top_logprobs", "requires 'logprobs' to be true");
  expect_chat_refused("{" + m + R"(, "logprobs": true, "top_logprobs": 21})", 400, "top_logprobs", "got 21");
  expect_chat_refused("{" + m + R"(, "logprobs": 1})", 400, "logprobs", "must be a boolean");
  expect_chat_refused("{" + m + R"(, "response_format": {"type": "json_object"}})", 400, "response_format.type",
                      "'json_object' is not supported");
  expect_chat_refused("{" + m + R"(, "tools": [{"type": "function"}]})", 400, "tools", "not supported");
  expect_chat_refused("{" + m + R"(, "tool_choice": "auto"})", 400, "tool_choice", "not supported");
  expect_chat_refused("{" + m + R"(, "functions": [{}]})", 400, "functions", "not supported");
  expect_chat_refused("{" + m + R"(, "max_tokens": 3, "max_completion_tokens": 4})", 400, "max_completion_tokens",
                      "not both with different values (3 and 4)");
  expect_chat_refused("{" + m + R"(, "max_tokens": 100})", 400, "max_tokens", "maximum context length is 64 tokens");
  expect_chat_refused("{" + m + R"(, "presence_penalty": 1})", 400, "presence_penalty", "not supported");
  std::string long_text(400, 'x');
  const ApiError e = refusal([&] { chat(R"({"messages": [{"role": "user", "content": ")" + long_text + R"("}]})"); });
  EXPECT_EQ(e.param, "messages");
  EXPECT_EQ(e.code, "context_length_exceeded");
  EXPECT_NE(e.message.find("leaves no room for the completion"), std::string::npos) << e.message;
}

TEST(Openai, ErrorJsonAndTypes) {
  const JsonValue v = parse_json(serve::error_json({400, "bad \"x\"", "temperature", ""}), "error");
  const JsonValue* err = v.field("error");
  ASSERT_TRUE(err && err->kind == JsonValue::kObject);
  EXPECT_EQ(err->field("message")->str, "bad \"x\"");
  EXPECT_EQ(err->field("type")->str, "invalid_request_error");
  EXPECT_EQ(err->field("param")->str, "temperature");
  EXPECT_EQ(err->field("code")->kind, JsonValue::kNull);
  const JsonValue w = parse_json(serve::error_json({404, "m", "", "model_not_found"}), "error");
  EXPECT_EQ(w.field("error")->field("param")->kind, JsonValue::kNull);
  EXPECT_EQ(w.field("error")->field("code")->str, "model_not_found");
  EXPECT_EQ(serve::error_type(401), "authentication_error");
  EXPECT_EQ(serve::error_type(429), "rate_limit_error");
  EXPECT_EQ(serve::error_type(503), "service_unavailable_error");
  EXPECT_EQ(serve::error_type(500), "server_error");
  EXPECT_EQ(serve::error_type(413), "invalid_request_error");
}

TEST(Openai, Utf8SanitizeAndSse) {
  EXPECT_EQ(serve::utf8_sanitize("plain \xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"),
            "plain \xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
  EXPECT_EQ(serve::utf8_sanitize("a\xe2\x82"), "a\xef\xbf\xbd\xef\xbf\xbd");                // a truncated character
  EXPECT_EQ(serve::utf8_sanitize("\xc0\xaf"), "\xef\xbf\xbd\xef\xbf\xbd");                  // overlong
  EXPECT_EQ(serve::utf8_sanitize("\xed\xa0\x80"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");  // a surrogate
  EXPECT_EQ(serve::utf8_sanitize("\x80x"), "\xef\xbf\xbdx");
  EXPECT_EQ(serve::sse_event(R"({"a":1})"), "data: {\"a\":1}\n\n");
  EXPECT_STREQ(serve::kSseDone, "data: [DONE]\n\n");
  serve::ModelInfo info;
  info.name = "m";
  info.max_seq_len = 64;
  info.created = 5;
  const JsonValue v = parse_json(serve::models_json(info), "models");
  EXPECT_EQ(v.field("object")->str, "list");
  const JsonValue& m = v.field("data")->array.at(0);
  EXPECT_EQ(m.field("id")->str, "m");
  EXPECT_EQ(m.field("object")->str, "model");
  EXPECT_EQ(m.field("created")->num, 5u);
  EXPECT_EQ(m.field("owned_by")->str, "moe");
  EXPECT_EQ(m.field("max_model_len")->num, 64u);
}

// ---- responses ----

serve::TokenEvent token(int32_t id, const std::string& text, double lp = -0.5,
                        std::vector<serve::TopLogprob> top = {}) {
  serve::TokenEvent ev;
  ev.token = id;
  ev.text = text;
  ev.logprob = lp;
  ev.top = std::move(top);
  return ev;
}

serve::FinishEvent finish(const std::string& reason, int prompt, int completion, const std::string& text = "") {
  serve::FinishEvent ev;
  ev.reason = reason;
  ev.text = text;
  ev.usage = {prompt, completion};
  return ev;
}

const serve::ResponseMeta kMeta{"cmpl-abc", 1700000001, "moe-test"};

// The JSON documents of an SSE byte stream; expects it to end with [DONE] when `done`.
std::vector<JsonValue> sse_documents(const std::string& bytes, bool done = true) {
  std::vector<JsonValue> docs;
  size_t pos = 0;
  bool saw_done = false;
  while (pos < bytes.size()) {
    const size_t end = bytes.find("\n\n", pos);
    EXPECT_NE(end, std::string::npos) << "an event without its blank line: " << bytes.substr(pos);
    if (end == std::string::npos) break;
    const std::string ev = bytes.substr(pos, end - pos);
    EXPECT_EQ(ev.rfind("data: ", 0), 0u) << ev;
    EXPECT_FALSE(saw_done) << "an event after [DONE]";
    if (ev == "data: [DONE]")
      saw_done = true;
    else
      docs.push_back(parse_json(ev.substr(6), "sse event"));
    pos = end + 2;
  }
  EXPECT_EQ(saw_done, done);
  return docs;
}

TEST(Openai, CompletionResponseJson) {
  const ParsedRequest req = completion(R"({"prompt": ["ab", "cd"], "n": 2})");
  serve::ResponseAssembler a(req, kMeta, serve_tokenizer());
  EXPECT_EQ(a.on_token(0, token(3, "Hel")), "");  // not streaming: nothing to send
  a.on_token(0, token(4, ""));
  for (int i = 1; i < 4; ++i) a.on_token(i, token(5, "x"));
  for (int i = 3; i >= 0; --i) {
    EXPECT_FALSE(a.finished());
    a.on_finish(i, finish(i == 0 ? "length" : "stop", req.prompt_tokens[req.prompt_of_choice[i]], i == 0 ? 2 : 1,
                          i == 0 ? "lo" : ""));
  }
  ASSERT_TRUE(a.finished());
  ASSERT_FALSE(a.failed());
  const JsonValue v = parse_json(a.response_json(), "completion");
  EXPECT_EQ(v.field("id")->str, "cmpl-abc");
  EXPECT_EQ(v.field("object")->str, "text_completion");
  EXPECT_EQ(v.field("created")->num, 1700000001u);
  EXPECT_EQ(v.field("model")->str, "moe-test");
  const auto& choices = v.field("choices")->array;
  ASSERT_EQ(choices.size(), 4u);
  EXPECT_EQ(choices[0].field("index")->num, 0u);
  EXPECT_EQ(choices[0].field("text")->str, "Hello");  // the events' texts, then the finish's
  EXPECT_EQ(choices[0].field("finish_reason")->str, "length");
  EXPECT_EQ(choices[0].field("logprobs")->kind, JsonValue::kNull);
  EXPECT_EQ(choices[3].field("index")->num, 3u);
  EXPECT_EQ(choices[3].field("text")->str, "x");
  EXPECT_EQ(choices[3].field("finish_reason")->str, "stop");
  const JsonValue* u = v.field("usage");
  const uint64_t prompt = uint64_t(req.prompt_tokens[0] + req.prompt_tokens[1]);  // each prompt counted once
  EXPECT_EQ(u->field("prompt_tokens")->num, prompt);
  EXPECT_EQ(u->field("completion_tokens")->num, 5u);
  EXPECT_EQ(u->field("total_tokens")->num, prompt + 5);
}

TEST(Openai, CompletionLogprobsAndEcho) {
  const Tokenizer& tok = serve_tokenizer();
  const ParsedRequest req = completion(R"({"prompt": "ab", "logprobs": 2})");
  serve::ResponseAssembler a(req, kMeta, tok);
  a.on_token(0, token(10, "t", -0.25, {{10, -0.25}, {11, -2.0}}));
  a.on_token(0, token(12, "u", -1.5, {{13, -0.5}, {14, -1.0}}));  // the sampled token is not among the top
  a.on_finish(0, finish("stop", 1, 2));
  const JsonValue v = parse_json(a.response_json(), "completion");
  const JsonValue* lp = v.field("choices")->array.at(0).field("logprobs");
  ASSERT_EQ(lp->kind, JsonValue::kObject);
  ASSERT_EQ(lp->field("tokens")->array.size(), 2u);
  EXPECT_EQ(lp->field("tokens")->array[0].str, serve::utf8_sanitize(tok.token_text(10)));
  EXPECT_DOUBLE_EQ(lp->field("token_logprobs")->array[1].dbl, -1.5);
  const JsonValue& top1 = lp->field("top_logprobs")->array[1];
  ASSERT_EQ(top1.kind, JsonValue::kObject);
  EXPECT_EQ(top1.object.size(), 3u);  // the top 2 and the sampled token
  EXPECT_DOUBLE_EQ(top1.field(serve::utf8_sanitize(tok.token_text(12)))->dbl, -1.5);
  EXPECT_EQ(lp->field("text_offset")->array[0].num, 0u);
  EXPECT_EQ(lp->field("text_offset")->array[1].num, uint64_t(tok.token_text(10).size()));

  const ParsedRequest er = completion(R"({"prompt": "ab", "echo": true, "stream": true})");
  serve::ResponseAssembler e(er, kMeta, tok);
  std::string bytes = e.stream_start();
  bytes += e.on_token(0, token(1, "c"));
  bytes += e.on_finish(0, finish("length", 1, 1));
  const std::vector<JsonValue> docs = sse_documents(bytes);
  ASSERT_EQ(docs.size(), 3u);
  EXPECT_EQ(docs[0].field("choices")->array[0].field("text")->str, "ab");  // the echoed prompt first
  EXPECT_EQ(docs[1].field("choices")->array[0].field("text")->str, "c");
}

TEST(Openai, CompletionStreamChunks) {
  const ParsedRequest req =
      completion(R"({"prompt": "ab", "stream": true, "stream_options": {"include_usage": true}})");
  serve::ResponseAssembler a(req, kMeta, serve_tokenizer());
  std::string bytes = a.stream_start();
  EXPECT_EQ(bytes, "");
  bytes += a.on_token(0, token(1, "Hel"));
  EXPECT_EQ(a.on_token(0, token(2, "")), "");  // held-back text: no chunk
  bytes += a.on_token(0, token(3, "lo"));
  bytes += a.on_finish(0, finish("stop", 1, 3, "!"));
  EXPECT_TRUE(a.finished());
  const std::vector<JsonValue> docs = sse_documents(bytes);
  ASSERT_EQ(docs.size(), 4u);
  std::string text;
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(docs[i].field("id")->str, "cmpl-abc");
    EXPECT_EQ(docs[i].field("object")->str, "text_completion");
    EXPECT_EQ(docs[i].field("usage")->kind, JsonValue::kNull);  // every chunk has usage: null
    const JsonValue& c = docs[i].field("choices")->array.at(0);
    EXPECT_EQ(c.field("index")->num, 0u);
    EXPECT_EQ(c.field("logprobs")->kind, JsonValue::kNull);
    EXPECT_EQ(c.field("finish_reason")->kind, i < 2 ? JsonValue::kNull : JsonValue::kString);
    text += c.field("text")->str;
  }
  EXPECT_EQ(text, "Hello!");  // the deltas concatenate to the completion
  EXPECT_EQ(docs[2].field("choices")->array[0].field("finish_reason")->str, "stop");
  EXPECT_TRUE(docs[3].field("choices")->array.empty());  // the usage chunk
  EXPECT_EQ(docs[3].field("usage")->field("completion_tokens")->num, 3u);
  EXPECT_EQ(docs[3].field("usage")->field("total_tokens")->num, uint64_t(req.prompt_tokens[0] + 3));
}

TEST(Openai, ChatResponseAndChunks) {
  const Tokenizer& tok = serve_tokenizer();
  const ParsedRequest req = chat(R"({"messages": [{"role": "user", "content": "hi"}], "logprobs": true,
                                     "top_logprobs": 1})");
  serve::ResponseAssembler a(req, {"chatcmpl-1", 7, "moe-test"}, tok);
  a.on_token(0, token(20, "Good", -0.1, {{20, -0.1}}));
  a.on_token(0, token(21, " day", -0.2, {{22, -0.05}}));
  a.on_finish(0, finish("stop", 9, 2));
  const JsonValue v = parse_json(a.response_json(), "chat");
  EXPECT_EQ(v.field("object")->str, "chat.completion");
  const JsonValue& c = v.field("choices")->array.at(0);
  EXPECT_EQ(c.field("message")->field("role")->str, "assistant");
  EXPECT_EQ(c.field("message")->field("content")->str, "Good day");
  EXPECT_EQ(c.field("finish_reason")->str, "stop");
  const auto& content = c.field("logprobs")->field("content")->array;
  ASSERT_EQ(content.size(), 2u);
  EXPECT_EQ(content[1].field("token")->str, serve::utf8_sanitize(tok.token_text(21)));
  EXPECT_DOUBLE_EQ(content[1].field("logprob")->dbl, -0.2);
  const std::string raw = tok.token_text(21);
  ASSERT_EQ(content[1].field("bytes")->array.size(), raw.size());
  EXPECT_EQ(content[1].field("bytes")->array[0].num, uint64_t(static_cast<unsigned char>(raw[0])));
  ASSERT_EQ(content[1].field("top_logprobs")->array.size(), 1u);
  EXPECT_EQ(content[1].field("top_logprobs")->array[0].field("token")->str, serve::utf8_sanitize(tok.token_text(22)));

  const ParsedRequest sr = chat(R"({"messages": [{"role": "user", "content": "hi"}], "stream": true, "n": 2})");
  serve::ResponseAssembler s(sr, {"chatcmpl-2", 7, "moe-test"}, tok);
  std::string bytes = s.stream_start();
  bytes += s.on_token(1, token(1, "A"));
  bytes += s.on_finish(1, finish("length", 9, 1));
  bytes += s.on_token(0, token(2, "B"));
  bytes += s.on_finish(0, finish("stop", 9, 1, "C"));
  const std::vector<JsonValue> docs = sse_documents(bytes);
  ASSERT_EQ(docs.size(), 7u);  // 2 role chunks, A, finish 1, B, C, finish 0
  for (int i = 0; i < 2; ++i) {
    const JsonValue& c0 = docs[i].field("choices")->array.at(0);
    EXPECT_EQ(c0.field("index")->num, uint64_t(i));
    EXPECT_EQ(c0.field("delta")->field("role")->str, "assistant");
    EXPECT_EQ(c0.field("delta")->field("content")->str, "");
    EXPECT_EQ(docs[i].field("object")->str, "chat.completion.chunk");
    EXPECT_EQ(docs[i].field("usage"), nullptr);  // no include_usage: no usage field
  }
  EXPECT_EQ(docs[2].field("choices")->array[0].field("delta")->field("content")->str, "A");
  const JsonValue& fin = docs[3].field("choices")->array[0];
  EXPECT_TRUE(fin.field("delta")->object.empty());
  EXPECT_EQ(fin.field("finish_reason")->str, "length");
  EXPECT_EQ(docs[5].field("choices")->array[0].field("delta")->field("content")->str, "C");
  EXPECT_EQ(docs[6].field("choices")->array[0].field("finish_reason")->str, "stop");
}

TEST(Openai, FailuresBecomeErrors) {
  const ParsedRequest req = completion(R"({"prompt": "ab", "stream": true, "n": 2})");
  serve::ResponseAssembler a(req, kMeta, serve_tokenizer());
  std::string bytes = a.on_token(0, token(1, "x"));
  serve::FinishEvent bad = finish("abort", 1, 1);
  bad.error = "rank 1 lost";
  bytes += a.on_finish(1, bad);
  EXPECT_TRUE(a.failed() && a.finished());
  EXPECT_EQ(a.on_token(0, token(1, "y")), "");  // later events are ignored
  EXPECT_EQ(a.on_finish(0, finish("stop", 1, 2)), "");
  const std::vector<JsonValue> docs = sse_documents(bytes);
  ASSERT_EQ(docs.size(), 2u);
  const JsonValue* err = docs[1].field("error");
  ASSERT_NE(err, nullptr);
  EXPECT_NE(err->field("message")->str.find("rank 1 lost"), std::string::npos);
  EXPECT_EQ(err->field("type")->str, "server_error");
  EXPECT_EQ(a.error().status, 500);

  serve::ResponseAssembler b(completion(R"({"prompt": "ab"})"), kMeta, serve_tokenizer());
  b.on_finish(0, finish("abort", 1, 0));
  EXPECT_TRUE(b.failed());
  EXPECT_EQ(b.error().status, 503);
  EXPECT_NE(b.error().message.find("aborted"), std::string::npos);
}

TEST(Openai, OpenApiDocument) {
  serve::OpenApiOptions o;
  o.model_name = "moe-test";
  o.max_seq_len = 64;
  o.vocab_size = 256;
  o.auth = true;
  const JsonValue v = parse_json(serve::openapi_json(o), "openapi");
  EXPECT_EQ(v.field("openapi")->str, "3.0.3");
  const JsonValue* paths = v.field("paths");
  for (const char* p :
       {"/health", "/v1/models", "/metrics", "/openapi.json", "/v1/completions", "/v1/chat/completions"})
    EXPECT_NE(paths->field(p), nullptr) << p;
  const JsonValue* post = paths->field("/v1/completions")->field("post");
  for (const char* code : {"200", "400", "401", "404", "408", "413", "429", "431", "500", "503"})
    EXPECT_NE(post->field("responses")->field(code), nullptr) << code;
  EXPECT_NE(post->field("responses")->field("429")->field("headers")->field("Retry-After"), nullptr);
  EXPECT_EQ(paths->field("/health")->field("get")->field("security")->array.size(), 0u);
  EXPECT_EQ(paths->field("/health")->field("get")->field("responses")->field("401"), nullptr);
  EXPECT_NE(v.field("security"), nullptr);
  const JsonValue* schemas = v.field("components")->field("schemas");
  const JsonValue* req = schemas->field("CompletionRequest");
  EXPECT_FALSE(req->field("additionalProperties")->b);
  const JsonValue* props = req->field("properties");
  EXPECT_EQ(props->field("model")->field("enum")->array.at(0).str, "moe-test");
  EXPECT_EQ(props->field("max_tokens")->field("maximum")->num, 64u);
  EXPECT_EQ(props->field("n")->field("maximum")->num, 8u);
  EXPECT_DOUBLE_EQ(props->field("temperature")->field("maximum")->dbl, 2);
  EXPECT_EQ(props->field("seed")->field("maximum")->num, ~uint64_t(0));
  EXPECT_FALSE(schemas->field("ChatCompletionRequest")->field("additionalProperties")->b);
  // without a key there is no security scheme (the server does not ask for one)
  const JsonValue open = parse_json(serve::openapi_json({}), "openapi");
  EXPECT_EQ(open.field("security"), nullptr);
  EXPECT_EQ(open.field("paths")->field("/v1/models")->field("get")->field("responses")->field("401"), nullptr);
}

}  // namespace
}  // namespace moe::test
