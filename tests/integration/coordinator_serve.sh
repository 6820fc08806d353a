#!/usr/bin/env bash
# Serving under `moe coordinator serve`: two replicas of a 2-rank `moe serve` (experts sharded over each replica's
# ranks) behind the coordinator's one OpenAI-compatible endpoint. While the official openai client keeps sending
# completions and chat streams, kill -9 a rank of one replica: no completion fails (each is retried on the other
# replica), no stream fails before its first token, the dead replica is restarted and serves again. The dashboard
# shows the replicas; `moe coordinator shutdown` drains them and the coordinator exits 0, leaving no process.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
source "$(dirname "${BASH_SOURCE[0]}")/lib/serve.bash"
source "$(dirname "${BASH_SOURCE[0]}")/lib/coordinator.bash"
checks="$MOE_SOURCE_DIR/tests/integration/lib/serve_checks.py"
art=${MOE_ARTIFACT_DIR:-$work}
mkdir -p "$art"
train_tiny_moe "$work/run" 30
ckpt="$work/run/checkpoints"
( umask 077; echo "test-key-0123456789" > "$work/key" )
jd=$work/job
coord_start "$jd" serve --checkpoint "$ckpt" --replicas 2 --ranks-per-replica 2 --api-key-file "$work/key"
ready="len(s['replicas']) == 2 and all(r['health'] == 'ok' for r in s['replicas'])"
wait_status "$jd" "$ready" 90 "both replicas serving"
api=$(sed -n 's/.*"api":"[^"]*:\([0-9]*\)".*/\1/p' "$jd/endpoint.json")
http=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$jd/endpoint.json")
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$api/v1/models")
[ "$code" = 401 ] || fail "the API answered $code without the key (the replicas check it)"

# load, then a replica's rank killed in the middle of it
"$VPY" "$checks" failover "$api" "$work/started" "$work/stop" > "$work/failover.txt" 2>&1 &
load=$!
for i in $(seq 300); do [ -f "$work/started" ] && break; sleep 0.1; done
[ -f "$work/started" ] || { cat "$work/failover.txt"; fail "no completion succeeded through the endpoint"; }
victim=$(st "$jd" "[r['pid'] for r in ranks if r['replica'] == 0 and r['rank'] == $((RANDOM % 2))][0]")
echo "kill -9 pid $victim (replica 0)"
kill -9 "$victim"
wait_status "$jd" "any(e['kind'] == 'failure' and e.get('replica') == 0 for e in events)" 10 "replica 0's failure"
wait_status "$jd" "[r['epoch'] for r in s['replicas']] == [2, 1] and $ready" 90 "replica 0 restarted"
sleep 3  # requests on both replicas again
touch "$work/stop"
wait "$load" || { cat "$work/failover.txt"; fail "requests failed while a replica was killed"; }
cat "$work/failover.txt"
st "$jd" "json.dumps([e for e in failures if e.get('replica') == 0][0])"

DASHBOARD_EXPECT=ranks,replicas,events bash "$MOE_SOURCE_DIR/tests/integration/lib/dashboard_check.sh" \
  "http://$http/?key=test-key-0123456789" "$art/coordinator_serve_dashboard.png"

"$MOE_BIN" coordinator shutdown --job-dir "$jd" | grep -q "stopping" || fail "shutdown not accepted"
coord_wait 0
no_orphans "serve --checkpoint $ckpt"
grep -q '"kind":"finish"' "$jd/events.jsonl" || fail "no finish event"
echo "OK"
