// Logging with a rank prefix ("[rank 1] ..."). The rank is set once by whoever knows it (the launcher);
// core itself knows nothing about MPI.
#pragma once
#include <sstream>
#include <string>

namespace moe::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

void set_rank(int rank, int world_size);
void set_level(Level level);
Level level();
void write(Level level, const std::string& msg);

}  // namespace moe::log

#define MOE_LOG(lvl, msg)                                                 \
  do {                                                                    \
    if (static_cast<int>(lvl) >= static_cast<int>(::moe::log::level())) { \
      std::ostringstream moe_log_oss_;                                    \
      moe_log_oss_ << msg;                                                \
      ::moe::log::write(lvl, moe_log_oss_.str());                         \
    }                                                                     \
  } while (0)
#define MOE_INFO(msg) MOE_LOG(::moe::log::Level::kInfo, msg)
#define MOE_WARN(msg) MOE_LOG(::moe::log::Level::kWarn, msg)
#define MOE_DEBUG(msg) MOE_LOG(::moe::log::Level::kDebug, msg)
