#!/usr/bin/env bash
# `moe train --tensorboard DIR` on 2 expert-parallel ranks writes standard event files: TensorBoard's own reader
# (EventAccumulator, from the pinned `tensorboard` package in the project's .venv, made by deploy/setup.sh) loads
# every scalar of every logged step and evaluation with the values of the metrics stream of the same run, and the
# per-expert load histograms with one bucket per expert. A corrupted record is rejected by the reader's CRC check.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
VPY=${MOE_VENV_PYTHON:?run through ctest}
[ -x "$VPY" ] || fail "no $VPY: run deploy/setup.sh (it creates the project's .venv with the test clients)"
mpiexec -n 2 "$MOE_BIN" train --config "$cfg" --set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" \
  --set train.out_dir="$work/run" --set train.steps=30 --set train.eval_every=10 --set model.ffn_pattern=FFN_MOE \
  --set model.moe.num_experts=4 --set model.moe.d_expert=32 --set parallel.expert_parallel=2 --threads 1 \
  --metrics "$work/metrics.jsonl" --tensorboard "$work/tb" > "$work/out.txt" 2>&1 || { cat "$work/out.txt"; fail "training failed"; }
test "$(ls "$work/tb" | grep -c '^events.out.tfevents\.')" -eq 1 || fail "expected one event file in $work/tb"
"$VPY" - "$work/tb" "$work/metrics.jsonl" <<'PY'
import json, math, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "histograms": 0})
ea.Reload()
recs = [json.loads(l) for l in open(sys.argv[2])]
train = [r for r in recs if r["type"] == "train"]
evals = [r for r in recs if r["type"] == "eval"]
def close(a, b): return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)  # event scalars are float32
for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                 ("train/tokens_per_s", "tokens_per_s"), ("train/router_loss", "router_loss")]:
    got = [(s.step, s.value) for s in ea.Scalars(tag)]
    assert [s for s, _ in got] == [r["step"] for r in train], (tag, got)
    assert all(close(v, r[key]) for (_, v), r in zip(got, train)), (tag, got)
for l in (0, 1):
    for name in ("router_loss", "aux_loss", "dropped_fraction"):
        got = [s.value for s in ea.Scalars("layer%d/%s" % (l, name))]
        assert all(close(v, r["layers"][l][name]) for v, r in zip(got, train)), (l, name, got)
    hist = ea.Histograms("layer%d/expert_load" % l)
    assert [h.step for h in hist] == [r["step"] for r in train]
    for h, r in zip(hist, train):
        load = r["layers"][l]["expert_load"]
        assert list(h.histogram_value.bucket) == load and list(h.histogram_value.bucket_limit) == [0, 1, 2, 3], h
        assert h.histogram_value.num == sum(load), h
val = [(s.step, s.value) for s in ea.Scalars("eval/val_loss")]
assert [s for s, _ in val] == [r["step"] for r in evals] == [10, 20, 30], val
assert all(close(v, r["val_loss"]) for (_, v), r in zip(val, evals)), val
print("tensorboard reader: %d scalar tags, %d histogram tags, %d logged steps, %d evaluations match the metrics stream"
      % (len(ea.Tags()["scalars"]), len(ea.Tags()["histograms"]), len(train), len(evals)))
PY
# a flipped byte in a record's payload: TensorBoard's record reader refuses the record (data CRC mismatch)
f=$(ls "$work/tb"/events.out.tfevents.*)
"$PY" - "$f" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
n = int.from_bytes(b[0:8], "little")   # first record: its length, masked CRC, payload, masked CRC
b[12 + n + 4 + 12 + 3] ^= 0x20         # a byte inside the second record's payload
open(p, "wb").write(bytes(b))
PY
"$VPY" - "$f" <<'PY'
import sys
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow
reader = pywrap_tensorflow.PyRecordReader_New(sys.argv[1], 0, "", None)
n = 0
try:
    while True:
        reader.GetNext()
        n += 1
except errors.DataLossError as e:
    assert n == 1, n  # the first record (file version) is intact, the second is refused
    print("corrupted record refused after %d good record(s): %s" % (n, e))
    sys.exit(0)
except errors.OutOfRangeError:
    sys.exit("the reader accepted a corrupted record (%d records)" % n)
PY
echo PASS
