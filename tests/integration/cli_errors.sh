#!/usr/bin/env bash
# Bad input through the CLI: each case must exit non-zero with an error that names what was wrong.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
data="data.train_file=$MOE_DATA_DIR/tinyshakespeare.txt"
fails=0
expect_error() {  # expect_error "<pattern>" cmd...
  local pattern=$1; shift
  local out rc
  out=$("$@" 2>&1); rc=$?
  if [ $rc -eq 0 ]; then echo "FAIL (exit 0): $*"; fails=$((fails+1)); return; fi
  if ! grep -q -- "$pattern" <<<"$out"; then echo "FAIL (no '$pattern' in: $out): $*"; fails=$((fails+1)); return; fi
  echo "ok (rc $rc): $(grep -m1 error <<<"$out")"
}
printf 'model {\n  d_model: 64\n  n_layrs: 2\n}\n' > "$work/unknown.pbtxt"
expect_error "unknown.pbtxt:3" "$MOE_BIN" train --config "$work/unknown.pbtxt"
expect_error "n_layrs" "$MOE_BIN" train --config "$work/unknown.pbtxt"
expect_error "model.d_model = -64" "$MOE_BIN" train --config "$cfg" --set "$data" --set model.d_model=-64
expect_error "divisible by model.n_kv_heads = 3" "$MOE_BIN" train --config "$cfg" --set "$data" --set model.n_kv_heads=3
expect_error "data.train_file" "$MOE_BIN" train --config "$cfg" --set data.train_file=/nonexistent/text.txt
expect_error "parallel.communicator = 'nccl': needs model.device = DEVICE_CUDA" "$MOE_BIN" train --config "$cfg" --set "$data" --set parallel.communicator=nccl
expect_error "parallel.communicator = 'gloo': must be \"mpi\" or \"nccl\"" "$MOE_BIN" train --config "$cfg" --set "$data" --set parallel.communicator=gloo
expect_error "model.moe.top_k = 0" "$MOE_BIN" train --config "$cfg" --set "$data" --set model.ffn_pattern=FFN_MOE --set model.moe.num_experts=4 --set model.moe.top_k=0
# the config's relative train_file (../../../shared/data/tinyshakespeare.txt) is looked up under --data-dir
expect_error "data.train_file = '/nonexistent/shared/data/tinyshakespeare.txt': file not found" "$MOE_BIN" train --config "$cfg" --data-dir /nonexistent/x/y/z
# a config that cannot fit is refused before anything is allocated (or written), with the estimate and the fields
expect_error "training needs an estimated .* PiB of memory on this node .* is available; it is driven by model.n_layers = 2147483647" "$MOE_BIN" train --config "$cfg" --set "$data" --set model.n_layers=2147483647 --set train.out_dir="$work/big"
expect_error "model.d_model = 1048576" "$MOE_BIN" train --config "$cfg" --set "$data" --set model.d_model=1048576 --set model.d_ff=4194304 --set model.n_heads=1024 --set model.n_kv_heads=1024 --set train.out_dir="$work/big"
mpi_big=$(timeout 60 mpiexec -n 2 "$MOE_BIN" train --config "$cfg" --set "$data" --set model.n_layers=2147483647 --set train.out_dir="$work/big" 2>&1); rc=$?
{ [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "2 rank(s) x" <<<"$mpi_big"; } || { echo "FAIL (rc $rc) 2-rank oversized config: $mpi_big"; fails=$((fails+1)); }
expect_error "model.device = cuda: no CUDA device is visible\|this build has no CUDA support" "$MOE_BIN" train --config "$cfg" --set "$data" --set model.device=DEVICE_CUDA --set train.out_dir="$work/big"
expect_error "unknown config field 'model.dmodel'" "$MOE_BIN" train --config "$cfg" --set model.dmodel=3
expect_error "cannot open config file" "$MOE_BIN" train --config /nonexistent.pbtxt
expect_error "unknown command" "$MOE_BIN" fly
expect_error "not a checkpoint" "$MOE_BIN" generate --checkpoint "$work"
# nothing was written by the failed runs
test -z "$(ls "$work" | grep -v unknown.pbtxt)" || { echo "FAIL: failed runs left files: $(ls "$work")"; fails=$((fails+1)); }
echo "$fails failed"
[ $fails -eq 0 ]
