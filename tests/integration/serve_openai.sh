#!/usr/bin/env bash
# `moe serve` with real clients, on 1 rank and on 2 ranks (the experts sharded over them): greedy completions
# (plain and streamed, through the official openai client) equal `moe generate`'s tokens for the same prompt and
# checkpoint; chat completions through the template; 16 concurrent requests give their solo tokens (batch
# invariance); curl sees the raw SSE frames ending in [DONE]; /metrics parses with prometheus_client and counts
# what happened; SparQ's extension fields pass through (full coverage gives the same text); a client leaving
# mid-stream frees its KV blocks; SIGTERM (one process) or SIGUSR1 to mpiexec drains and exits 0.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
source "$(dirname "${BASH_SOURCE[0]}")/lib/serve.bash"
checks="$MOE_SOURCE_DIR/tests/integration/lib/serve_checks.py"
train_tiny_moe "$work/run" 300
ckpt="$work/run/checkpoints"
key="$work/key"
( umask 077; echo "test-key-0123456789" > "$key" )
prompt="ROMEO:"
"$MOE_BIN" generate --checkpoint "$ckpt" --prompt "$prompt" --threads 1 --set generate.temperature=0 \
  --set generate.max_new_tokens=24 > "$work/generate.txt"
echo "generate: $(head -c 80 "$work/generate.txt" | tr '\n' '|')"

for ranks in 1 2; do
  echo "== $ranks rank(s)"
  launch=(); sig=TERM  # one process: SIGTERM drains it; under mpiexec: SIGUSR1 to mpiexec (forwarded to the ranks)
  [ $ranks -gt 1 ] && { launch=(mpiexec -n $ranks); sig=USR1; }
  start_server "$work/serve$ranks.log" "${launch[@]}" "$MOE_BIN" serve --checkpoint "$ckpt" --threads 1 \
    --api-key-file "$key" --set serving.port=0
  grep -q "experts over $ranks rank" "$work/serve$ranks.log" || { cat "$work/serve$ranks.log"; fail "not on $ranks ranks"; }
  "$VPY" "$checks" greedy "$port" "$prompt" "$work/generate.txt" 24
  "$VPY" "$checks" chat "$port"
  "$VPY" "$checks" concurrent "$port" 16 12
  "$VPY" "$checks" sparq "$port"
  # the raw frames of a stream
  curl -sN -H "Authorization: Bearer test-key-0123456789" -H "Content-Type: application/json" \
    -d '{"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0, "stream": true}' \
    "http://127.0.0.1:$port/v1/completions" > "$work/sse.txt"
  test "$(grep -c '^data: {' "$work/sse.txt")" -ge 5 || { cat "$work/sse.txt"; fail "fewer than 5 SSE data events"; }
  test "$(grep -v '^$' "$work/sse.txt" | tail -n 1)" = "data: [DONE]" || { cat "$work/sse.txt"; fail "no final [DONE]"; }
  "$VPY" "$checks" disconnect "$port"
  "$VPY" "$checks" metrics "$port"
  rc=0
  stop_server $sig || rc=$?
  test $rc -eq 0 || { cat "$work/serve$ranks.log"; fail "the drained server exited with $rc"; }
  grep -q "draining" "$work/serve$ranks.log" || { cat "$work/serve$ranks.log"; fail "no drain in the log"; }
done
echo PASS
