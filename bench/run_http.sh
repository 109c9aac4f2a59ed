#!/usr/bin/env bash
# run_http.sh: the HTTP figure of docs/BENCHMARKS.md, in one run.
#
#   bench/run_http.sh [BUILD_DIR=build-rel] [connections=64] [duration=10s]
#
# Starts, on loopback ports of its own: a mosquitto, taratxtd (fresh data
# directory) with one tt-devsim device online, and tt-canned202; then runs
# bench/http_load.sh against each, three times, and prints the figures.
# Stops everything it started. Needs a Release build of taratxtd, tt-devsim
# and tt-canned202 in BUILD_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
B="${1:-build-rel}"
CONNS="${2:-64}"
DUR="${3:-10s}"
for t in taratxtd bench/tt-devsim bench/tt-canned202; do
    [ -x "$B/$t" ] || { echo "missing $B/$t: cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release && cmake --build $B" >&2; exit 2; }
done
W=$(mktemp -d /tmp/tt-bench-XXXXXX)
MQ=$((20000 + RANDOM % 10000)); HP=$((MQ + 1)); CP=$((MQ + 2))
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
mosquitto -p "$MQ" >"$W/mosquitto.log" 2>&1 & pids+=($!)
"$B/taratxtd" serve --data "$W/data" --listen "127.0.0.1:$HP" --mqtt-url "tcp://127.0.0.1:$MQ" --log-level warn \
    >"$W/taratxtd.out" 2>"$W/taratxtd.log" & pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$HP/healthz" >/dev/null && break; sleep 0.1; done
TOKEN=$(cat "$W/data/initial-token")
curl -sf -X POST "http://127.0.0.1:$HP/api/v1/devices" -H "Authorization: Bearer $TOKEN" \
    -d '{"name":"bench","rate_per_minute":600}' >"$W/device.json"
"$B/bench/tt-devsim" --credentials "$W/device.json" --quiet >"$W/devsim.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$HP/api/v1/devices/1" -H "Authorization: Bearer $TOKEN" | grep -q '"online":true' && break
    sleep 0.1
done
"$B/bench/tt-canned202" --listen "127.0.0.1:$CP" --threads 192 >"$W/canned.log" 2>&1 & pids+=($!)
sleep 0.5
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'); wrk -t2 -c$CONNS -d$DUR"
for run in 1 2 3; do
    out=$(bench/http_load.sh "http://127.0.0.1:$HP" "$TOKEN" "$CONNS" "$DUR" 2 2>&1)
    t=$(echo "$out" | sed -n 's/^requests\/s: //p')
    bad=$(echo "$out" | sed -n 's/^non-2xx: //p')
    c=$(bench/http_load.sh "http://127.0.0.1:$CP" x "$CONNS" "$DUR" 2 2>&1 | sed -n 's/^requests\/s: //p')
    echo "run $run: taratxtd $t req/s (202, fsync'd; non-2xx: ${bad:-0})   canned-202 civetweb $c req/s"
done
# The group commit behind those figures: requests per fsync and time per commit.
curl -s "http://127.0.0.1:$HP/metrics" | awk '
    /^taratxt_store_commit_batch_size_sum/ {bs=$2} /^taratxt_store_commit_batch_size_count/ {bc=$2}
    /^taratxt_store_commit_seconds_sum/ {ss=$2}
    END { if (bc > 0) printf "store: %d commits, %.0f keys per commit (about four per message), %.2f ms per commit (fsync included)\n", bc, bs/bc, 1000*ss/bc }'
