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
expect_error "model.device = cuda: no CUDA device is visible\|this build has no CUDA support" "$MOE_BIN" train --config "$MOE_SOURCE_DIR/deploy/configs/shakespeare_mowe.pbtxt" --set "$data" --set model.device=DEVICE_CUDA --set train.out_dir="$work/big"
expect_error "model.matmul_precision = MATMUL_BF16: needs model.device = DEVICE_CUDA" "$MOE_BIN" train --config "$cfg" --set "$data" --set model.matmul_precision=MATMUL_BF16 --set train.out_dir="$work/big"
expect_error "unknown config field 'model.dmodel'" "$MOE_BIN" train --config "$cfg" --set model.dmodel=3
expect_error "cannot open config file" "$MOE_BIN" train --config /nonexistent.pbtxt
# command-line mistakes: exactly one line on stderr, nothing on stdout, exit code 2
expect_usage_error() {  # expect_usage_error "<exact stderr line>" cmd...
  local want=$1; shift
  local rc
  "$@" > "$work/usage.out" 2> "$work/usage.err"; rc=$?
  if [ $rc -ne 2 ] || [ -s "$work/usage.out" ] || [ "$(cat "$work/usage.err")" != "$want" ]; then
    echo "FAIL (rc $rc, want 2 and the line '$want'; stdout: $(cat "$work/usage.out"); stderr: $(cat "$work/usage.err")): $*"
    fails=$((fails+1)); return
  fi
  echo "ok (rc 2): $want"
}
unknown_fly="error: unknown command 'fly' (known: train, generate, serve, eval, config, ckpt, coordinator); see 'moe --help'"
expect_usage_error "$unknown_fly" "$MOE_BIN" fly
expect_usage_error "$unknown_fly" "$MOE_BIN" fly --help
expect_usage_error "$unknown_fly" "$MOE_BIN" help fly
expect_usage_error "error: missing command (known: train, generate, serve, eval, config, ckpt, coordinator); see 'moe --help'" "$MOE_BIN"
expect_usage_error "error: unknown option '--bogus' for 'moe train'; see 'moe train --help'" \
  "$MOE_BIN" train --config "$cfg" --bogus
expect_usage_error "error: unknown option '--resume' for 'moe generate'; see 'moe generate --help'" \
  "$MOE_BIN" generate --checkpoint "$work" --resume
expect_usage_error "error: unexpected argument 'extra' for 'moe eval'; see 'moe eval --help'" \
  "$MOE_BIN" eval --checkpoint "$work" extra
expect_usage_error "error: option --config of 'moe config' needs a value; see 'moe config --help'" "$MOE_BIN" config --config
expect_usage_error "error: --threads: 'two' is not a non-negative integer; see 'moe train --help'" \
  "$MOE_BIN" train --config "$cfg" --threads two
expect_usage_error "error: 'moe generate' needs --checkpoint DIR; see 'moe generate --help'" "$MOE_BIN" generate
# other errors keep exit code 1
"$MOE_BIN" train --config /nonexistent.pbtxt > /dev/null 2>&1; rc=$?
[ $rc -eq 1 ] || { echo "FAIL: a missing config file exited $rc, not 1"; fails=$((fails+1)); }
# help: the general usage and every command's own usage and options on stdout, exit 0
expect_help() {  # expect_help "<pattern>" cmd...
  local pat=$1; shift
  local rc
  "$@" > "$work/help.out" 2> "$work/help.err"; rc=$?
  if [ $rc -ne 0 ] || [ -s "$work/help.err" ] || ! grep -q -- "$pat" "$work/help.out"; then
    echo "FAIL (rc $rc, no '$pat' in: $(cat "$work/help.out" "$work/help.err")): $*"; fails=$((fails+1)); return
  fi
  echo "ok (help): $*"
}
expect_help "^usage: moe <command>" "$MOE_BIN" --help
expect_help "^usage: moe <command>" "$MOE_BIN" help
expect_help "^usage: moe train --config FILE" "$MOE_BIN" train --help
expect_help "^  --loss-log FILE" "$MOE_BIN" train --config "$cfg" --help
expect_help "^usage: moe train --config FILE" "$MOE_BIN" help train
expect_help "^  --prompt TEXT" "$MOE_BIN" generate --help
expect_help "^usage: moe eval --checkpoint DIR" "$MOE_BIN" eval -h
expect_help "^usage: moe config --config FILE" "$MOE_BIN" config --help
expect_help "^usage: moe ckpt" "$MOE_BIN" ckpt --help
expect_help "^usage: moe ckpt" "$MOE_BIN" help ckpt
expect_error "not a checkpoint" "$MOE_BIN" generate --checkpoint "$work"
# nothing was written by the failed runs
test -z "$(ls "$work" | grep -v -e unknown.pbtxt -e usage.out -e usage.err -e help.out -e help.err)" || { echo "FAIL: failed runs left files: $(ls "$work")"; fails=$((fails+1)); }
echo "$fails failed"
[ $fails -eq 0 ]
