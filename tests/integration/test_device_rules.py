#!/usr/bin/python3
"""it_device_rules: what the device actor promises (API.md 2, 3, 8).

window (at most N unreported hand-overs), rate_per_minute, priority (high
before normal), reports only move a message forward, unreported messages are
dispatched again on reconnect with the next attempt number, and the
dispatch timeout retries three times then fails with device_timeout.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, T, check, check_eq, log, mqtt_pub, must, run)  # noqa: E402


def sends_by_id(sim):
    out = {}
    for e in sim.sends():
        out.setdefault(e.get("id"), []).append(e.get("attempt"))
    return out


def test_window():
    broker = Broker()
    srv = Server(broker=broker, extra=["--window", "4"])
    api = srv.api()
    dev = api.create_device("windowed", rate_per_minute=600)
    sim = DevSim(dev, ["--report", "none"])
    api.wait_online(dev["id"])
    ids = [api.send("+63917000%04d" % i, "w%d" % i, dev_id=dev["id"])["id"] for i in range(10)]
    sim.wait_for(lambda evs: len([e for e in evs if e.get("event") == "send"]) >= 4, 20, "4 sends")
    time.sleep(T(2))
    got = sends_by_id(sim)
    check_eq(len(got), 4, "distinct messages handed over with --window 4 and no reports (%r)" % got)
    check_eq(sorted(got), ids[:4], "the first four (FIFO) are handed over")
    d = api.device(dev["id"])
    check_eq(d.get("queue"), {"pending": 6, "in_flight": 4}, "queue of the windowed device")
    # a report frees one slot
    first = ids[0]
    mqtt_pub(broker.port, dev["mqtt"]["topic_prefix"] + "/report", {"id": first, "status": "sent"})
    sim.wait_for(lambda evs: len(set(e.get("id") for e in evs if e.get("event") == "send")) >= 5, 20,
                 "a fifth send after one report")
    time.sleep(T(1))
    check_eq(len(sends_by_id(sim)), 5, "distinct hand-overs after one report")
    check_eq(api.message(first).get("status"), "sent", "status after a sent report")


def test_rate():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("slow SIM", rate_per_minute=3)
    check_eq(dev.get("rate_per_minute"), 3, "rate_per_minute in the 201 body")
    sim = DevSim(dev)
    api.wait_online(dev["id"])
    ids = [api.send("+63917100%04d" % i, "r%d" % i, dev_id=dev["id"])["id"] for i in range(5)]
    sim.wait_for(lambda evs: len([e for e in evs if e.get("event") == "send"]) >= 3, 20, "3 sends")
    time.sleep(T(3))
    got = sends_by_id(sim)
    check_eq(len(got), 3, "hand-overs within seconds at rate_per_minute 3 (%r)" % got)
    for i in ids[:3]:
        api.wait_message(i, "delivered", 20)
    d = api.device(dev["id"])
    check_eq(d.get("queue"), {"pending": 2, "in_flight": 0}, "queue while rate limited")
    check_eq(api.message(ids[4]).get("status"), "pending", "fifth message still pending")


def test_priority_and_reports():
    broker = Broker()
    srv = Server(broker=broker, extra=["--window", "1"])
    api = srv.api()
    dev = api.create_device("prio", rate_per_minute=600)
    dev_id = dev["id"]
    normal = [api.send("+63917200%04d" % i, "normal %d" % i, dev_id=dev_id, force=True)["id"] for i in range(3)]
    high = api.send("+639172009999", "high one", dev_id=dev_id, force=True, priority="high")
    check_eq(high.get("priority"), "high", "priority in the 202 body")
    sim = DevSim(dev)
    sim.wait_for(lambda evs: len([e for e in evs if e.get("event") == "send"]) >= 4, 30, "4 sends")
    order = [e.get("id") for e in sim.sends()]
    check_eq(order[:4], [high["id"]] + normal, "hand-over order (high first, then FIFO) with --window 1")
    for i in normal + [high["id"]]:
        api.wait_message(i, "delivered", 20)

    # reports move forward only
    P = dev["mqtt"]["topic_prefix"]
    done = api.message(normal[0])
    mqtt_pub(broker.port, P + "/report", {"id": normal[0], "status": "sent"})
    mqtt_pub(broker.port, P + "/report", {"id": normal[1], "status": "failed", "error": "late"})
    time.sleep(T(1.5))
    after = api.message(normal[0])
    check_eq(after.get("status"), "delivered", "status after a late 'sent' report")
    check_eq(after.get("delivered_at"), done.get("delivered_at"), "delivered_at after a late report")
    after1 = api.message(normal[1])
    check_eq(after1.get("status"), "delivered", "status after a late 'failed' report")
    check_eq(after1.get("error"), None, "error after a late 'failed' report")

    # pending -> delivered directly, then a late sent changes nothing
    sim.term()
    api.wait_online(dev_id, online=False)
    sim2 = DevSim(dev, ["--report", "none"])
    api.wait_online(dev_id)
    x = api.send("+639172000100", "manual reports", dev_id=dev_id)["id"]
    sim2.wait_event(lambda e: e.get("event") == "send" and e.get("id") == x, 20, "send of %d" % x)
    mqtt_pub(broker.port, P + "/report", {"id": x, "status": "delivered"})
    got = api.wait_message(x, "delivered", 10)
    check(got.get("delivered_at") is not None, "delivered_at after a direct delivered report")
    mqtt_pub(broker.port, P + "/report", {"id": x, "status": "sent"})
    time.sleep(T(1.5))
    check_eq(api.message(x).get("status"), "delivered", "delivered then late sent")
    y = api.send("+639172000101", "fails", dev_id=dev_id)["id"]
    sim2.wait_event(lambda e: e.get("event") == "send" and e.get("id") == y, 20, "send of %d" % y)
    mqtt_pub(broker.port, P + "/report", {"id": y, "status": "sent"})
    api.wait_message(y, "sent", 10)
    mqtt_pub(broker.port, P + "/report", {"id": y, "status": "failed", "error": "carrier_rejected"})
    f = api.wait_message(y, "failed", 10)
    check_eq(f.get("error"), "carrier_rejected", "error of a failed report")
    check(f.get("failed_at") is not None, "failed_at set")
    mqtt_pub(broker.port, P + "/report", {"id": y, "status": "delivered"})
    time.sleep(T(1.5))
    check_eq(api.message(y).get("status"), "failed", "failed is final")
    check(srv.alive(), "server alive")


def test_redispatch_on_reconnect():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("flaky")
    dev_id = dev["id"]
    sim = DevSim(dev, ["--report", "none"])
    api.wait_online(dev_id)
    x = api.send("+639173000000", "again please", dev_id=dev_id)["id"]
    ev = sim.wait_event(lambda e: e.get("event") == "send" and e.get("id") == x, 20, "first send")
    check_eq(ev.get("attempt"), 1, "first attempt")
    sim.kill()   # no DISCONNECT: the broker publishes the Last Will
    api.wait_online(dev_id, online=False, timeout=15)
    check_eq(api.message(x).get("status"), "pending", "status while the device is gone")
    sim2 = DevSim(dev)
    ev2 = sim2.wait_event(lambda e: e.get("event") == "send" and e.get("id") == x, 20, "send after reconnect")
    check_eq(ev2.get("attempt"), 2, "attempt after reconnect")
    m = api.wait_message(x, "delivered", 20)
    check_eq(m.get("attempts"), 2, "attempts after reconnect")


def test_dispatch_timeout():
    broker = Broker()
    srv = Server(broker=broker, extra=["--dispatch-timeout", "1"])
    api = srv.api()
    dev = api.create_device("mute")
    sim = DevSim(dev, ["--report", "none"])
    api.wait_online(dev["id"])
    x = api.send("+639174000000", "anyone?", dev_id=dev["id"])["id"]
    t0 = time.time()
    f = api.wait_message(x, "failed", 30)
    log("failed after %.1fs" % (time.time() - t0))
    check_eq(f.get("error"), "device_timeout", "error after three dispatch timeouts")
    check(f.get("failed_at") is not None, "failed_at set")
    check_eq(f.get("attempts"), 3, "attempts")
    time.sleep(T(2))
    check_eq(sends_by_id(sim).get(x), [1, 2, 3], "attempts seen by the device")
    check_eq(api.device(dev["id"]).get("queue"), {"pending": 0, "in_flight": 0}, "queue after the failure")


if __name__ == "__main__":
    run([test_window, test_rate, test_priority_and_reports, test_redispatch_on_reconnect, test_dispatch_timeout])
