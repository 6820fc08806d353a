#include "launcher/cli.h"

#include <cstdio>

namespace moe::launcher {
int run_cli(int argc, char** argv) {
  std::fprintf(stderr, "moe: not built yet\n");
  return 1;
}
}  // namespace moe::launcher
