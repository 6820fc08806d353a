#pragma once
namespace moe::launcher {
// Entry point of the `moe` command line tool; returns the process exit code.
int run_cli(int argc, char** argv);
}
