#!/usr/bin/env bash
# The README demo (deploy/configs/shakespeare_moe.pbtxt on 2 expert-parallel ranks, 300 steps) reproduces, bit for
# bit, the loss sequence recorded before the restructuring of the model builder, the grouped FFN and the backend
# seam (tests/data/fixtures/demo_moe_ep2.loss, written with --loss-log at commit e5981bd on this machine kind:
# OpenBLAS OpenMP build, one thread per rank). Losses are compared as exact hex floats.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
fixture="$MOE_SOURCE_DIR/tests/data/fixtures/demo_moe_ep2.loss"
# the fixture was recorded with OpenBLAS choosing its own kernels for this CPU: a forced core type (some machines of
# this kind export OPENBLAS_CORETYPE=Haswell) picks other kernels and other roundings
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
mpiexec -n 2 "$MOE_BIN" train --config "$MOE_SOURCE_DIR/deploy/configs/shakespeare_moe.pbtxt" \
  --set parallel.expert_parallel=2 --set train.out_dir="$work/run" --set checkpoint.every=0 --threads 1 \
  --loss-log "$work/loss.txt" > "$work/out.txt" 2>&1 || { cat "$work/out.txt"; fail "demo training failed"; }
if ! diff -q "$fixture" "$work/loss.txt" > /dev/null; then
  diff "$fixture" "$work/loss.txt" | head -5
  fail "the demo's losses differ from the recorded fixture (first differences above)"
fi
echo "demo: $(wc -l < "$work/loss.txt") losses bit-identical to the fixture"
echo PASS
