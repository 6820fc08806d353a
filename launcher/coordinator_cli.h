// `moe coordinator ...`: run a supervised training or serving job (launcher/coordinator.h), or talk to the
// coordinator of a running one (status, checkpoint, slots, shutdown). Runs without mpirun and before MPI_Init: the
// coordinator starts the ranks itself.
#pragma once
namespace moe::launcher {
// argv[0] == "coordinator"; returns the exit code: 0 done, 1 a failed job or request, 2 a bad command line.
// Errors are thrown as moe::Error and reported by the CLI.
int coordinator_cli_main(int argc, char** argv);
// The usage text (`moe coordinator --help`, `moe help coordinator`).
const char* coordinator_usage();
}  // namespace moe::launcher
