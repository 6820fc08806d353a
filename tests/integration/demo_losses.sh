#!/usr/bin/env bash
# The README demo (deploy/configs/shakespeare_moe.pbtxt on 2 expert-parallel ranks, 300 steps) reproduces, bit for
# bit, the loss sequence recorded before the restructuring of the model builder, the grouped FFN and the backend
# seam (tests/data/fixtures/demo_moe_ep2.loss, written with --loss-log at commit e5981bd on the AMD EPYC Zen 5
# machine: OpenBLAS OpenMP build choosing its own kernels, one thread per rank). Losses are compared as exact hex
# floats.
#
# The bits depend on the machine kind: OpenBLAS picks its sgemm kernels by CPU, and -march=native lets GCC pick
# instructions. Other kinds keep their own recording, demo_moe_ep2.<march>-<openblas core>.loss, held to the same
# bit-for-bit rule. On a kind with no recording the run must still train as the recording does (the first steps
# equal to 1e-5, before MoE routing decisions amplify rounding, and the mean of the last 50 losses within 5%), and
# the script says how to record one.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
fixtures="$MOE_SOURCE_DIR/tests/data/fixtures"
# the recordings were made with OpenBLAS choosing its own kernels for the CPU: a forced core type (some machines
# export OPENBLAS_CORETYPE=Haswell) picks other kernels and other roundings
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
march=$(${CXX:-g++} -march=native -Q --help=target 2>/dev/null | awk '$1 == "-march=" {print $2}' || true)
core=$(OPENBLAS_VERBOSE=2 "$PY" -c "import ctypes.util, ctypes, glob
ctypes.CDLL(glob.glob('/usr/lib/*/openblas-openmp/libopenblas.so.0')[0])" 2>&1 | awk '/Core:/ {print $2}' || true)
kind="${march:-unknown}-${core:-unknown}"
mpiexec -n 2 "$MOE_BIN" train --config "$MOE_SOURCE_DIR/deploy/configs/shakespeare_moe.pbtxt" \
  --set parallel.expert_parallel=2 --set train.out_dir="$work/run" --set checkpoint.every=0 --threads 1 \
  --loss-log "$work/loss.txt" > "$work/out.txt" 2>&1 || { cat "$work/out.txt"; fail "demo training failed"; }
n=$(wc -l < "$work/loss.txt")
if diff -q "$fixtures/demo_moe_ep2.loss" "$work/loss.txt" > /dev/null; then
  echo "demo: $n losses bit-identical to the original recording (machine kind $kind)"
elif [[ -f "$fixtures/demo_moe_ep2.$kind.loss" ]]; then
  if ! diff -q "$fixtures/demo_moe_ep2.$kind.loss" "$work/loss.txt" > /dev/null; then
    diff "$fixtures/demo_moe_ep2.$kind.loss" "$work/loss.txt" | head -5
    fail "the demo's losses differ from this machine kind's recording demo_moe_ep2.$kind.loss (first differences above)"
  fi
  echo "demo: $n losses bit-identical to the recording for machine kind $kind"
else
  "$PY" - "$fixtures/demo_moe_ep2.loss" "$work/loss.txt" <<'PY' || fail "the demo does not train as recorded"
import sys
read = lambda p: [float.fromhex(l.split()[1]) for l in open(p)]
want, got = read(sys.argv[1]), read(sys.argv[2])
assert len(got) == len(want), f"{len(got)} losses, recorded {len(want)}"
first = max(abs(a - b) / a for a, b in zip(want[:5], got[:5]))
assert first < 1e-5, f"the first 5 losses differ by {first:.2e} relative (more than rounding)"
mean = lambda x: sum(x) / len(x)
tail = mean(got[-50:]) / mean(want[-50:]) - 1
assert abs(tail) < 0.05, f"the last 50 losses average {mean(got[-50:]):.4f}, recorded {mean(want[-50:]):.4f}"
print(f"demo: first 5 losses within {first:.1e}, last-50 mean {tail:+.2%} from the recording")
PY
  echo "demo: no recording for machine kind $kind; record one with"
  echo "  cp <the run's --loss-log> tests/data/fixtures/demo_moe_ep2.$kind.loss"
fi
echo PASS
