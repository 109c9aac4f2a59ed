#!/bin/sh
# devsim_check.sh: checks tt-devsim against a real mosquitto, with
# mosquitto_pub/mosquitto_sub playing the server. Not part of ctest (the
# integration suite covers the device side through the server); run it by
# hand after changing tt-devsim:
#
#   bench/devsim_check.sh [path/to/tt-devsim]     (default build-bench/bench/tt-devsim)
#
# Prints one "ok" line per check and exits non-zero at the first failure,
# leaving its scratch directory for a look. Covers the misbehaviour switches
# too (garbage, repeat, out-of-order, storm, unknown-ids, foreign-ids,
# --inbound-id, --inbound-repeat). With a sanitizer build of tt-devsim, a
# sanitizer report in any run's stderr fails the check.
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

# The misbehaviour switches. wire2.log shows the retain flag: "%r topic payload".
mosquitto_sub -p "$port" -F '%r %t %p' -t "$P/#" > "$dir/wire2.log" 2>&1 &
pids="$pids $!"
sleep 0.3

# 4. --misbehave garbage: garbage on report, status (not retained) and inbound,
#    then a normal device
"$devsim" --credentials "$dir/dev7.json" --url "tcp://127.0.0.1:$port" --misbehave garbage \
    > "$dir/out4.log" 2> "$dir/err4.log" &
sim=$!
pids="$pids $sim"
wait_for "$dir/out4.log" '"event":"connected","device_id":7' || fail "garbage run did not connect"
wait_for "$dir/out4.log" '"mode":"garbage","detail":"P/inbound: .*-badfrom' || fail "garbage not all published"
for w in "^0 $P/report not json\$" "^0 $P/report \\[\\]\$" "^0 $P/report \\{\"id\":\"x\"\\}\$" \
    "^0 $P/report \\{\"id\":1,\"status\":\"bogus\"\\}\$" "^0 $P/status not json\$" \
    "^0 $P/status \\{\"online\":\"yes\"\\}\$" "^0 $P/inbound \\[\\]\$" \
    "^0 $P/inbound \\{\"id\":\"garbage-[0-9a-f]*-nofrom\",\"message\":"; do
    wait_for "$dir/wire2.log" "$w" 3 || fail "garbage not on the wire: $w"
done
grep -q "^1 $P/status \\(not json\\|\\[\\]\\|null\\|{\"online\":\"yes\"}\\)" "$dir/wire2.log" &&
    fail "garbage status was retained"
grep -q '"event":"misbehave","device_id":7,"mode":"garbage","detail":"P/status: {\\"online\\":\\"yes\\"}"' \
    "$dir/out4.log" || fail "no misbehave event for garbage status"
mosquitto_sub -p "$port" -v -t "$P/status" -C 1 -W 3 > "$dir/status4.log" 2>&1 || true
grep -q "$P/status {\"online\":true" "$dir/status4.log" || fail "retained status not online after garbage"
pub "$P/send" '{"id":15,"to":"+639171234567","message":"x","attempt":1}'
wait_for "$dir/wire2.log" "^0 $P/report \\{\"id\":15,\"status\":\"delivered\"\\}" ||
    fail "no normal report after garbage"
kill -TERM $sim
rc=0
wait $sim || rc=$?
[ $rc = 0 ] || fail "garbage run exit code $rc"
echo "ok: --misbehave garbage on report, status (not retained), inbound; then normal"

# 5. --misbehave repeat: every report three times
"$devsim" --credentials "$dir/dev7.json" --url "tcp://127.0.0.1:$port" --misbehave repeat \
    --exit-after 1 > "$dir/out5.log" 2> "$dir/err5.log" &
sim=$!
wait_for "$dir/out5.log" '"event":"connected"' || fail "repeat run did not connect"
pub "$P/send" '{"id":16,"to":"+639171234567","message":"x","attempt":1}'
rc=0
wait $sim || rc=$?
[ $rc = 0 ] || fail "repeat run exit code $rc"
[ "$(grep -c "^0 $P/report {\"id\":16,\"status\":\"sent\"}\$" "$dir/wire2.log")" = 3 ] ||
    fail "sent of 16 not published 3 times"
[ "$(grep -c "^0 $P/report {\"id\":16,\"status\":\"delivered\"}\$" "$dir/wire2.log")" = 3 ] ||
    fail "delivered of 16 not published 3 times"
grep -q '"mode":"repeat","detail":"report 16 delivered published 3 times"' "$dir/out5.log" ||
    fail "no misbehave event for repeat"
echo "ok: --misbehave repeat publishes each report 3 times"

# 6. --misbehave out-of-order: delivered before sent
"$devsim" --credentials "$dir/dev7.json" --url "tcp://127.0.0.1:$port" --misbehave out-of-order \
    --exit-after 1 > "$dir/out6.log" 2> "$dir/err6.log" &
sim=$!
wait_for "$dir/out6.log" '"event":"connected"' || fail "out-of-order run did not connect"
pub "$P/send" '{"id":17,"to":"+639171234567","message":"x","attempt":1}'
rc=0
wait $sim || rc=$?
[ $rc = 0 ] || fail "out-of-order run exit code $rc"
order=$(sed -n "s|^0 $P/report {\"id\":17,\"status\":\"\([a-z]*\)\"}\$|\1|p" "$dir/wire2.log" | tr '\n' ' ')
[ "$order" = "delivered sent " ] || fail "reports of 17 in order '$order', want 'delivered sent '"
grep -q '"mode":"out-of-order"' "$dir/out6.log" || fail "no misbehave event for out-of-order"
echo "ok: --misbehave out-of-order reports delivered, then sent"

# 7. --storm 3: three connections dropped without DISCONNECT (three Wills),
#    then one that stays
closes_before=$(grep -c "Client device-7 closed its connection" "$dir/mosquitto.log" || true)
mosquitto_sub -p "$port" -F '%r %p' -t "$P/status" > "$dir/status7.log" 2>&1 &
pids="$pids $!"
wait_for "$dir/status7.log" '^1 ' || fail "no retained status before the storm"
"$devsim" --credentials "$dir/dev7.json" --url "tcp://127.0.0.1:$port" --storm 3 \
    > "$dir/out7.log" 2> "$dir/err7.log" &
sim=$!
pids="$pids $sim"
wait_for "$dir/out7.log" '"event":"connected","device_id":7' || fail "storm run did not connect"
[ "$(grep -c '"mode":"storm","detail":"connection [123] of 3 dropped without DISCONNECT"' "$dir/out7.log")" = 3 ] ||
    fail "not 3 storm events"
wait_count "$dir/status7.log" '0 {"online":false}' 3 || fail "not 3 Last Wills during the storm"
closes=$(grep -c "Client device-7 closed its connection" "$dir/mosquitto.log" || true)
[ $((closes - closes_before)) -ge 3 ] || fail "broker saw $((closes - closes_before)) unclean closes, want 3"
wait_count "$dir/status7.log" '0 {"online":true' 4 || fail "not online 4 times"
[ "$(tail -n 1 "$dir/status7.log")" = '0 {"online":true,"sim":"tt-devsim"}' ] || fail "not online after the storm"
pub "$P/send" '{"id":18,"to":"+639171234567","message":"x","attempt":1}'
wait_for "$dir/wire2.log" "^0 $P/report \\{\"id\":18,\"status\":\"delivered\"\\}" ||
    fail "no normal report after the storm"
kill -TERM $sim
rc=0
wait $sim || rc=$?
[ $rc = 0 ] || fail "storm run exit code $rc"
echo "ok: --storm 3 drops 3 connections without DISCONNECT (3 Wills), then stays connected"

# 8. unknown-ids, foreign-ids, --inbound-id with --inbound-repeat
"$devsim" --credentials "$dir/dev7.json" --url "tcp://127.0.0.1:$port" --misbehave unknown-ids \
    --foreign-id 555 --inbound-id fixed-1 --inbound '+639170000001:twice' --inbound-repeat 2 \
    --exit-after 1 > "$dir/out8.log" 2> "$dir/err8.log" &
sim=$!
wait_for "$dir/out8.log" '"event":"connected"' || fail "unknown-ids run did not connect"
wait_for "$dir/wire2.log" "^0 $P/report \\{\"id\":555,\"status\":\"delivered\"\\}" ||
    fail "foreign id 555 not reported"
wait_count "$dir/wire2.log" "0 $P/inbound {\"id\":\"fixed-1\",\"from\":\"+639170000001\"" 2 ||
    fail "inbound fixed-1 not published twice"
pub "$P/send" '{"id":19,"to":"+639171234567","message":"x","attempt":1}'
rc=0
wait $sim || rc=$?
[ $rc = 0 ] || fail "unknown-ids run exit code $rc"
grep -q "^0 $P/report {\"id\":1000019,\"status\":\"delivered\"}\$" "$dir/wire2.log" ||
    fail "unknown id 1000019 not reported"
for m in unknown-ids foreign-ids inbound-repeat; do
    grep -q "\"mode\":\"$m\"" "$dir/out8.log" || fail "no misbehave event for $m"
done
echo "ok: unknown-ids, foreign-ids, --inbound-id with --inbound-repeat"

# A sanitizer build reports on stderr; some runs above end by _exit or have
# no exit code checked, so look at every run's stderr.
if grep -lE 'Sanitizer|runtime error:' "$dir"/err*.log >/dev/null 2>&1; then
    fail "sanitizer report in $(grep -lE 'Sanitizer|runtime error:' "$dir"/err*.log | tr '\n' ' ')"
fi
echo "ok: no sanitizer reports"

echo "all devsim checks passed"
