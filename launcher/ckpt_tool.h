// `moe ckpt ...`: checkpoint utilities that work without mpirun (inspect, verify, reshard, convert).
#pragma once
namespace moe::launcher {
// argv[0] == "ckpt"; returns the exit code (errors are thrown as moe::Error and reported by the CLI).
int ckpt_tool_main(int argc, char** argv);
}
