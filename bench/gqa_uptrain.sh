#!/usr/bin/env bash
# GQA uptraining (Ainslie et al. 2023) at toy scale, the whole recipe side by side in one run:
#   1. train a multi-head model (MHA: 8 query and 8 key/value heads) for STEPS steps;
#   2. mean-pool its key/value heads to 2 groups (GQA) and to 1 (MQA): `moe ckpt convert --to-gqa G`;
#      validation loss right after the conversion (`moe eval`);
#   3. uptrain each converted checkpoint for 5% of STEPS (`moe train --set train.init_from=...`: step 0, fresh AdamW
#      state, warmup + cosine over the uptraining steps), at each peak lr of UP_LRS, and measure again;
#   4. train GQA (2 kv heads) from scratch for STEPS steps (same tokenizer, data, schedule);
#   5. decode speed of the serving engine (bench_serve --engine: Model::forward_infer over the paged KV cache, no
#      HTTP) for MHA, GQA and MQA at batch 1 and 16 at context CONTEXT on DECODE_THREADS threads, ROUNDS rounds
#      interleaved; the median per model of wall-clock tokens/s and of tokens per CPU-second (the work itself,
#      what a shared machine's load changes least).
# OMP_WAIT_POLICY=passive: on a machine shared with other jobs, spinning OpenMP threads slow training ~10x.
# Prints the table (val loss, KV-cache bytes per token = 2 * layers * n_kv_heads * head_dim * 4, decode tokens/s).
# usage: bench/gqa_uptrain.sh   (env: BUILD=build OUT=runs/gqa_uptrain STEPS=300 THREADS=2 DECODE_THREADS=1
#                                CONTEXT=240 ROUNDS=3 UP_LRS="0.003 0.001": the uptraining's peak optimizer.lr values,
#                                the first the original run's)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$(cd "${BUILD:-$root/build}" && pwd)
moe=$build/moe
bench=$build/bench_serve
out=${OUT:-$root/runs/gqa_uptrain}
data=${DATA:-$root/../shared/data/tinyshakespeare.txt}
steps=${STEPS:-300}
threads=${THREADS:-2}
decode_threads=${DECODE_THREADS:-1}
context=${CONTEXT:-240}
rounds=${ROUNDS:-3}
lr=0.003
up_lrs=(${UP_LRS:-$lr 0.001})
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
up_steps=$(( (steps + 10) / 20 ))                  # 5% of the original steps
up_warm=$(( up_steps / 10 > 0 ? up_steps / 10 : 1 ))
[ -x "$moe" ] && [ -x "$bench" ] || { echo "build first: $moe, $bench" >&2; exit 1; }
[ -f "$data" ] || { echo "no corpus $data (set DATA)" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out"
layers=4 d_model=192 heads=8
cfg=$out/mha.pbtxt
cat > "$cfg" <<EOF
model { d_model: $d_model n_layers: $layers n_heads: $heads n_kv_heads: $heads d_ff: 512 activation: SWIGLU norm: RMSNORM
        max_seq_len: 256 }
data { train_file: "$data" tokenizer_vocab_size: 1024 tokenizer_type: "bpe" seq_len: 256 batch_size: 8 val_fraction: 0.1 }
optimizer { lr: $lr min_lr: 0.0003 weight_decay: 0.1 grad_clip: 1.0 warmup_steps: 30 schedule: COSINE }
train { steps: $steps log_every: 50 eval_every: 0 eval_batches: 16 seed: 1337 out_dir: "$out/mha" }
checkpoint { every: 0 keep_last: 1 }
EOF
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*" >&2; }
train() {  # train NAME ARGS...: a run into $out/NAME, its log in $out/NAME.log
  local name=$1; shift
  log "train $name $*"
  "$moe" train --config "$cfg" --threads "$threads" --set train.out_dir="$out/$name" "$@" > "$out/$name.log" 2>&1 \
    || { cat "$out/$name.log" >&2; exit 1; }
}
val() { "$moe" eval --checkpoint "$1" --threads "$threads" | sed -n 's/.*val loss \([0-9.]*\).*/\1/p'; }

train mha
tok=(--set data.tokenizer_model="$out/mha/tokenizer.model")  # every run on the MHA run's tokenizer
declare -A loss
loss[mha]=$(val "$out/mha/checkpoints")
for g in 2 1; do
  "$moe" ckpt convert "$out/mha/checkpoints" --to-gqa $g --out "$out/kv${g}_init" > /dev/null
  loss[kv${g}_init]=$(val "$out/kv${g}_init")
  for i in "${!up_lrs[@]}"; do
    train kv${g}_up$i "${tok[@]}" --set train.init_from="$out/kv${g}_init" --set train.steps=$up_steps \
      --set optimizer.warmup_steps=$up_warm --set optimizer.lr=${up_lrs[$i]}
    loss[kv${g}_up$i]=$(val "$out/kv${g}_up$i/checkpoints")
  done
done
train kv2_scratch "${tok[@]}" --set model.n_kv_heads=2
loss[kv2_scratch]=$(val "$out/kv2_scratch/checkpoints")
log "training and evaluation done"

# decode: ROUNDS rounds, each over the three attention layouts in turn (noise spreads over all of them)
declare -A ckpt=([$heads]="$out/mha/checkpoints" [2]="$out/kv2_up0/checkpoints" [1]="$out/kv1_up0/checkpoints")
for r in $(seq "$rounds"); do
  for kv in $heads 2 1; do
    "$bench" --checkpoint "${ckpt[$kv]}" --engine 1 --closed 1,16 --context "$context" --threads "$decode_threads" \
      | sed -n "s/^ENGINE batch=\([0-9]*\) .* tokens_per_s=\([0-9.]*\) .* tokens_per_cpu_s=\([0-9.]*\)/$kv \1 \2 \3/p" \
      >> "$out/decode.txt"
  done
done
log "decode benchmark done"
med() {  # med KV BATCH COLUMN: the median over the rounds of column 3 (wall tokens/s) or 4 (tokens per CPU-s)
  awk -v k="$1" -v b="$2" -v c="$3" '$1 == k && $2 == b { print $c }' "$out/decode.txt" | sort -g \
    | awk '{ v[NR] = $1 } END { printf "%.0f\n", (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
kvb() { echo $(( 2 * layers * $1 * (d_model / heads) * 4 )); }  # (k, v) * layers * kv heads * head_dim * f32

echo
echo "GQA uptraining: $steps original steps; uptraining $up_steps steps (5%, warmup $up_warm, cosine to min_lr)"
echo "decode: context $context, $decode_threads thread(s), median of $rounds rounds; tokens/s wall | per CPU-second"
printf "%-40s %9s %11s %19s %19s\n" "model" "val loss" "KV B/token" "decode b1 wall|cpu" "decode b16 wall|cpu"
row() {  # row LABEL LOSS KV [with decode]
  local d1=- d16=-
  if [ -n "${4:-}" ]; then d1="$(med "$3" 1 3) | $(med "$3" 1 4)"; d16="$(med "$3" 16 3) | $(med "$3" 16 4)"; fi
  printf "%-40s %9s %11s %19s %19s\n" "$1" "$2" "$(kvb "$3")" "$d1" "$d16"
}
row "MHA ($heads kv heads), $steps steps" "${loss[mha]}" $heads decode
for g in 2 1; do
  name=$([ $g = 2 ] && echo GQA-2 || echo MQA)
  row "$name converted, no uptraining" "${loss[kv${g}_init]}" $g
  for i in "${!up_lrs[@]}"; do
    row "$name uptrained $up_steps steps, peak lr ${up_lrs[$i]}" "${loss[kv${g}_up$i]}" $g $([ $i = 0 ] && echo decode)
  done
done
row "GQA-2 from scratch, $steps steps" "${loss[kv2_scratch]}" 2
log "total"
