#!/usr/bin/env bash
# Packs what tests/gpu/run.sh needs on the GPU machine into .gpu/moe-gpu.tar.xz (ignored by git; pass `.gpu` in the
# device tool's carry). That machine has CUDA, NCCL (pip's nvidia-nccl), CMake and a compiler but no Debian
# packages and no network, so the binaries are built HERE (CUDA targets for sm_90) and travel
# with every shared library they load that is not the C/C++ runtime or CUDA's, and with Open MPI's runtime
# (orterun, orted, its and PMIx's plugins and help files), each at its absolute path under root/ so that
# OPAL_PREFIX relocates Open MPI. Usage: tests/gpu/bundle.sh [BUILD_DIR]   (default build; built first)
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-$src/build}
cmake --build "$build" -j"$(nproc)" --target moe mpi_tests cuda_tests bench_moe bench_gpu bench_model > /dev/null
[[ -x "$build/cuda_tests" ]] || { echo "bundle: $build has no cuda_tests (configure where nvcc exists)" >&2; exit 1; }
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
root=$stage/moe-gpu/root
mkdir -p "$root" "$stage/moe-gpu/bin"
cp "$build"/{moe,mpi_tests,cuda_tests,bench_moe,bench_gpu,bench_model} "$stage/moe-gpu/bin/"
# Open MPI's and PMIx's runtime files, as installed (libraries, plugins, help texts, launchers)
files=$( (dpkg -L libopenmpi3 libpmix2 openmpi-common; echo /usr/bin/orterun /usr/bin/orted /usr/bin/ompi_info) |
  tr ' ' '\n' | grep -v -E "/(doc|man|lintian)/" )
for f in $files; do [[ -f "$f" ]] && { mkdir -p "$root$(dirname "$f")"; cp -a "$f" "$root$f"; }; done
ln -sf orterun "$root/usr/bin/mpirun"
# every shared library the binaries, launchers and plugins load, but the C/C++ runtime and CUDA's own
skip='/(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so|/usr/local/cuda|libcuda\.so|libnccl'
objs=$(find "$stage/moe-gpu/bin" "$root" -type f \( -perm -u+x -o -name "*.so*" \))
needed=$(for o in $objs; do ldd "$o" 2>/dev/null | awk '$3 ~ /^\// {print $3}'; done | sort -u | grep -v -E "$skip")
for lib in $needed; do
  real=$(readlink -f "$lib")
  mkdir -p "$root$(dirname "$lib")"
  [[ -e "$root$lib" ]] || cp "$real" "$root$lib"
done
mkdir -p "$stage/moe-gpu/data"  # the training runs' text (the device machine has no shared/ folder)
cp "$src/../shared/data/tinyshakespeare.txt" "$stage/moe-gpu/data/"
mkdir -p "$src/.gpu"
tar -C "$stage" -cJf "$src/.gpu/moe-gpu.tar.xz" moe-gpu
n_libs=$(find "$root" -name '*.so*' | wc -l)
echo "bundle: $(du -h "$src/.gpu/moe-gpu.tar.xz" | cut -f1) in .gpu/moe-gpu.tar.xz ($n_libs libraries)"
