#!/usr/bin/env bash
# A real Slurm run on a one-node cluster started for this test (tests/slurm/local_cluster.sh): submit
# deploy/slurm/train.sbatch (2 tasks, srun --mpi=pmix), send the pre-timeout signal to the batch shell once training
# has progressed, and check that the job checkpointed, requeued itself, resumed from the checkpoint and finished.
# Also: a launch without PMIx (srun --mpi=none / pmi2) fails clearly with a non-zero exit.
# Needs root and the Debian Slurm packages; installs them with apt-get when missing and SKIPs (exit 0) only when
# apt-get cannot install them. Every daemon and job is stopped on exit.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/slurm.bash"

tasks=2
overcommit=(); [ "$(nproc)" -lt "$tasks" ] && overcommit=(--overcommit)
cfg="$MOE_SOURCE_DIR/deploy/configs/tiny_test.pbtxt"
steps=400   # ~10 s at 2 ranks with batch 64: long enough to interrupt after the first progress lines
args="--set data.train_file=$MOE_DATA_DIR/tinyshakespeare.txt --set train.out_dir=$work/run --set train.steps=$steps"
args+=" --set checkpoint.every=0 --set parallel.expert_parallel=1 --set data.batch_size=64 --threads 1"

# ---- launch errors: srun without PMIx must fail non-zero with a message that names the cause
for mpi in none pmi2; do
  set +e
  # shellcheck disable=SC2086  # $args is word-split on purpose
  out=$(cd "$work" && timeout 60 srun -n "$tasks" "${overcommit[@]}" --mpi=$mpi "$MOE_BIN" train --config "$cfg" $args 2>&1)
  rc=$?
  set -e
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "srun --mpi=$mpi: exit code $rc (124 = hung)"
  grep -q -e "launch with srun --mpi=pmix" <<<"$out" \
    || fail "srun --mpi=$mpi: no clear error: $out"
  echo "srun --mpi=$mpi: exit $rc, $(grep -m1 -o -e "error: srun started.*" <<<"$out")"
done

# ---- training job: checkpoint on the pre-timeout signal, requeue, resume, finish
job=$(cd "$work" && CONFIG="$cfg" MOE_BIN="$MOE_BIN" EXTRA_ARGS="$args" \
      sbatch --parsable --job-name=moe-train --ntasks="$tasks" --ntasks-per-node="$tasks" "${overcommit[@]}" \
             --time=10 --output="$work/%x-%j.out" --error="$work/%x-%j.err" "$MOE_SOURCE_DIR/deploy/slurm/train.sbatch")
job=${job%%;*}
out="$work/moe-train-$job.out"
echo "submitted job $job"
# wait until training has progressed (a step line at step >= 20), then send the pre-timeout signal to the batch shell
deadline=$(( $(date +%s) + 60 ))
until grep -qE "step +([2-9][0-9]|[1-9][0-9][0-9])/$steps" "$out" 2>/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "no training progress in 60 s"
  grep -q "moe exited" "$out" 2>/dev/null && fail "training ended before it was signalled"
  sleep 0.2
done
scancel --signal=USR1 --batch "$job"
echo "sent SIGUSR1 to the batch shell of job $job"
# Slurm makes a requeued batch job eligible only ~120 s later (BeginTime): start it now to keep the test short
deadline=$(( $(date +%s) + 60 ))
until scontrol show job "$job" 2>/dev/null | grep -q "JobState=PENDING"; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "job $job was not requeued within 60 s of the signal"
  sleep 0.2
done
scontrol show job "$job" | grep -o "Reason=[A-Za-z]*"
# not at once: slurmd rejects a launch credential issued in the same second as the revocation of the previous run's
# credential ("Killing non-startable batch JobId=N: Job credential revoked")
sleep 2
scontrol update JobId="$job" StartTime=now
deadline=$(( $(date +%s) + 90 ))
until grep -qE "step +$steps/$steps" "$out" 2>/dev/null && grep -q "moe exited with code 0" "$out"; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "job did not finish in 90 s after the signal"
  state=$(scontrol show job "$job" 2>/dev/null | grep -o "JobState=[A-Z_]*" || true)
  case "$state" in *FAILED*|*CANCELLED*|*TIMEOUT*|*NODE_FAIL*) fail "job $job: $state" ;; esac
  sleep 0.5
done
# the first run stopped after checkpointing and requeued; the second resumed from that checkpoint
grep -q "batch shell got SIGUSR1" "$out" || fail "the batch shell did not see SIGUSR1"
grep -q "stopped by a signal after checkpointing" "$out" || fail "moe did not report the signal stop"
grep -q "moe exited with code 3" "$out" || fail "first run did not exit with code 3"
grep -q "requeueing job $job" "$out" || fail "job was not requeued"
ckpt_step=$(grep -m1 -o "checkpoint .*/checkpoints/step_[0-9]*" "$out" | sed 's/.*step_//')
[ -n "$ckpt_step" ] && [ "$ckpt_step" -lt "$steps" ] || fail "no checkpoint before the stop (got '$ckpt_step')"
grep -qE "resumed from .*step_$ckpt_step at step $ckpt_step" "$out" || fail "second run did not resume from step_$ckpt_step"
grep -q "run 2 on" "$out" || fail "no second run of job $job"
test -e "$work/run/checkpoints/latest" || fail "no latest checkpoint"
grep -q "step_$steps" "$work/run/checkpoints/latest" 2>/dev/null || [ -d "$work/run/checkpoints/step_$steps" ] \
  || fail "latest is not step_$steps"
for _ in $(seq 1 50); do
  state=$(scontrol show job "$job" 2>/dev/null | grep -o "JobState=[A-Z_]*" || echo "JobState=gone")
  [ "$state" = JobState=COMPLETED ] || [ "$state" = JobState=gone ] && break; sleep 0.2
done
[ "$state" = JobState=COMPLETED ] || [ "$state" = JobState=gone ] || fail "job $job ended as $state"
restarts=$(scontrol show job "$job" 2>/dev/null | grep -o "Restarts=[0-9]*" || echo "Restarts=?")
echo "job $job: checkpoint at step $ckpt_step, requeued ($restarts), resumed and finished $steps/$steps"
echo "PASS in $(( $(date +%s) - t0 )) s"
