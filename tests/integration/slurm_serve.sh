#!/usr/bin/env bash
# deploy/slurm/serve.sbatch on a real one-node Slurm cluster started for this test (tests/slurm/local_cluster.sh):
# the job serves a tiny MoE checkpoint with srun --mpi=pmix on 2 tasks (the experts sharded over them), answers
# /health and a greedy completion equal to `moe generate`'s, and `scancel` (SIGTERM to every task) drains it: the
# server exits 0. Needs root and the Debian Slurm packages (installed when missing; SKIP only when apt-get cannot).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/slurm.bash"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

# the checkpoint: the tiny test config as a 4-expert MoE, 100 steps on 2 expert-parallel ranks
mpiexec -n 2 "$MOE_BIN" train --config "$MOE_SOURCE_DIR/deploy/configs/tiny_test.pbtxt" \
  --set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" --set train.out_dir="$work/run" --set train.steps=100 \
  --set train.eval_every=0 --set checkpoint.every=0 --set model.ffn_pattern=FFN_MOE --set model.moe.num_experts=4 \
  --set model.moe.d_expert=80 --set parallel.expert_parallel=2 --threads 1 > "$work/train.log" 2>&1 \
  || { cat "$work/train.log"; fail "training failed"; }
ckpt="$work/run/checkpoints"
"$MOE_BIN" generate --checkpoint "$ckpt" --prompt "ROMEO:" --set generate.temperature=0 \
  --set generate.max_new_tokens=12 --threads 1 > "$work/generate.txt"

port=$(( base + 2 ))
while ! port_free "$port"; do port=$((port + 1)); done
tasks=2
overcommit=(); [ "$(nproc)" -lt "$tasks" ] && overcommit=(--overcommit)
job=$(cd "$work" && CHECKPOINT="$ckpt" MOE_BIN="$MOE_BIN" PORT="$port" EXTRA_ARGS="--threads 1" \
      sbatch --parsable --job-name=moe-serve --ntasks="$tasks" --ntasks-per-node="$tasks" "${overcommit[@]}" \
             --time=10 --output="$work/%x-%j.out" --error="$work/%x-%j.err" "$MOE_SOURCE_DIR/deploy/slurm/serve.sbatch")
job=${job%%;*}
echo "submitted serving job $job (port $port)"
deadline=$(( $(date +%s) + 90 ))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "the server of job $job was not ready within 90 s"
  state=$(scontrol show job "$job" 2>/dev/null | grep -o "JobState=[A-Z_]*" || true)
  case "$state" in *FAILED*|*CANCELLED*|*TIMEOUT*|*COMPLETED*) fail "job $job: $state before it served" ;; esac
  sleep 0.3
done
grep -q "experts over 2 rank" "$work/moe-serve-$job".out "$work/moe-serve-$job".err || fail "the job does not serve on 2 ranks"
curl -s "http://127.0.0.1:$port/v1/completions" -H "Content-Type: application/json" \
  -d '{"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0}' > "$work/completion.json"
"${MOE_PYTHON:-python3}" - "$work/completion.json" "$work/generate.txt" <<'PY' || fail "the completion differs"
import json, sys
text = json.load(open(sys.argv[1]))["choices"][0]["text"]
want = open(sys.argv[2]).read().rstrip("\n")
assert "ROMEO:" + text == want, ("ROMEO:" + text, want)
print("completion equals moe generate:", repr(text))
PY
scancel "$job"
deadline=$(( $(date +%s) + 60 ))
until grep -q "moe serve exited with code" "$work/moe-serve-$job.out" 2>/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "job $job did not end within 60 s of scancel"
  sleep 0.3
done
grep -q "moe serve exited with code 0" "$work/moe-serve-$job.out" || fail "the drained server did not exit 0"
grep -q "draining" "$work/moe-serve-$job".out "$work/moe-serve-$job".err || fail "no drain in the server's log"
echo "scancel drained the server: $(grep "exited with code" "$work/moe-serve-$job.out")"
echo "PASS in $(( $(date +%s) - t0 )) s"
