#include "launcher/coordinator_http.h"

// clang-format off
#include <utility>  // before any Boost.Asio header: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <memory>
#include <optional>

#include "core/error.h"
#include "core/log.h"
#include "serve/http_connection.h"
#include "serve/http_server.h"
#include "serve/http_service.h"
#include "serve/openai.h"

namespace moe::launcher {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using Request = http::request<http::string_body>;
using Reply = serve::HttpReply;
using serve::json_reply;

constexpr size_t kMaxTargetInMessage = 200;  // characters of a request target quoted in an error message

std::string_view view(beast::string_view s) { return std::string_view(s.data(), s.size()); }

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// ---- replies ----

// The serving API's error JSON (its type from the status); 401 carries WWW-Authenticate: Bearer. (The server answers
// nothing 429 or 503, so no Retry-After.)
Reply error_reply(int status, std::string message, std::string code = "") {
  return serve::error_reply(serve::ApiError{status, std::move(message), "", std::move(code)}, 0);
}

// The page may only run its own inline script and style and fetch from its own origin; it never sends the URL (and
// its key) as a referrer and cannot be framed.
constexpr const char* kPagePolicy =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

Reply page_reply() {
  Reply r = json_reply(200, std::string(dashboard_html()));
  r.content_type = "text/html; charset=utf-8";
  r.headers.emplace_back("Content-Security-Policy", kPagePolicy);
  r.headers.emplace_back("Referrer-Policy", "no-referrer");
  return r;
}

// ---- authorization ----

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// s decoded as application/x-www-form-urlencoded ('+' is a space, %XX a byte); nullopt when an escape is malformed.
std::optional<std::string> form_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') {
      out += ' ';
    } else if (s[i] != '%') {
      out += s[i];
    } else {
      if (i + 2 >= s.size() || hex_value(s[i + 1]) < 0 || hex_value(s[i + 2]) < 0) return std::nullopt;
      out += static_cast<char>(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2]));
      i += 2;
    }
  }
  return out;
}

// The decoded value of the first query parameter `name` ("" when its escapes are malformed), or nullopt when absent.
std::optional<std::string> query_param(std::string_view query, std::string_view name) {
  while (!query.empty()) {
    const size_t amp = query.find('&');
    const std::string_view part = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    const size_t eq = part.find('=');
    if (part.substr(0, eq) != name) continue;
    if (eq == std::string_view::npos) return std::string();
    return form_decode(part.substr(eq + 1)).value_or(std::string());
  }
  return std::nullopt;
}

// Why the request is not authorized, or "" when it is: no key is set, or `Authorization: Bearer <key>` or the query
// parameter `key` carries it. Both are compared (in constant time) whenever present.
std::string auth_failure(const Request& req, std::string_view query, const std::string& key) {
  if (key.empty()) return "";
  const auto header = req.find(http::field::authorization);
  const bool has_header = header != req.end();
  const std::string_view v = has_header ? trim(view(header->value())) : std::string_view();
  const bool bearer = v.size() > 7 && beast::iequals(beast::string_view(v.data(), 7), "Bearer ");
  const bool header_ok = serve::constant_time_equal(bearer ? trim(v.substr(7)) : std::string_view(), key) && bearer;
  const std::optional<std::string> param = query_param(query, "key");
  const bool param_ok = param && serve::constant_time_equal(*param, key);
  if (header_ok || param_ok) return "";
  if (!has_header && !param)
    return "Missing API key: send the header 'Authorization: Bearer <key>' (or open the dashboard as /?key=<key>)";
  if (has_header && !bearer && !param) return "The Authorization header must be 'Bearer <key>'";
  return "Incorrect API key provided";
}

// ---- routing ----

// What the connections share; it lives as long as any of them.
struct Core {
  std::function<std::string()> status_json;
  CoordinatorHttpOptions opt;
  std::shared_ptr<serve::ConnectionSet> connections;
};

Reply status_reply(const Core& core) {
  try {
    return json_reply(200, core.status_json());
  } catch (const std::exception& e) {
    MOE_WARN("coordinator http: the status document failed: " << e.what());
    return error_reply(500, std::string("internal error: the status document failed: ") + e.what(), "internal_error");
  }
}

// Answers one request.
Reply route(const Request& req, const Core& core) {
  const std::string_view target = view(req.target());
  const size_t q = target.find('?');
  const std::string_view path = target.substr(0, q);
  const std::string_view query = q == std::string_view::npos ? std::string_view() : target.substr(q + 1);
  if (path != "/health") {
    const std::string why = auth_failure(req, query, core.opt.api_key);
    if (!why.empty()) return error_reply(401, why, "invalid_api_key");
  }
  const std::string method(view(req.method_string()));
  if (path != "/" && path != "/status" && path != "/health") {
    const std::string shown = serve::utf8_sanitize(std::string(target.substr(0, kMaxTargetInMessage)));
    return error_reply(404, "Invalid URL (" + method + " " + shown + "): the routes are /, /status and /health");
  }
  if (req.method() != http::verb::get) {
    Reply r = error_reply(405, "Method " + method + " is not allowed on " + std::string(path) + " (allowed: GET)");
    r.headers.emplace_back("Allow", "GET");
    return r;
  }
  if (path == "/health") return json_reply(200, R"({"status":"ok"})");
  if (path == "/status") return status_reply(core);
  return page_reply();
}

// ---- one connection ----

// One TCP connection (serve::HttpConnection reads its requests and writes the replies): answers each request at once.
class Session : public serve::HttpConnection {
 public:
  Session(tcp::socket socket, std::shared_ptr<const Core> core, bool admitted)
      : HttpConnection(std::move(socket), core->connections, admitted), core_(std::move(core)) {}

 private:
  void on_request(Request req) override;
  std::shared_ptr<const Core> core_;
};

void Session::on_request(Request req) {
  Reply r;
  try {
    r = route(req, *core_);
  } catch (const std::exception& e) {  // a bug or out of memory: answer it, keep serving
    MOE_WARN("coordinator http: " << req.method_string() << " " << req.target() << " failed: " << e.what());
    r = error_reply(500, std::string("internal error: ") + e.what(), "internal_error");
  }
  reply(r);
}

// The connections' side of the options: one limit for the header and the body, one timeout for waiting, reading
// and writing; a connection over max_connections is closed at once.
serve::ConnectionOptions connection_options(const CoordinatorHttpOptions& o) {
  serve::ConnectionOptions c;
  c.server = "moe-coordinator";
  c.headers = {{"Cache-Control", "no-store"}, {"X-Content-Type-Options", "nosniff"}};
  c.max_connections = o.max_connections;
  c.refuse_over_limit = false;
  c.max_body_bytes = o.max_request_bytes;
  c.max_header_bytes = o.max_request_bytes;
  c.request_timeout_s = o.read_timeout_s;
  c.request_timeout_name = "read_timeout_s";
  c.idle_timeout_s = o.read_timeout_s;
  return c;
}

void check_options(const std::function<std::string()>& status_json, const CoordinatorHttpOptions& o) {
  const std::string where = o.host + ":" + std::to_string(o.port);
  MOE_CHECK(bool(status_json), "coordinator http on " << where << ": no status callback");
  MOE_CHECK(o.max_request_bytes > 0 && o.max_request_bytes <= (int64_t(1) << 30),
            "coordinator http on " << where << ": max_request_bytes must be in [1, 2^30], not " << o.max_request_bytes);
  MOE_CHECK(o.read_timeout_s > 0,
            "coordinator http on " << where << ": read_timeout_s must be > 0, not " << o.read_timeout_s);
  MOE_CHECK(o.max_connections > 0,
            "coordinator http on " << where << ": max_connections must be > 0, not " << o.max_connections);
}

}  // namespace

// ---- CoordinatorHttp ----

class CoordinatorHttp::Impl {
 public:
  Impl(std::function<std::string()> status_json, const CoordinatorHttpOptions& opt)
      : service_({"coordinator http", "CoordinatorHttp", ""}, connection_options(opt)),
        core_(std::make_shared<Core>(Core{std::move(status_json), opt, service_.connections()})) {
    service_.listen(opt.host, opt.port, [core = core_](tcp::socket socket, bool admitted) {
      std::make_shared<Session>(std::move(socket), core, admitted)->start();
    });
  }
  ~Impl() { stop(); }
  int port() const { return service_.port(); }
  void start() {
    if (!service_.start()) return;
    MOE_DEBUG("coordinator http: listening on http://" << core_->opt.host << ":" << port()
                                                       << (core_->opt.api_key.empty() ? " (open)" : " (API key)"));
  }
  void stop() { service_.stop(); }

 private:
  serve::HttpService service_;
  std::shared_ptr<const Core> core_;
};

CoordinatorHttp::CoordinatorHttp(std::function<std::string()> status_json, const CoordinatorHttpOptions& opt) {
  check_options(status_json, opt);
  impl_ = std::make_unique<Impl>(std::move(status_json), opt);
}
CoordinatorHttp::~CoordinatorHttp() = default;
int CoordinatorHttp::port() const { return impl_->port(); }
void CoordinatorHttp::start() { impl_->start(); }
void CoordinatorHttp::stop() { impl_->stop(); }

}  // namespace moe::launcher
