#!/usr/bin/env bash
# `moe ckpt convert DIR --to-hf OUT` is loaded by transformers itself (AutoModelForCausalLM.from_pretrained, no
# custom code, nothing downloaded: HF_HUB_OFFLINE=1), for a dense GQA model (llama) and an MoE model trained here
# (mixtral, 4 experts top-2): transformers' log-probabilities of the tokens `moe generate` chose greedily equal ours
# (float32 on both sides, |difference| < 2e-4 nats for each of the 40 generated tokens; the inputs of the
# comparison are every logit, through the log-softmax normaliser), and transformers' own greedy generation
# reproduces our 40 tokens. Models the target cannot express (word experts, GELU) are refused naming the layer
# and the reason, and nothing is written.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
VPY=${MOE_VENV_PYTHON:?run through ctest}
[ -x "$VPY" ] || fail "no $VPY: run deploy/setup.sh (it creates the project's .venv with the test clients)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
data=(--set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" --set train.steps=40 --set train.eval_every=0
      --threads 2)
check() {  # check NAME EXPECTED_ARCH ARGS...
  local name=$1 arch=$2; shift 2
  "$MOE_BIN" train --config "$cfg" "${data[@]}" "$@" --set train.out_dir="$work/$name" > "$work/$name.log" 2>&1 \
    || { cat "$work/$name.log"; fail "$name: training failed"; }
  "$MOE_BIN" ckpt convert "$work/$name/checkpoints" --to-hf "$work/$name.hf"
  "$MOE_BIN" generate --checkpoint "$work/$name/checkpoints" --prompt "ROMEO:" --set generate.temperature=0 \
    --set generate.max_new_tokens=40 --print-ids > /dev/null 2> "$work/$name.ids"
  "$VPY" - "$work/$name.hf" "$work/$name.ids" "$arch" <<'PY'
import json, sys
import torch
from transformers import AutoModelForCausalLM
d, ids_file, arch = sys.argv[1], sys.argv[2], sys.argv[3]
assert json.load(open(d + "/config.json"))["architectures"] == [arch]
lines = open(ids_file).read().split("\n")
ids = [int(x) for x in lines[0].split()]
ours = [float(x) for x in lines[1].split()]
n_new = len(ours)
prompt = ids[: len(ids) - n_new]
model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
model.eval()
assert type(model).__name__ == arch, type(model).__name__
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    theirs = [lp[len(prompt) - 1 + i, ids[len(prompt) + i]].item() for i in range(n_new)]
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    assert diff < 2e-4, ("log-probabilities differ", diff, ours[:5], theirs[:5])
    gen = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False)[0].tolist()
assert gen == ids, ("greedy generation differs", gen[len(prompt):], ids[len(prompt):])
print("%s: transformers %s loads it; %d log-probabilities within %.2e of ours; greedy generation identical (%d tokens)"
      % (d.rsplit("/", 1)[-1], arch, n_new, diff, n_new))
PY
}
check dense LlamaForCausalLM
check moe MixtralForCausalLM --set model.ffn_pattern=FFN_MOE --set model.moe.num_experts=4 \
  --set model.moe.d_expert=64 --set model.moe.aux_loss_coef=0.01 --set model.moe.top_k=2
# refused, naming the layer / field and the reason; nothing written
"$MOE_BIN" train --config "$cfg" "${data[@]}" --set train.steps=2 --set model.ffn_pattern=FFN_MOE,FFN_WORD_EXPERT \
  --set model.moe.num_experts=4 --set model.word_experts.num_experts=16 --set model.word_experts.d_expert=8 \
  --set model.word_experts.num_frequent=8 --set train.out_dir="$work/words" > /dev/null 2>&1
expect_fail "layer 1 is a word-expert layer" "$MOE_BIN" ckpt convert "$work/words/checkpoints" --to-hf "$work/words.hf"
[ ! -e "$work/words.hf" ] && [ ! -e "$work/words.hf.tmp" ] || fail "a refused export left files behind"
"$MOE_BIN" train --config "$cfg" "${data[@]}" --set train.steps=2 --set model.activation=GELU \
  --set train.out_dir="$work/gelu" > /dev/null 2>&1
expect_fail "model.activation is GELU" "$MOE_BIN" ckpt convert "$work/gelu/checkpoints" --to-hf "$work/gelu.hf"
mkdir -p "$work/full.hf" && touch "$work/full.hf/x"
expect_fail "exists and is not an empty directory" "$MOE_BIN" ckpt convert "$work/dense/checkpoints" --to-hf "$work/full.hf"
echo PASS
