#!/usr/bin/env bash
# Fuzzing `moe serve` against its own OpenAPI description (GET /openapi.json) with schemathesis: a few hundred
# generated requests (valid and invalid bodies: --data-generation-method all; every route, with the API key), every check on (no 5xx, status codes
# and content types as documented, responses matching their schemas). Afterwards the server still answers /health
# and a valid completion, and drains cleanly.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"
source "$(dirname "${BASH_SOURCE[0]}")/lib/serve.bash"
train_tiny_moe "$work/run" 30
key="$work/key"
( umask 077; echo "test-key-0123456789" > "$key" )
start_server "$work/serve.log" "$MOE_BIN" serve --checkpoint "$work/run/checkpoints" --threads 1 --api-key-file "$key" \
  --set serving.port=0
schemathesis=$(dirname "$VPY")/schemathesis
# deterministic example generation (seeded, derandomized); the cassette records every request and response
"$schemathesis" run "http://127.0.0.1:$port/openapi.json" -H "Authorization: Bearer test-key-0123456789" \
  --checks all --data-generation-method all --hypothesis-max-examples 100 --hypothesis-seed 1 --hypothesis-derandomize --request-timeout 60000 \
  --cassette-path "$work/cassette.yaml" > "$work/fuzz.txt" 2>&1 || { cat "$work/fuzz.txt"; fail "schemathesis found failures"; }
tail -n 5 "$work/fuzz.txt"
requests=$(grep -c "^- id:" "$work/cassette.yaml" || true)
echo "schemathesis sent $requests requests"
[ "$requests" -ge 200 ] || fail "only $requests fuzzing requests (wanted a few hundred)"
code=$(http_code GET /health)
[ "$code" = 200 ] || fail "/health answers $code after the fuzzing"
code=$(http_code POST /v1/completions -H "Authorization: Bearer test-key-0123456789" -H "Content-Type: application/json" \
  -d '{"prompt": "ROMEO:", "max_tokens": 4}')
[ "$code" = 200 ] || { cat "$work/body.txt"; fail "a valid completion answers $code after the fuzzing"; }
stop_server TERM || fail "the server did not drain cleanly after the fuzzing"
echo PASS
