#!/usr/bin/python3
"""it_broker_acl: the broker enforces device access (API.md 8, "Broker access").

Against a mosquitto with the dynamic-security plugin whose first admin is the
server's broker user, the server reports "broker_acl":"managed" and gives each
device a broker client with a role for exactly its own topics. A device's
credentials cannot read another device's P/send, cannot publish into another
device's P/report or P/status (the other device's message and online state do
not change); a re-keyed device's old password is refused and the device shows
offline until it reconnects with the new one; a deleted device's password is
refused. After the broker restarts with an empty plugin file, the server
re-creates the device clients (their passwords are stored sealed). Against a
plain broker the server still sends and reports "unmanaged".
"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, T, check, check_eq, must, run,  # noqa: E402
                     wait_until)


def mqtt_as(broker, creds, topic, pub=None, wait=2, retain=False):
    """Connects with a device's broker credentials (mosquitto_sub, or
    mosquitto_pub when pub is given). Returns (refused, output)."""
    m = creds["mqtt"]
    base = ["-h", "127.0.0.1", "-p", str(broker.port), "-i", m["client_id"], "-u", m["username"],
            "-P", m["password"], "-t", topic, "-V", "mqttv5"]
    if pub is not None:
        args = ["mosquitto_pub"] + base + ["-m", pub, "-q", "1"] + (["-r"] if retain else [])
    else:
        args = ["mosquitto_sub"] + base + ["-C", "1", "-W", str(wait), "-v"]
    r = subprocess.run(args, capture_output=True, timeout=T(wait + 10))
    err = (r.stdout + r.stderr).decode(errors="replace")
    # Refused at connect ("Connection error: Connection Refused: not
    # authorised."), as opposed to a publish the broker denies after connect.
    refused = "connection refused" in err.lower() or "connection error" in err.lower()
    return refused, err


def server_for(broker, extra=None):
    return Server(broker=broker, extra=["--mqtt-username", broker.admin_user] + list(extra or []),
                  env={"TARATXT_MQTT_PASSWORD": broker.admin_password})


def wait_acl(api, state):
    return wait_until(lambda: api.get("/healthz", token=None).body.get("broker_acl") == state, T(20),
                      "broker_acl %s" % state)


def test_acl_enforced():
    broker = Broker(dynsec=True)
    srv = server_for(broker)
    api = srv.api()
    wait_acl(api, "managed")
    # Granting the server's user its role makes the broker drop that user's
    # connections once; the links come back by themselves.
    wait_until(lambda: api.get("/healthz", token=None).body.get("mqtt") == "connected", T(20), "links connected")

    a, b = api.create_device("A"), api.create_device("B")
    pa = a["mqtt"]["topic_prefix"]
    pb = b["mqtt"]["topic_prefix"]
    sim_b = DevSim(b, ["--report", "none"])
    sim_b.wait_connected()
    api.wait_online(b["id"])

    # A's credentials cannot read B's sends.
    spy = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-i", a["mqtt"]["client_id"],
                            "-u", a["mqtt"]["username"], "-P", a["mqtt"]["password"], "-t", pb + "/send",
                            "-C", "1", "-W", "6", "-v", "-V", "mqttv5"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.0)
    m = api.post("/devices/%d/messages" % b["id"], {"to": "+639170000001", "message": "for B only"})
    must(m.status == 202, "send through B: %s" % m.text)
    mid = m.body["id"]
    sim_b.wait_event(lambda e: e.get("event") == "send" and e.get("id") == mid, 15, "B receives its send")
    out, _ = spy.communicate(timeout=T(20))
    text = out.decode(errors="replace")
    check("refused" not in text.lower(), "device A's credentials should connect (only the topic is denied): %r" % text)
    check("for B only" not in text, "device A's credentials read device B's P/send: %r" % text[-300:])

    # A's credentials cannot report B's message or flip B offline (the
    # connection is accepted; the broker drops the publishes).
    refused, out = mqtt_as(broker, a, pb + "/report", pub='{"id":%d,"status":"failed","error":"forged"}' % mid)
    check(not refused, "device A connects to publish: %r" % out)
    refused, out = mqtt_as(broker, a, pb + "/status", pub='{"online":false}', retain=True)
    check(not refused, "device A connects to publish: %r" % out)
    time.sleep(1.5)
    check_eq(api.message(mid).get("status"), "pending", "B's message after A published a forged report")
    check_eq(api.device(b["id"]).get("online"), True, "B after A published a forged offline status")
    # ... while its own topics are allowed.
    refused, _ = mqtt_as(broker, a, pa + "/status", pub='{"online":true,"by":"test"}', retain=True)
    check(not refused, "device A may publish its own status")
    api.wait_online(a["id"])

    # Re-keying: the old password is refused, the device shows offline.
    old = dict(a)
    r = api.post("/devices/%d/credentials" % a["id"], {})
    must(r.status == 200 and r.body.get("mqtt", {}).get("password"), "credential rotation: %s" % r.text)
    new = dict(a, mqtt=r.body["mqtt"])
    check(r.body["mqtt"]["password"] != old["mqtt"]["password"], "a new password")
    check_eq(api.device(a["id"]).get("online"), False, "device after its credentials were rotated")
    refused = wait_until(lambda: mqtt_as(broker, old, pa + "/send", wait=1)[0], T(15), "old password refused")
    check(refused, "the old password still connects")
    sim_a = DevSim(new)
    sim_a.wait_connected()
    api.wait_online(a["id"])

    # Deleting: the password is refused.
    check_eq(api.delete("/devices/%d" % b["id"]).status, 204, "DELETE device B")
    sim_b.kill()
    refused = wait_until(lambda: mqtt_as(broker, b, pb + "/send", wait=1)[0], T(15), "deleted device refused")
    check(refused, "a deleted device's password still connects")

    # The broker loses its plugin state: the server re-creates the clients.
    sim_a.kill()
    broker.stop()
    broker.init_dynsec()
    broker.start()
    ok = wait_until(lambda: not mqtt_as(broker, new, pa + "/send", wait=1)[0], T(30),
                    "device A's client re-created after the broker lost it")
    check(ok, "after the broker restarted with an empty plugin file, device A's password is refused")
    check(mqtt_as(broker, b, pb + "/send", wait=1)[0], "the deleted device came back with the broker")
    sim_a2 = DevSim(new)
    sim_a2.wait_connected()
    api.wait_online(a["id"])
    m2 = api.send("+639170000002", "after the broker restart", dev_id=a["id"])
    api.wait_message(m2["id"], "delivered", T(20))


def test_plain_broker_unmanaged():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    wait_acl(api, "unmanaged")
    dev = api.create_device("P")
    sim = DevSim(dev)
    sim.wait_connected()
    api.wait_online(dev["id"])
    m = api.send("+639170000003", "plain broker")
    api.wait_message(m["id"], "delivered", T(20))
    check_eq(api.get("/healthz", token=None).body.get("status"), "ok", "health with an unmanaged broker")


if __name__ == "__main__":
    run([test_acl_enforced, test_plain_broker_unmanaged])
