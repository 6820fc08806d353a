// Serving benchmark client (bench/serve.sh runs it against `moe serve` at 1 and 2 ranks, beside the PyTorch
// decoding loop of bench/torch_decode.py):
//  1. the memory-bandwidth bound of decoding for the checkpoint's model: bytes read per decode step (every weight
//     a token touches, the active experts only, plus its keys and values at the mean context) over the measured
//     read bandwidth of this machine (a 512 MiB buffer, the server's thread count), as tokens/s at batch 1;
//  2. a load generator over HTTP (streamed completions, Server-Sent Events timed as they arrive): closed loop at
//     each concurrency (every client sends its next request when the last one finished) and open loop with
//     Poisson arrivals at each rate; reports output tokens/s, time to first token and inter-token latency p50/p99.
// usage: bench_serve --port P --checkpoint DIR [--closed 1,4,16,64] [--poisson 20,50] [--requests 32]
//                    [--max-tokens 64] [--prompt-words 12] [--threads N] [--label TEXT] [--bound-only 1]
//        bench_serve --checkpoint DIR --engine 1 [--closed 1,16] [--context N] [--threads N]
//                    (the engine's decode step alone at batch sizes --closed; context N, default the mean context
//                    of the load generator's requests: prompt-words * 1.4 + max-tokens / 2)
#include <mpi.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "core/config.h"
#include "core/error.h"
#include "core/threads.h"
#include "launcher/run_state.h"
#include "bench/decode_steps.h"

namespace beast = boost::beast;
namespace http = beast::http;
using tcp = boost::asio::ip::tcp;
using clk = std::chrono::steady_clock;

namespace {

double secs(clk::time_point a, clk::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// ---------------------------------------------------------------- 1. the bandwidth bound
void print_bound(const moe::proto::ModelConfig& m, int threads, int prompt_tokens, int max_tokens) {
  const double w = moe::bench::decode_weight_bytes(m, 1);
  const double ctx = prompt_tokens + max_tokens / 2.0;  // mean context while decoding
  const double kv = moe::bench::decode_kv_bytes(m, 1, ctx);
  const double bw = moe::bench::read_bandwidth(threads);
  std::printf("decode bandwidth bound (batch 1)\n");
  std::printf("  active weights per token            %10.2f MiB\n", w / (1 << 20));
  std::printf("  KV cache read per token (ctx %4.0f)  %10.2f MiB\n", ctx, kv / (1 << 20));
  std::printf("  read bandwidth (%d threads)          %10.2f GB/s\n", threads, bw / 1e9);
  std::printf("  bound                               %10.1f tokens/s\n", bw / (w + kv));
  std::printf("BOUND_TOKENS_PER_S %.1f\n", bw / (w + kv));
}

// ---------------------------------------------------------------- the engine's decode step alone
// ms per decode step of B sequences at context `ctx` (Model::forward_infer over a paged cache, no HTTP, no
// scheduling): what the server's batch costs before the front end
void engine_steps(const std::string& ckpt, int threads, const std::vector<double>& batches, int ctx) {
  moe::set_num_threads(threads);
  moe::launcher::LoadOptions lo;
  lo.inference = true;
  moe::launcher::LoadedModel lm = moe::launcher::load_for_inference(ckpt, lo);
  moe::Model& m = *lm.model;
  m.prepare_inference();
  std::printf("engine decode step (forward_infer, %d threads, context %d)   ms/step   tokens/s\n", threads, ctx);
  for (double bd : batches) {
    const int B = int(bd);
    const moe::bench::DecodeTiming t = moe::bench::time_decode_steps(m, B, ctx);
    const double s = t.seconds, cpu = t.cpu_seconds;
    std::printf("  batch %-3d                                                 %8.3f %10.0f\n", B, s * 1e3, B / s);
    std::printf("ENGINE batch=%d ms_per_step=%.4f tokens_per_s=%.1f cpu_ms_per_step=%.4f tokens_per_cpu_s=%.1f\n", B,
                s * 1e3, B / s, cpu * 1e3, B / cpu);
  }
}

// ---------------------------------------------------------------- 2. the load generator
struct Sample {
  double ttft = 0;          // request sent -> first token event
  std::vector<double> itl;  // between consecutive token events
  int tokens = 0;           // completion tokens (usage)
  bool ok = false;
};

std::vector<std::string> prompts(int words) {
  std::ifstream f(std::string(MOE_SOURCE_DIR) + "/../shared/data/tinyshakespeare.txt");
  std::vector<std::string> all, out;
  std::string w;
  while (f >> w && all.size() < 20000) all.push_back(w);
  MOE_CHECK(all.size() > size_t(words), "bench_serve: no corpus for prompts");
  for (size_t i = 0; i + words < all.size() && out.size() < 512; i += 37) {
    std::string p;
    for (int j = 0; j < words; ++j) p += (j ? " " : "") + all[i + j];
    out.push_back(p);
  }
  return out;
}

std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (c == '\n') {
      o += "\\n";
      continue;
    }
    o += c;
  }
  return o + "\"";
}

// one streamed completion over a fresh connection; token events are timed as their bytes arrive
Sample run_request(int port, const std::string& prompt, int max_tokens) {
  Sample s;
  try {
    boost::asio::io_context ioc;
    tcp::socket sock(ioc);
    sock.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)));
    sock.set_option(tcp::no_delay(true));
    http::request<http::string_body> req{http::verb::post, "/v1/completions", 11};
    req.set(http::field::host, "127.0.0.1");
    req.set(http::field::content_type, "application/json");
    req.body() = "{\"prompt\":" + json_str(prompt) + ",\"max_tokens\":" + std::to_string(max_tokens) +
                 ",\"temperature\":0,\"ignore_eos\":true,\"stream\":true,\"stream_options\":{\"include_usage\":true}}";
    req.prepare_payload();
    const auto t0 = clk::now();
    http::write(sock, req);
    beast::flat_buffer buf;
    http::response_parser<http::string_body> p;
    p.body_limit(64 << 20);
    clk::time_point last{};
    std::string pending;
    auto on_chunk = [&](std::uint64_t, beast::string_view body, beast::error_code&) -> std::size_t {
      const auto now = clk::now();
      pending.append(body.data(), body.size());
      for (size_t e; (e = pending.find("\n\n")) != std::string::npos; pending.erase(0, e + 2)) {
        const std::string ev = pending.substr(0, e);
        if (ev.find("\"text\":\"") != std::string::npos && ev.find("\"text\":\"\"") == std::string::npos) {
          if (last == clk::time_point{})
            s.ttft = secs(t0, now);
          else
            s.itl.push_back(secs(last, now));
          last = now;
        }
        const size_t u = ev.find("\"completion_tokens\":");
        if (u != std::string::npos) s.tokens = std::atoi(ev.c_str() + u + 20);
      }
      return body.size();
    };
    p.on_chunk_body(on_chunk);
    http::read(sock, buf, p);
    s.ok = p.get().result() == http::status::ok && s.tokens > 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "request failed: %s\n", e.what());
  }
  return s;
}

double pct(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5))];
}

void report(const std::string& label, const std::vector<Sample>& samples, double wall) {
  std::vector<double> ttft, itl;
  long tokens = 0, failed = 0;
  for (const Sample& s : samples) {
    if (!s.ok) {
      ++failed;
      continue;
    }
    ttft.push_back(s.ttft);
    itl.insert(itl.end(), s.itl.begin(), s.itl.end());
    tokens += s.tokens;
  }
  std::printf("%-22s %6zu %9.1f %9.1f %9.1f %8.2f %8.2f %6ld\n", label.c_str(), samples.size(), tokens / wall,
              pct(ttft, 0.5) * 1e3, pct(ttft, 0.99) * 1e3, pct(itl, 0.5) * 1e3, pct(itl, 0.99) * 1e3, failed);
  std::printf("RESULT %s tokens_per_s=%.1f ttft_p50_ms=%.2f ttft_p99_ms=%.2f itl_p50_ms=%.3f itl_p99_ms=%.3f\n",
              label.c_str(), tokens / wall, pct(ttft, 0.5) * 1e3, pct(ttft, 0.99) * 1e3, pct(itl, 0.5) * 1e3,
              pct(itl, 0.99) * 1e3);
  std::fflush(stdout);
}

// closed loop: `conc` clients, `total` requests in all, each client sending its next one when its last finished
void closed_loop(int port, int conc, int total, int max_tokens, const std::vector<std::string>& ps) {
  std::vector<Sample> samples(total);
  std::atomic<int> next{0};
  const auto t0 = clk::now();
  std::vector<std::thread> th;
  for (int c = 0; c < conc; ++c)
    th.emplace_back([&] {
      for (int i; (i = next++) < total;) samples[i] = run_request(port, ps[i % ps.size()], max_tokens);
    });
  for (auto& t : th) t.join();
  report("closed c=" + std::to_string(conc), samples, secs(t0, clk::now()));
}

// open loop: `total` requests arriving as a Poisson process of `rate` per second, each on its own thread
void open_loop(int port, double rate, int total, int max_tokens, const std::vector<std::string>& ps) {
  std::vector<Sample> samples(total);
  std::mt19937_64 rng(7);
  std::exponential_distribution<double> gap(rate);
  std::vector<std::thread> th;
  const auto t0 = clk::now();
  auto at = t0;
  for (int i = 0; i < total; ++i) {
    at += std::chrono::duration_cast<clk::duration>(std::chrono::duration<double>(gap(rng)));
    std::this_thread::sleep_until(at);
    th.emplace_back([&, i] { samples[i] = run_request(port, ps[i % ps.size()], max_tokens); });
  }
  for (auto& t : th) t.join();
  char name[64];
  std::snprintf(name, sizeof name, "poisson %.0f/s", rate);
  report(name, samples, secs(t0, clk::now()));
}

std::vector<double> list(const std::string& s) {
  std::vector<double> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');)
    if (!x.empty()) out.push_back(std::stod(x));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int port = 0, requests = 32, max_tokens = 64, words = 12, threads = 2, bound_only = 0, engine = 0, context = 0;
  std::string ckpt, closed = "1,4,16,64", poisson = "", label = "";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--port")
      port = std::stoi(v);
    else if (a == "--checkpoint")
      ckpt = v;
    else if (a == "--closed")
      closed = v;
    else if (a == "--poisson")
      poisson = v;
    else if (a == "--requests")
      requests = std::stoi(v);
    else if (a == "--max-tokens")
      max_tokens = std::stoi(v);
    else if (a == "--prompt-words")
      words = std::stoi(v);
    else if (a == "--threads")
      threads = std::stoi(v);
    else if (a == "--label")
      label = v;
    else if (a == "--bound-only")
      bound_only = std::stoi(v);
    else if (a == "--engine")
      engine = std::stoi(v);
    else if (a == "--context")
      context = std::stoi(v);
    else {
      std::fprintf(stderr, "bench_serve: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  try {
    moe::Config cfg = moe::ckpt::read_manifest(moe::ckpt::resolve(ckpt)).config();
    moe::fill_defaults(cfg);
    const std::vector<std::string> ps = prompts(words);
    if (bound_only || engine) {
      if (bound_only) print_bound(cfg.model(), threads, int(words * 1.4), max_tokens);  // ~1.4 tokens per word
      if (engine) engine_steps(ckpt, threads, list(closed), context > 0 ? context : int(words * 1.4 + max_tokens / 2));
      MPI_Finalize();
      return 0;
    }
    std::printf("load generator %s: %d requests per setting, %d output tokens each, prompts of %d words\n",
                label.c_str(), requests, max_tokens, words);
    std::printf("%-22s %6s %9s %9s %9s %8s %8s %6s\n", "setting", "reqs", "tok/s", "ttft p50", "ttft p99", "itl p50",
                "itl p99", "failed");
    run_request(port, ps[0], 4);  // warm-up
    for (double c : list(closed)) closed_loop(port, int(c), std::max(requests, int(c) * 2), max_tokens, ps);
    for (double r : list(poisson)) open_loop(port, r, requests, max_tokens, ps);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_serve: %s\n", e.what());
    return 1;
  }
  MPI_Finalize();
  return 0;
}
