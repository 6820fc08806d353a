#!/usr/bin/env bash
# End to end through the CLI: train a tiny model for 50 steps on tinyshakespeare, check that validation loss
# ends clearly below the unigram entropy of the data, resume is a no-op at the end, generate text, eval.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
"$MOE_BIN" train --config "$cfg" --set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" \
  --set train.out_dir="$work/run" --threads 2 --metrics "$work/metrics.jsonl" | tee "$work/train.log"
grep -q "^step    50/50" "$work/train.log" || { echo "FAIL: no progress line for step 50"; exit 1; }
entropy=$(sed -n 's/.*unigram entropy (context-free baseline) \([0-9.]*\) nats.*/\1/p' "$work/train.log")
# from the metrics stream: the val loss at step 50, the first logged train loss
read -r val first < <("$PY" -c '
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])]
ev = [x for x in r if x["type"] == "eval" and x["step"] == 50]
tr = [x for x in r if x["type"] == "train"]
assert len(ev) == 1 and tr[-1]["step"] == 50, r
print(ev[0]["val_loss"], tr[0]["loss"])' "$work/metrics.jsonl")
echo "unigram entropy $entropy, first logged train loss $first, final val loss $val"
awk -v v="$val" -v h="$entropy" 'BEGIN { exit !(v + 0.3 < h) }' || { echo "FAIL: val loss $val not clearly below unigram entropy $entropy"; exit 1; }
test -f "$work/run/checkpoints/step_50/model.h5" && test -f "$work/run/checkpoints/latest"
# the checkpoint is plain HDF5 that h5py reads
if [ -n "${MOE_PYTHON:-}" ]; then
  "$MOE_PYTHON" -c "import h5py,sys; f=h5py.File(sys.argv[1]); n=[]; f.visit(n.append); assert 'params/tok_emb.weight' in n, n; print('h5py sees', len(n), 'objects')" \
    "$work/run/checkpoints/step_50/model.h5"
fi
"$MOE_BIN" generate --checkpoint "$work/run/checkpoints" --prompt "ROMEO:" --threads 2 | tee "$work/gen.txt"
test "$(wc -c < "$work/gen.txt")" -gt 20 || { echo "FAIL: generated text too short"; exit 1; }
"$MOE_BIN" eval --checkpoint "$work/run/checkpoints" --threads 2 | tee "$work/eval.txt"
grep -q "val loss" "$work/eval.txt"
# checkpoint utilities: inspect lists the tensors, verify passes, then a flipped byte is caught and named
"$MOE_BIN" ckpt inspect "$work/run/checkpoints" > "$work/inspect.txt"; head -5 "$work/inspect.txt"
grep -q "params/layers.0.attn.wq .*\[64, 64\]" "$work/inspect.txt"
"$MOE_BIN" ckpt verify "$work/run/checkpoints" | grep -q "^OK:"
if [ -n "${MOE_PYTHON:-}" ]; then
  flip_byte "$work/run/checkpoints/step_50/model.h5" params/layers.1.ffn.w_up 5 0x40
  set +e
  out=$("$MOE_BIN" ckpt verify "$work/run/checkpoints" 2>&1); rc=$?
  set -e
  echo "$out"
  [ $rc -ne 0 ] && grep -q "checksum mismatch in tensor 'params/layers.1.ffn.w_up'" <<<"$out" \
    || { echo "FAIL: a flipped byte was not reported"; exit 1; }
fi
echo "PASS"
