// Forwarding header (kept so launcher/cli.cpp compiles unchanged): Parallel lives in comm/parallel.h.
#pragma once
#include "comm/parallel.h"

namespace moe::launcher {
using comm::Parallel;
}
