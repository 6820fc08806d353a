#!/usr/bin/env bash
# Load balancing without an auxiliary loss (DeepSeek-V3 bias balancing) against the Switch aux loss: trains the demo
# MoE (deploy/configs/shakespeare_moe.pbtxt, capacity factor as configured) three ways on one rank, side by side in
# one invocation, and prints per run, over the logged steps of the second half: the max expert overload (routed
# max / mean load before capacity drops; mean over those steps of the worst layer, and the worst step), the dropped
# fraction (mean over layers and steps) and the final validation loss.
#   aux    as configured (aux_loss_coef 0.01)
#   bias   aux_loss_coef 0, bias_balancing true (bias_update_rate: its default unless RATE is set)
#   both   aux_loss_coef 0.01 and bias_balancing true
# usage: bench/balance_compare.sh [--set path=value ...]   (extra overrides for all three runs)
# env: MOE_BIN (default build/moe), STEPS (300), THREADS (2), RATE (bias_update_rate), OUT (run directory; default
#      a fresh temporary one), RUNS (default "aux bias both")
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${MOE_BIN:-$root/build/moe}
steps=${STEPS:-300}
threads=${THREADS:-2}
out=${OUT:-$(mktemp -d /tmp/balance_compare.XXXXXX)}
runs=${RUNS:-aux bias both}
mkdir -p "$out"
common=(--config "$root/deploy/configs/shakespeare_moe.pbtxt" --threads "$threads" --set train.steps="$steps"
        --set train.log_every=10 --set train.eval_every=0 --set train.eval_batches=4 --set checkpoint.every=0 "$@")
rate=()
[ -n "${RATE:-}" ] && rate=(--set model.moe.bias_update_rate="$RATE")
tok=()
for run in $runs; do
  case $run in
    aux) extra=() ;;
    bias) extra=(--set model.moe.aux_loss_coef=0 --set model.moe.bias_balancing=true "${rate[@]}") ;;
    both) extra=(--set model.moe.bias_balancing=true "${rate[@]}") ;;
    *) echo "unknown run '$run' (aux, bias, both)" >&2; exit 2 ;;
  esac
  rm -rf "$out/$run" "$out/$run.jsonl"
  start=$(date +%s.%N)
  "$bin" train "${common[@]}" "${tok[@]}" "${extra[@]}" --set train.out_dir="$out/$run" \
    --metrics "$out/$run.jsonl" > "$out/$run.log" 2>&1 || { tail -20 "$out/$run.log"; exit 1; }
  echo "$run: $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.0f", e - s }') s" >&2
  # the same tokenizer for every run (the first run trains it)
  [ ${#tok[@]} -eq 0 ] && tok=(--set data.tokenizer_model="$out/$run/tokenizer.model")
done
python3 - "$out" "$steps" $runs <<'PY'
import json, sys
out, steps, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("| run | max overload, mean (2nd half) | max overload, worst step | dropped fraction | final val loss |")
print("| --- | --- | --- | --- | --- |")
for run in runs:
    recs = [json.loads(l) for l in open("%s/%s.jsonl" % (out, run))]
    late = [r for r in recs if r["type"] == "train" and r["step"] > steps // 2]
    worst = [max(l["max_overload"] for l in r["layers"] if "max_overload" in l) for r in late]
    drops = [l["dropped_fraction"] for r in late for l in r["layers"] if "dropped_fraction" in l]
    val = [r for r in recs if r["type"] == "eval"][-1]["val_loss"]
    print("| %s | %.3f | %.3f | %.2f%% | %.4f |" % (run, sum(worst) / len(worst), max(worst),
                                                    100 * sum(drops) / len(drops), val))
print("(%d logged steps per run in the second half; run directories and metrics under %s)" % (len(late), out))
PY
