#!/usr/bin/python3
"""it_cli: the command line of API.md 10.

--version and --help exit 0 (help names every documented flag); unknown
flags and out-of-range values exit non-zero without serving; each flag also
reads its TARATXT_* environment variable; the initial token is printed on
the first start only; --device-mqtt-url, --topic-root and
--mqtt-links per-device change what devices see and still deliver.
"""
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, T, binary, check, check_eq, free_port, mktemp, must, run,  # noqa: E402
                     port_open)

FLAGS = ["--listen", "--data", "--mqtt-url", "--mqtt-username", "--mqtt-password", "--topic-root",
         "--mqtt-links", "--device-mqtt-url", "--http-threads", "--window", "--dispatch-timeout",
         "--otp-template"]


def cli(*args, timeout=20, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([binary("TARATXTD")] + list(args), capture_output=True, text=True,
                          timeout=T(timeout), stdin=subprocess.DEVNULL, env=e)


def test_version_help_and_bad_flags():
    r = cli("--version")
    check_eq(r.returncode, 0, "taratxtd --version exit code")
    check(re.search(r"\d+\.\d+\.\d+", r.stdout) is not None, "--version prints a version: %r" % r.stdout)
    r = cli("--help")
    check_eq(r.returncode, 0, "taratxtd --help exit code")
    text = r.stdout + r.stderr
    for f in FLAGS:
        check(f in text, "--help mentions %s" % f)
    for f in ("TARATXT_LISTEN", "TARATXT_DATA", "TARATXT_MQTT_URL"):
        check(f in text, "--help mentions %s" % f)

    data = os.path.join(mktemp("cli"), "data")
    for bad in (["--bogus"], ["--window", "0"], ["--dispatch-timeout", "0"], ["--listen", "nonsense"],
                ["--mqtt-links", "zero"], ["--http-threads", "-3"]):
        port = free_port()
        try:
            r = cli("serve", "--listen", "127.0.0.1:%d" % port, "--data", data, *bad, timeout=15)
            check(r.returncode != 0, "serve %s: expected a non-zero exit, seen %d" % (" ".join(bad), r.returncode))
            check(r.stderr.strip() != "", "serve %s: says why on stderr" % " ".join(bad))
        except subprocess.TimeoutExpired:
            check(False, "serve %s: still running after 15 s (it should refuse the flag)" % " ".join(bad))
        check(not port_open(port), "serve %s left something listening" % " ".join(bad))


def test_env_and_first_token():
    broker = Broker()
    srv = Server(broker=broker, start=False)
    srv.args = lambda: [srv.bin, "serve"]
    srv.env = {"TARATXT_LISTEN": "127.0.0.1:%d" % srv.port, "TARATXT_DATA": srv.data,
               "TARATXT_MQTT_URL": broker.url, "TARATXT_WINDOW": "2",
               "TARATXT_DEVICE_MQTT_URL": "tcp://gateway.example:1883"}
    srv.start()
    api = srv.api()
    dev = api.create_device("env")
    check_eq(dev["mqtt"].get("url"), "tcp://gateway.example:1883", "mqtt.url from TARATXT_DEVICE_MQTT_URL")
    sim = DevSim(dev, ["--report", "none", "--url", broker.url])
    api.wait_online(dev["id"])
    for i in range(4):
        api.send("+63917000000%d" % i, "env %d" % i, dev_id=dev["id"])
    sim.wait_for(lambda evs: len([e for e in evs if e.get("event") == "send"]) >= 2, 20, "2 sends")
    time.sleep(T(1.5))
    check_eq(len(sim.sends()), 2, "hand-overs with TARATXT_WINDOW=2")

    check_eq(srv.term(), 0, "exit code")
    srv.start()
    with open(srv.logpath) as f:
        log_text = f.read()
    check_eq(log_text.count(srv.token), 1, "the initial token is printed once (first start only)")


def test_topic_root_and_links():
    broker = Broker()
    srv = Server(broker=broker, extra=["--topic-root", "acme/sms", "--mqtt-links", "per-device"])
    api = srv.api()
    devs = [api.create_device("d%d" % i) for i in range(3)]
    for d in devs:
        check_eq(d["mqtt"].get("topic_prefix"), "acme/sms/devices/%d" % d["id"], "topic_prefix with --topic-root")
    sim = DevSim(devs)
    for d in devs:
        api.wait_online(d["id"])
        m = api.send("+639171234567", "to %d" % d["id"], dev_id=d["id"])
        got = api.wait_message(m["id"], "delivered", 20)
        check_eq(got.get("device_id"), d["id"], "device of a direct send")
    check_eq(len(sim.sends()), 3, "one hand-over per device")


if __name__ == "__main__":
    run([test_version_help_and_bad_flags, test_env_and_first_token, test_topic_root_and_links])
