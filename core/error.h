// One error path for the whole system: moe::Error exceptions with context, thrown by MOE_CHECK
// (as PyTorch's TORCH_CHECK) and caught once at the CLI boundary.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace moe {

class Error : public std::runtime_error {
 public:
  Error(const std::string& what, const char* file, int line)
      : std::runtime_error(what), where_(std::string(file) + ":" + std::to_string(line)) {}
  const std::string& where() const { return where_; }

 private:
  std::string where_;
};

}  // namespace moe

#define MOE_THROW(msg)                                              \
  do {                                                              \
    std::ostringstream moe_oss_;                                    \
    moe_oss_ << msg;                                                \
    throw ::moe::Error(moe_oss_.str(), __FILE__, __LINE__);         \
  } while (0)

#define MOE_CHECK(cond, msg)                                        \
  do {                                                              \
    if (!(cond)) MOE_THROW(msg);                                    \
  } while (0)
