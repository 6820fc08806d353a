#!/usr/bin/env bash
# The coordinator's control plane and its views, against a running training job:
#  - peers without the job's secret (a wrong secret, garbage bytes, a 2 GB length prefix after a good handshake,
#    a worker of another job) are refused and logged; the job keeps running, unaffected;
#  - `moe coordinator checkpoint` makes every rank checkpoint at its next step boundary; `status` prints the job;
#  - /status and the dashboard need the API key (Bearer or ?key=); headless Chromium renders the dashboard (loss
#    curve, ranks, events, expert heat map) from a live job; its screenshot is kept in MOE_ARTIFACT_DIR;
#  - kill -9 the coordinator: the workers checkpoint and exit within seconds (nothing left behind); a new
#    coordinator of the same job dir continues the epochs and the run from `latest`, to train.steps;
#  - a bad config is refused before anything runs; slots that allow no world >= --min-world are refused; launches
#    that keep failing back off and end in a crash-loop error (exit 1) naming why they failed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
source "$(dirname "${BASH_SOURCE[0]}")/lib/coordinator.bash"
art=${MOE_ARTIFACT_DIR:-$work}
mkdir -p "$art"
steps=2500
args=(--set data.train_file="$MOE_DATA_DIR/tinyshakespeare.txt" --set train.steps=$steps --set train.log_every=20
      --set train.eval_every=0 --set checkpoint.every=0 --set model.ffn_pattern=FFN_MOE --set model.moe.num_experts=4
      --set model.moe.d_expert=64 --set model.d_model=96 --set data.batch_size=16 --set parallel.expert_parallel=2)
printf 'dashboard-key-%s\n' "$$" > "$work/key"
chmod 600 "$work/key"
key=$(head -n 1 "$work/key")
jd=$work/job
# a bad config is refused before anything is launched
expect_fail "model.n_heads" "$MOE_BIN" coordinator run --config "$cfg" "${args[@]}" --set model.n_heads=3 \
  --job-dir "$work/badjob"
[ ! -e "$work/badjob" ] || fail "the refused job left $work/badjob behind"
# the slots from a hostfile (mpirun --hostfile); at least 2 ranks
echo "localhost slots=2" > "$work/hostfile"
coord_start "$jd" run --config "$cfg" "${args[@]}" --set train.out_dir="$work/run" --hostfile "$work/hostfile" \
  --min-world 2 --api-key-file "$work/key"
wait_status "$jd" "$(running "$jd" 1 2)" 90 "epoch 1 running"
expect_fail "allow no world size of at least 2" "$MOE_BIN" coordinator slots 1 --job-dir "$jd"
control=$(sed -n 's/.*"control":"\([^"]*\)".*/\1/p' "$jd/endpoint.json")
http=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$jd/endpoint.json")

# ---- peers without the secret ----
"$PY" - "${control##*:}" "$jd/secret" <<'PY'
import hashlib, hmac, socket, struct, sys, time
port, secret = int(sys.argv[1]), open(sys.argv[2]).readline().strip().encode()
MAGIC = b"MOE-CONTROL/1"

def connect():
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = b""
    while len(greeting) < len(MAGIC) + 32:
        greeting += s.recv(64)
    assert greeting.startswith(MAGIC), greeting
    return s, greeting[len(MAGIC):]

def closed(s):  # the coordinator closes the connection (EOF or reset) within 10 s
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True

def proof(key, server_nonce, client_nonce):
    return hmac.new(key, b"client" + server_nonce + client_nonce, hashlib.sha256).digest()

cn = b"n" * 32
s, sn = connect()                      # a wrong secret
s.sendall(cn + proof(b"not-the-secret", sn, cn))
assert closed(s), "a wrong secret was not refused"
s, sn = connect()                      # garbage bytes
s.sendall(b"\x00\xffGET / HTTP/1.1\r\n" * 8)
assert closed(s), "garbage was not refused"
s, sn = connect()                      # the right secret, then a 2 GB length prefix
s.sendall(cn + proof(secret, sn, cn))
server = s.recv(32)
assert server == hmac.new(secret, b"server" + cn + sn, hashlib.sha256).digest(), "bad server proof"
s.sendall(struct.pack(">I", 2 << 30) + b"x" * 1024)
assert closed(s), "a 2 GB length prefix was not refused"
print("refused: wrong secret, garbage, 2 GB frame")
PY
# a worker of another job: its secret does not prove this job's
expect_fail "refused the job secret" env MOE_COORDINATOR="$control" MOE_JOB_SECRET=another-jobs-secret MOE_EPOCH=1 \
  "$MOE_BIN" train --config "$cfg" "${args[@]}" --set train.out_dir="$work/intruder" --set parallel.expert_parallel=1 --threads 1
n=$(grep -c "control: dropped the connection" "$jd.out" || true)
[ "$n" -ge 4 ] || { cat "$jd.out"; fail "$n refusals logged, expected 4"; }
# the job did not notice
[ "$(st "$jd" "s['epoch'] == 1 and not failures and len(ranks) == 2 and all(r['health'] == 'ok' for r in ranks)")" = True ] \
  || { status "$jd"; fail "the refused peers disturbed the job"; }

# ---- checkpoint on request, and the status text ----
"$MOE_BIN" coordinator checkpoint --job-dir "$jd" | grep -q "checkpoint" || fail "checkpoint request not accepted"
for i in $(seq 100); do [ -f "$work/run/checkpoints/latest" ] && break; sleep 0.1; done
[ -f "$work/run/checkpoints/latest" ] || fail "no checkpoint after 'moe coordinator checkpoint' (checkpoint.every=0)"
asked=$(sed 's/step_//' "$work/run/checkpoints/latest")
echo "checkpoint on request at step $asked"
has "epoch 1" "$MOE_BIN" coordinator status --job-dir "$jd" || fail "status does not show the epoch"
grep -q "PHASE_TRAINING" "$work/has.txt" && grep -q "events:" "$work/has.txt" || { cat "$work/has.txt"; fail "status text"; }

# ---- /status and the dashboard ----
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$http/status")
[ "$code" = 401 ] || fail "/status without the key answered $code"
curl -sf -H "Authorization: Bearer $key" "http://$http/status" | "$PY" -c '
import json, sys
s = json.load(sys.stdin)
assert s["job"]["kind"] == "train" and s["world"]["size"] == 2, s["world"]
assert len(s["ranks"]) == 2 and s["loss_curve"], "no ranks or loss curve"
assert s["expert_load"]["experts"] == 4 and s["expert_load"]["tokens"], s["expert_load"]' || fail "/status document"
DASHBOARD_EXPECT=loss,ranks,events,experts bash "$MOE_SOURCE_DIR/tests/integration/lib/dashboard_check.sh" \
  "http://$http/?key=$key" "$art/coordinator_dashboard.png"

# ---- the coordinator dies: the workers stop cleanly, a new coordinator resumes ----
pids=$(st "$jd" "' '.join(str(r['pid']) for r in ranks)")
kill -9 "$coord_pid"
t0=$(date +%s%N)
for p in $pids; do
  while kill -0 "$p" 2>/dev/null; do
    [ $(( ($(date +%s%N) - t0) / 1000000 )) -lt 10000 ] || fail "rank pid $p still running 10 s after the coordinator died"
    sleep 0.05
  done
done
echo "the workers exited $(( ($(date +%s%N) - t0) / 1000000 )) ms after the coordinator died"
no_orphans "train.out_dir=$work/run"
lost=$(sed 's/step_//' "$work/run/checkpoints/latest")
[ "$lost" -gt "$asked" ] || fail "no checkpoint when the coordinator was lost (latest $lost, asked $asked)"
grep -q "lost the coordinator" "$jd/logs/epoch_1.log" || fail "the ranks did not report losing the coordinator"

coord_start "$jd" run --config "$cfg" "${args[@]}" --set train.out_dir="$work/run" --hostfile "$work/hostfile" \
  --min-world 2 --api-key-file "$work/key"
wait_status "$jd" "$(running "$jd" 2 2)" 90 "epoch 2 running under the new coordinator"
grep -q "resumed from .*step_$lost at step $lost" "$jd/logs/epoch_2.log" || { cat "$jd/logs/epoch_2.log"; fail "not resumed from step $lost"; }
coord_wait 0
[ "$(cat "$work/run/checkpoints/latest")" = "step_$steps" ] || fail "the run did not reach step $steps"
no_orphans "train.out_dir=$work/run"

# ---- a crash loop: every launch fails (latest names a checkpoint that is not there); the coordinator gives up ----
echo "step_999999" > "$work/run/checkpoints/latest"
coord_start "$jd" run --config "$cfg" "${args[@]}" --set train.out_dir="$work/run" --set train.steps=$((steps * 2)) \
  --slots 2 --max-restarts 3
coord_wait 1
grep -q "giving up after 3 launches without progress" "$jd.out" || { cat "$jd.out"; fail "no crash-loop message"; }
grep -q "relaunching in 2 s (backoff)" "$jd.out" || fail "no backoff between the failed launches"
grep -q '"kind":"error","cause":"3 launches in a row made no progress (a crash loop): giving up"' "$jd/events.jsonl" \
  || fail "no crash-loop event"
grep -q "not a complete checkpoint" "$jd/events.jsonl" || fail "the failure events do not say why the launches failed"
no_orphans "train.out_dir=$work/run"
echo "OK"
