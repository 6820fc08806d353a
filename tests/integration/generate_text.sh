#!/usr/bin/env bash
# `moe generate` prints the prompt and its continuation decoded as ONE token sequence: decoding the continuation
# alone drops the SentencePiece word-boundary space of its first piece ("looked at" + "the" -> "looked atthe").
# Trains the tiny config for a few steps, generates with --print-ids, and checks the printed text against an
# independent decoder (Debian's spm_decode) of prompt ids + generated ids.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
"$MOE_BIN" train --config "$cfg" --set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" \
  --set train.out_dir="$work/run" --set train.steps=6 --set train.log_every=6 --set train.eval_every=6 \
  --threads 2 > "$work/train.log"
tok="$work/run/checkpoints/step_6/tokenizer.model"
test -f "$tok" || fail "no tokenizer in the checkpoint"
prompt="ROMEO: I will speak"
word_starts=0  # continuations whose first piece starts a new word: the case the old printing got wrong
for seed in 3 4 5 6 7 8 9 10; do
  "$MOE_BIN" generate --checkpoint "$work/run/checkpoints" --prompt "$prompt" --threads 2 --print-ids \
    --set generate.seed=$seed --set generate.max_new_tokens=12 > "$work/gen.txt" 2> "$work/ids.txt"
  # the reference: the tokenizer's own decoder on the whole id sequence, split at the <nl> symbol as moe does
  nl=$(spm_export_vocab --model="$tok" | awk -F'\t' '$1 == "<nl>" { print NR - 1 }')
  test -n "$nl" || fail "no <nl> piece in the tokenizer"
  head -n 1 "$work/ids.txt" | tr ' ' '\n' | awk -v nl="$nl" '$1 == nl { print line; line = ""; next }
    { line = (line == "" ? $1 : line " " $1) } END { print line }' > "$work/segments.txt"
  spm_decode --model="$tok" --input_format=id < "$work/segments.txt" > "$work/want.txt"
  cmp -s "$work/gen.txt" "$work/want.txt" || { echo "printed:"; cat "$work/gen.txt"; echo "ids:"; cat "$work/ids.txt"
    echo "spm_decode of the ids:"; cat "$work/want.txt"; fail "seed $seed: generate did not print the decoded sequence"; }
  case "$(cat "$work/gen.txt")" in "$prompt"*) ;; *) fail "seed $seed: output does not start with the prompt";; esac
  [ "$(head -c $((${#prompt} + 1)) "$work/gen.txt")" = "$prompt " ] && word_starts=$((word_starts + 1))
  echo "seed $seed ok: $(head -c 80 "$work/gen.txt" | tr '\n' '|')"
done
[ $word_starts -gt 0 ] || fail "no seed gave a continuation starting with a new word: pick other seeds"
echo "PASS ($word_starts of 8 continuations start a new word)"
