#include "checkpoints/checkpoint.h"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "checkpoints/crc32c.h"
#include "core/error.h"

namespace fs = std::filesystem;

// HDF5 calls return negative on failure; the automatic error-stack printing is turned off so the one error
// path reports instead.
#define MOE_H5_CHECK(expr, what)                                   \
  ([&]() {                                                         \
    auto moe_h5_r_ = (expr);                                       \
    MOE_CHECK(moe_h5_r_ >= 0, "HDF5 error: " << what);             \
    return moe_h5_r_;                                              \
  }())

namespace moe::ckpt {
namespace {

struct H5Quiet {
  H5Quiet() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }
};
const H5Quiet h5_quiet;

// RAII for hid_t
struct Hid {
  hid_t id = -1;
  herr_t (*close)(hid_t) = nullptr;
  Hid(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  ~Hid() {
    if (id >= 0 && close) close(id);
  }
  Hid(const Hid&) = delete;
  Hid& operator=(const Hid&) = delete;
  operator hid_t() const { return id; }
};

void fsync_path(const std::string& path, bool dir) {
  int fd = ::open(path.c_str(), dir ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  MOE_CHECK(fd >= 0, "cannot open '" << path << "' to fsync");
  int rc = ::fsync(fd);
  ::close(fd);
  MOE_CHECK(rc == 0, "fsync of '" << path << "' failed");
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  MOE_CHECK(f.good(), "cannot write '" << path << "'");
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  f.close();
  MOE_CHECK(f.good(), "writing '" << path << "' failed (disk full?)");
  fsync_path(path, false);
}

void write_dataset(hid_t file, const std::string& path, const Tensor& t, proto::Manifest& m,
                   const std::string& file_name) {
  MOE_CHECK(t.dtype() == DType::kF32 || t.dtype() == DType::kI32 || t.dtype() == DType::kBF16,
            "checkpoint: tensor '" << path << "' has dtype " << dtype_name(t.dtype()) << " (f32, bf16 or i32 expected)");
  MOE_CHECK(t.device() == Device::kCPU, "checkpoint: tensor '" << path << "' must be on the CPU");
  // bf16 is stored as a 16-bit unsigned dataset (the raw bit patterns) with the attribute dtype = "bf16"
  hid_t file_type = H5T_IEEE_F32LE, mem_type = H5T_NATIVE_FLOAT;
  if (t.dtype() == DType::kI32) file_type = H5T_STD_I32LE, mem_type = H5T_NATIVE_INT32;
  if (t.dtype() == DType::kBF16) file_type = H5T_STD_U16LE, mem_type = H5T_NATIVE_UINT16;
  std::vector<hsize_t> dims(t.shape().begin(), t.shape().end());
  Hid space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  MOE_H5_CHECK(space.id, "creating dataspace for '" << path << "'");
  Hid lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl, 1);
  Hid ds(H5Dcreate2(file, ("/" + path).c_str(), file_type, space, lcpl, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  MOE_H5_CHECK(ds.id, "creating dataset '" << path << "'");
  MOE_H5_CHECK(H5Dwrite(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.raw()), "writing '" << path << "'");
  if (t.dtype() == DType::kBF16) {
    const char* value = "bf16";
    Hid str(H5Tcopy(H5T_C_S1), H5Tclose);
    MOE_H5_CHECK(str.id, "creating a string type for '" << path << "'");
    MOE_H5_CHECK(H5Tset_size(str, std::strlen(value)), "sizing the dtype attribute of '" << path << "'");
    Hid aspace(H5Screate(H5S_SCALAR), H5Sclose);
    Hid attr(H5Acreate2(ds, "dtype", str, aspace, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    MOE_H5_CHECK(attr.id, "creating the dtype attribute of '" << path << "'");
    MOE_H5_CHECK(H5Awrite(attr, str, value), "writing the dtype attribute of '" << path << "'");
  }
  auto* e = m.add_tensors();
  e->set_name(path);
  for (auto d : t.shape()) e->add_shape(d);
  e->set_dtype(dtype_name(t.dtype()));
  e->set_crc32c(crc32c(t.raw(), t.nbytes()));
  e->set_file(file_name);
}

std::vector<int64_t> list_steps(const std::string& root) {
  std::vector<int64_t> steps;
  if (!fs::is_directory(root)) return steps;
  for (const auto& ent : fs::directory_iterator(root)) {
    const std::string n = ent.path().filename().string();
    if (n.rfind("step_", 0) == 0 && n.find(".tmp") == std::string::npos && ent.is_directory()) {
      try {
        steps.push_back(std::stoll(n.substr(5)));
      } catch (...) {
      }
    }
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

}  // namespace

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  MOE_CHECK(f.good(), "cannot read '" << path << "'");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string save(const std::string& root, const SaveRequest& req) {
  MOE_CHECK(req.config, "checkpoint save: the config is required");
  fs::create_directories(root);
  const std::string name = "step_" + std::to_string(req.step);
  const std::string final_dir = root + "/" + name;
  const std::string tmp_dir = final_dir + ".tmp";
  fs::remove_all(tmp_dir);
  fs::create_directories(tmp_dir);

  proto::Manifest m;
  m.set_format_version(kFormatVersion);
  *m.mutable_config() = *req.config;
  m.set_step(req.step);
  m.set_world_size(req.world_size);
  m.set_expert_parallel(req.config->parallel().expert_parallel());
  m.set_optimizer_t(req.optimizer_t);
  for (uint64_t w : req.loader_rng) m.add_loader_rng(w);
  const std::string h5_name = "model.h5";
  {
    Hid file(H5Fcreate((tmp_dir + "/" + h5_name).c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
    MOE_H5_CHECK(file.id, "creating " << tmp_dir << "/" << h5_name);
    for (const NamedTensor& t : req.tensors) write_dataset(file, t.name, t.tensor, m, h5_name);
    MOE_H5_CHECK(H5Fflush(file, H5F_SCOPE_GLOBAL), "flushing " << h5_name);
  }
  fsync_path(tmp_dir + "/" + h5_name, false);
  if (req.tokenizer_blob) {
    write_file(tmp_dir + "/tokenizer.model", *req.tokenizer_blob);
    m.set_tokenizer_file("tokenizer.model");
  }
  std::string bin;
  MOE_CHECK(m.SerializeToString(&bin), "serialising the manifest failed");
  write_file(tmp_dir + "/manifest.txt", config_to_text(m));
  write_file(tmp_dir + "/manifest.pb", bin);  // written last: its presence marks a complete directory
  fsync_path(tmp_dir, true);
  fs::remove_all(final_dir);
  fs::rename(tmp_dir, final_dir);
  fsync_path(root, true);
  // `latest`: write a temp file and rename over the old one
  write_file(root + "/latest.tmp", name + "\n");
  fs::rename(root + "/latest.tmp", root + "/latest");
  fsync_path(root, true);
  if (req.keep_last > 0) {
    auto steps = list_steps(root);
    for (size_t i = 0; i + req.keep_last < steps.size(); ++i)
      if (steps[i] != req.step) fs::remove_all(root + "/step_" + std::to_string(steps[i]));
  }
  return final_dir;
}

std::string resolve(const std::string& path) {
  MOE_CHECK(fs::exists(path), "checkpoint path '" << path << "' does not exist");
  if (fs::is_regular_file(path + "/manifest.pb")) return path;
  if (fs::is_regular_file(path + "/latest")) {
    std::string name = read_file(path + "/latest");
    while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
    const std::string dir = path + "/" + name;
    MOE_CHECK(fs::is_regular_file(dir + "/manifest.pb"),
              "'" << path << "/latest' names '" << name << "', which is not a complete checkpoint");
    return dir;
  }
  MOE_THROW("'" << path << "' is not a checkpoint (no manifest.pb) nor a checkpoint root (no latest file)");
}

proto::Manifest read_manifest(const std::string& step_dir) {
  proto::Manifest m;
  const std::string bytes = read_file(step_dir + "/manifest.pb");
  MOE_CHECK(m.ParseFromString(bytes), "checkpoint " << step_dir << ": manifest.pb is corrupt");
  MOE_CHECK(m.format_version() >= 1 && m.format_version() <= kFormatVersion,
            "checkpoint " << step_dir << ": manifest format version " << m.format_version()
                          << " is not supported (this build reads versions 1.." << kFormatVersion << ")");
  return m;
}

Reader::Reader(const std::string& step_dir, const proto::Manifest& manifest) : dir_(step_dir), m_(manifest) {
  const std::string h5 = step_dir + "/model.h5";
  MOE_CHECK(fs::is_regular_file(h5), "checkpoint " << step_dir << ": model.h5 is missing");
  file_ = H5Fopen(h5.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  MOE_CHECK(file_ >= 0, "checkpoint " << h5 << " is not a readable HDF5 file (truncated or corrupt?)");
}

Reader::~Reader() {
  if (file_ >= 0) H5Fclose(file_);
}

const proto::TensorEntry& Reader::entry(const std::string& name) const {
  for (const auto& e : m_.tensors())
    if (e.name() == name) return e;
  MOE_THROW("checkpoint " << dir_ << ": manifest has no tensor '" << name << "'");
}

bool Reader::has(const std::string& name) const {
  for (const auto& e : m_.tensors())
    if (e.name() == name) return true;
  return false;
}

Shape Reader::shape(const std::string& name) const {
  const auto& e = entry(name);
  return Shape(e.shape().begin(), e.shape().end());
}

void Reader::read(const std::string& name, Tensor& dst, int64_t row_offset) {
  const proto::TensorEntry& e = entry(name);
  const Shape shape(e.shape().begin(), e.shape().end());
  const std::string where = dir_ + "/" + e.file();
  // a bf16 dataset may be read into an f32 tensor (converted); otherwise the dtypes must match
  const bool widen = e.dtype() == "bf16" && dst.dtype() == DType::kF32;
  MOE_CHECK(e.dtype() == dtype_name(dst.dtype()) || widen,
            "checkpoint " << where << ": tensor '" << name << "' has dtype " << e.dtype() << ", expected "
                          << dtype_name(dst.dtype()));
  Shape want = dst.shape();
  bool ok = !shape.empty() && want.size() == shape.size() && row_offset >= 0 &&
            row_offset + (want.empty() ? 0 : want[0]) <= shape[0];
  for (size_t i = 1; ok && i < shape.size(); ++i) ok = want[i] == shape[i];
  if (row_offset == 0 && !want.empty() && want[0] == shape[0]) ok = ok && want == shape;
  MOE_CHECK(ok || (shape.empty() && want.empty()),
            "checkpoint " << where << ": tensor '" << name << "' has shape " << shape_str(shape)
                          << " but the model expects " << shape_str(want)
                          << (row_offset ? " at row offset " + std::to_string(row_offset) : std::string()));
  Hid ds(H5Dopen2(file_, ("/" + name).c_str(), H5P_DEFAULT), H5Dclose);
  MOE_CHECK(ds.id >= 0, "checkpoint " << where << ": dataset '" << name << "' is missing");
  Hid space(H5Dget_space(ds), H5Sclose);
  const int nd = H5Sget_simple_extent_ndims(space);
  std::vector<hsize_t> dims(std::max(nd, 0));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  MOE_CHECK(Shape(dims.begin(), dims.end()) == shape,
            "checkpoint " << where << ": dataset '" << name << "' has shape "
                          << shape_str(Shape(dims.begin(), dims.end())) << ", manifest says " << shape_str(shape));
  // read the whole dataset (to verify its checksum), then copy the requested rows
  const DType stored = widen ? DType::kBF16 : dst.dtype();
  Tensor full = (!widen && row_offset == 0 && want == shape) ? dst : Tensor::empty(shape, stored);
  hid_t mem_type = H5T_NATIVE_FLOAT;
  if (stored == DType::kI32) mem_type = H5T_NATIVE_INT32;
  if (stored == DType::kBF16) mem_type = H5T_NATIVE_UINT16;
  MOE_H5_CHECK(H5Dread(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, full.raw()),
               "reading dataset '" << name << "' from " << where << " (file truncated or corrupt?)");
  const uint32_t crc = crc32c(full.raw(), full.nbytes());
  MOE_CHECK(crc == e.crc32c(), "checkpoint " << where << ": checksum mismatch in tensor '" << name << "' (stored "
                                             << e.crc32c() << ", computed " << crc << ")");
  if (full.raw() != dst.raw()) {
    const size_t row_bytes = shape[0] ? full.nbytes() / shape[0] : 0;
    const uint8_t* src = static_cast<const uint8_t*>(full.raw()) + row_offset * row_bytes;
    if (widen) {
      const bf16* b = reinterpret_cast<const bf16*>(src);
      float* f = dst.f32();
      for (int64_t i = 0; i < dst.numel(); ++i) f[i] = bf16_to_float(b[i]);
    } else {
      std::memcpy(dst.raw(), src, dst.nbytes());
    }
  }
}

}  // namespace moe::ckpt
