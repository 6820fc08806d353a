#!/usr/bin/env bash
# deploy/slurm/coordinator.sbatch on a real one-node Slurm cluster started for this test (tests/slurm/local_cluster.sh):
# the coordinator runs inside the batch job and launches the 2 training ranks with srun --mpi=pmix; a rank killed
# with kill -9 is detected and the step relaunched (srun again, in the same allocation) from the newest
# checkpoint; the job reaches train.steps and completes, with no task left. Needs root and the Debian Slurm packages
# (installed when missing; SKIP only when apt-get cannot).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/slurm.bash"
PY=${MOE_PYTHON:-python3}
source "$(dirname "${BASH_SOURCE[0]}")/lib/coordinator.bash"
trap 'coord_cleanup; cleanup' EXIT

tasks=2
overcommit=(); [ "$(nproc)" -lt "$tasks" ] && overcommit=(--overcommit)
cfg="$MOE_SOURCE_DIR/deploy/configs/tiny_test.pbtxt"
steps=1500
args="--set data.train_file=$MOE_DATA_DIR/tinyshakespeare.txt --set train.out_dir=$work/run --set train.steps=$steps"
args+=" --set checkpoint.every=50 --set train.eval_every=0 --set model.ffn_pattern=FFN_MOE"
args+=" --set model.moe.num_experts=4 --set model.d_model=96 --set data.batch_size=16 --set parallel.expert_parallel=2"
jd=$work/job
job=$(cd "$work" && CONFIG="$cfg" MOE_BIN="$MOE_BIN" JOB_DIR="$jd" EXTRA_ARGS="$args" \
      sbatch --parsable --job-name=moe-coord --ntasks="$tasks" --ntasks-per-node="$tasks" "${overcommit[@]}" \
             --time=10 --output="$work/%x-%j.out" --error="$work/%x-%j.err" "$MOE_SOURCE_DIR/deploy/slurm/coordinator.sbatch")
job=${job%%;*}
out="$work/moe-coord-$job.out" err="$work/moe-coord-$job.err"
echo "submitted job $job"
for _ in $(seq 600); do [ -s "$jd/endpoint.json" ] && break; sleep 0.1; done
[ -s "$jd/endpoint.json" ] || fail "the coordinator of job $job did not start"
wait_status "$jd" "$(running "$jd" 1 2)" 120 "epoch 1 running under srun"
grep -q "epoch 1: world 2 (expert parallel 2), srun pid" "$err" "$out" || fail "epoch 1 was not launched with srun"
sleep 2
pid=$(st "$jd" "[r['pid'] for r in ranks if r['rank'] == 1][0]")
echo "kill -9 rank 1 (pid $pid) at step $(st "$jd" "ranks[0]['step']")"
t0=$(now_s)
kill -9 "$pid"
wait_status "$jd" "$(running "$jd" 2 2)" 90 "epoch 2 running (relaunched with srun)"
st "$jd" "json.dumps(failures[0])"
st "$jd" "failures[0]['time'] - $t0 <= 2 and failures[0]['next_step_s'] <= 30" | grep -q True \
  || fail "detection or restart too slow"
deadline=$(( $(date +%s) + 120 ))
until grep -q "moe coordinator exited with code" "$out" 2>/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "the job did not finish within 120 s of the restart"
  sleep 0.5
done
grep -q "moe coordinator exited with code 0" "$out" || fail "the coordinator did not exit 0"
[ "$(cat "$work/run/checkpoints/latest")" = "step_$steps" ] || fail "the run did not reach step $steps"
for _ in $(seq 1 50); do
  state=$(scontrol show job "$job" 2>/dev/null | grep -o "JobState=[A-Z_]*" || echo "JobState=gone")
  [ "$state" = JobState=COMPLETED ] || [ "$state" = JobState=gone ] && break; sleep 0.2
done
[ "$state" = JobState=COMPLETED ] || [ "$state" = JobState=gone ] || fail "job $job: $state"
no_orphans "train.out_dir=$work/run"
echo "OK"
