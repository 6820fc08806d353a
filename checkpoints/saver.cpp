#include "checkpoints/saver.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "checkpoints/checkpoint.h"
#include "comm/self_comm.h"
#include "core/error.h"

namespace moe::ckpt {

SaveFault SaveFault::from_env() {
  SaveFault f;
  const char* mode = std::getenv("MOE_CKPT_FAULT");
  if (!mode || !*mode) return f;
  const std::string m = mode;
  MOE_CHECK(m == "kill" || m == "error" || m == "slow", "MOE_CKPT_FAULT='" << m << "': expected kill, error or slow");
  f.mode = m == "kill" ? kKill : m == "error" ? kError : kSlow;
  auto num = [](const char* name, int64_t dflt) -> int64_t {
    const char* v = std::getenv(name);
    if (!v || !*v) return dflt;
    char* end = nullptr;
    const long long x = std::strtoll(v, &end, 10);
    MOE_CHECK(end && *end == 0, name << "='" << v << "' is not an integer");
    return x;
  };
  f.rank = static_cast<int>(num("MOE_CKPT_FAULT_RANK", 0));
  f.step = num("MOE_CKPT_FAULT_STEP", -1);
  f.after = static_cast<int>(num("MOE_CKPT_FAULT_AFTER", 0));
  return f;
}

struct CheckpointSaver::Job {
  int64_t step = 0;
  std::string tmp_dir;
  int rank = 0;
  bool writes_main = false;  // rank 0: model.h5 (+ tokenizer)
  int total_shards = 1;      // S: the shard files of the whole save
  std::vector<int> shards;   // the experts_<shard>.h5 files this rank writes (none, or shard_split of them)
  std::vector<DatasetWrite> main_sets;
  std::vector<std::vector<DatasetWrite>> shard_sets;  // per file of `shards`
  std::vector<VirtualDataset> virtuals;
  std::string tokenizer;
  bool has_tokenizer = false;
  proto::Manifest manifest;  // rank 0: the base fields
  struct Info {
    std::string name;
    Shape shape;  // global
    DType dtype;
    bool sharded;
  };
  std::vector<Info> tensors;  // rank 0: every tensor in save order
  SaveFault fault;
  std::function<void(const std::string&)> on_file_written;
  // outcome
  std::vector<uint32_t> main_crcs;
  std::vector<std::vector<uint32_t>> shard_crcs;  // per file of `shards`
  std::string error;
  std::atomic<bool> cancel{false};
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread thread;

  void write() noexcept {
    std::string file;
    int written = 0;
    const bool faulty = fault.mode != SaveFault::kNone && fault.rank == rank && (fault.step < 0 || fault.step == step);
    auto before = [&](int, const std::string&) {
      MOE_CHECK(!cancel.load(), "the save was abandoned");
      if (faulty && fault.mode == SaveFault::kSlow) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (faulty && fault.mode != SaveFault::kSlow && written == fault.after) {
        if (fault.mode == SaveFault::kKill) {
          std::fprintf(stderr, "[rank %d] MOE_CKPT_FAULT=kill: SIGKILL while writing %s (after %d datasets)\n", rank,
                       file.c_str(), written);
          std::fflush(stderr);
          std::raise(SIGKILL);
        }
        MOE_THROW("injected write failure (MOE_CKPT_FAULT=error) after " << written << " datasets");
      }
      ++written;
    };
    try {
      // all of this rank's files written, then all fsynced (fsync_file says why)
      std::vector<std::string> files;
      if (writes_main) {
        file = tmp_dir + "/model.h5";
        main_crcs = write_h5(file, main_sets, virtuals, before, false);
        files.push_back(file);
        if (has_tokenizer) {
          file = tmp_dir + "/tokenizer.model";
          write_file(file, tokenizer, false);
          files.push_back(file);
        }
      }
      for (size_t i = 0; i < shards.size(); ++i) {
        file = tmp_dir + "/" + shard_file_name(shards[i]);
        shard_crcs.push_back(write_h5(file, shard_sets[i], {}, before, false));
        files.push_back(file);
      }
      for (const std::string& f : files) {
        file = f;
        fsync_file(f);
        if (on_file_written) on_file_written(f);
      }
    } catch (const std::exception& e) {
      error = "rank " + std::to_string(rank) + " failed writing " + file + ": " + e.what();
    }
    // the snapshot is no longer needed
    main_sets.clear();
    shard_sets.clear();
    std::lock_guard<std::mutex> lock(mu);
    done = true;
    cv.notify_all();
  }

  bool is_done() {
    std::lock_guard<std::mutex> lock(mu);
    return done;
  }
  // waits at most `seconds` (0: forever) for the writer; joins it when done
  bool wait(double seconds) {
    std::unique_lock<std::mutex> lock(mu);
    if (seconds > 0) {
      if (!cv.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return done; })) return false;
    } else {
      cv.wait(lock, [&] { return done; });
    }
    lock.unlock();
    if (thread.joinable()) thread.join();
    return true;
  }
};

namespace {

// Every rank's string (of any length) on every rank: one all-gather of the lengths, one of the padded bytes.
std::vector<std::string> all_gather_strings(comm::Communicator& c, const std::string& mine) {
  const int n = c.size();
  if (n == 1) return {mine};
  int64_t len = static_cast<int64_t>(mine.size());
  std::vector<int64_t> lens(n);
  c.all_gather(&len, lens.data(), sizeof(int64_t));
  int64_t max_len = 0;
  for (int64_t l : lens) max_len = std::max(max_len, l);
  std::vector<std::string> out(n);
  if (max_len == 0) return out;
  std::vector<char> send(max_len, 0), recv(max_len * n);
  std::memcpy(send.data(), mine.data(), mine.size());
  c.all_gather(send.data(), recv.data(), static_cast<size_t>(max_len));
  for (int r = 0; r < n; ++r) out[r].assign(recv.data() + r * max_len, lens[r]);
  return out;
}

// A writer's outcome on the wire: the number of shard files, for each its id, checksum count and checksums, then
// the error text (empty: success).
std::string encode_outcome(const std::vector<int>& shards, const std::vector<std::vector<uint32_t>>& crcs,
                           const std::string& error) {
  std::vector<int32_t> words{static_cast<int32_t>(error.empty() ? crcs.size() : 0)};
  for (size_t i = 0; error.empty() && i < crcs.size(); ++i) {
    words.push_back(shards[i]);
    words.push_back(static_cast<int32_t>(crcs[i].size()));
    for (uint32_t c : crcs[i]) words.push_back(static_cast<int32_t>(c));
  }
  std::string s(sizeof(int32_t) * words.size(), '\0');
  std::memcpy(s.data(), words.data(), s.size());
  return s + error;
}
void decode_outcome(const std::string& s, std::map<int, std::vector<uint32_t>>& shard_crcs, std::string& error) {
  size_t pos = 0;
  auto word = [&]() {
    int32_t w;
    MOE_CHECK(s.size() >= pos + sizeof w, "checkpoint: malformed writer outcome");
    std::memcpy(&w, s.data() + pos, sizeof w);
    pos += sizeof w;
    return w;
  };
  const int32_t n = word();
  for (int32_t i = 0; i < n; ++i) {
    const int32_t shard = word(), count = word();
    std::vector<uint32_t> crcs(count);
    for (auto& c : crcs) c = static_cast<uint32_t>(word());
    shard_crcs[shard] = std::move(crcs);
  }
  error = s.substr(pos);
}

std::string join_errors(const std::vector<std::string>& errors) {
  std::ostringstream o;
  for (size_t i = 0; i < errors.size(); ++i) o << (i ? "; " : "") << errors[i];
  return o.str();
}

}  // namespace

CheckpointSaver::CheckpointSaver(comm::Parallel& par, SaverOptions opt) : par_(par), opt_(std::move(opt)) {}

CheckpointSaver::~CheckpointSaver() {
  if (!job_) return;
  job_->cancel = true;  // the writer stops before its next dataset
  if (job_->thread.joinable()) {
    // the thread holds its own reference to the job: if it is stuck in a write, let it go rather than hang
    if (!job_->wait(std::max(5.0, par_.world().deadline()))) job_->thread.detach();
  }
}

void CheckpointSaver::agree(const std::string& local_error, const std::string& what) {
  const std::vector<std::string> all = all_gather_strings(par_.world(), local_error);
  std::vector<std::string> errors;
  for (size_t r = 0; r < all.size(); ++r)
    if (!all[r].empty()) errors.push_back("rank " + std::to_string(r) + ": " + all[r]);
  if (!errors.empty()) MOE_THROW(what << " failed: " << join_errors(errors));
}

namespace {
// The tensors of a save are writable and every expert tensor splits into shard_split blocks per rank. The tensors
// are the same on every rank, so every rank throws alike.
void check_save(const SaveState& state, int ep, const std::string& what) {
  const int split = state.shard_split;
  MOE_CHECK(split >= 1, what << ": shard_split " << split << " must be >= 1");
  for (const LocalTensor& t : state.tensors) {
    check_writable(t.tensor, t.name);
    if (!t.sharded) continue;
    const Shape& shape = t.tensor.shape();
    MOE_CHECK(!shape.empty() && shape[0] % split == 0,
              "checkpoint: expert tensor '" << t.name << "' of shape " << shape_str(shape) << " cannot be split over "
                                            << split * ep << " expert-parallel shards (parallel.expert_parallel)");
  }
}
}  // namespace

std::string CheckpointSaver::save(SaveState state, bool wait) {
  if (job_) finish();  // never two saves in flight
  const int rank = par_.rank();
  const std::string what = "checkpoint of step " + std::to_string(state.step);
  const int ep = par_.ep_size();
  const int split = state.shard_split;
  check_save(state, ep, what);  // everything, before creating the directory (all ranks throw alike)
  // 1. rank 0 prepares step_<N>.tmp; everyone learns whether that worked
  std::string err;
  if (rank == 0) {
    try {
      begin_save(opt_.root, state.step);
    } catch (const std::exception& e) {
      err = std::string("cannot create the directory: ") + e.what();
    }
  }
  agree(err, what);

  auto job = std::make_shared<Job>();
  job->step = state.step;
  job->tmp_dir = opt_.root + "/step_" + std::to_string(state.step) + ".tmp";
  job->rank = rank;
  job->writes_main = rank == 0;
  // shard files exist only when there are sharded tensors (a dense model's checkpoint is model.h5 alone)
  bool any_sharded = false;
  for (const LocalTensor& t : state.tensors) any_sharded |= t.sharded;
  if (par_.dp_rank() == 0 && any_sharded)
    for (int j = 0; j < split; ++j) job->shards.push_back(par_.ep_rank() * split + j);
  job->shard_sets.resize(job->shards.size());
  job->fault = opt_.fault;
  job->on_file_written = opt_.on_file_written;
  const bool async = opt_.async && !wait;
  for (const LocalTensor& t : state.tensors) {
    Shape global = t.tensor.shape();
    if (t.sharded) global[0] *= ep;
    const bool mine = writes(t);
    if (mine) {
      // asynchronous: snapshot (copy) now, training goes on changing the live tensors
      Tensor data = async ? snapshot(t) : t.tensor;
      if (!t.sharded) {
        job->main_sets.push_back({t.name, data});
      } else {
        const int64_t rows = data.dim(0) / split;  // block j of this rank's rows -> shard file ep_rank*split + j
        for (int j = 0; j < split; ++j)
          job->shard_sets[j].push_back(split == 1 ? DatasetWrite{t.name, data} : DatasetWrite{t.name, data, j * rows, rows});
      }
    }
    if (job->writes_main) {
      job->tensors.push_back({t.name, global, t.tensor.dtype(), t.sharded});
      if (t.sharded) job->virtuals.push_back({t.name, global, t.tensor.dtype(), ep * split});
    }
  }
  job->total_shards = ep * split;
  if (job->writes_main) {
    job->manifest = std::move(state.manifest);
    if (state.tokenizer_blob) {
      job->tokenizer = *state.tokenizer_blob;
      job->has_tokenizer = true;
      job->manifest.set_tokenizer_file("tokenizer.model");
    }
  }
  job_ = job;
  if (async) {
    if (job->writes_main || !job->shards.empty()) {
      // the thread owns a reference to its job. (It runs at normal priority: nice 19 or SCHED_IDLE starved it on
      // 2 cores busy with training, 19 and 128 steps until the commit, and a larger total stall in bench_ckpt.)
      job->thread = std::thread([job] { job->write(); });
    } else {
      job->done = true;  // another data-parallel replica: nothing to write
    }
    return "";
  }
  job->write();
  return commit();
}

bool CheckpointSaver::writes(const LocalTensor& t) const {
  return t.sharded ? par_.dp_rank() == 0 : par_.rank() == 0;
}

Tensor CheckpointSaver::snapshot(const LocalTensor& t) {
  // only called with no save in flight (save() finishes a pending one first), so no writer reads the buffers
  Tensor& b = buffers_[t.name];
  if (!b.defined() || b.shape() != t.tensor.shape() || b.dtype() != t.tensor.dtype()) {
    b = t.tensor.clone();
  } else {
    std::memcpy(b.raw(), t.tensor.raw(), t.tensor.nbytes());
  }
  return b;
}

void CheckpointSaver::prepare(const std::vector<LocalTensor>& tensors) {
  MOE_CHECK(!job_, "CheckpointSaver::prepare while a save is in flight");
  for (const LocalTensor& t : tensors)
    if (writes(t)) snapshot(t);
}

std::string CheckpointSaver::poll() {
  if (!job_) return "";
  double writing = job_->is_done() ? 0.0 : 1.0;
  if (par_.size() > 1) par_.world().all_reduce_sum(&writing, 1);
  if (writing > 0) return "";
  job_->wait(0);
  return commit();
}

std::string CheckpointSaver::finish() {
  if (!job_) return "";
  const double limit = par_.world().deadline();
  if (!job_->wait(limit)) {
    job_->cancel = true;
    job_->thread.detach();  // it holds its own reference to the job
    const int64_t step = job_->step;
    job_.reset();
    MOE_THROW("checkpoint of step " << step << ": the writer of rank " << par_.rank() << " did not finish within "
                                    << limit << " s (parallel.collective_timeout_s)");
  }
  return commit();
}

std::string CheckpointSaver::commit() {
  std::shared_ptr<Job> job = std::move(job_);
  const std::string what = "checkpoint of step " + std::to_string(job->step);
  // 3. every rank's outcome on every rank (under the communicator's deadline)
  const std::vector<std::string> all =
      all_gather_strings(par_.world(), encode_outcome(job->shards, job->shard_crcs, job->error));
  std::vector<std::string> errors;
  std::map<int, std::vector<uint32_t>> shard_crcs;
  for (const std::string& s : all) {
    std::string error;
    decode_outcome(s, shard_crcs, error);
    if (!error.empty()) errors.push_back(error);
  }
  if (!errors.empty()) {
    if (par_.rank() == 0) abandon_save(opt_.root, job->step);
    MOE_THROW(what << " failed, nothing was committed (`latest` still names the previous checkpoint): "
                   << join_errors(errors));
  }
  // 4. rank 0 completes the manifest and commits; everyone learns whether that worked
  std::string err, dir;
  if (par_.rank() == 0) {
    try {
      proto::Manifest& m = job->manifest;
      size_t plain = 0, sharded = 0;
      const int S = job->total_shards;
      for (const Job::Info& t : job->tensors) {
        if (!t.sharded) {
          *m.add_tensors() = plain_entry(t.name, t.shape, t.dtype, job->main_crcs.at(plain++));
          continue;
        }
        std::vector<uint32_t> crcs;
        for (int s = 0; s < S; ++s) {
          auto it = shard_crcs.find(s);
          MOE_CHECK(it != shard_crcs.end() && sharded < it->second.size(),
                    "no checksums from the writer of shard " << s << " (" << shard_file_name(s) << ")");
          crcs.push_back(it->second[sharded]);
        }
        *m.add_tensors() = sharded_entry(t.name, t.shape, t.dtype, crcs);
        ++sharded;
      }
      dir = commit_save(opt_.root, job->step, m, opt_.keep_last);
    } catch (const std::exception& e) {
      err = std::string("commit: ") + e.what();
      abandon_save(opt_.root, job->step);
    }
  }
  agree(err, what);
  return par_.rank() == 0 ? dir : opt_.root + "/step_" + std::to_string(job->step);
}

}  // namespace moe::ckpt

namespace moe::ckpt {

// The one-process save: the same saver over a self communicator (ep 1), writing the S shard files of the GLOBAL
// tensors itself (shard_split = S).
std::string save(const std::string& root, const SaveRequest& req) {
  SaveState st;
  st.step = req.step;
  st.manifest = base_manifest(req);
  st.tokenizer_blob = req.tokenizer_blob;
  st.shard_split = st.manifest.expert_parallel();
  st.tensors.reserve(req.tensors.size());
  for (const NamedTensor& t : req.tensors) st.tensors.push_back({t.name, t.tensor, t.sharded});
  comm::Parallel self(std::make_unique<comm::SelfCommunicator>(), 1);
  CheckpointSaver saver(self, {root, /*async=*/false, req.keep_last, SaveFault{}, {}});
  return saver.save(std::move(st), /*wait=*/true);
}

}  // namespace moe::ckpt
