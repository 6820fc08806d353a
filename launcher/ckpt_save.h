// Forwarding header (kept so launcher/cli.cpp compiles unchanged): the saver lives in checkpoints/saver.h.
#pragma once
#include "checkpoints/saver.h"
#include "launcher/model_state.h"
#include "launcher/parallel.h"

namespace moe::launcher {
using ckpt::CheckpointSaver;
using ckpt::SaveFault;
using ckpt::SaverOptions;
using ckpt::SaveState;
}  // namespace moe::launcher
