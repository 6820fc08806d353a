#!/usr/bin/env bash
# `moe ckpt` on a real run: inspect, verify (and its failures on a flipped byte, a truncated file, a newer format
# version, a path that is not a checkpoint), safetensors export checked with Python (json + numpy against h5py) and
# import, GQA conversion, sparse upcycling (the upcycled model's val loss equals the dense one), bf16 cast, and
# resharding an expert-parallel checkpoint then resuming it on 2 ranks.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
data=(--set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt")
val_loss() { "$MOE_BIN" eval --checkpoint "$1" --threads 1 | sed -n 's/.*val loss \([0-9.]*\).*/\1/p'; }

"$MOE_BIN" train --config "$cfg" "${data[@]}" --set train.out_dir="$work/run" --set train.steps=10 --threads 1 > /dev/null
ck="$work/run/checkpoints"
step="$ck/step_10"

# ---- inspect / verify
"$MOE_BIN" ckpt inspect "$ck" > "$work/inspect.txt"
grep -q "step 10" "$work/inspect.txt" || fail "inspect: no step"
grep -q "params/layers.0.attn.wq .*\[64, 64\] .*f32 .*16384 .*replicated" "$work/inspect.txt" || fail "inspect: table"
has "^OK: 63 tensors" "$MOE_BIN" ckpt verify "$ck" || fail "verify of a good checkpoint"
has "params/<name> becomes the safetensors tensor <name>" "$MOE_BIN" ckpt --help || fail "--help"

# a flipped byte inside one dataset: verify names the tensor
cp -r "$step" "$work/flip"
flip_byte "$work/flip/model.h5" params/layers.1.attn.wv 100 0x10
expect_fail "checksum mismatch in tensor 'params/layers.1.attn.wv'" "$MOE_BIN" ckpt verify "$work/flip"
grep -q "flip/model.h5" "$work/out.txt" || fail "verify: file not named"
# truncated
cp -r "$step" "$work/trunc"
truncate -s 60000 "$work/trunc/model.h5"
expect_fail "trunc/model.h5" "$MOE_BIN" ckpt verify "$work/trunc"
# a missing dataset
cp -r "$step" "$work/missing"
"$PY" -c "import h5py,sys; f=h5py.File(sys.argv[1],'r+'); del f['params/final_norm.weight']; f.close()" "$work/missing/model.h5"
expect_fail "dataset 'params/final_norm.weight' is missing" "$MOE_BIN" ckpt verify "$work/missing"
# a newer format version (field 1 of the manifest, the first varint)
cp -r "$step" "$work/v99"
"$PY" - "$work/v99/manifest.pb" <<'PY'
import sys
b = bytearray(open(sys.argv[1], "rb").read())
assert b[0] == 0x08 and b[1] == 0x02, b[:2]  # format version 2
b[1] = 99
open(sys.argv[1], "wb").write(bytes(b))
PY
expect_fail "format version 99 is not supported" "$MOE_BIN" ckpt verify "$work/v99"
expect_fail "is not a checkpoint" "$MOE_BIN" ckpt inspect "$work/run"
# a failed convert leaves nothing behind
expect_fail "checksum mismatch" "$MOE_BIN" ckpt convert "$work/flip" --dtype bf16 --out "$work/never"
test ! -e "$work/never" || fail "failed convert left $work/never"
expect_fail "refusing to overwrite" "$MOE_BIN" ckpt convert "$ck" --dtype bf16 --out "$work/run"

# ---- safetensors export, checked with Python, and import
"$MOE_BIN" ckpt convert "$ck" --to-safetensors "$work/m.safetensors" > /dev/null
"$PY" - "$work/m.safetensors" "$step/model.h5" <<'PY'
import json, struct, sys
import h5py, numpy as np
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
hdr = json.loads(raw[8:8 + n])
meta = hdr.pop("__metadata__")
assert meta["moe.step"] == "10", meta
e = hdr["layers.0.attn.wq"]
assert e["dtype"] == "F32" and e["shape"] == [64, 64], e
b, end = e["data_offsets"]
x = np.frombuffer(raw[8 + n + b:8 + n + end], dtype="<f4").reshape(e["shape"])
with h5py.File(sys.argv[2], "r") as f:
    names = []
    f["params"].visit(lambda k: names.append(k) if isinstance(f["params"][k], h5py.Dataset) else None)
    assert sorted(names) == sorted(hdr), (sorted(names), sorted(hdr))
    assert np.array_equal(x, f["params/layers.0.attn.wq"][...])
print("safetensors header and data match h5py:", len(hdr), "tensors")
PY
"$MOE_BIN" ckpt convert --from-safetensors "$work/m.safetensors" --config "$work/run/config.txt" \
  --tokenizer "$work/run/tokenizer.model" --out "$work/fromst" > /dev/null
"$MOE_BIN" ckpt verify "$work/fromst" > /dev/null
dense=$(val_loss "$ck")
back=$(val_loss "$work/fromst")
[ "$dense" = "$back" ] || fail "safetensors round trip changed the val loss: $dense vs $back"
"$MOE_BIN" generate --checkpoint "$work/fromst" --threads 1 --set generate.max_new_tokens=8 > /dev/null
expect_fail "layers.0.ffn.w_gate" "$MOE_BIN" ckpt convert --from-safetensors "$work/m.safetensors" \
  --config "$work/run/config.txt" --set model.d_ff=128 --out "$work/badst"
test ! -e "$work/badst" || fail "failed import left $work/badst"

# ---- GQA (tiny_test: 4 heads, 2 kv heads) -> MQA, with a bf16 cast
"$MOE_BIN" ckpt convert "$ck" --to-gqa 1 --dtype bf16 --out "$work/gqa" > /dev/null
has "heads 4/1" "$MOE_BIN" ckpt inspect "$work/gqa" || fail "gqa: n_kv_heads"
has "params/layers.0.attn.wk .*\[16, 64\] .*bf16" "$MOE_BIN" ckpt inspect "$work/gqa" || fail "gqa: wk"
"$PY" -c "import h5py,sys; d=h5py.File(sys.argv[1])['params/layers.0.attn.wk']; assert d.dtype=='uint16' and d.attrs['dtype'] in (b'bf16','bf16'), (d.dtype, d.attrs['dtype'])" "$work/gqa/step_10/model.h5"
"$MOE_BIN" generate --checkpoint "$work/gqa" --threads 1 --set generate.max_new_tokens=8 > /dev/null
expect_fail "not divisible by 3" "$MOE_BIN" ckpt convert "$ck" --to-gqa 3 --out "$work/gqa3"

# ---- sparse upcycling: same function, so the same val loss
"$MOE_BIN" ckpt convert "$ck" --upcycle 4 --out "$work/up" > /dev/null
has "params/layers.1.ffn.experts.w_up .*\[4, 160, 64\] .*experts" "$MOE_BIN" ckpt inspect "$work/up" || fail "upcycle: experts"
up=$(val_loss "$work/up")
"$PY" -c "import sys; d, u = float(sys.argv[1]), float(sys.argv[2]); assert abs(d - u) <= 1e-3, (d, u)" "$dense" "$up"
echo "val loss dense $dense, upcycled $up"

# ---- reshard an expert-parallel run, resume it on 2 ranks
moe=(--set data.tokenizer_model="$work/run/tokenizer.model" --set model.ffn_pattern=FFN_DENSE,FFN_MOE --set model.moe.num_experts=4 --set train.eval_every=0)
"$MOE_BIN" train --config "$cfg" "${data[@]}" "${moe[@]}" --set train.out_dir="$work/moe" --set train.steps=6 --threads 1 > /dev/null
expect_fail "model.moe.num_experts = 4: must be divisible by parallel.expert_parallel = 3" \
  "$MOE_BIN" ckpt reshard "$work/moe/checkpoints" --ep 3 --out "$work/moe3/checkpoints"
test ! -e "$work/moe3" || fail "failed reshard left $work/moe3"
"$MOE_BIN" ckpt reshard "$work/moe/checkpoints" --ep 2 --out "$work/moe2/checkpoints" > /dev/null
has "saved on 2 rank(s), expert parallel 2" "$MOE_BIN" ckpt inspect "$work/moe2/checkpoints" || fail "reshard"
has "experts_1.h5 (expert rows 2..3)" "$MOE_BIN" ckpt inspect "$work/moe2/checkpoints" || fail "reshard: shard files"
# a flipped byte in one shard file: verify names the tensor, the shard and the file; a missing shard file too
cp -r "$work/moe2/checkpoints/step_6" "$work/flip2"
flip_byte "$work/flip2/experts_1.h5" params/layers.1.ffn.experts.w_up 40 0x08
expect_fail "checksum mismatch in tensor 'params/layers.1.ffn.experts.w_up' shard 1 (rows 2..3 of 4)" \
  "$MOE_BIN" ckpt verify "$work/flip2"
grep -q "flip2/experts_1.h5" "$work/out.txt" || fail "verify: shard file not named"
rm "$work/flip2/experts_0.h5"
expect_fail "experts_0.h5 is missing" "$MOE_BIN" ckpt verify "$work/flip2"
# the tokenizer comes from data.tokenizer_model (both runs)
mpiexec -n 2 "$MOE_BIN" train --config "$cfg" "${data[@]}" "${moe[@]}" --set train.out_dir="$work/moe2" \
  --set train.steps=9 --set parallel.expert_parallel=2 --threads 1 --resume > "$work/resume.txt" 2>&1 \
  || { cat "$work/resume.txt"; fail "resume on 2 ranks"; }
grep -q "resumed from .*step_6 at step 6" "$work/resume.txt" || { cat "$work/resume.txt"; fail "did not resume"; }
has "^OK: " "$MOE_BIN" ckpt verify "$work/moe2/checkpoints" || fail "verify after resume"
has "step 9" "$MOE_BIN" ckpt inspect "$work/moe2/checkpoints" || fail "no step 9 checkpoint"

# ---- a format-version-1 checkpoint (tests/data/ckpt_v1: one model.h5, expert tensors global, saved on 2 ranks)
v1="$MOE_SOURCE_DIR/tests/data/ckpt_v1"
has "format version 1 | step 4 | saved on 2 rank(s), expert parallel 2" "$MOE_BIN" ckpt inspect "$v1" || fail "v1 inspect"
has "^OK: 70 tensors" "$MOE_BIN" ckpt verify "$v1" || fail "v1 verify"
"$MOE_BIN" ckpt reshard "$v1" --ep 1 --out "$work/v1ep1/checkpoints" > /dev/null
has "format version 2 | step 4 | saved on 1 rank(s), expert parallel 1" "$MOE_BIN" ckpt inspect "$work/v1ep1/checkpoints" \
  || fail "v1 reshard"
has "^OK: 70 tensors" "$MOE_BIN" ckpt verify "$work/v1ep1/checkpoints" || fail "v1 reshard verify"
mkdir -p "$work/v1run/checkpoints"
cp -r "$v1/step_4" "$work/v1run/checkpoints/"
echo step_4 > "$work/v1run/checkpoints/latest"
v1args=(--set data.tokenizer_model="$work/run/tokenizer.model" --set model.d_model=16 --set model.n_heads=2
        --set model.n_kv_heads=1 --set model.d_ff=32 --set data.seq_len=16 --set data.batch_size=4
        --set model.ffn_pattern=FFN_MOE,FFN_WORD_EXPERT --set model.moe.num_experts=4 --set model.moe.d_expert=16
        --set model.word_experts.num_experts=8 --set model.word_experts.d_expert=8 --set model.word_experts.num_frequent=4
        --set parallel.expert_parallel=2 --set train.eval_every=0 --set train.steps=6 --set train.out_dir="$work/v1run")
mpiexec -n 2 "$MOE_BIN" train --config "$cfg" "${data[@]}" "${v1args[@]}" --threads 1 --resume > "$work/v1.txt" 2>&1 \
  || { cat "$work/v1.txt"; fail "resume of the v1 checkpoint on 2 ranks"; }
grep -q "resumed from .*step_4 at step 4" "$work/v1.txt" || { cat "$work/v1.txt"; fail "v1: did not resume"; }
has "format version 2 | step 6 | saved on 2 rank(s), expert parallel 2" "$MOE_BIN" ckpt inspect "$work/v1run/checkpoints" \
  || fail "v1 resume: new checkpoint"
echo PASS
