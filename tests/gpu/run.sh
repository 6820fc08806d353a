#!/usr/bin/env bash
# The one-shot GPU check (issue 12), on the device machine from the repository root, with .gpu carried (made here by
# tests/gpu/bundle.sh):   tests/gpu/run.sh
# Runs, each under a time limit: the CUDA op and backend tests against the CPU kernels (cuda_tests), the
# host-staged collectives on device memory at 1 and 2 ranks sharing the GPU, the communication backend factory
# (NCCL at 1 rank; at 2 ranks on one GPU NCCL must be refused on every rank alike), and the GEMM bench (bench_gpu:
# bf16 through our cuBLASLt path vs raw cuBLASLt, and fp32). Writes $OUT/gpu.log (all output), one .txt per check
# and $OUT/results.md (one row per check, then the GEMM lines). Expected to take a few minutes on an H200.
set -uo pipefail
OUT=${OUT:-/tmp/moe-gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
src=$(pwd)
bundle=${MOE_GPU_BUNDLE:-$src/.gpu/moe-gpu.tar.xz}
[[ -f "$bundle" ]] || { echo "run.sh: no $bundle (make it with tests/gpu/bundle.sh and carry .gpu)"; exit 1; }
dir=/tmp/moe-gpu
rm -rf "$dir" && tar -C /tmp -xJf "$bundle"
root=$dir/root
# NCCL and cuBLAS of the machine (CUDA toolkit or pip's nvidia-* wheels)
pylibs=$(python3 - <<'PY' 2>/dev/null
import importlib, os
for m in ("nvidia.nccl", "nvidia.cublas", "nvidia.cuda_runtime"):
    try:
        print(os.path.join(list(importlib.import_module(m).__path__)[0], "lib"))
    except Exception:
        pass
PY
)
libs="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu/openblas-openmp"
libs="$libs:$root/usr/lib/x86_64-linux-gnu/pmix2/lib:$root/usr/lib/x86_64-linux-gnu/openmpi/lib"
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib $pylibs; do [[ -d "$d" ]] && libs="$libs:$d"; done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
export OPAL_PREFIX=$root/usr PATH=$root/usr/bin:$PATH
export PMIX_INSTALL_PREFIX=$root/usr/lib/x86_64-linux-gnu/pmix2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1  # one machine: shared memory only
bin=$dir/bin
table=$OUT/results.md
printf '| check | result | seconds |\n| --- | --- | --- |\n' > "$table"
# check NAME LIMIT_S CMD...: runs CMD, records PASS/FAIL and gtest's summary line
check() {
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1 || rc=$?
  cat "$OUT/$name.txt"
  local summary
  summary=$(sed "s/\x1b\[[0-9;]*m//g" "$OUT/$name.txt" | grep -oE "(PASSED|SKIPPED|FAILED) +\] [0-9]+ tests?" |
    sed -E "s/ +\] / /" | sort -u | tr "\n" " ")
  printf '| %s | %s (rc %d) %s | %d |\n' "$name" "$([[ $rc == 0 ]] && echo PASS || echo FAIL)" "$rc" "$summary" \
    $((SECONDS - t0)) >> "$table"
}
echo "=== machine"; nvidia-smi -L || true; nproc
check cuda_tests 300 "$bin/cuda_tests"
check staged_np1 120 mpirun -np 1 --bind-to none "$bin/mpi_tests" --gtest_filter='*StagedComm*:Comm.BackendFactory'
check staged_np2 120 mpirun -np 2 --bind-to none "$bin/mpi_tests" --gtest_filter='*StagedComm*:Comm.BackendFactory'
check bench_gpu 240 "$bin/bench_gpu"
grep -h "^GEMM" "$OUT/bench_gpu.txt" | sed 's/^/    /' >> "$table" || true
echo "=== results"; cat "$table"
