#!/usr/bin/python3
"""it_force: force:true queues for an offline device (API.md 2, 4).

With the device offline, a forced direct send and a forced routed send are
accepted (202, pending, forced true) and stored; when the device connects it
receives them and they reach delivered.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Broker, DevSim, Server, check, check_eq, must, run  # noqa: E402


def test_force():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("sleepy")
    dev_id = dev["id"]

    m1 = api.send("+639171234567", "forced direct", dev_id=dev_id, force=True)
    check_eq(m1.get("status"), "pending", "status of a forced send")
    check_eq(m1.get("forced"), True, "forced flag")
    check_eq(m1.get("routing"), "direct", "routing")
    check_eq(m1.get("device_id"), dev_id, "device_id")

    m2 = api.send("+639179999999", "forced routed", force=True)
    check_eq(m2.get("status"), "pending", "status of a forced routed send")
    check_eq(m2.get("forced"), True, "forced flag (routed)")
    check_eq(m2.get("device_id"), dev_id, "forced routed send goes to the (only) device")
    check(m2.get("routing") in ("auto", "pinned"), "routing of a forced routed send: %r" % m2.get("routing"))

    m3 = api.send("+639171234567", "forced by id", device_id=dev_id, force=True)
    check_eq(m3.get("forced"), True, "forced flag (device_id)")

    d = api.device(dev_id)
    check_eq(d.get("queue", {}).get("pending"), 3, "queue.pending of the offline device")
    check_eq(d.get("online"), False, "device still offline")
    for m in (m1, m2, m3):
        check_eq(api.message(m["id"]).get("status"), "pending", "GET of a queued message")

    sim = DevSim(dev)
    sim.wait_connected()
    for m in (m1, m2, m3):
        sim.wait_event(lambda e, i=m["id"]: e.get("event") == "send" and e.get("id") == i, 20,
                       "send of %d" % m["id"])
        got = api.wait_message(m["id"], "delivered", 20)
        check_eq(got.get("forced"), True, "forced flag kept")
    d = api.device(dev_id)
    check_eq(d.get("queue"), {"pending": 0, "in_flight": 0}, "queue after delivery")
    check(srv.alive(), "server alive")


if __name__ == "__main__":
    run([test_force])
