# Shared set-up of the serving tests (sourced after common.bash): a tiny MoE checkpoint trained here, and a
# `moe serve` process (or an mpirun of it) started on an ephemeral port, waited for until /health says ready, and
# stopped on exit.
VPY=${MOE_VENV_PYTHON:?run through ctest}
[ -x "$VPY" ] || fail "no $VPY: run deploy/setup.sh (it creates the project's .venv with the test clients)"
export HF_HUB_OFFLINE=1 NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
server_pid=""
trap 'stop_server; rm -rf "$work"' EXIT

# train_tiny_moe DIR [STEPS]: the tiny test config as a 4-expert top-2 MoE, trained on 2 expert-parallel ranks
train_tiny_moe() {
  local dir=$1 steps=${2:-30}
  mpiexec -n 2 "$MOE_BIN" train --config "$cfg" --set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" \
    --set train.out_dir="$dir" --set train.steps="$steps" --set train.eval_every=0 --set checkpoint.every=0 \
    --set model.ffn_pattern=FFN_MOE --set model.moe.num_experts=4 --set model.moe.top_k=2 \
    --set model.moe.d_expert=80 --set parallel.expert_parallel=2 --threads 1 > "$work/train_$(basename "$dir").log" 2>&1 \
    || { cat "$work/train_$(basename "$dir").log"; fail "training the tiny MoE failed"; }
}

# start_server LOG CMD...: runs CMD (a `moe serve ... --set serving.port=0` command line) in the background and
# waits until its log names the port and /health answers 200; sets server_pid and port
start_server() {
  local log=$1; shift
  : > "$log"  # (exists before the first read below: the background job opens it only once it runs)
  "$@" > "$log" 2>&1 &
  server_pid=$!
  port=""
  for _ in $(seq 1 600); do
    kill -0 "$server_pid" 2>/dev/null || { cat "$log"; fail "the server exited during start-up"; }
    port=$(sed -n 's|.*listening on http://[^:]*:\([0-9]*\).*|\1|p' "$log" | head -n 1)
    if [ -n "$port" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ]; then
      return 0
    fi
    sleep 0.1
  done
  cat "$log"; fail "the server did not become ready within 60 s"
}

# stop_server [SIGNAL]: SIGNAL (default TERM: a drain; USR1 for mpiexec, which forwards it), then SIGKILL after 20 s;
# returns the server's exit code
stop_server() {
  [ -n "$server_pid" ] || return 0
  local pid=$server_pid rc=0
  server_pid=""
  kill -"${1:-TERM}" "$pid" 2>/dev/null || true
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" || rc=$?
  return $rc
}

# http_code METHOD PATH [curl args...]: prints the status code (body in $work/body.txt)
http_code() {
  local method=$1 path=$2; shift 2
  curl -s -o "$work/body.txt" -w '%{http_code}' -X "$method" "http://127.0.0.1:$port$path" "$@"
}
