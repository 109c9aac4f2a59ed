# deps.sh: installs the Debian packages Taratxt needs, when any is missing.
# Sourced by scripts/run and scripts/test.
TT_PACKAGES="build-essential cmake pkg-config libcivetweb-dev libpaho-mqtt-dev libck-dev libmsgpack-dev
librocksdb-dev libjansson-dev libsodium-dev mosquitto mosquitto-clients python3 wrk curl prometheus"

tt_install_deps() {
    local missing=""
    for p in $TT_PACKAGES; do
        dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    echo "Installing Debian packages:$missing" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q $missing >&2
}
