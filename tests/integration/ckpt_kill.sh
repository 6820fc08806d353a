#!/usr/bin/env bash
# Interrupted checkpoint saves. A training run (checkpoints every 2 steps) is killed with SIGKILL while it writes
# the checkpoint of step 4, made deterministic by fault injection (checkpoints/saver.h: MOE_CKPT_FAULT=kill makes
# the writer of MOE_CKPT_FAULT_RANK raise SIGKILL on itself after MOE_CKPT_FAULT_AFTER datasets of the save of
# MOE_CKPT_FAULT_STEP): synchronous and asynchronous saves, on 1 rank and on 2 ranks under mpiexec (one rank dies
# mid-write, mpiexec ends the other). After each kill: `latest` still names step_2, `moe ckpt verify` passes on it,
# the partial step_4.tmp is not a checkpoint, and `moe train --resume` removes it, resumes from step 2 and finishes
# with the uninterrupted run's losses (exact). Also: an injected write error on rank 1 fails the save on both ranks
# naming the rank and the file (nothing committed, no hang); and SIGUSR1 (Slurm's requeue signal) while an
# asynchronous save is still being written: the pending save is committed, then the final one, exit code 3.
# Every command runs under `timeout`: a hung rank fails the test instead of stalling it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
T=120  # seconds any single command may take
args=(--set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" --set train.steps=6 --set checkpoint.every=2
      --set model.ffn_pattern=FFN_MOE,FFN_DENSE --set model.moe.num_experts=4 --set model.moe.d_expert=64
      --set train.eval_every=0 --set train.log_every=100 --threads 1)
# one tokenizer for every run (trained once)
timeout $T "$MOE_BIN" train --config "$cfg" "${args[@]}" --set train.out_dir="$work/tok" --set train.steps=1 > /dev/null 2>&1
args+=(--set data.tokenizer_model="$work/tok/tokenizer.model")

# run NAME LAUNCH... -- ARGS...: trains into $work/NAME, output in $work/NAME.out, returns the exit code
run() {
  local name=$1; shift
  local launch=(); while [ "$1" != "--" ]; do launch+=("$1"); shift; done; shift
  local rc=0
  timeout $T "${launch[@]}" "$MOE_BIN" train --config "$cfg" "${args[@]}" --set train.out_dir="$work/$name" \
    --loss-log "$work/$name.log" "$@" >> "$work/$name.out" 2>&1 || rc=$?
  [ $rc -ne 124 ] || { cat "$work/$name.out"; fail "$name: timed out after $T s (a hung rank?)"; }
  return $rc
}

# uninterrupted references (1 rank, and 2 ranks with expert parallelism 2)
one=(env); two=(mpiexec -n 2)
ep2=(--set parallel.expert_parallel=2)
run ref1 "${one[@]}" -- || fail "reference run (1 rank)"
run ref2 "${two[@]}" -- "${ep2[@]}" || fail "reference run (2 ranks)"

# kill_case NAME REF RANK AFTER LAUNCH... -- ARGS...
kill_case() {
  local name=$1 ref=$2 rank=$3 after=$4; shift 4
  local launch=(); while [ "$1" != "--" ]; do launch+=("$1"); shift; done; shift
  local ck="$work/$name/checkpoints" rc=0
  MOE_CKPT_FAULT=kill MOE_CKPT_FAULT_RANK=$rank MOE_CKPT_FAULT_STEP=4 MOE_CKPT_FAULT_AFTER=$after \
    run "$name" "${launch[@]}" -- "$@" || rc=$?
  [ $rc -ne 0 ] || { cat "$work/$name.out"; fail "$name: the run was not killed"; }
  grep -q "MOE_CKPT_FAULT=kill: SIGKILL while writing .*step_4.tmp/" "$work/$name.out" \
    || { cat "$work/$name.out"; fail "$name: not killed while writing step 4"; }
  [ "$(cat "$ck/latest")" = step_2 ] || fail "$name: latest is '$(cat "$ck/latest")', expected step_2"
  [ -d "$ck/step_4.tmp" ] && [ ! -e "$ck/step_4" ] || fail "$name: expected a partial step_4.tmp and no step_4"
  timeout $T "$MOE_BIN" ckpt verify "$ck" > "$work/$name.verify" 2>&1 || { cat "$work/$name.verify"; fail "$name: verify"; }
  grep -q "^OK: .*/step_2 match" "$work/$name.verify" || fail "$name: verify did not check step_2"
  if timeout $T "$MOE_BIN" ckpt verify "$ck/step_4.tmp" > /dev/null 2>&1; then fail "$name: step_4.tmp verified"; fi
  # resume: the leftover is removed, training continues from step 2 and finishes exactly like the reference
  rm -f "$work/$name.log"
  run "$name" "${launch[@]}" -- "$@" --resume || { cat "$work/$name.out"; fail "$name: resume"; }
  grep -q "removed .*step_4.tmp (an incomplete checkpoint" "$work/$name.out" || fail "$name: step_4.tmp not removed"
  grep -q "resumed from .*step_2 at step 2" "$work/$name.out" || fail "$name: did not resume from step 2"
  [ "$(cat "$ck/latest")" = step_6 ] && [ -z "$(ls -d "$ck"/*.tmp 2>/dev/null)" ] || fail "$name: after resume"
  timeout $T "$MOE_BIN" ckpt verify "$ck" > /dev/null || fail "$name: verify after resume"
  tail -n 4 "$work/$ref.log" > "$work/$name.want"
  diff "$work/$name.want" "$work/$name.log" || fail "$name: resumed losses differ from the uninterrupted run"
  echo "$name: killed mid-write, latest stayed step_2, verified, resumed, steps 3-6 exact"
}
kill_case sync_1rank ref1 0 3 "${one[@]}" --
kill_case async_1rank ref1 0 3 "${one[@]}" -- --set checkpoint.async=true
kill_case sync_2ranks ref2 1 2 "${two[@]}" -- "${ep2[@]}"                               # rank 1 in experts_1.h5
kill_case async_2ranks ref2 0 5 "${two[@]}" -- "${ep2[@]}" --set checkpoint.async=true  # rank 0 in model.h5

# a write error on one rank fails the save on every rank, naming the rank and the file; nothing is committed
rc=0
MOE_CKPT_FAULT=error MOE_CKPT_FAULT_RANK=1 MOE_CKPT_FAULT_STEP=4 MOE_CKPT_FAULT_AFTER=1 \
  run err_2ranks "${two[@]}" -- "${ep2[@]}" || rc=$?
[ $rc -ne 0 ] || fail "err_2ranks: succeeded"
for r in 0 1; do
  grep -q "\[rank $r\] error: checkpoint of step 4 failed, nothing was committed .*rank 1 failed writing .*step_4.tmp/experts_1.h5: injected write failure" \
    "$work/err_2ranks.out" || { cat "$work/err_2ranks.out"; fail "err_2ranks: rank $r did not report the failed save"; }
done
ck="$work/err_2ranks/checkpoints"
[ "$(cat "$ck/latest")" = step_2 ] && [ ! -e "$ck/step_4" ] && [ ! -e "$ck/step_4.tmp" ] || fail "err_2ranks: state"
echo "err_2ranks: both ranks failed the save naming rank 1 and experts_1.h5; latest stayed step_2"

# SIGUSR1 while an asynchronous save is pending (its writer slowed down): committed before the final save, exit 3
ck="$work/sig/checkpoints"
MOE_CKPT_FAULT=slow "$MOE_BIN" train --config "$cfg" "${args[@]}" --set train.out_dir="$work/sig" \
  --set train.steps=100000 --set checkpoint.every=3 --set checkpoint.async=true > "$work/sig.out" 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q "checkpoint of step 3: writing in the background" "$work/sig.out" && break; sleep 0.05; done
kill -USR1 $pid
for _ in $(seq $((T * 10))); do kill -0 $pid 2> /dev/null || break; sleep 0.1; done
if kill -0 $pid 2> /dev/null; then kill -9 $pid; fail "sig: still running $T s after SIGUSR1 (hung)"; fi
rc=0; wait $pid || rc=$?
[ $rc -eq 3 ] || { cat "$work/sig.out"; fail "sig: exit code $rc, expected 3"; }
grep -q "waiting for the background checkpoint to finish before the checkpoint of step" "$work/sig.out" \
  || { cat "$work/sig.out"; fail "sig: the save was not pending at the stop"; }
last=$(sed -n 's/.*checkpoint .*\/step_\([0-9]*\)$/\1/p' "$work/sig.out" | tail -n 1)
grep -q "checkpoint .*/step_3$" "$work/sig.out" || fail "sig: step 3 not committed"
[ "$(cat "$ck/latest")" = "step_$last" ] && [ -z "$(ls -d "$ck"/*.tmp 2>/dev/null)" ] || fail "sig: latest/tmp"
timeout $T "$MOE_BIN" ckpt verify "$ck/step_3" > /dev/null || fail "sig: verify step_3"
timeout $T "$MOE_BIN" ckpt verify "$ck" > /dev/null || fail "sig: verify latest"
echo "sig: SIGUSR1 with a pending asynchronous save: step_3 committed, then step_$last, exit 3"
echo PASS
