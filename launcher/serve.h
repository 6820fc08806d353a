// `moe serve` and `moe generate`: a checkpoint loaded for inference into the serving engine (serve/engine.h).
// serve: every rank of the job loads its expert shard and runs the engine; rank 0 puts the HTTP API
// (serve/http_server.h) in front of it, started before the model loads (/health answers 503 until it is ready).
// SIGTERM, SIGINT or SIGUSR1 on any rank drains: no new requests, the in-flight ones finish
// (serving.drain_timeout_s), exit 0. Under mpirun send SIGUSR1 to mpirun, which forwards it (a SIGTERM to mpirun
// is forwarded too, but Open MPI kills the ranks one second later). generate: one prompt through a one-rank engine,
// printed with its continuation.
#pragma once
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace moe::launcher {

struct ServeOptions {
  std::string checkpoint;              // a step_<N> directory or a checkpoint root with `latest`
  std::vector<std::string> overrides;  // --set (serving.port=..., ...)
  std::string api_key_file;            // --api-key-file: overrides serving.api_key_file
};
// Every rank of `world`; returns the exit code (0 after a drain).
int run_serve(const ServeOptions& o, comm::Communicator& world);

struct GenerateOptions {
  std::string checkpoint;
  std::vector<std::string> overrides;  // --set generate.temperature=... (and any other field)
  std::string prompt;                  // the text to continue
  bool print_ids = false;              // the ids and each generated token's log-probability on stderr
};
int run_generate(const GenerateOptions& o);

}  // namespace moe::launcher
