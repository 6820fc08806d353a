#include "core/log.h"

#include <cstdio>
#include <mutex>

namespace moe::log {
namespace {
int g_rank = 0;
int g_world = 1;
Level g_level = Level::kInfo;
std::mutex g_mu;
}  // namespace

void set_rank(int rank, int world_size) {
  g_rank = rank;
  g_world = world_size;
}
void set_level(Level level) { g_level = level; }
Level level() { return g_level; }

void write(Level lvl, const std::string& msg) {
  static const char* kNames[] = {"debug", "info", "warn", "error"};
  std::lock_guard<std::mutex> lock(g_mu);
  FILE* out = lvl >= Level::kWarn ? stderr : stdout;
  if (g_world > 1)
    std::fprintf(out, "[rank %d] %s%s%s\n", g_rank, lvl == Level::kInfo ? "" : kNames[static_cast<int>(lvl)],
                 lvl == Level::kInfo ? "" : ": ", msg.c_str());
  else
    std::fprintf(out, "%s%s%s\n", lvl == Level::kInfo ? "" : kNames[static_cast<int>(lvl)],
                 lvl == Level::kInfo ? "" : ": ", msg.c_str());
  std::fflush(out);
}

}  // namespace moe::log
