#!/usr/bin/env bash
# Bad input and failures of `moe serve`, with curl: no or a wrong API key (401, /health open), malformed JSON, a
# wrong type, an unknown field, an unknown model, an empty prompt, max_tokens past the context, a token id outside
# the vocabulary, a body over the limit, an unknown route: each a 4xx with an OpenAI error JSON naming the problem,
# and the server keeps serving; a full queue answers 429 with Retry-After; /health answers 503 "loading" until the
# model is ready; SIGTERM drains (the requests already accepted all finish, later ones are refused, exit 0); bad
# serving configs and a taken port are refused at start with a clear error; a rank killed with SIGKILL takes the
# 2-rank server down with an error.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
source "$(dirname "${BASH_SOURCE[0]}")/lib/serve.bash"
train_tiny_moe "$work/run" 100
ckpt="$work/run/checkpoints"
key="$work/key"
( umask 077; echo "test-key-0123456789" > "$key" )
auth=(-H "Authorization: Bearer test-key-0123456789")
json=(-H "Content-Type: application/json")
start_server "$work/serve.log" "$MOE_BIN" serve --checkpoint "$ckpt" --threads 1 --api-key-file "$key" \
  --set serving.port=0 --set serving.max_body_bytes=4096

# expect CODE PATTERN METHOD PATH [curl args]: the status and a body matching PATTERN (an OpenAI error object for 4xx)
expect() {
  local want=$1 pat=$2; shift 2
  local got
  got=$(http_code "$@")
  [ "$got" = "$want" ] || { cat "$work/body.txt"; echo; fail "$* -> HTTP $got, expected $want"; }
  grep -q -- "$pat" "$work/body.txt" || { cat "$work/body.txt"; echo; fail "$* -> body lacks '$pat'"; }
  if [ "${want:0:1}" = 4 ]; then
    "$VPY" -c 'import json,sys; e=json.load(open(sys.argv[1]))["error"]; assert e["message"] and e["type"], e' \
      "$work/body.txt" || fail "$* -> not an OpenAI error object: $(cat "$work/body.txt")"
  fi
  echo "  $want $(head -c 110 "$work/body.txt")"
}
ok='{"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}'
echo "auth"
expect 200 '"status":"ok"' GET /health
expect 401 "API key" POST /v1/completions "${json[@]}" -d "$ok"
expect 401 "API key" POST /v1/completions "${json[@]}" -H "Authorization: Bearer wrong" -d "$ok"
expect 401 "API key" GET /metrics
grep -qi "www-authenticate: bearer" < <(curl -si "http://127.0.0.1:$port/v1/models") || fail "401 without WWW-Authenticate"
echo "bad requests"
expect 400 "JSON" POST /v1/completions "${auth[@]}" "${json[@]}" -d '{"prompt": "ROMEO:", "max_tokens": '
expect 400 "max_tokens" POST /v1/completions "${auth[@]}" "${json[@]}" -d '{"prompt": "ROMEO:", "max_tokens": "four"}'
expect 400 "temperature" POST /v1/completions "${auth[@]}" "${json[@]}" -d '{"prompt": "ROMEO:", "temperature": -1}'
expect 400 "frobnicate" POST /v1/completions "${auth[@]}" "${json[@]}" -d '{"prompt": "ROMEO:", "frobnicate": 1}'
expect 404 "model_not_found" POST /v1/completions "${auth[@]}" "${json[@]}" -d '{"model": "gpt-9", "prompt": "x"}'
expect 400 "empty" POST /v1/completions "${auth[@]}" "${json[@]}" -d '{"prompt": ""}'
expect 400 "context" POST /v1/completions "${auth[@]}" "${json[@]}" -d '{"prompt": "ROMEO:", "max_tokens": 100000}'
expect 400 "vocabulary" POST /v1/completions "${auth[@]}" "${json[@]}" -d '{"prompt": [1, 2, 999999]}'
expect 400 "messages" POST /v1/chat/completions "${auth[@]}" "${json[@]}" -d '{"messages": []}'
expect 400 "role" POST /v1/chat/completions "${auth[@]}" "${json[@]}" -d '{"messages": [{"role": "god", "content": "x"}]}'
big=$("$VPY" -c 'print("{\"prompt\": \"" + "a" * 10000 + "\"}")')
expect 413 "4096" POST /v1/completions "${auth[@]}" "${json[@]}" -d "$big"
expect 404 "Invalid URL" GET /v2/nothing "${auth[@]}"
expect 405 "not allowed" GET /v1/completions "${auth[@]}"
echo "still serving"
expect 200 '"text_completion"' POST /v1/completions "${auth[@]}" "${json[@]}" -d "$ok"
expect 200 '"status":"ok"' GET /health
stop_server TERM || fail "the server did not drain cleanly"

echo "a full queue: 429 with Retry-After"
start_server "$work/serve_q.log" "$MOE_BIN" serve --checkpoint "$ckpt" --threads 1 --set serving.port=0 \
  --set serving.max_running=1 --set serving.max_queue=1
long='{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0, "stream": true}'
pids=()
for i in 1 2 3 4 5 6; do
  curl -s -o "$work/q$i.txt" -D "$work/h$i.txt" -w '%{http_code}' "${json[@]}" -d "$long" \
    "http://127.0.0.1:$port/v1/completions" > "$work/code$i.txt" &
  pids+=($!)
done
wait "${pids[@]}"
codes=$(for i in 1 2 3 4 5 6; do printf "%s " "$(cat "$work/code$i.txt")"; done)
echo "  6 concurrent requests with room for 1 running + 1 waiting: $codes"
grep -q 429 <<<"$codes" || fail "no 429 from a full queue: $codes"
grep -q 200 <<<"$codes" || fail "no request was served: $codes"
for i in 1 2 3 4 5 6; do
  if [ "$(cat "$work/code$i.txt")" = 429 ]; then
    grep -qi "^retry-after: [0-9]" "$work/h$i.txt" || fail "429 without Retry-After: $(cat "$work/h$i.txt")"
    grep -q "rate_limit" "$work/q$i.txt" || fail "429 body: $(cat "$work/q$i.txt")"
  fi
done
expect 200 '"text_completion"' POST /v1/completions "${json[@]}" -d "$ok"
stop_server TERM || fail "the server did not drain cleanly"

echo "loading: /health is 503 until the model (and a 2 GiB KV cache) is ready, then 200"
: > "$work/serve_l.log"  # (exists before the first read: the background job opens it only once it runs)
"$MOE_BIN" serve --checkpoint "$ckpt" --threads 1 --set serving.port=0 --set serving.kv_cache_bytes=2147483648 \
  > "$work/serve_l.log" 2>&1 &
server_pid=$!
codes=""
for _ in $(seq 1 600); do
  port=$(sed -n 's|.*listening on http://[^:]*:\([0-9]*\).*|\1|p' "$work/serve_l.log" | head -n 1)
  if [ -n "$port" ]; then
    c=$(http_code GET /health)
    [ "$c" = 503 ] && grep -q loading "$work/body.txt" && codes="$codes 503"
    [ "$c" = 200 ] && { codes="$codes 200"; break; }
  fi
  sleep 0.01
done
echo "  /health:$(tr ' ' '\n' <<<"$codes" | uniq -c | tr -s ' \n' ' ')"
grep -q 503 <<<"$codes" && grep -q 200 <<<"$codes" || fail "no 503 while loading, then 200: $codes"
stop_server TERM || fail "the server did not drain cleanly"

echo "drain: SIGTERM with 40 requests accepted (one running at a time): all finish, exit 0"
start_server "$work/serve_d.log" "$MOE_BIN" serve --checkpoint "$ckpt" --threads 1 --set serving.port=0 \
  --set serving.max_running=1 --set serving.max_queue=64
pids=()
for i in $(seq 1 40); do
  curl -s -o "$work/d$i.json" -w '%{http_code}' "${json[@]}" \
    -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0, "ignore_eos": true}' \
    "http://127.0.0.1:$port/v1/completions" > "$work/dcode$i.txt" &
  pids+=($!)
done
for _ in $(seq 1 500); do  # SIGTERM once a first request has finished (the others are running or queued)
  generated=$(curl -s "http://127.0.0.1:$port/metrics" | sed -n 's/^moe_generation_tokens_total //p')
  [ "${generated%.*}" -ge 50 ] 2>/dev/null && break
  sleep 0.01
done
waiting=$(curl -s "http://127.0.0.1:$port/metrics" | sed -n 's/^moe_requests_waiting //p')
drain_pid=$server_pid
kill -TERM "$drain_pid"
sleep 0.05
late=$(curl -s -o /dev/null -w '%{http_code}' "${json[@]}" -d "$ok" "http://127.0.0.1:$port/v1/completions" || true)
wait "${pids[@]}"
rc=0
wait "$drain_pid" || rc=$?
server_pid=""
[ $rc -eq 0 ] || { tail "$work/serve_d.log"; fail "the drained server exited with $rc"; }
done_ok=0
for i in $(seq 1 40); do
  [ "$(cat "$work/dcode$i.txt")" = 200 ] && grep -q '"completion_tokens":50' "$work/d$i.json" && done_ok=$((done_ok + 1))
done
echo "  $waiting waiting at SIGTERM; $done_ok of 40 finished with 50 tokens; a request after SIGTERM: ${late:-refused}"
[ "$done_ok" = 40 ] || fail "only $done_ok of the 40 accepted requests finished during the drain"
[ "$late" != 200 ] || fail "a request after SIGTERM was served"
grep -q "draining" "$work/serve_d.log" || fail "no drain in the log"

echo "refused at start"
expect_fail "serving.max_batch_tokens" "$MOE_BIN" serve --checkpoint "$ckpt" --set serving.max_batch_tokens=0
expect_fail "serving.kv_cache_bytes" "$MOE_BIN" serve --checkpoint "$ckpt" --set serving.kv_cache_bytes=1000
expect_fail "no-such-key" "$MOE_BIN" serve --checkpoint "$ckpt" --api-key-file "$work/no-such-key"
expect_fail "not divisible by 3" mpiexec -n 3 "$MOE_BIN" serve --checkpoint "$ckpt" --threads 1
"$VPY" -c 'import socket,time; s=socket.socket(); s.bind(("127.0.0.1",0)); s.listen(); open("'"$work"'/port","w").write(str(s.getsockname()[1])); time.sleep(30)' &
holder=$!
for _ in $(seq 1 50); do [ -s "$work/port" ] && break; sleep 0.1; done
expect_fail "$(cat "$work/port")" "$MOE_BIN" serve --checkpoint "$ckpt" --set serving.port="$(cat "$work/port")"
kill $holder 2>/dev/null || true
grep -q "" "$work/out.txt" && echo "  taken port: $(grep -m1 error "$work/out.txt")"

echo "a rank killed: the 2-rank server goes down with an error"
start_server "$work/serve2.log" mpiexec -n 2 "$MOE_BIN" serve --checkpoint "$ckpt" --threads 1 --set serving.port=0
launcher=$server_pid
# a rank of THIS server: a child of its mpiexec (other tests' servers may run at the same time under ctest -j)
victim=$(pgrep -P "$launcher" -f "$MOE_BIN serve" | tail -n 1)
[ -n "$victim" ] || fail "no rank process found"
kill -KILL "$victim"
rc=0
for _ in $(seq 1 300); do kill -0 "$launcher" 2>/dev/null || break; sleep 0.1; done
kill -0 "$launcher" 2>/dev/null && fail "the server is still up 30 s after a rank died"
wait "$launcher" || rc=$?
server_pid=""
[ $rc -ne 0 ] || fail "mpiexec exited 0 after a rank was killed"
grep -qiE "signal 9|killed|error" "$work/serve2.log" || { cat "$work/serve2.log"; fail "no error reported"; }
echo "  mpiexec exited $rc: $(grep -m1 -iE "signal 9|killed|error" "$work/serve2.log")"
curl -s -o /dev/null "http://127.0.0.1:$port/health" && fail "the port still answers"
echo PASS
