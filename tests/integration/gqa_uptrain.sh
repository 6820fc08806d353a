#!/usr/bin/env bash
# GQA uptraining (Ainslie et al. 2023) end to end through the CLI: train a tiny multi-head model (4 query and 4
# key/value heads), mean-pool it to 2 kv heads with `moe ckpt convert --to-gqa 2`, and uptrain the converted
# checkpoint with `moe train --set train.init_from=DIR` and the MHA run's own config file: the model (n_kv_heads 2)
# comes from the checkpoint, the run starts at step 0 with its own warmup + cosine schedule over its 20 steps (not
# the MHA run's, which ended at min_lr), and its val loss ends finite and below the converted model's. Refused with
# a clear error: a `--set model.*` override that changes a tensor shape (the tensor and both shapes named),
# `--resume` onto a checkpoint without optimizer state, train.init_from inside the run's own checkpoints, a missing
# train.init_from directory.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
data=(--set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" --threads 2)
val_loss() { "$MOE_BIN" eval --checkpoint "$1" --threads 2 | sed -n 's/.*val loss \([0-9.]*\).*/\1/p'; }
mha_cfg="$work/mha.pbtxt"
sed 's/n_kv_heads: 2/n_kv_heads: 4/' "$cfg" > "$mha_cfg"
grep -q "n_heads: 4 n_kv_heads: 4" "$mha_cfg" || fail "could not make the MHA config from $cfg"

"$MOE_BIN" train --config "$mha_cfg" "${data[@]}" --set train.steps=60 --set train.out_dir="$work/mha" \
  > "$work/mha.log" 2>&1 || { cat "$work/mha.log"; fail "MHA training failed"; }
grep -q "heads 4/4 (q/kv)" "$work/mha.log" || { cat "$work/mha.log"; fail "the MHA run is not multi-head"; }
"$MOE_BIN" ckpt convert "$work/mha/checkpoints" --to-gqa 2 --out "$work/gqa" > /dev/null
mha=$(val_loss "$work/mha/checkpoints")
converted=$(val_loss "$work/gqa")

# ---- uptraining: the MHA config file as it is (n_kv_heads 4 there), the model from the checkpoint
up=(--config "$mha_cfg" "${data[@]}" --set train.steps=20 --set train.log_every=5 --set optimizer.warmup_steps=2
    --set train.init_from="$work/gqa" --set train.out_dir="$work/up")
"$MOE_BIN" train "${up[@]}" --metrics "$work/up.jsonl" > "$work/up.log" 2>&1 \
  || { cat "$work/up.log"; fail "uptraining failed"; }
grep -q "modified: n_kv_heads: 4 -> 2" "$work/up.log" || { cat "$work/up.log"; fail "no note of the model's n_kv_heads"; }
grep -q "heads 4/2 (q/kv)" "$work/up.log" || { cat "$work/up.log"; fail "the uptrained model is not GQA"; }
grep -q "train.init_from: weights and routing tables of $work/gqa/step_60 (step 60 of its run); step 0 of 20" \
  "$work/up.log" || { cat "$work/up.log"; fail "no start from train.init_from at step 0"; }
# the schedule is the uptraining run's own: near optimizer.lr (0.004) after the 2 warmup steps, min_lr (0.0004) at
# its end; 20 steps logged every 5 from step 5 on
"$PY" - "$work/up.jsonl" <<'PY'
import json, sys
tr = [r for r in map(json.loads, open(sys.argv[1])) if r["type"] == "train"]
assert [r["step"] for r in tr] == [5, 10, 15, 20], [r["step"] for r in tr]
assert tr[0]["lr"] > 0.0035, ("step 5: not near the peak of a fresh schedule", tr[0]["lr"])
assert tr[-1]["lr"] < 0.0006, ("step 20: the cosine did not decay to min_lr over the uptraining", tr[-1]["lr"])
PY
test -f "$work/up/checkpoints/step_20/manifest.pb" || fail "no checkpoint of uptraining step 20"
uptrained=$(val_loss "$work/up/checkpoints")
echo "val loss: MHA $mha, GQA-2 converted $converted, uptrained 20 steps $uptrained"
awk -v a="$uptrained" -v b="$converted" 'BEGIN { exit !(a == a + 0 && a > 0 && a < b) }' \
  || fail "uptrained val loss $uptrained is not finite and below the converted model's $converted"
# --resume continues the uptraining run itself (its optimizer state), not train.init_from
"$MOE_BIN" train "${up[@]}" --set train.steps=24 --resume > "$work/up2.log" 2>&1 \
  || { cat "$work/up2.log"; fail "resuming the uptraining failed"; }
grep -q "resumed from $work/up/checkpoints/step_20 at step 20" "$work/up2.log" || { cat "$work/up2.log"; fail "no resume"; }

# ---- refused, naming what is wrong
expect_fail "tensor 'params/layers.0.attn.wk' has shape \[32, 64\] but the model config expects \[64, 64\]" \
  "$MOE_BIN" train "${up[@]}" --set train.out_dir="$work/bad" --set model.n_kv_heads=4
grep -q "a --set model.\* override must keep every tensor shape" "$work/out.txt" || { cat "$work/out.txt"; fail "no hint"; }
test ! -e "$work/bad/checkpoints" || fail "a refused run wrote checkpoints"
"$MOE_BIN" ckpt convert "$work/mha/checkpoints" --to-gqa 2 --out "$work/conv/checkpoints" > /dev/null
expect_fail "has no optimizer state (a converted or imported checkpoint): start a new run from it with --set train.init_from=" \
  "$MOE_BIN" train --config "$mha_cfg" "${data[@]}" --set train.out_dir="$work/conv" --resume
expect_fail "config field train.init_from = '$work/mha/checkpoints': lies inside this run's own checkpoints" \
  "$MOE_BIN" train "${up[@]}" --set train.init_from="$work/mha/checkpoints" --set train.out_dir="$work/mha"
expect_fail "config field train.init_from = '$work/nowhere': no such checkpoint directory" \
  "$MOE_BIN" train "${up[@]}" --set train.init_from="$work/nowhere"
echo "OK"
