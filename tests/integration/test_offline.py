#!/usr/bin/python3
"""it_offline: the offline rule (API.md 2, 4) as a user sees it.

No device at all: 409 no_devices. A device whose simulator stopped (SIGTERM:
it publishes {"online":false}) or that never connected: a direct send, a send
naming it by device_id and a send to a number pinned to it are 409
device_offline; with every device offline an unpinned number is 409
no_device_online. Each is a problem+json body, and nothing is stored.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Broker, DevSim, Server, check, check_eq, check_problem, must, run  # noqa: E402


def test_offline():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()

    r = api.post("/messages", {"to": "+639171234567", "message": "nobody home"})
    check_problem(r, 409, "no_devices", "POST /messages on an account without devices")

    dev = api.create_device("A")
    a = dev["id"]
    sim = DevSim(dev)
    sim.wait_connected()
    api.wait_online(a)
    pinned = api.send("+639171112222", "pin me")       # pins +639171112222 to A
    check_eq(pinned.get("routing"), "auto", "routing of the first send")
    api.wait_message(pinned["id"], "delivered", 20)

    rc = sim.term()
    check_eq(rc, 0, "tt-devsim exit code after SIGTERM")
    d = api.wait_online(a, online=False, timeout=15)
    check_eq(d.get("online"), False, "device offline after its simulator stopped")

    try:
        before = [m["id"] for m in api.list_all()]
    except AssertionError as e:
        check(False, "listing messages: %s" % e)
        before = None

    r = api.post("/devices/%d/messages" % a, {"to": "+639170000001", "message": "x"})
    check_problem(r, 409, "device_offline", "POST /devices/{id}/messages to an offline device")
    if isinstance(r.body, dict):
        check(isinstance(r.body.get("detail"), str) and r.body.get("detail"),
              "device_offline should carry a detail: %r" % r.body)

    r = api.post("/messages", {"to": "+639170000001", "message": "x", "device_id": a})
    check_problem(r, 409, "device_offline", "POST /messages with device_id of an offline device")

    r = api.post("/messages", {"to": "+63 917 111 2222", "message": "x"})
    check_problem(r, 409, "device_offline", "POST /messages to a number pinned to an offline device")

    r = api.post("/messages", {"to": "+639170000009", "message": "x"})
    check_problem(r, 409, "no_device_online", "POST /messages with every device offline")

    r = api.post("/messages", {"to": "+639170000009", "message": "x", "force": False})
    check_problem(r, 409, "no_device_online", "force:false is the default")

    # a second device that never connected
    b = api.create_device("B")["id"]
    r = api.post("/devices/%d/messages" % b, {"to": "+639170000001", "message": "x"})
    check_problem(r, 409, "device_offline", "direct send to a device that never connected")
    r = api.post("/messages", {"to": "+639170000010", "message": "x"})
    check_problem(r, 409, "no_device_online", "two devices, none online")

    if before is not None:
        after = [m["id"] for m in api.list_all()]
        check_eq(after, before, "a 409 must store nothing")

    # back online: the pinned number routes again
    sim2 = DevSim(dev)
    sim2.wait_connected()
    api.wait_online(a)
    m = api.send("+639171112222", "back")
    check_eq(m.get("routing"), "pinned", "routing after the device is back")
    api.wait_message(m["id"], "delivered", 20)
    check(srv.alive(), "server alive")


if __name__ == "__main__":
    run([test_offline])
