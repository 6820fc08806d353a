#pragma once
namespace moe {
// Sets the OpenMP and OpenBLAS thread counts (n <= 0: all cores). Returns the count in use.
int set_num_threads(int n);
}
