#!/usr/bin/python3
"""it_broker_down: a missing broker is not fatal (API.md 7, 10).

The server starts against a port where nothing listens: /healthz is 200 with
status ok and mqtt disconnected, and the API serves (devices are created,
forced sends are accepted). When a broker appears on that port, /healthz
turns connected and a device gets the forced messages.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, T, check, check_eq, free_port, must, run,  # noqa: E402
                     wait_until)


def test_broker_down():
    mport = free_port()
    srv = Server(mqtt_url="tcp://127.0.0.1:%d" % mport)
    api = srv.api()
    h = api.get("/healthz")
    check_eq(h.status, 200, "healthz without a broker")
    check_eq((h.body or {}).get("status"), "ok", "healthz status without a broker")
    check_eq((h.body or {}).get("mqtt"), "disconnected", "healthz mqtt without a broker")
    check_eq((h.body or {}).get("store"), "ok", "healthz store")

    dev = api.create_device("waiting")
    dev_id = dev["id"]
    check_eq(dev["mqtt"].get("url"), "tcp://127.0.0.1:%d" % mport, "mqtt.url")
    check_eq(dev.get("online"), False, "online")
    r = api.post("/devices/%d/messages" % dev_id, {"to": "+639171234567", "message": "x"})
    check_eq(r.status, 409, "unforced send while the broker is down")
    m1 = api.send("+639171234567", "forced 1", dev_id=dev_id, force=True)
    m2 = api.send("+639179876543", "forced 2", force=True)
    check_eq(m2.get("device_id"), dev_id, "forced routed send picks the only device")
    check_eq(api.get("/devices").status, 200, "GET /devices while the broker is down")
    check(srv.alive(), "server alive without a broker")

    broker = Broker(port=mport)

    def connected():
        r = api.get("/healthz")
        return r.status == 200 and (r.body or {}).get("mqtt") == "connected" and r.body
    h = wait_until(connected, T(45), "healthz mqtt connected after the broker started", 0.25)
    check_eq(h.get("status"), "ok", "healthz status after reconnect")
    acl = wait_until(lambda: (api.get("/healthz").body or {}).get("broker_acl") != "unknown" and
                     (api.get("/healthz").body or {}).get("broker_acl"), T(15), "broker_acl learned")
    check_eq(acl, "unmanaged", "broker_acl against an anonymous broker without dynamic security")

    sim = DevSim(dev)
    sim.wait_connected()
    api.wait_online(dev_id)
    for m in (m1, m2):
        sim.wait_event(lambda e, i=m["id"]: e.get("event") == "send" and e.get("id") == i, 20,
                       "send of %d" % m["id"])
        api.wait_message(m["id"], "delivered", 20)

    # the broker goes away and comes back: the server follows
    broker.stop()
    wait_until(lambda: (api.get("/healthz").body or {}).get("mqtt") == "disconnected", T(15),
               "healthz disconnected after the broker stopped", 0.25)
    broker.start()
    wait_until(connected, T(45), "healthz connected after the broker restarted", 0.25)
    api.wait_online(dev_id, timeout=30)
    m3 = api.send("+639171234567", "after the broker restart", dev_id=dev_id)
    api.wait_message(m3["id"], "delivered", 20)


if __name__ == "__main__":
    run([test_broker_down])
