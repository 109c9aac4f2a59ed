#!/usr/bin/python3
"""it_misbehave: a broken or hostile device cannot hurt the server or other
devices' messages (API.md 2, 8).

Garbage payloads, reports for ids the device was never given (unknown, or
another device's message), repeated and out-of-order reports, a reconnect
storm, an inbound SMS published three times at once, and a device that drops
its connection mid-batch: the server stays healthy, statuses only move
forward, nothing is stored twice and every message is delivered.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Broker, DevSim, Server, T, check, check_eq, must, run, wait_until  # noqa: E402


def test_garbage_and_bad_reports():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    a = api.create_device("bystander")
    b = api.create_device("rogue", rate_per_minute=600)
    victim = api.send("+639170000001", "not yours", dev_id=a["id"], force=True)
    rogue = DevSim(b, ["--misbehave", "garbage", "--misbehave", "unknown-ids", "--misbehave", "repeat",
                       "--misbehave", "out-of-order", "--foreign-id", str(victim["id"])])
    rogue.wait_event(lambda e: e.get("event") == "misbehave", 20, "a misbehaviour")
    api.wait_online(b["id"])
    ids = [api.send("+63917100000%d" % i, "m%d" % i, dev_id=b["id"])["id"] for i in range(5)]
    for i in ids:
        rogue.wait_for(lambda evs, i=i: len([e for e in evs if e.get("event") == "report" and e.get("id") == i]) >= 6,
                       20, "delivered x3 then sent x3 reported for %d" % i)
    time.sleep(T(1))
    for i in ids:
        m = api.message(i)
        check_eq(m.get("status"), "delivered",
                 "message %d after reports delivered,delivered,delivered,sent,sent,sent (delivered is final)" % i)
        check_eq(m.get("attempts"), 1, "attempts of %d (repeated reports are not re-sends)" % i)
    v = api.message(victim["id"])
    check_eq(v.get("status"), "pending", "another device's message reported by the rogue")
    check_eq(v.get("delivered_at"), None, "delivered_at of the victim")
    check_eq(api.device(a["id"]).get("queue", {}).get("pending"), 1, "the bystander's queue")
    check_eq(api.device(b["id"]).get("queue"), {"pending": 0, "in_flight": 0}, "the rogue's queue")
    for x in api.list_all():
        check(x.get("id") in ids + [victim["id"]] or x.get("direction") == "inbound",
              "a message the server never created: %r" % x)
    h = api.get("/healthz")
    check_eq(h.status, 200, "healthz after garbage")
    check(srv.alive(), "server alive after garbage")

    # the bystander still gets its message
    sim = DevSim(a)
    api.wait_message(victim["id"], "delivered", 20)
    check_eq(len(sim.sends(victim["id"])), 1, "the victim handed over once, to its own device")


def test_storm_repeat_and_drop():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("stormy", rate_per_minute=600)
    dev_id = dev["id"]
    sim = DevSim(dev, ["--storm", "6", "--inbound-id", "fixed-1", "--inbound", "+639175551234:three times",
                       "--inbound-repeat", "3"])
    sim.wait_event(lambda e: e.get("event") == "ack" and e.get("inbound") == "fixed-1", 30, "ack of fixed-1")
    api.wait_online(dev_id, timeout=30)
    time.sleep(T(1))
    ins = [x for x in api.list_all() if x.get("direction") == "inbound"]
    check_eq(len(ins), 1, "an inbound id published three times is stored once")
    check_eq(api.device(dev_id).get("online"), True, "online after the storm settles")
    m = api.send("+639175551234", "after the storm")
    check_eq(m.get("routing"), "pinned", "routing to the number pinned by the inbound SMS")
    api.wait_message(m["id"], "delivered", 20)

    # a device that drops its connection after 3 sends
    sim.term()
    api.wait_online(dev_id, online=False)
    ids = [api.send("+63917200000%d" % i, "d%d" % i, dev_id=dev_id, force=True)["id"] for i in range(8)]
    dropper = DevSim(dev, ["--drop-after", "3"])
    wait_until(lambda: not dropper.alive(), T(30), "tt-devsim --drop-after 3 to exit")
    check_eq(dropper.proc.returncode, 3, "tt-devsim --drop-after exit code")
    api.wait_online(dev_id, online=False, timeout=15)
    sim2 = DevSim(dev)
    for i in ids:
        api.wait_message(i, "delivered", 30)
    check(srv.alive(), "server alive")


if __name__ == "__main__":
    run([test_garbage_and_bad_reports, test_storm_repeat_and_drop])
