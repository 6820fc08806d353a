// Test helpers: exchange arrays with the PyTorch oracle scripts in tests/oracle/ through .npy files.
// The oracle runs under the Python named by $MOE_PYTHON (Debian's /usr/bin/python3 with python3-torch).
// A missing oracle is a test FAILURE, never a skip.
#pragma once
#include "core/params.h"
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/rng.h"

namespace moe::test {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> f;     // for float32/float64 files (converted to float)
  std::vector<int32_t> i;   // for int32/int64 files
  bool is_int = false;
};

void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape);
void write_npy(const std::string& path, const int32_t* data, const std::vector<int64_t>& shape);
NpyArray read_npy(const std::string& path);

// A fresh temporary directory per call (removed by the destructor).
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Runs `$MOE_PYTHON $MOE_ORACLE_DIR/<script> <args...>`; fails the test (ADD_FAILURE) and returns false
// if the interpreter, the script or torch is missing, or the script exits non-zero.
bool run_oracle(const std::string& script, const std::vector<std::string>& args);

std::vector<float> randn(Rng& rng, int64_t n, float scale = 1.0f);

// max |a-b| / max(max|b|, floor): a relative error scaled by the reference's magnitude.
double max_rel_err(const float* a, const float* b, int64_t n, double floor = 1e-6);
double max_rel_err(const std::vector<float>& a, const std::vector<float>& b, double floor = 1e-6);

std::string env_or_fail(const char* name);

// The message of the moe::Error that f throws ("" if it throws none).
std::string error_of(const std::function<void()>& f);

// Deterministic random weights for tests: every parameter of `ps` in order, matrices N(0, std^2) (residual
// projections, Init::kNormalOut: N(0, down_std^2)) drawn from rng, Init::kZeros ones zeroed, norms left as they are.
void fill_weights(ParamStore& ps, Rng& rng, float std, float down_std);

}  // namespace moe::test
