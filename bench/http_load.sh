#!/bin/sh
# http_load.sh: HTTP load on POST /api/v1/messages with wrk.
#
#   bench/http_load.sh URL TOKEN [connections=64] [duration=10s] [threads=2]
#
# URL is the server's base URL (http://127.0.0.1:8080); /api/v1/messages is
# appended unless URL already ends with it. Prints wrk's own report, then one
# summary line "requests/s: N" (and "non-2xx: N" on stderr when wrk saw any).
set -eu

usage() {
    echo "usage: $0 URL TOKEN [connections=64] [duration=10s] [threads=2]" >&2
    exit 2
}
[ $# -ge 2 ] && [ $# -le 5 ] || usage
url=${1%/}
token=$2
conns=${3:-64}
duration=${4:-10s}
threads=${5:-2}

command -v wrk >/dev/null 2>&1 || { echo "$0: wrk not found (apt-get install wrk)" >&2; exit 1; }
case $url in
    */api/v1/messages) ;;
    *) url=$url/api/v1/messages ;;
esac
script=$(cd "$(dirname "$0")" && pwd)/post.lua

out=$(mktemp)
trap 'rm -f "$out"' EXIT
TOKEN=$token wrk -t "$threads" -c "$conns" -d "$duration" --latency -s "$script" "$url" | tee "$out"

rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
bad=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
if [ -n "$bad" ]; then
    echo "non-2xx: $bad" >&2
fi
if [ -z "$rps" ]; then
    echo "$0: wrk printed no Requests/sec" >&2
    exit 1
fi
echo "requests/s: $rps"
