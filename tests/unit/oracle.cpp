#include "tests/unit/oracle.h"

#include "core/error.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace moe::test {
namespace {

void write_npy_raw(const std::string& path, const void* data, size_t elem, const char* descr,
                   const std::vector<int64_t>& shape) {
  std::ostringstream h;
  h << "{'descr': '" << descr << "', 'fortran_order': False, 'shape': (";
  int64_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    h << shape[i] << (shape.size() == 1 ? "," : (i + 1 < shape.size() ? ", " : ""));
    n *= shape[i];
  }
  h << "), }";
  std::string header = h.str();
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream f(path, std::ios::binary);
  ASSERT_TRUE(f.good()) << "cannot write " << path;
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t len = static_cast<uint16_t>(header.size());
  f.write(reinterpret_cast<const char*>(&len), 2);
  f.write(header.data(), header.size());
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(n * elem));
}

}  // namespace

void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  write_npy_raw(path, data, 4, "<f4", shape);
}
void write_npy(const std::string& path, const int32_t* data, const std::vector<int64_t>& shape) {
  write_npy_raw(path, data, 4, "<i4", shape);
}

NpyArray read_npy(const std::string& path) {
  NpyArray out;
  std::ifstream f(path, std::ios::binary);
  if (!f.good()) {
    ADD_FAILURE() << "oracle output missing: " << path;
    return out;
  }
  char magic[8];
  f.read(magic, 8);
  if (std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    ADD_FAILURE() << path << " is not a .npy file";
    return out;
  }
  uint32_t hlen = 0;
  if (magic[6] == 1) {
    uint16_t l;
    f.read(reinterpret_cast<char*>(&l), 2);
    hlen = l;
  } else {
    f.read(reinterpret_cast<char*>(&hlen), 4);
  }
  std::string header(hlen, ' ');
  f.read(header.data(), hlen);
  auto dpos = header.find("'descr': '");
  std::string descr = header.substr(dpos + 10, 3);
  EXPECT_EQ(header.find("'fortran_order': True"), std::string::npos) << path;
  auto spos = header.find("'shape': (");
  auto send = header.find(")", spos);
  std::string shp = header.substr(spos + 10, send - spos - 10);
  int64_t n = 1;
  std::stringstream ss(shp);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    if (tok.find_first_not_of(' ') == std::string::npos) continue;
    out.shape.push_back(std::stoll(tok));
    n *= out.shape.back();
  }
  if (descr == "<f4") {
    out.f.resize(n);
    f.read(reinterpret_cast<char*>(out.f.data()), n * 4);
  } else if (descr == "<f8") {
    std::vector<double> d(n);
    f.read(reinterpret_cast<char*>(d.data()), n * 8);
    out.f.assign(d.begin(), d.end());
  } else if (descr == "<i4") {
    out.is_int = true;
    out.i.resize(n);
    f.read(reinterpret_cast<char*>(out.i.data()), n * 4);
  } else if (descr == "<i8") {
    out.is_int = true;
    std::vector<int64_t> d(n);
    f.read(reinterpret_cast<char*>(d.data()), n * 8);
    out.i.assign(d.begin(), d.end());
  } else {
    ADD_FAILURE() << path << ": unsupported npy dtype " << descr;
  }
  return out;
}

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "moe_test_XXXXXX").string();
  char* p = mkdtemp(tmpl.data());
  if (!p) throw std::runtime_error("mkdtemp failed");
  path_ = p;
}
TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string env_or_fail(const char* name) {
  const char* v = std::getenv(name);
  // defaults compiled in by CMake, so the test binaries also work outside ctest
  if ((!v || !*v) && std::strcmp(name, "MOE_PYTHON") == 0) v = MOE_TEST_PYTHON;
  if ((!v || !*v) && std::strcmp(name, "MOE_ORACLE_DIR") == 0) v = MOE_TEST_SOURCE_DIR "/tests/oracle";
  if ((!v || !*v) && std::strcmp(name, "MOE_SOURCE_DIR") == 0) v = MOE_TEST_SOURCE_DIR;
  if ((!v || !*v) && std::strcmp(name, "MOE_DATA_DIR") == 0) v = MOE_TEST_SOURCE_DIR "/../shared/data";
  if (!v || !*v) {
    ADD_FAILURE() << "environment variable " << name << " is not set (run the tests through ctest)";
    return "";
  }
  return v;
}

bool run_oracle(const std::string& script, const std::vector<std::string>& args) {
  std::string py = env_or_fail("MOE_PYTHON");
  std::string dir = env_or_fail("MOE_ORACLE_DIR");
  if (py.empty() || dir.empty()) return false;
  std::string cmd = "'" + py + "' '" + dir + "/" + script + "'";
  for (auto& a : args) cmd += " '" + a + "'";
  cmd += " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) {
    ADD_FAILURE() << "cannot run oracle: " << cmd;
    return false;
  }
  std::string output;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, pipe)) output.append(buf, n);
  int rc = pclose(pipe);
  if (rc != 0) {
    ADD_FAILURE() << "PyTorch oracle failed (rc " << rc << "): " << cmd << "\n"
                  << output << "\n(install it with deploy/setup.sh: python3-torch for /usr/bin/python3)";
    return false;
  }
  return true;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::vector<float> randn(Rng& rng, int64_t n, float scale) {
  std::vector<float> v(n);
  for (auto& x : v) x = rng.normal() * scale;
  return v;
}

double max_rel_err(const float* a, const float* b, int64_t n, double floor) {
  double maxdiff = 0, maxref = floor;
  for (int64_t i = 0; i < n; ++i) {
    double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    if (std::isnan(d)) return INFINITY;
    maxdiff = std::max(maxdiff, d);
    maxref = std::max(maxref, std::fabs(static_cast<double>(b[i])));
  }
  return maxdiff / maxref;
}

double max_rel_err(const std::vector<float>& a, const std::vector<float>& b, double floor) {
  if (a.size() != b.size()) {
    ADD_FAILURE() << "size mismatch " << a.size() << " vs " << b.size();
    return 1e30;
  }
  return max_rel_err(a.data(), b.data(), static_cast<int64_t>(a.size()), floor);
}

void fill_weights(ParamStore& ps, Rng& rng, float std, float down_std) {
  for (Param* p : ps.all()) {
    if (p->init == Init::kZeros) p->value.zero_();
    else if (p->init != Init::kOnes) init_normal(p->value, rng, p->init == Init::kNormalOut ? down_std : std);
  }
}

}  // namespace moe::test
