#include "launcher/cli.h"

int main(int argc, char** argv) { return moe::launcher::run_cli(argc, argv); }
