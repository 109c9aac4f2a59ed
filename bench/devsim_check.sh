#!/bin/sh
# devsim_check.sh: checks tt-devsim against a real mosquitto, with
# mosquitto_pub/mosquitto_sub playing the server. Not part of ctest (the
# integration suite covers the device side through the server); run it by
# hand after changing tt-devsim:
#
#   bench/devsim_check.sh [path/to/tt-devsim]     (default build-bench/bench/tt-devsim)
#
# Prints one "ok" line per check and exits non-zero at the first failure,
# leaving its scratch directory for a look.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
devsim=${1:-$here/../build-bench/bench/tt-devsim}
[ -x "$devsim" ] || { echo "no tt-devsim at $devsim" >&2; exit 2; }
for tool in mosquitto mosquitto_pub mosquitto_sub; do
    command -v $tool >/dev/null 2>&1 || [ -x /usr/sbin/$tool ] || { echo "$tool not found" >&2; exit 2; }
done
PATH=$PATH:/usr/sbin

dir=$(mktemp -d /tmp/tt-devsim-check.XXXXXX)
pids=""
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${failed:-0}" = 0 ]; then rm -rf "$dir"; fi
}
trap cleanup EXIT

fail() {
    failed=1
    echo "FAIL: $*" >&2
    echo "scratch: $dir" >&2
    exit 1
}

# Waits up to $3 seconds (default 5) for pattern $2 (grep -E) in file $1.
wait_for() {
    n=$(( ${3:-5} * 10 ))
    while [ $n -gt 0 ]; do
        grep -Eq -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
        n=$((n - 1))
    done
    return 1
}

# Waits up to 5 s for at least $3 lines of file $1 holding fixed string $2.
wait_count() {
    n=50
    while [ $n -gt 0 ]; do
        [ "$(grep -cF -- "$2" "$1" 2>/dev/null || true)" -ge "$3" ] && return 0
        sleep 0.1
        n=$((n - 1))
    done
    return 1
}

# mosquitto on a free loopback port below the ephemeral range (a few tries:
# another process may take the port between the check and the bind).
start_broker() {
    port=$(( 10000 + $(od -An -N2 -tu2 /dev/urandom) % 20000 ))
    if ss -tan 2>/dev/null | grep -q ":$port "; then return 1; fi
    cat > "$dir/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
log_dest stdout
log_type all
EOF
    # The log goes through stdout: mosquitto started as root drops to its
    # own user, which could not write into our private scratch directory.
    # stdbuf: line-buffered, so the checks below see each line at once.
    stdbuf -oL mosquitto -c "$dir/mosquitto.conf" > "$dir/mosquitto.log" 2>&1 &
    broker=$!
    if wait_for "$dir/mosquitto.log" "running" 3; then
        pids="$pids $broker"
        return 0
    fi
    kill $broker 2>/dev/null || true
    return 1
}
started=0
for _ in 1 2 3 4 5; do
    if start_broker; then started=1; break; fi
done
[ $started = 1 ] || fail "mosquitto did not start"

P=taratxt/v1/devices/7
cat > "$dir/dev7.json" <<EOF
{"id":7,"name":"check","mqtt":{"url":"tcp://127.0.0.1:1","client_id":"device-7","username":"device-7","password":"x","topic_prefix":"$P"}}
EOF
pub() { mosquitto_pub -p "$port" -q 1 -t "$1" -m "$2"; }

mosquitto_sub -p "$port" -v -t "$P/#" > "$dir/wire.log" 2>&1 &
pids="$pids $!"
sleep 0.3

# 1. connect, retained online status, send, duplicate, pins, inbound and ack
"$devsim" --credentials "$dir/dev7.json" --url "tcp://127.0.0.1:$port" \
    --inbound '+639170000001:hello' > "$dir/out1.log" 2> "$dir/err1.log" &
sim=$!
pids="$pids $sim"
wait_for "$dir/out1.log" '"event":"connected","device_id":7' || fail "no connected event"
mosquitto_sub -p "$port" -v -t "$P/status" -C 1 -W 3 > "$dir/status1.log" 2>&1 || true
grep -q "$P/status {\"online\":true" "$dir/status1.log" || fail "retained status is not online"
echo "ok: connects, retained P/status online"

wait_for "$dir/wire.log" "$P/inbound .*\"from\":\"\\+639170000001\"" || fail "inbound not published"
inbound_id=$(sed -n 's/.*"event":"inbound".*"id":"\(sim-1-[0-9a-f]*\)".*/\1/p' "$dir/out1.log")
[ -n "$inbound_id" ] || fail "no inbound event"
echo "ok: inbound $inbound_id published"

pub "$P/send" '{"id":12,"to":"+639171234567","message":"hi","attempt":1}'
wait_for "$dir/wire.log" "$P/report \\{\"id\":12,\"status\":\"delivered\"\\}" || fail "no delivered report"
grep -q "$P/report {\"id\":12,\"status\":\"sent\"}" "$dir/wire.log" || fail "no sent report"
grep -q '"event":"send","device_id":7,"id":12,.*"safe_word":null,"attempt":1,"duplicate":false' \
    "$dir/out1.log" || fail "no send event"
echo "ok: send -> reports sent, delivered"

pub "$P/send" '{"id":12,"to":"+639171234567","message":"hi","attempt":2}'
wait_for "$dir/out1.log" '"id":12,.*"attempt":2,"duplicate":true' || fail "repeat not flagged duplicate"
wait_count "$dir/wire.log" "$P/report {\"id\":12,\"status\":\"delivered\"}" 2 ||
    fail "repeat was not re-reported"
[ "$(grep -c '"event":"send".*"id":12,.*"duplicate":false' "$dir/out1.log")" = 1 ] ||
    fail "repeat was sent again"
echo "ok: repeated id not sent again, re-reported"

pub "$P/pins" '{"number":"+639171234567","safe_word":"apple"}'
wait_for "$dir/out1.log" '"event":"pins","device_id":7,"payload":\{"number":"\+639171234567","safe_word":"apple"\}' ||
    fail "no pins event"
echo "ok: pins"

pub "$P/ack" "{\"inbound\":\"$inbound_id\"}"
wait_for "$dir/out1.log" "\"event\":\"ack\",\"device_id\":7,\"inbound\":\"$inbound_id\"" || fail "no ack event"
echo "ok: ack"

kill -TERM $sim
rc=0
wait $sim || rc=$?
[ $rc = 0 ] || fail "SIGTERM exit code $rc"
mosquitto_sub -p "$port" -v -t "$P/status" -C 1 -W 3 > "$dir/status2.log" 2>&1 || true
grep -q "$P/status {\"online\":false}" "$dir/status2.log" || fail "retained status not offline after SIGTERM"
grep -q '"event":"disconnected","device_id":7' "$dir/out1.log" || fail "no disconnected event"
echo "ok: SIGTERM -> offline retained, exit 0"

# 2. --report failed with a delay, --exit-after
"$devsim" --credentials "$dir/dev7.json" --url "tcp://127.0.0.1:$port" --report failed \
    --fail-error 'no signal' --report-delay-ms 300 --exit-after 1 > "$dir/out2.log" 2> "$dir/err2.log" &
sim=$!
wait_for "$dir/out2.log" '"event":"connected"' || fail "second run did not connect"
pub "$P/send" '{"id":13,"to":"+639171234567","message":"x","attempt":1}'
rc=0
wait $sim || rc=$?
[ $rc = 0 ] || fail "--exit-after exit code $rc"
grep -q "$P/report {\"id\":13,\"status\":\"failed\",\"error\":\"no signal\"}" "$dir/wire.log" ||
    fail "no failed report"
echo "ok: --report failed --report-delay-ms, --exit-after exits 0 once reported"

# 3. --drop-after: exit 3 without DISCONNECT, the broker fires the Last Will
"$devsim" --credentials "$dir/dev7.json" --url "tcp://127.0.0.1:$port" --drop-after 1 \
    > "$dir/out3.log" 2> "$dir/err3.log" &
sim=$!
wait_for "$dir/out3.log" '"event":"connected"' || fail "third run did not connect"
# Follow P/status live: first the retained online, then the Will.
mosquitto_sub -p "$port" -v -t "$P/status" > "$dir/status3.log" 2>&1 &
pids="$pids $!"
wait_for "$dir/status3.log" "$P/status \{\"online\":true" || fail "not online before drop"
pub "$P/send" '{"id":14,"to":"+639171234567","message":"x","attempt":1}'
rc=0
wait $sim || rc=$?
[ $rc = 3 ] || fail "--drop-after exit code $rc, want 3"
wait_for "$dir/mosquitto.log" "Client device-7 closed its connection" 3 ||
    fail "broker did not see an unclean close"
grep -q "$P/report {\"id\":14,\"status\":\"delivered\"}" "$dir/wire.log" || fail "report 14 missing"
# tt-devsim never publishes offline on this path: this is the Last Will.
wait_for "$dir/status3.log" "$P/status \{\"online\":false\}" 3 || fail "Last Will not published"
echo "ok: --drop-after exits 3 after reporting, Last Will sets status offline"

echo "all devsim checks passed"
