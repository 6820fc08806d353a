#!/usr/bin/env bash
# The one-shot GPU check (issue 12), on the device machine from the repository root, with .gpu carried (made here by
# tests/gpu/bundle.sh):   tests/gpu/run.sh
# Runs, each under a time limit: the CUDA op and backend tests against the CPU kernels (cuda_tests), the
# host-staged collectives on device memory at 1 and 2 ranks sharing the GPU, the communication backend factory
# (NCCL at 1 rank; at 2 ranks on one GPU NCCL must be refused on every rank alike), 50 training steps of a dense
# config on the CPU, on CUDA, and on 2 ranks sharing the GPU (losses compared), the same with MoE layers (and expert
# parallelism over the 2 ranks), the same with word-expert layers, the README demo's first 100 losses on CUDA vs
# the CPU, NCCL training at world 1, greedy generation and `moe serve` (over HTTP) on CUDA vs the CPU, the GEMM bench
# (bench_gpu: bf16 through our cuBLASLt path vs raw cuBLASLt, and fp32; grouped vs dense expert GEMM) and the model
# bench (bench_model: training MFU, decode at batch 1 and 64 vs the bandwidth bound). Writes $OUT/gpu.log (all
# output), one .txt per check and $OUT/results.md (one row per check, then the bench lines). Expected to take a few
# minutes on an H200.
set -uo pipefail
OUT=${OUT:-/tmp/moe-gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
src=$(pwd)
bundle=${MOE_GPU_BUNDLE:-$src/.gpu/moe-gpu.tar.xz}
[[ -f "$bundle" ]] || { echo "run.sh: no $bundle (make it with tests/gpu/bundle.sh and carry .gpu)"; exit 1; }
dir=/tmp/moe-gpu
rm -rf "$dir" && tar -C /tmp -xJf "$bundle"
root=$dir/root
# NCCL and cuBLAS of the machine (CUDA toolkit or pip's nvidia-* wheels)
pylibs=$(python3 - <<'PY' 2>/dev/null
import importlib, os
for m in ("nvidia.nccl", "nvidia.cublas", "nvidia.cuda_runtime"):
    try:
        print(os.path.join(list(importlib.import_module(m).__path__)[0], "lib"))
    except Exception:
        pass
PY
)
libs="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu/openblas-openmp"
libs="$libs:$root/usr/lib/x86_64-linux-gnu/pmix2/lib:$root/usr/lib/x86_64-linux-gnu/openmpi/lib"
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib $pylibs; do [[ -d "$d" ]] && libs="$libs:$d"; done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
export OPAL_PREFIX=$root/usr PATH=$root/usr/bin:$PATH
export PMIX_INSTALL_PREFIX=$root/usr/lib/x86_64-linux-gnu/pmix2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1  # one machine: shared memory only
bin=$dir/bin
export OUT src dir bin
table=$OUT/results.md
printf '| check | result | seconds |\n| --- | --- | --- |\n' > "$table"
# check NAME LIMIT_S CMD...: runs CMD, records PASS/FAIL and gtest's summary line
check() {
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS rc=0
  if declare -F "$1" > /dev/null; then  # a function of this script: run by a bash that has it
    timeout "$limit" bash -c "$(declare -f "$1"); $1 \"\$@\"" _ "${@:2}" > "$OUT/$name.txt" 2>&1 || rc=$?
  else
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1 || rc=$?
  fi
  cat "$OUT/$name.txt"
  local summary
  summary=$(sed "s/\x1b\[[0-9;]*m//g" "$OUT/$name.txt" | grep -oE "(PASSED|SKIPPED|FAILED) +\] [0-9]+ tests?" |
    sed -E "s/ +\] / /" | sort -u | tr "\n" " ")
  printf '| %s | %s (rc %d) %s | %d |\n' "$name" "$([[ $rc == 0 ]] && echo PASS || echo FAIL)" "$rc" "$summary" \
    $((SECONDS - t0)) >> "$table"
}
echo "=== machine"; nvidia-smi -L || true; nproc
check cuda_tests 180 "$bin/cuda_tests"
check staged_np1 120 mpirun -np 1 --bind-to none "$bin/mpi_tests" --gtest_filter='*StagedComm*:Comm.BackendFactory'
check staged_np2 120 mpirun -np 2 --bind-to none "$bin/mpi_tests" --gtest_filter='*StagedComm*:Comm.BackendFactory'
# training on CUDA (a dense config: model.device = DEVICE_CUDA), 50 steps of deploy/configs/tiny_test.pbtxt: the
# CPU run, the CUDA run, and 2 ranks sharing the GPU (gradients all-reduced through host memory over MPI)
train() {  # train NAME RANKS DEVICE [--set FIELD=VALUE ...]; the config: $config, default tiny_test.pbtxt
  mpirun -np "$2" --bind-to none "$bin/moe" train --config "${config:-$src/deploy/configs/tiny_test.pbtxt}" --threads 4 \
    --set "data.train_file=$dir/data/tinyshakespeare.txt" --set "model.device=$3" --set checkpoint.every=0 \
    --set "train.out_dir=$OUT/run_$1" --loss-log "$OUT/$1.loss" "${@:4}"
}
# same_losses A B: the first 5 losses within 2e-3 (relative) and the mean of the last 10 within 2%
same_losses() {
  local a b
  a=$(while read -r s l; do printf '%s %.9g\n' "$s" "$l"; done < "$OUT/$1.loss")
  b=$(while read -r s l; do printf '%s %.9g\n' "$s" "$l"; done < "$OUT/$2.loss")
  paste <(echo "$a") <(echo "$b") | awk -v A="$1" -v B="$2" '
    { n++; x[n] = $2; y[n] = $4; if (n <= 5) { d = x[n] - y[n]; if (d < 0) d = -d; if (d > 2e-3 * x[n]) bad = 1 } }
    END { for (i = n - 9; i <= n; i++) { sa += x[i]; sb += y[i] }
          r = (sa - sb) / sa; if (r < 0) r = -r
          printf "%s vs %s: %d losses, first %.6f vs %.6f, last-10 mean %.6f vs %.6f (%.3f%%)\n", A, B, n, x[1], y[1],
                 sa / 10, sb / 10, 100 * r
          if (n < 10 || bad || r > 0.02) { print "FAILED ] 1 test"; exit 1 } print "PASSED ] 1 test" }'
}
check train_cpu 120 train cpu 1 DEVICE_CPU
check train_cuda 120 train cuda 1 DEVICE_CUDA
check train_cuda_np2 120 train cuda_np2 2 DEVICE_CUDA
check losses_cuda 10 same_losses cpu cuda
check losses_cuda_np2 10 same_losses cuda cuda_np2
# the same with MoE layers (every other layer: 4 experts, top-2, dropless, aux loss) on the device: the CPU run, the
# CUDA run, and expert parallelism over 2 ranks sharing the GPU (the token all-to-all host-staged over MPI)
moe=(--set model.ffn_pattern=FFN_MOE,FFN_DENSE --set model.moe.num_experts=4 --set model.moe.top_k=2
     --set model.moe.d_expert=128 --set model.moe.dropless=true --set model.moe.aux_loss_coef=0.01)
check train_moe_cpu 120 train moe_cpu 1 DEVICE_CPU "${moe[@]}"
check train_moe_cuda 120 train moe_cuda 1 DEVICE_CUDA "${moe[@]}"
check train_moe_cuda_ep2 120 train moe_cuda_ep2 2 DEVICE_CUDA "${moe[@]}" --set parallel.expert_parallel=2
check losses_moe_cuda 10 same_losses moe_cpu moe_cuda
check losses_moe_cuda_ep2 10 same_losses moe_cuda moe_cuda_ep2
# word-expert layers (every other layer: 256 experts of d_expert 16, the 64 most frequent tokens with their own)
# on the device: the tables' rows gathered and updated there; the CPU run, the CUDA run, and expert parallelism over
# 2 ranks sharing the GPU
mowe=(--set model.ffn_pattern=FFN_WORD_EXPERT,FFN_DENSE --set model.word_experts.num_experts=256
      --set model.word_experts.d_expert=16 --set model.word_experts.num_frequent=64)
check train_mowe_cpu 120 train mowe_cpu 1 DEVICE_CPU "${mowe[@]}"
check train_mowe_cuda 120 train mowe_cuda 1 DEVICE_CUDA "${mowe[@]}"
check train_mowe_cuda_ep2 120 train mowe_cuda_ep2 2 DEVICE_CUDA "${mowe[@]}" --set parallel.expert_parallel=2
check losses_mowe_cuda 10 same_losses mowe_cpu mowe_cuda
check losses_mowe_cuda_ep2 10 same_losses mowe_cuda mowe_cuda_ep2
# the README demo's config (shakespeare_moe.pbtxt: every layer MoE, 8 experts top-2 with capacity drops): its first
# 100 losses on CUDA against the CPU's
export config=$src/deploy/configs/shakespeare_moe.pbtxt
check train_demo_cpu 120 train demo_cpu 1 DEVICE_CPU --set train.steps=100
check train_demo_cuda 120 train demo_cuda 1 DEVICE_CUDA --set train.steps=100
check losses_demo_cuda 10 same_losses demo_cpu demo_cuda
unset config
# NCCL at world 1 (the one NCCL layout one GPU allows): the tensor groups of parallel.communicator = "nccl"
check train_cuda_nccl 120 train cuda_nccl 1 DEVICE_CUDA --set parallel.communicator=nccl
check losses_cuda_nccl 10 same_losses cuda cuda_nccl
# the serving engine on CUDA (paged KV cache in device memory; moe generate runs the server's engine): the greedy
# continuation of the CUDA-trained checkpoint equal to the CPU's
same_greedy() {
  for d in CPU CUDA; do
    "$bin/moe" generate --checkpoint "$OUT/run_cuda/checkpoints" --set "model.device=DEVICE_$d" \
      --set generate.temperature=0 --set generate.max_new_tokens=40 --prompt "ROMEO:" --print-ids > "$OUT/greedy_$d.txt" &&
      [[ -s "$OUT/greedy_$d.txt" ]] || { echo "generate on $d failed"; echo "FAILED ] 1 test"; return 1; }
  done
  cat "$OUT/greedy_CUDA.txt"
  if cmp -s "$OUT/greedy_CPU.txt" "$OUT/greedy_CUDA.txt"; then echo "PASSED ] 1 test"; else
    diff "$OUT/greedy_CPU.txt" "$OUT/greedy_CUDA.txt" | head -5; echo "FAILED ] 1 test"; return 1; fi
}
check greedy_cuda 120 same_greedy
# `moe serve` on CUDA (one process; the paged KV cache in device memory) answers a greedy completion over HTTP with
# the CPU server's text: each server queried as a client would (python3's urllib: /health, /v1/models,
# /v1/completions), then drained with SIGTERM (exit 0). (The client is a file: check's `declare -f` copy of a
# function would mangle a here-document inside it.)
cat > "$OUT/serve_client.py" <<'PY'
import json, os, re, sys, time, urllib.request
log, out, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
url = None
for _ in range(900):
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited during start-up")
    m = re.search(r"listening on http://[^:]*:(\d+)", open(log).read())
    if m:
        url = "http://127.0.0.1:" + m.group(1)
        try:
            if urllib.request.urlopen(url + "/health", timeout=5).status == 200:
                break
        except OSError:
            pass
    time.sleep(0.1)
else:
    sys.exit("the server did not become ready in 90 s")
model = json.load(urllib.request.urlopen(url + "/v1/models", timeout=10))["data"][0]["id"]
body = json.dumps({"model": model, "prompt": "ROMEO:", "max_tokens": 40, "temperature": 0}).encode()
req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
text = json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]["text"]
open(out, "w").write(text)
print(repr(text))
PY
same_served() {
  local d pid
  for d in CPU CUDA; do
    "$bin/moe" serve --checkpoint "$OUT/run_cuda/checkpoints" --set "model.device=DEVICE_$d" --set serving.port=0 \
      > "$OUT/serve_$d.log" 2>&1 &
    pid=$!
    if ! python3 "$OUT/serve_client.py" "$OUT/serve_$d.log" "$OUT/served_$d.txt" "$pid"; then
      kill -9 "$pid"; cat "$OUT/serve_$d.log"; echo "FAILED ] 1 test"; return 1
    fi
    kill -TERM "$pid"
    wait "$pid" || { cat "$OUT/serve_$d.log"; echo "the $d server did not drain"; echo "FAILED ] 1 test"; return 1; }
  done
  cmp -s "$OUT/served_CPU.txt" "$OUT/served_CUDA.txt" || { echo "the texts differ"; echo "FAILED ] 1 test"; return 1; }
  echo "PASSED ] 1 test"
}
check serve_cuda 150 same_served
check bench_gpu 240 "$bin/bench_gpu"
# an MoE of d_model 2048, 8 layers, 8 experts top-2 in bf16: training MFU, decode at batch 1 and 64 vs the bound
check bench_model 240 "$bin/bench_model" --threads "$(nproc)"
grep -hE "^(GEMM|GROUPED)" "$OUT/bench_gpu.txt" | sed 's/^/    /' >> "$table" || true
grep -hE "^(train|step|MFU|decode|DECODE)" "$OUT/bench_model.txt" | sed 's/^/    /' >> "$table" || true
echo "=== results"; cat "$table"
