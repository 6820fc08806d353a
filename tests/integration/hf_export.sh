#!/usr/bin/env bash
# Hugging Face transformers both ways. Export: `moe ckpt convert DIR --to-hf OUT` is loaded by transformers itself (AutoModelForCausalLM.from_pretrained, no
# custom code, nothing downloaded: HF_HUB_OFFLINE=1), for a dense GQA model (llama) and an MoE model trained here
# (mixtral, 4 experts top-2): transformers' log-probabilities of the 240 tokens `moe generate` chose (one greedy
# and five sampled continuations of 40) equal ours (float32 on both sides, |difference| < 2e-4 nats per token; every
# logit enters through the log-softmax normaliser), and transformers' own greedy generation reproduces our 40
# greedy tokens. Models the target cannot express (word experts, GELU) are refused naming the layer
# and the reason, and nothing is written. Import: `--from-hf` of an exported directory exported again gives
# byte-identical tensors; models made by transformers itself (random llama and mixtral, save_pretrained, sharded
# with an index) imported here give transformers' log-probabilities and greedy tokens; bad directories (a missing
# shard, a wrong shape, an unknown model_type, no SentencePiece tokenizer) are clear errors that write nothing.
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
  # one greedy continuation and five sampled ones (temperature 0.8, seeds 1-5): 240 tokens compared
  "$MOE_BIN" generate --checkpoint "$work/$name/checkpoints" --prompt "ROMEO:" --set generate.temperature=0 \
    --set generate.max_new_tokens=40 --print-ids > /dev/null 2> "$work/$name.ids"
  for seed in 1 2 3 4 5; do
    "$MOE_BIN" generate --checkpoint "$work/$name/checkpoints" --prompt "First Citizen:" --set generate.seed=$seed \
      --set generate.temperature=0.8 --set generate.max_new_tokens=40 --print-ids > /dev/null 2> "$work/$name.s$seed"
  done
  "$VPY" - "$work/$name.hf" "$arch" "$work/$name.ids" "$work"/$name.s? <<'PY'
import json, sys
import torch
from transformers import AutoModelForCausalLM
d, arch, greedy, sampled = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
assert json.load(open(d + "/config.json"))["architectures"] == [arch]
model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
assert type(model).__name__ == arch, type(model).__name__
def read(f):
    lines = open(f).read().split("\n")
    ids = [int(x) for x in lines[0].split()]
    ours = [float(x) for x in lines[1].split()]
    return ids[: len(ids) - len(ours)], ids, ours
worst, n = 0.0, 0
with torch.no_grad():
    for f in [greedy] + sampled:
        prompt, ids, ours = read(f)
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        theirs = [lp[len(prompt) - 1 + i, ids[len(prompt) + i]].item() for i in range(len(ours))]
        worst = max(worst, max(abs(a - b) for a, b in zip(ours, theirs)))
        n += len(ours)
    assert worst < 2e-4, ("log-probabilities differ", worst)
    prompt, ids, ours = read(greedy)
    gen = model.generate(torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False)[0].tolist()
assert gen == ids, ("greedy generation differs", gen[len(prompt):], ids[len(prompt):])
# the exported tokenizer: transformers' LlamaTokenizer (slow: use_fast=False) encodes the prompt as we did
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(d, use_fast=False)
assert tok("ROMEO:", add_special_tokens=False)["input_ids"] == prompt, (tok("ROMEO:")["input_ids"], prompt)
print("%s: transformers %s loads it; %d log-probabilities within %.2e of ours; greedy generation identical (%d tokens)"
      % (d.rsplit("/", 1)[-1], arch, n, worst, len(ours)))
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
# ---- a sharded export (model-0000k-of-0000n.safetensors + index) loads and computes the same logits
"$MOE_BIN" ckpt convert "$work/moe/checkpoints" --to-hf "$work/moe_sharded.hf" --max-shard-size 30000
test -f "$work/moe_sharded.hf/model.safetensors.index.json" || fail "no index file in the sharded export"
[ "$(ls "$work/moe_sharded.hf" | grep -c '^model-.*-of-.*\.safetensors$')" -gt 1 ] || fail "the export was not sharded"
"$VPY" - "$work/moe.hf" "$work/moe_sharded.hf" <<'PY'
import sys
import torch
from transformers import AutoModelForCausalLM
a = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
b = AutoModelForCausalLM.from_pretrained(sys.argv[2], torch_dtype=torch.float32).eval()
ids = torch.arange(1, 50).unsqueeze(0)
with torch.no_grad():
    assert torch.equal(a(ids).logits, b(ids).logits)
print("sharded export: loads and gives the same logits")
PY
# ---- import: round trip of our exports, byte-identical tensors; the imported model generates what the original did
for name in dense moe; do
  "$MOE_BIN" ckpt convert --from-hf "$work/$name.hf" --out "$work/rt_$name"
  "$MOE_BIN" ckpt convert "$work/rt_$name" --to-hf "$work/rt_$name.hf"
  "$VPY" - "$work/$name.hf/model.safetensors" "$work/rt_$name.hf/model.safetensors" <<'PY'
import sys
from safetensors.numpy import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert sorted(a) == sorted(b), (sorted(a), sorted(b))
for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
print("round trip %s: %d tensors byte-identical after --from-hf and --to-hf" % (sys.argv[1].split("/")[-2], len(a)))
PY
  "$MOE_BIN" generate --checkpoint "$work/rt_$name" --prompt "ROMEO:" --set generate.temperature=0 \
    --set generate.max_new_tokens=40 --print-ids > /dev/null 2> "$work/rt_$name.ids"
  [ "$(head -n 1 "$work/rt_$name.ids")" = "$(head -n 1 "$work/$name.ids")" ] \
    || fail "the imported $name model generates other tokens"
done

# ---- models made by transformers: random init, saved sharded with an index, our SentencePiece tokenizer beside
make_hf() {  # make_hf DIR ARCH
  "$VPY" - "$1" "$2" "$work/dense.hf" <<'PY'
import json, shutil, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
out, arch, tok_from = sys.argv[1], sys.argv[2], sys.argv[3]
V = json.load(open(tok_from + "/config.json"))["vocab_size"]
common = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
torch.manual_seed(0)
if arch == "mixtral":
    model = MixtralForCausalLM(MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common))
else:
    model = LlamaForCausalLM(LlamaConfig(**common))
with torch.no_grad():  # a larger init than 0.02, so that the logits are not nearly uniform
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.15)
model.save_pretrained(out, safe_serialization=True, max_shard_size="40KB")
shutil.copy(tok_from + "/tokenizer.model", out)
shutil.copy(tok_from + "/tokenizer_config.json", out)
PY
}
for arch in llama mixtral; do
  make_hf "$work/made_$arch" $arch
  test -f "$work/made_$arch/model.safetensors.index.json" || fail "transformers did not shard the $arch model"
  "$MOE_BIN" ckpt convert --from-hf "$work/made_$arch" --out "$work/imp_$arch"
  "$MOE_BIN" generate --checkpoint "$work/imp_$arch" --prompt "ROMEO:" --set generate.temperature=0 \
    --set generate.max_new_tokens=40 --print-ids > /dev/null 2> "$work/imp_$arch.ids"
  "$VPY" - "$work/made_$arch" "$work/imp_$arch.ids" <<'PY'
import sys
import torch
from transformers import AutoModelForCausalLM
d = sys.argv[1]
lines = open(sys.argv[2]).read().split("\n")
ids = [int(x) for x in lines[0].split()]
ours = [float(x) for x in lines[1].split()]
prompt = ids[: len(ids) - len(ours)]
model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
with torch.no_grad():
    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    theirs = [lp[len(prompt) - 1 + i, ids[len(prompt) + i]].item() for i in range(len(ours))]
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    assert diff < 2e-4, ("log-probabilities differ", diff)
    gen = model.generate(torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False)[0].tolist()
assert gen == ids, ("greedy generation differs", gen, ids)
print("%s made by transformers, imported: %d log-probabilities within %.2e of the library's; greedy identical"
      % (type(model).__name__, len(ours), diff))
PY
done

# ---- an imported model is evaluated and fine-tuned (train.init_from: its weights and model config, fresh AdamW
# state; the config file's model section is replaced by the checkpoint's)
has "val loss" "$MOE_BIN" eval --checkpoint "$work/imp_llama" --set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" \
  --threads 2
"$MOE_BIN" train --config "$cfg" "${data[@]}" --set train.steps=8 --set train.log_every=4 \
  --set train.init_from="$work/imp_llama" --set train.out_dir="$work/ft" \
  --metrics "$work/ft.jsonl" > "$work/ft.log" 2>&1 || { cat "$work/ft.log"; fail "fine-tuning the imported model failed"; }
grep -q "train.init_from: weights and routing tables of .*step_0 (step 0 of its run); step 0 of 8" "$work/ft.log" \
  || { cat "$work/ft.log"; fail "no fine-tune from train.init_from"; }
grep -q '"step":8' "$work/ft.jsonl" || fail "the fine-tune did not reach step 8"
echo "fine-tuned the imported llama for 8 steps"

# ---- bad directories: a clear error, nothing written
bad() {  # bad NAME PATTERN: import $work/bad_NAME, expect PATTERN, no output left
  expect_fail "$2" "$MOE_BIN" ckpt convert --from-hf "$work/bad_$1" --out "$work/out_$1"
  [ ! -e "$work/out_$1" ] || fail "bad $1: a failed import left $work/out_$1"
}
cp -r "$work/made_llama" "$work/bad_shard"
rm "$(ls "$work"/bad_shard/model-0000*-of-*.safetensors | tail -n 1)"
bad shard "weight file .* is missing"
cp -r "$work/made_llama" "$work/bad_shape"
sed -i 's/"intermediate_size": 80/"intermediate_size": 96/' "$work/bad_shape/config.json"
bad shape "has shape \[80, 48\] but the model config expects \[96, 48\]"
cp -r "$work/made_llama" "$work/bad_type"
sed -i 's/"model_type": "llama"/"model_type": "gpt2"/' "$work/bad_type/config.json"
bad type "unknown model_type 'gpt2' in config.json (supported: llama, mixtral)"
cp -r "$work/made_llama" "$work/bad_tok"
rm "$work/bad_tok/tokenizer.model"; echo '{"version": "1.0"}' > "$work/bad_tok/tokenizer.json"
bad tok "has no tokenizer.model: only SentencePiece tokenizers are supported"
cp -r "$work/made_llama" "$work/bad_spm"
echo "not a sentencepiece model" > "$work/bad_spm/tokenizer.model"
bad spm "is not a SentencePiece model"
echo PASS
