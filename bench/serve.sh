#!/usr/bin/env bash
# The serving benchmark, side by side in one run (results: bench/RESULTS.md):
#   1. the checkpoint: the README demo model (deploy/configs/shakespeare_moe.pbtxt: d_model 192, 4 layers, 8 experts
#      top-2) trained for a few steps here (speed does not depend on training; greedy text is non-trivial);
#   2. the decode bandwidth bound of that model on this machine, and the engine's decode step alone (no HTTP);
#   3. `moe serve` at 1 rank (2 threads), 2 ranks (1 thread each, experts sharded) and 1 rank with 1 thread (a core
#      left to the HTTP thread and the clients), each under the load generator of bench_serve: closed loop at
#      concurrency 1/4/16/64 and open loop (Poisson arrivals);
#   4. the same model decoding greedily in PyTorch eager (bench/torch_decode.py, Debian's torch, a KV-cache loop,
#      2 threads) at batch 1 and 16, after checking that it decodes the same tokens as `moe generate`;
#   5. the ratios against the targets.
# usage: bench/serve.sh [BUILD_DIR (default build)]; takes ~2 minutes on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
moe=$build/moe
bench=$build/bench_serve
work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill -USR1 "$server" 2>/dev/null; sleep 1; rm -rf "$work"; }
trap cleanup EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OPENBLAS_NUM_THREADS=2
echo "== $(date '+%F %T'), $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

echo "== checkpoint: deploy/configs/shakespeare_moe.pbtxt, 60 steps"
"$moe" train --config "$root/deploy/configs/shakespeare_moe.pbtxt" --set train.out_dir="$work/run" \
  --set train.steps=60 --set train.eval_every=0 --set checkpoint.every=0 --threads 2 > "$work/train.log" 2>&1
ckpt=$work/run/checkpoints
step_dir=$ckpt/$(cat "$ckpt/latest")

echo "== the PyTorch loop decodes the same model"
"$moe" generate --checkpoint "$ckpt" --prompt "ROMEO: Is the day so young" --set generate.temperature=0 \
  --set generate.max_new_tokens=24 --print-ids 2> "$work/ids.txt" > /dev/null
all=$(head -n 1 "$work/ids.txt")
n=$(wc -w <<<"$all")
ours=$(cut -d' ' -f$((n - 23))-"$n" <<<"$all")
theirs=$(/usr/bin/python3 "$root/bench/torch_decode.py" "$step_dir" --greedy-ids "$(cut -d' ' -f1-$((n - 24)) <<<"$all")" \
  --new 24 --threads 2)
[ "$ours" = "$theirs" ] || { echo "torch greedy ($theirs) != moe generate ($ours)"; exit 1; }
echo "greedy tokens equal: $ours"

echo "== bound and engine"
"$bench" --checkpoint "$ckpt" --bound-only 1 --threads 2 | tee "$work/bound.txt"
"$bench" --checkpoint "$ckpt" --engine 1 --closed 1,16,64 --threads 2 | tee "$work/engine.txt"

serve_load() {  # RANKS THREADS: a server, the load generator, drained (load<RANKS>x<THREADS>.txt)
  local ranks=$1 threads=$2 port
  mpiexec -n "$ranks" --bind-to none "$moe" serve --checkpoint "$ckpt" --threads "$threads" --set serving.port=0 \
    > "$work/serve$ranks.log" 2>&1 &
  server=$!
  for _ in $(seq 1 300); do
    port=$(sed -n 's|.*listening on http://[^:]*:\([0-9]*\).*|\1|p' "$work/serve$ranks.log" | head -n 1)
    [ -n "$port" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ] && break
    sleep 0.1
  done
  "$bench" --port "$port" --checkpoint "$ckpt" --closed 1,4,16,64 --poisson 40,120 --requests 64 --max-tokens 64 \
    --label "$ranks rank(s) x $threads thread(s)" | tee "$work/load${ranks}x$threads.txt"
  kill -USR1 "$server"
  wait "$server"
  server=""
}
echo "== moe serve"
serve_load 1 2
serve_load 2 1
serve_load 1 1  # one core left to the HTTP thread and the clients

echo "== PyTorch eager"
/usr/bin/python3 "$root/bench/torch_decode.py" "$step_dir" --batches 1,16 --threads 2 | tee "$work/torch.txt"

echo "== ratios"
/usr/bin/python3 - "$work" <<'PY'
import json, re, sys
w = sys.argv[1]
bound = float(re.search(r"BOUND_TOKENS_PER_S ([\d.]+)", open(w + "/bound.txt").read()).group(1))
eng = {int(b): float(t) for b, t in re.findall(r"ENGINE batch=(\d+) ms_per_step=[\d.]+ tokens_per_s=([\d.]+)",
                                               open(w + "/engine.txt").read())}
torch = {json.loads(l[6:])["batch"]: json.loads(l[6:])["tokens_per_s"] for l in open(w + "/torch.txt")
         if l.startswith("TORCH ")}
def load(setup):
    out = {}
    for m in re.finditer(r"RESULT (.*?) tokens_per_s=([\d.]+) ttft_p50_ms=([\d.]+) ttft_p99_ms=([\d.]+) "
                         r"itl_p50_ms=([\d.]+) itl_p99_ms=([\d.]+)", open("%s/load%s.txt" % (w, setup)).read()):
        out[m.group(1)] = [float(x) for x in m.groups()[1:]]
    return out
print("%-52s %10s %8s" % ("", "measured", "target"))
print("%-52s %10.2f %8s" % ("engine batch-1 decode / bandwidth bound", eng[1] / bound, ">= 0.5"))
for setup in ("1x2", "2x1", "1x1"):
    L = load(setup)
    c1, c16 = L["closed c=1"], L["closed c=16"]
    r = "%s rank(s) x %s thread(s)" % tuple(setup.split("x"))
    print("%-52s %10.2f %8s" % (r + ": server c=1 / bound", c1[0] / bound, ">= 0.5"))
    print("%-52s %10.2f %8s" % (r + ": tokens/s c=16 / c=1", c16[0] / c1[0], ">= 6"))
    print("%-52s %10.2f %8s" % (r + ": server c=1 / torch batch 1", c1[0] / torch[1], ">= 3"))
    print("%-52s %10.2f %8s" % (r + ": server c=16 / torch batch 16", c16[0] / torch[16], ">= 3"))
    print("%-52s %10.2f %8s" % (r + ": ITL p99 / p50 at c=16", c16[4] / max(c16[3], 1e-9), "< 2"))
print("%-52s %10.2f %8s" % ("engine batch 16 / batch 1 (no HTTP)", eng[16] / eng[1], ""))
print("%-52s %10.2f %8s" % ("engine batch 1 / torch batch 1", eng[1] / torch[1], ">= 3"))
print("%-52s %10.2f %8s" % ("engine batch 16 / torch batch 16", eng[16] / torch[16], ">= 3"))
PY
