# Helpers of the coordinator tests (sourced after common.bash): start a `moe coordinator`, read its status through
# the CLI (`moe coordinator status --json`), wait for conditions on it, and check that no process is left behind.

coord_pid=""
# on exit (a failed check included): the coordinator stopped (SIGTERM: it stops its groups), then any moe process
# (and its launcher) of this test's scratch directory killed
coord_cleanup() {
  if [ -n "$coord_pid" ] && kill -0 "$coord_pid" 2>/dev/null; then
    kill -TERM "$coord_pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$coord_pid" 2>/dev/null || break; sleep 0.2; done
  fi
  pkill -9 -f -- "$MOE_BIN (train|serve|coordinator) .*$work/" 2>/dev/null || true
}
trap 'coord_cleanup; if type stop_server > /dev/null 2>&1; then stop_server || true; fi; rm -rf "$work"' EXIT

# coord_start JOBDIR ARGS...: starts `moe coordinator ARGS --job-dir JOBDIR` in the background (its output in
# JOBDIR.out); sets coord_pid and waits (60 s) until its endpoint.json is there
coord_start() {
  local jd=$1; shift
  mkdir -p "$(dirname "$jd")"
  rm -f "$jd/endpoint.json"
  "$MOE_BIN" coordinator "$@" --job-dir "$jd" > "$jd.out" 2>&1 &
  coord_pid=$!
  local deadline=$(( $(date +%s) + 60 ))
  until [ -s "$jd/endpoint.json" ]; do
    kill -0 "$coord_pid" 2>/dev/null || { cat "$jd.out"; fail "the coordinator exited at start"; }
    [ "$(date +%s)" -lt "$deadline" ] || fail "no endpoint.json in $jd after 60 s"
    sleep 0.1
  done
}

# status JOBDIR: the status document (JSON) on stdout
status() { "$MOE_BIN" coordinator status --job-dir "$1" --json; }

# st JOBDIR PYEXPR: evaluates PYEXPR with `s` bound to the status document (and `ranks`, `events`, `failures`)
st() {
  status "$1" | "$PY" -c '
import json, sys
s = json.load(sys.stdin)
ranks, events = s["ranks"], s["events"]
failures = [e for e in events if e["kind"] == "failure"]
print(eval(sys.argv[1]))' "$2"
}

# wait_status JOBDIR PYEXPR [SECONDS] [WHAT]: until PYEXPR is True (default 90 s)
wait_status() {
  local jd=$1 expr=$2 limit=${3:-90} what=${4:-$2}
  local deadline=$(( $(date +%s) + limit ))
  until [ "$(st "$jd" "$expr" 2>/dev/null)" = "True" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      "$MOE_BIN" coordinator status --job-dir "$jd" || true
      tail -n 30 "$jd.out"
      fail "waited ${limit} s for: $what"
    fi
    sleep 0.2
  done
}

# running JOBDIR EPOCH WORLD: the expression "group of epoch EPOCH running on WORLD ranks, each past its first step"
running() {
  echo "s['epoch'] == $2 and s['job']['state'] == 'running' and len(ranks) == $3 and all(r['step'] > 0 for r in ranks)"
}

# now_s: the time in seconds (fractional), as the events' times
now_s() { date +%s.%N; }

# no_orphans PATTERN: no process whose command line matches PATTERN is left (after 5 s at most)
no_orphans() {
  local i
  for i in $(seq 50); do
    pgrep -f -- "$1" > /dev/null || return 0
    sleep 0.1
  done
  ps -ef | grep -- "$1" | grep -v grep
  fail "processes matching '$1' were left behind"
}

# coord_wait RC: waits for the coordinator to exit (300 s at most) with RC
coord_wait() {
  local i
  for i in $(seq 3000); do
    kill -0 "$coord_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$coord_pid" 2>/dev/null && { kill -9 "$coord_pid"; fail "the coordinator did not exit"; }
  set +e; wait "$coord_pid"; local rc=$?; set -e
  [ "$rc" -eq "$1" ] || fail "the coordinator exited with $rc, expected $1"
}
