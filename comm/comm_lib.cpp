// Backend factory: the one place that knows every backend (NCCL only in CUDA builds, MOE_HAVE_NCCL; MPI host-staged
// for device tensors).
#include <mpi.h>

#include "comm/communicator.h"
#include "comm/mpi/mpi_comm.h"
#include "comm/staged_comm.h"
#include "core/backend.h"
#include "core/error.h"
#if defined(MOE_HAVE_NCCL) && MOE_HAVE_NCCL
#include "comm/nccl/nccl_comm.h"
#endif

namespace moe::comm {

std::unique_ptr<Communicator> Communicator::world() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  MOE_CHECK(init && !fin, "Communicator::world: MPI is " << (fin ? "already finalised" : "not initialised")
                                                         << " (MPI_Init must run first)");
  // a duplicate: our traffic and error handler stay apart from raw MPI_COMM_WORLD users
  MPI_Comm dup = MPI_COMM_NULL;
  MOE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
  return std::make_unique<MpiCommunicator>(dup, /*owns=*/true);
}

bool backend_available(const std::string& backend) {
  if (backend == "mpi") return true;
#if defined(MOE_HAVE_NCCL) && MOE_HAVE_NCCL
  if (backend == "nccl") return true;
#endif
  return false;
}

std::unique_ptr<Communicator> make_communicator(const std::string& backend, double deadline_s, Backend* tensors) {
  if (backend == "mpi") {
    std::unique_ptr<Communicator> c = Communicator::world();
    c->set_deadline(deadline_s);
    if (tensors && tensors->device() != Device::kCPU) c = std::make_unique<StagedCommunicator>(std::move(c), *tensors);
    return c;
  }
  if (backend == "nccl") {
#if defined(MOE_HAVE_NCCL) && MOE_HAVE_NCCL
    auto c = NcclCommunicator::create(MPI_COMM_WORLD, /*device=*/-1, deadline_s > 0 ? deadline_s : kNcclSetupDeadline);
    c->set_deadline(deadline_s);
    return c;
#else
    MOE_THROW("communication backend 'nccl' is not available: this build has no CUDA/NCCL (configure with "
              "-DMOE_CUDA=ON where nvcc and NCCL exist)");
#endif
  }
  MOE_THROW("unknown communication backend '" << backend << "' (known: mpi, nccl)");
}

}  // namespace moe::comm
