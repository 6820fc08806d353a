#include "checkpoints/checkpoint.h"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <limits>
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

// The automatic HDF5 error-stack printing is per thread in the thread-safe library (Debian's): every entry point
// that may run on a background writer thread turns it off for its thread.
void h5_quiet_this_thread() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

}  // namespace

void check_writable(const Tensor& t, const std::string& name) {
  MOE_CHECK(t.dtype() == DType::kF32 || t.dtype() == DType::kI32 || t.dtype() == DType::kBF16,
            "checkpoint: tensor '" << name << "' has dtype " << dtype_name(t.dtype()) << " (f32, bf16 or i32 expected)");
  MOE_CHECK(t.device() == Device::kCPU, "checkpoint: tensor '" << name << "' must be on the CPU");
}

namespace {

// HDF5 file and memory types of a dtype; bf16 is stored as a 16-bit unsigned dataset (the raw bit patterns) with
// the attribute dtype = "bf16"
hid_t file_type_of(DType dt) {
  return dt == DType::kI32 ? H5T_STD_I32LE : dt == DType::kBF16 ? H5T_STD_U16LE : H5T_IEEE_F32LE;
}
hid_t mem_type_of(DType dt) {
  return dt == DType::kI32 ? H5T_NATIVE_INT32 : dt == DType::kBF16 ? H5T_NATIVE_UINT16 : H5T_NATIVE_FLOAT;
}

void tag_bf16(hid_t ds, const std::string& where) {
  const char* value = "bf16";
  Hid str(H5Tcopy(H5T_C_S1), H5Tclose);
  MOE_H5_CHECK(str.id, "creating a string type for " << where);
  MOE_H5_CHECK(H5Tset_size(str, std::strlen(value)), "sizing the dtype attribute of " << where);
  Hid aspace(H5Screate(H5S_SCALAR), H5Sclose);
  Hid attr(H5Acreate2(ds, "dtype", str, aspace, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  MOE_H5_CHECK(attr.id, "creating the dtype attribute of " << where);
  MOE_H5_CHECK(H5Awrite(attr, str, value), "writing the dtype attribute of " << where);
}

size_t row_bytes_of(const Shape& shape, DType dt) {
  if (shape.empty() || shape[0] == 0) return 0;
  return static_cast<size_t>(shape_numel(shape) / shape[0]) * dtype_size(dt);
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

std::string step_name(int64_t step) { return "step_" + std::to_string(step); }

}  // namespace

std::string shard_file_name(int shard) { return "experts_" + std::to_string(shard) + ".h5"; }

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  MOE_CHECK(f.good(), "cannot read '" << path << "'");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& bytes, bool sync) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  MOE_CHECK(f.good(), "cannot write '" << path << "'");
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  f.close();
  MOE_CHECK(f.good(), "writing '" << path << "' failed (disk full?)");
  if (sync) fsync_path(path, false);
}

void fsync_file(const std::string& path) { fsync_path(path, false); }

std::vector<uint32_t> write_h5(const std::string& path, const std::vector<DatasetWrite>& datasets,
                               const std::vector<VirtualDataset>& virtuals, const BeforeDataset& before, bool sync) {
  h5_quiet_this_thread();
  std::vector<uint32_t> crcs;
  int written = 0;
  {
    Hid file(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
    MOE_H5_CHECK(file.id, "creating " << path);
    Hid lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
    H5Pset_create_intermediate_group(lcpl, 1);
    for (const DatasetWrite& d : datasets) {
      if (before) before(written, path);
      check_writable(d.tensor, d.name);
      const Tensor& t = d.tensor;
      Shape shape = t.shape();
      const size_t row_bytes = row_bytes_of(shape, t.dtype());
      const int64_t rows = d.rows < 0 ? (shape.empty() ? 0 : shape[0]) : d.rows;
      MOE_CHECK(d.rows < 0 || (!shape.empty() && d.row_offset >= 0 && d.row_offset + rows <= shape[0]),
                "checkpoint: rows [" << d.row_offset << ", " << d.row_offset + rows << ") of tensor '" << d.name
                                     << "' lie outside its shape " << shape_str(shape));
      if (d.rows >= 0) shape[0] = rows;
      const void* data = static_cast<const uint8_t*>(t.raw()) + (d.rows >= 0 ? d.row_offset * row_bytes : 0);
      const size_t nbytes = d.rows >= 0 ? rows * row_bytes : t.nbytes();
      std::vector<hsize_t> dims(shape.begin(), shape.end());
      Hid space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
      MOE_H5_CHECK(space.id, "creating the dataspace of '" << d.name << "' in " << path);
      Hid ds(H5Dcreate2(file, ("/" + d.name).c_str(), file_type_of(t.dtype()), space, lcpl, H5P_DEFAULT,
                        H5P_DEFAULT),
             H5Dclose);
      MOE_H5_CHECK(ds.id, "creating dataset '" << d.name << "' in " << path);
      if (nbytes)
        MOE_H5_CHECK(H5Dwrite(ds, mem_type_of(t.dtype()), H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
                     "writing dataset '" << d.name << "' to " << path << " (disk full?)");
      if (t.dtype() == DType::kBF16) tag_bf16(ds, "dataset '" + d.name + "' in " + path);
      crcs.push_back(crc32c(data, nbytes));
      ++written;
    }
    for (const VirtualDataset& v : virtuals) {
      if (before) before(written, path);
      MOE_CHECK(!v.shape.empty() && v.shards >= 1 && v.shape[0] % v.shards == 0,
                "checkpoint: expert tensor '" << v.name << "' of shape " << shape_str(v.shape)
                                              << " cannot be split into " << v.shards << " equal row blocks");
      std::vector<hsize_t> dims(v.shape.begin(), v.shape.end());
      const hsize_t rows = dims[0] / v.shards;
      Hid vspace(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
      std::vector<hsize_t> src_dims = dims;
      src_dims[0] = rows;
      Hid src_space(H5Screate_simple(static_cast<int>(src_dims.size()), src_dims.data(), nullptr), H5Sclose);
      MOE_H5_CHECK(vspace.id, "creating the dataspace of '" << v.name << "' in " << path);
      MOE_H5_CHECK(src_space.id, "creating the shard dataspace of '" << v.name << "' in " << path);
      Hid dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
      if (v.dtype == DType::kF32) {  // a missing shard file reads as NaN, not as plausible zeros
        const float nan = std::numeric_limits<float>::quiet_NaN();
        MOE_H5_CHECK(H5Pset_fill_value(dcpl, H5T_NATIVE_FLOAT, &nan), "fill value of '" << v.name << "'");
      }
      std::vector<hsize_t> start(dims.size(), 0);
      for (int s = 0; s < v.shards; ++s) {
        start[0] = s * rows;
        MOE_H5_CHECK(H5Sselect_hyperslab(vspace, H5S_SELECT_SET, start.data(), nullptr, src_dims.data(), nullptr),
                     "selecting shard " << s << " of '" << v.name << "'");
        // a RELATIVE source file name: resolved next to model.h5 (see checkpoint.h)
        MOE_H5_CHECK(H5Pset_virtual(dcpl, vspace, shard_file_name(s).c_str(), ("/" + v.name).c_str(), src_space),
                     "mapping shard " << s << " of '" << v.name << "'");
      }
      MOE_H5_CHECK(H5Sselect_all(vspace), "selecting '" << v.name << "'");
      Hid ds(H5Dcreate2(file, ("/" + v.name).c_str(), file_type_of(v.dtype), vspace, lcpl, dcpl, H5P_DEFAULT),
             H5Dclose);
      MOE_H5_CHECK(ds.id, "creating virtual dataset '" << v.name << "' in " << path);
      if (v.dtype == DType::kBF16) tag_bf16(ds, "virtual dataset '" + v.name + "' in " + path);
      ++written;
    }
    MOE_H5_CHECK(H5Fflush(file, H5F_SCOPE_GLOBAL), "flushing " << path);
  }
  if (sync) fsync_path(path, false);
  return crcs;
}

proto::TensorEntry plain_entry(const std::string& name, const Shape& shape, DType dtype, uint32_t crc) {
  proto::TensorEntry e;
  e.set_name(name);
  for (auto d : shape) e.add_shape(d);
  e.set_dtype(dtype_name(dtype));
  e.set_crc32c(crc);
  e.set_file("model.h5");
  return e;
}

proto::TensorEntry sharded_entry(const std::string& name, const Shape& shape, DType dtype,
                                 const std::vector<uint32_t>& shard_crcs) {
  const int S = static_cast<int>(shard_crcs.size());
  MOE_CHECK(S >= 1 && !shape.empty() && shape[0] % S == 0,
            "checkpoint: expert tensor '" << name << "' of shape " << shape_str(shape) << " cannot be split into " << S
                                          << " equal row blocks");
  proto::TensorEntry e = plain_entry(name, shape, dtype, 0);
  const int64_t rows = shape[0] / S;
  const uint64_t shard_bytes = rows * row_bytes_of(shape, dtype);
  uint32_t crc = 0;
  for (int s = 0; s < S; ++s) {
    auto* sh = e.add_shards();
    sh->set_file(shard_file_name(s));
    sh->set_row_offset(s * rows);
    sh->set_rows(rows);
    sh->set_crc32c(shard_crcs[s]);
    crc = s == 0 ? shard_crcs[0] : crc32c_combine(crc, shard_crcs[s], shard_bytes);
  }
  e.set_crc32c(crc);
  return e;
}

std::string begin_save(const std::string& root, int64_t step) {
  fs::create_directories(root);
  const std::string tmp_dir = root + "/" + step_name(step) + ".tmp";
  fs::remove_all(tmp_dir);
  fs::create_directories(tmp_dir);
  return tmp_dir;
}

std::string commit_save(const std::string& root, int64_t step, const proto::Manifest& m, int keep_last) {
  const std::string name = step_name(step);
  const std::string final_dir = root + "/" + name;
  const std::string tmp_dir = final_dir + ".tmp";
  std::string bin;
  MOE_CHECK(m.SerializeToString(&bin), "serialising the manifest failed");
  write_file(tmp_dir + "/manifest.txt", config_to_text(m), false);
  write_file(tmp_dir + "/manifest.pb", bin, false);  // written last: its presence marks a complete directory
  fsync_path(tmp_dir + "/manifest.txt", false);
  fsync_path(tmp_dir + "/manifest.pb", false);
  fsync_path(tmp_dir, true);
  fs::remove_all(final_dir);
  fs::rename(tmp_dir, final_dir);
  fsync_path(root, true);
  // `latest`: write a temp file and rename over the old one
  write_file(root + "/latest.tmp", name + "\n");
  fs::rename(root + "/latest.tmp", root + "/latest");
  fsync_path(root, true);
  if (keep_last > 0) {
    auto steps = list_steps(root);
    for (size_t i = 0; i + keep_last < steps.size(); ++i)
      if (steps[i] != step) fs::remove_all(root + "/" + step_name(steps[i]));
  }
  return final_dir;
}

void abandon_save(const std::string& root, int64_t step) noexcept {
  std::error_code ec;
  fs::remove_all(root + "/" + step_name(step) + ".tmp", ec);
}

std::vector<std::string> remove_stale_saves(const std::string& root) {
  std::vector<std::string> removed;
  if (!fs::is_directory(root)) return removed;
  for (const auto& ent : fs::directory_iterator(root)) {
    const std::string n = ent.path().filename().string();
    const bool tmp_step = n.rfind("step_", 0) == 0 && n.size() > 4 && n.compare(n.size() - 4, 4, ".tmp") == 0;
    if (tmp_step || n == "latest.tmp") removed.push_back(n);
  }
  for (const auto& n : removed) fs::remove_all(root + "/" + n);
  std::sort(removed.begin(), removed.end());
  return removed;
}

proto::Manifest base_manifest(const SaveRequest& req) {
  MOE_CHECK(req.config, "checkpoint save: the config is required");
  proto::Manifest m;
  m.set_format_version(kFormatVersion);
  *m.mutable_config() = *req.config;
  m.set_step(req.step);
  m.set_world_size(req.world_size);
  m.set_expert_parallel(std::max(1, req.config->parallel().expert_parallel()));
  m.set_optimizer_t(req.optimizer_t);
  for (uint64_t w : req.loader_rng) m.add_loader_rng(w);
  for (const auto& r : req.router_rng) *m.add_router_rng() = r;
  if (req.tokenizer_blob) m.set_tokenizer_file("tokenizer.model");
  return m;
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
  // format 1 predates model.word_experts.placement: its word-expert tables were stored with the multiplicative one
  auto* we = m.mutable_config()->mutable_model();
  if (m.format_version() == 1 && we->has_word_experts() &&
      we->word_experts().placement() == proto::WordExpertConfig::PLACEMENT_UNSET)
    we->mutable_word_experts()->set_placement(proto::WordExpertConfig::PLACEMENT_MULTIPLICATIVE);
  // a sharded tensor's shards must tile its rows in order, and their checksums combine to the tensor's
  for (const auto& e : m.tensors()) {
    if (e.shards_size() == 0) continue;
    const std::string where = "checkpoint " + step_dir + "/manifest.pb: tensor '" + e.name() + "'";
    MOE_CHECK(m.format_version() >= 2, where << " has shards, which format version 1 does not allow");
    const Shape shape(e.shape().begin(), e.shape().end());
    MOE_CHECK(!shape.empty(), where << " is sharded but has no rows");
    const size_t row_bytes = row_bytes_of(shape, dtype_from_name(e.dtype()));
    int64_t next = 0;
    uint32_t crc = 0;
    for (int s = 0; s < e.shards_size(); ++s) {
      const auto& sh = e.shards(s);
      MOE_CHECK(sh.row_offset() == next && sh.rows() >= 0 && !sh.file().empty(),
                where << ": shard " << s << " (" << sh.file() << ", rows from " << sh.row_offset()
                      << ") does not continue at row " << next);
      crc = s == 0 ? sh.crc32c() : crc32c_combine(crc, sh.crc32c(), sh.rows() * row_bytes);
      next += sh.rows();
    }
    MOE_CHECK(next == shape[0], where << ": its shards hold " << next << " rows, its shape " << shape_str(shape));
    MOE_CHECK(crc == e.crc32c(), where << ": the shard checksums do not combine to the tensor's checksum");
  }
  return m;
}

// ------------------------------------------------------------------------------------------------ Reader

Reader::Reader(const std::string& step_dir, const proto::Manifest& manifest) : dir_(step_dir), m_(manifest) {
  h5_quiet_this_thread();
  MOE_CHECK(fs::is_regular_file(step_dir + "/model.h5"), "checkpoint " << step_dir << ": model.h5 is missing");
  open_file("model.h5");
}

Reader::~Reader() {
  for (auto& [name, id] : files_) H5Fclose(id);
}

int64_t Reader::open_file(const std::string& file) {
  auto it = files_.find(file);
  if (it != files_.end()) return it->second;
  const std::string path = dir_ + "/" + file;
  MOE_CHECK(fs::is_regular_file(path), "checkpoint " << dir_ << ": file " << path << " is missing");
  const hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  MOE_CHECK(id >= 0, "checkpoint " << path << " is not a readable HDF5 file (truncated or corrupt?)");
  files_[file] = id;
  return id;
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

int Reader::num_shards(const std::string& name) const { return entry(name).shards_size(); }

void Reader::read_dataset(const std::string& file, const std::string& name, const Shape& shape, DType stored,
                          void* out, uint32_t crc, const std::string& what) {
  const std::string where = dir_ + "/" + file;
  const hid_t f = open_file(file);
  Hid ds(H5Dopen2(f, ("/" + name).c_str(), H5P_DEFAULT), H5Dclose);
  MOE_CHECK(ds.id >= 0, "checkpoint " << where << ": dataset '" << name << "' is missing" << what);
  Hid space(H5Dget_space(ds), H5Sclose);
  const int nd = H5Sget_simple_extent_ndims(space);
  std::vector<hsize_t> dims(std::max(nd, 0));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  MOE_CHECK(Shape(dims.begin(), dims.end()) == shape,
            "checkpoint " << where << ": dataset '" << name << "' has shape "
                          << shape_str(Shape(dims.begin(), dims.end())) << ", manifest says " << shape_str(shape)
                          << what);
  const size_t nbytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(stored);
  // read in blocks of rows of ~4 MiB and checksum each block while it is still in the cache (one pass over
  // memory instead of two: the load runs at ~0.7x of a raw read with a separate checksum pass, see RESULTS.md)
  const size_t row_bytes = row_bytes_of(shape, stored);
  const int64_t rows = shape.empty() ? 0 : shape[0];
  const int64_t block = row_bytes ? std::max<int64_t>(1, static_cast<int64_t>((size_t(4) << 20) / row_bytes)) : 1;
  uint32_t got = 0;
  if (nbytes && block >= rows) {
    MOE_H5_CHECK(H5Dread(ds, mem_type_of(stored), H5S_ALL, H5S_ALL, H5P_DEFAULT, out),
                 "reading dataset '" << name << "' from " << where << what << " (file truncated or corrupt?)");
    got = crc32c(out, nbytes);
  } else if (nbytes) {
    std::vector<hsize_t> start(dims.size(), 0), count = dims;
    for (int64_t r = 0; r < rows; r += block) {
      start[0] = static_cast<hsize_t>(r);
      count[0] = static_cast<hsize_t>(std::min(block, rows - r));
      MOE_H5_CHECK(H5Sselect_hyperslab(space, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr),
                   "selecting rows of dataset '" << name << "' in " << where);
      Hid mem(H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr), H5Sclose);
      uint8_t* dst = static_cast<uint8_t*>(out) + r * row_bytes;
      MOE_H5_CHECK(H5Dread(ds, mem_type_of(stored), mem, space, H5P_DEFAULT, dst),
                   "reading dataset '" << name << "' from " << where << what << " (file truncated or corrupt?)");
      got = crc32c(dst, count[0] * row_bytes, got);
    }
  }
  MOE_CHECK(got == crc, "checkpoint " << where << ": checksum mismatch in tensor '" << name << "'" << what
                                      << " (stored " << crc << ", computed " << got << ")");
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
  const DType stored = widen ? DType::kBF16 : dst.dtype();
  const size_t row_bytes = row_bytes_of(shape, stored);
  const int64_t want_rows = want.empty() ? 0 : want[0];
  // copies rows [from, from + n) of a block holding rows [block_first, ...) into dst
  auto copy_rows = [&](const uint8_t* block, int64_t block_first, int64_t from, int64_t n) {
    const uint8_t* src = block + (from - block_first) * row_bytes;
    const int64_t elems = n * static_cast<int64_t>(row_bytes / dtype_size(stored));
    if (widen) {
      const bf16* b = reinterpret_cast<const bf16*>(src);
      float* f = dst.f32() + (from - row_offset) * (row_bytes / dtype_size(stored));
      for (int64_t i = 0; i < elems; ++i) f[i] = bf16_to_float(b[i]);
    } else {
      std::memcpy(static_cast<uint8_t*>(dst.raw()) + (from - row_offset) * row_bytes, src, n * row_bytes);
    }
  };
  if (e.shards_size() == 0) {  // one plain dataset: read it whole (to verify its checksum), copy the rows
    Tensor full = (!widen && row_offset == 0 && want == shape) ? dst : Tensor::empty(shape, stored);
    read_dataset(e.file(), name, shape, stored, full.raw(), e.crc32c(), "");
    if (full.raw() != dst.raw() && want_rows)
      copy_rows(static_cast<const uint8_t*>(full.raw()), 0, row_offset, want_rows);
    return;
  }
  // a sharded tensor: only the shards overlapping [row_offset, row_offset + want_rows), each read whole
  for (int s = 0; s < e.shards_size(); ++s) {
    const auto& sh = e.shards(s);
    const int64_t lo = std::max(row_offset, sh.row_offset());
    const int64_t hi = std::min(row_offset + want_rows, sh.row_offset() + sh.rows());
    if (lo >= hi) continue;
    Shape sshape = shape;
    sshape[0] = sh.rows();
    const std::string what = " shard " + std::to_string(s) + " (rows " + std::to_string(sh.row_offset()) + ".." +
                             std::to_string(sh.row_offset() + sh.rows() - 1) + " of " + std::to_string(shape[0]) +
                             ")";
    if (!widen && lo == sh.row_offset() && hi == sh.row_offset() + sh.rows()) {  // straight into dst
      read_dataset(sh.file(), name, sshape, stored,
                   static_cast<uint8_t*>(dst.raw()) + (lo - row_offset) * row_bytes, sh.crc32c(), what);
    } else {
      Tensor block = Tensor::empty(sshape, stored);
      read_dataset(sh.file(), name, sshape, stored, block.raw(), sh.crc32c(), what);
      copy_rows(static_cast<const uint8_t*>(block.raw()), sh.row_offset(), lo, hi - lo);
    }
  }
}

void Reader::read_shard(const std::string& name, int shard, Tensor& dst) {
  const proto::TensorEntry& e = entry(name);
  MOE_CHECK(shard >= 0 && shard < e.shards_size(),
            "checkpoint " << dir_ << ": tensor '" << name << "' has no shard " << shard);
  const auto& sh = e.shards(shard);
  Shape sshape(e.shape().begin(), e.shape().end());
  sshape[0] = sh.rows();
  MOE_CHECK(dst.shape() == sshape && dtype_name(dst.dtype()) == e.dtype(),
            "checkpoint " << dir_ << ": shard " << shard << " of tensor '" << name << "' is " << e.dtype() << " "
                          << shape_str(sshape));
  read_dataset(sh.file(), name, sshape, dst.dtype(), dst.raw(), sh.crc32c(),
               " shard " + std::to_string(shard) + " (rows " + std::to_string(sh.row_offset()) + ".." +
                   std::to_string(sh.row_offset() + sh.rows() - 1) + " of " + std::to_string(e.shape(0)) + ")");
}

void Reader::check_virtual(const std::string& name) {
  const proto::TensorEntry& e = entry(name);
  if (e.shards_size() == 0) return;
  const Shape shape(e.shape().begin(), e.shape().end());
  Tensor t = Tensor::empty(shape, dtype_from_name(e.dtype()));
  try {
    read_dataset(e.file(), name, shape, t.dtype(), t.raw(), e.crc32c(), " (virtual dataset over the shards)");
  } catch (const Error& err) {
    MOE_THROW(err.what() << "; the virtual dataset maps onto " << e.shards_size()
                         << " shard file(s) next to it: one is missing, moved or HDF5_VDS_PREFIX points elsewhere");
  }
}

}  // namespace moe::ckpt
