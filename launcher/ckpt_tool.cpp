// Placeholder while the checkpoint utilities are being written (replaced in this change set).
#include "launcher/ckpt_tool.h"

#include "core/error.h"

namespace moe::launcher {
int ckpt_tool_main(int, char**) { MOE_THROW("moe ckpt: not available yet"); }
}  // namespace moe::launcher
