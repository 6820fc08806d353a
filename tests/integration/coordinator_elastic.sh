#!/usr/bin/env bash
# Elastic training under `moe coordinator run` on this machine's 2 slots: kill -9 a random rank at a random time,
# three times; SIGSTOP a rank; take a slot away and give it back. After each failure: detected within 2 s of the
# injection, the new group's first step within 30 s, steps redone at most the checkpoint interval, nothing left of
# the old group. The job reaches train.steps, the coordinator exits 0, and the final validation loss is within 2%
# of an uninterrupted run of the same config (bit-exact resumes at the same world; world 1 with micro-batches).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
source "$(dirname "${BASH_SOURCE[0]}")/lib/coordinator.bash"
seed=${MOE_TEST_SEED:-11}
RANDOM=$seed
echo "random choices from seed $seed (MOE_TEST_SEED=N picks others)"
steps=2500 every=50
args=(--set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" --set train.steps=$steps --set train.log_every=100
      --set train.eval_every=0 --set checkpoint.every=$every --set model.ffn_pattern=FFN_MOE
      --set model.moe.num_experts=4 --set model.moe.d_expert=64 --set model.d_model=96 --set data.batch_size=16
      --set parallel.expert_parallel=2)

# the reference: the same config, uninterrupted
mpirun -np 2 --bind-to none "$MOE_BIN" train --config "$cfg" "${args[@]}" --set train.out_dir="$work/ref" \
  --threads 1 > "$work/ref.txt" 2>&1 || { cat "$work/ref.txt"; fail "the reference run failed"; }
ref=$("$MOE_BIN" eval --checkpoint "$work/ref/checkpoints" --set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" |
      sed -n 's/.*val loss \([0-9.]*\).*/\1/p')

jd=$work/job
coord_start "$jd" run --config "$cfg" "${args[@]}" --set train.out_dir="$work/run" --slots 2
wait_status "$jd" "$(running "$jd" 1 2)" 90 "epoch 1 running"
st "$jd" "s['world']" | grep -q "'size': 2, 'expert_parallel': 2" || fail "epoch 1 is not world 2 x expert parallel 2"

# inject FAILURE_CMD: waits a random 1..4 s of training, runs the command on a random rank's pid, then checks the
# failure event of this epoch and the next epoch's first step
epoch=1
inject() {
  sleep "$((RANDOM % 4 + 1)).$((RANDOM % 10))"
  local rank=$((RANDOM % 2))
  local pid; pid=$(st "$jd" "[r['pid'] for r in ranks if r['rank'] == $rank][0]")
  echo "epoch $epoch: '$1' on rank $rank (pid $pid) at step $(st "$jd" "ranks[0]['step']")"
  local t0; t0=$(now_s)
  $1 "$pid"
  wait_status "$jd" "any(e['epoch'] == $epoch and e['kind'] == 'failure' for e in events)" 10 "failure of epoch $epoch"
  local ev; ev=$(st "$jd" "json.dumps([e for e in failures if e['epoch'] == $epoch][0])")
  echo "  $ev"
  local detect; detect=$(echo "$ev" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['time'] - $t0)")
  echo "  detected $detect s after the injection"
  "$PY" -c "import sys; sys.exit(0 if $detect <= 2.0 else 1)" || fail "epoch $epoch: detected after $detect s"
  echo "$ev" | grep -q "$2" || fail "epoch $epoch: the cause does not say '$2'"
  ps -p "$pid" > /dev/null && fail "epoch $epoch: the failed rank (pid $pid) is still there"
  epoch=$((epoch + 1))
  wait_status "$jd" "$(running "$jd" $epoch 2)" 60 "epoch $epoch running"
  ev=$(st "$jd" "json.dumps([e for e in failures if e['epoch'] == $((epoch - 1))][0])")
  echo "$ev" | "$PY" -c "
import json, sys
e = json.load(sys.stdin)
assert e['next_step_s'] <= 30, e
assert 0 <= e['steps_redone'] <= $every, e
print('  next step after %.2f s, %d step(s) redone' % (e['next_step_s'], e['steps_redone']))" \
    || fail "epoch $((epoch - 1)): recovery out of bounds"
}
kill9() { kill -9 "$1"; }
sigstop() { kill -STOP "$1"; }
for i in 1 2 3; do inject kill9 "exited"; done
inject sigstop "is stopped (hung"

# a slot taken away: shrink now (checkpoint, relaunch on one rank with micro-batches of the same share)
"$MOE_BIN" coordinator slots 1 --job-dir "$jd" | grep -q "slots 1" || fail "slots 1 not accepted"
epoch=$((epoch + 1))
wait_status "$jd" "$(running "$jd" $epoch 1)" 60 "epoch $epoch running on 1 rank"
grep -q "world 1 (expert parallel 1, micro-batch 8)" "$jd.out" || { cat "$jd.out"; fail "no micro-batch 8 at world 1"; }
# given back: grow again at the next checkpoint
sleep 2
"$MOE_BIN" coordinator slots 2 --job-dir "$jd" > /dev/null
epoch=$((epoch + 1))
wait_status "$jd" "$(running "$jd" $epoch 2)" 60 "epoch $epoch running on 2 ranks again"
st "$jd" "[e['kind'] for e in events if e['kind'] == 'resize']" | grep -q "'resize', 'resize'" \
  || fail "the shrink and the grow are not both recorded"

coord_wait 0
no_orphans "train.out_dir=$work/run"
final=$("$MOE_BIN" eval --checkpoint "$work/run/checkpoints" --set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" |
        sed -n 's/.*val loss \([0-9.]*\).*/\1/p')
echo "final validation loss $final, uninterrupted $ref"
"$PY" -c "import sys; sys.exit(0 if abs($final - $ref) <= 0.02 * $ref else 1)" \
  || fail "final validation loss $final is not within 2% of the uninterrupted run's $ref"
grep -q '"kind":"finish","cause":"the job finished"' "$jd/events.jsonl" || fail "no finish event"
"$MOE_BIN" coordinator status --job-dir "$jd" > /dev/null 2>&1 && fail "status answered after the coordinator exited"
echo "OK"
