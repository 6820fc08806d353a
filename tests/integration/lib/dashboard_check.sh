#!/usr/bin/env bash
# dashboard_check.sh URL OUT_PNG: opens the coordinator's dashboard at URL (with ?key=<key> when the coordinator has
# an API key) in headless Chromium, lets the page run for DASHBOARD_BUDGET_MS of virtual time, and checks in the DOM
# it leaves that it refreshed from /status at least twice, that its last refresh succeeded and that the sections
# named in DASHBOARD_EXPECT were filled. Writes the screenshot (1400x1000) to OUT_PNG whenever Chromium made one, also
# when a check fails. Exits 0, or non-zero with the reason on stderr. Takes a few seconds (at most ~25 s).
#
# DASHBOARD_EXPECT: comma-separated, of loss (the chart has its line), ranks, events, replicas (the table has rows)
#                   and experts (the heat map has cells). Default: loss,ranks,experts (a training job).
# DASHBOARD_BUDGET_MS: default 4000 (the page refreshes every second). CHROMIUM: the browser (default: chromium).
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 URL OUT_PNG" >&2
  exit 2
fi
url=$1 out=$2
expect=${DASHBOARD_EXPECT:-loss,ranks,experts}
budget=${DASHBOARD_BUDGET_MS:-4000}
fail() { echo "dashboard_check: $*" >&2; exit 1; }

browser=${CHROMIUM:-chromium}
command -v "$browser" > /dev/null || fail "no '$browser' on PATH (Debian: apt-get install chromium)"
[[ $budget =~ ^[0-9]+$ ]] || fail "DASHBOARD_BUDGET_MS must be a number of milliseconds, not '$budget'"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# One run dumps the DOM and takes the screenshot, both once the virtual time budget is spent. --no-sandbox: root in
# a container has no usable sandbox; the profile is a throwaway.
rc=0
timeout 25 "$browser" --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage \
  --user-data-dir="$tmp/profile" --no-first-run --no-default-browser-check --disable-extensions \
  --disable-background-networking --disable-component-update --disable-sync --disable-default-apps --mute-audio \
  --no-proxy-server --password-store=basic --hide-scrollbars --run-all-compositor-stages-before-draw \
  --virtual-time-budget="$budget" --window-size=1400,1000 --screenshot="$tmp/shot.png" --dump-dom "$url" \
  > "$tmp/dom.html" 2> "$tmp/chromium.log" || rc=$?
if [[ -s $tmp/shot.png ]]; then cp "$tmp/shot.png" "$out"; fi
if [[ $rc -ne 0 ]]; then
  tail -n 20 "$tmp/chromium.log" >&2
  [[ $rc -eq 124 ]] && fail "chromium did not finish within 25 s on $url"
  fail "chromium failed (exit $rc) on $url"
fi
if [[ ! -s $tmp/shot.png ]]; then
  why=$(grep -o 'Page load failed: .*' "$tmp/chromium.log" | head -n 1 || true)
  fail "chromium wrote no screenshot of $url${why:+ ($why)}"
fi
[[ $(head -c 4 "$tmp/shot.png" | tail -c 3) == PNG ]] || fail "the screenshot of $url is not a PNG"

dom=$(< "$tmp/dom.html")
[[ $dom == *'id="loss-chart"'* ]] || fail "$url is not the dashboard (no #loss-chart in: ${dom:0:300})"
body=$(grep -o '<body[^>]*>' <<< "$dom" | head -n 1 || true)
updated=$(sed -n 's/.*data-updated="\([0-9]*\)".*/\1/p' <<< "$body")
state=$(sed -n 's/.*data-state="\([a-z]*\)".*/\1/p' <<< "$body")
banner=$(sed -n 's/.*<div id="error" role="alert">\([^<]*\)<.*/\1/p' <<< "$dom" |
  sed 's/&lt;/</g; s/&gt;/>/g; s/&quot;/"/g; s/&#39;/'"'"'/g; s/&amp;/\&/g')
[[ ${updated:-0} -ge 2 ]] || fail "the page refreshed ${updated:-0} times (< 2) in ${budget} ms; state '$state' $banner"
[[ $state == ok ]] || fail "the last refresh failed: $banner"

# count PATTERN: how often PATTERN occurs in the DOM
count() { { grep -o -- "$1" <<< "$dom" || true; } | wc -l; }
IFS=, read -r -a sections <<< "$expect"
for section in "${sections[@]}"; do
  case $section in
    loss) n=$(count '<path class="loss-line" d="M') what="a loss line" ;;
    ranks) n=$(count '<tr class="rank-row"') what="rows in the ranks table" ;;
    events) n=$(count '<tr class="event-row"') what="rows in the events table" ;;
    replicas) n=$(count '<tr class="replica-row"') what="rows in the replicas table" ;;
    experts) n=$(count '<rect class="cell"') what="cells in the expert heat map" ;;
    *) fail "unknown section '$section' in DASHBOARD_EXPECT (loss, ranks, events, replicas, experts)" ;;
  esac
  [[ $n -ge 1 ]] || fail "no $what after $updated refreshes"
done
echo "dashboard_check: $updated refreshes; ${expect//,/, } filled; screenshot $out"
