#!/usr/bin/python3
"""it_inbound: inbound SMS, end-to-end acks, pinning and safe words (API.md 2, 4, 5, 8).

A device's inbound SMS is stored once per (device, id), acknowledged on
P/ack after it is stored (also every repeat, also an invalid payload that
has an id), listed as direction inbound / status received with from
normalised and to null. An unpinned phone number is pinned to the device
that received it and the device learns the pin on P/pins; an alphanumeric
sender is not pinned. A later outbound send to that number is routed
"pinned" and carries the safe word; an inbound text containing the safe
word (any case, any punctuation between words) is safe_word_verified.
"""
import os
import sys
import time
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, MqttSub, Server, T, check, check_eq, check_time, mqtt_pub,  # noqa: E402
                     must, run, wait_until)


def inbound_list(api, query=""):
    r = api.get("/messages?direction=inbound&limit=500" + query)
    must(r.status == 200, "GET /messages?direction=inbound: %r" % r)
    return r.body["data"]


def test_inbound():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("receiver")
    dev_id = dev["id"]
    P = dev["mqtt"]["topic_prefix"]
    acks = MqttSub(broker.port, P + "/ack")
    sim = DevSim(dev, ["--inbound", "+63 917-123-4567:hello from a phone", "--inbound", "GCash:Your balance is 5"])
    api.wait_online(dev_id)

    ins = sim.wait_for(lambda evs: [e for e in evs if e.get("event") == "inbound"] if
                       len([e for e in evs if e.get("event") == "inbound"]) >= 2 else None, 20, "2 inbound")
    for e in ins[:2]:
        sim.wait_event(lambda a, i=e["id"]: a.get("event") == "ack" and a.get("inbound") == i, 20,
                       "ack of inbound %s" % e["id"])

    msgs = wait_until(lambda: (lambda l: l if len(l) >= 2 else None)(inbound_list(api)), T(10), "2 inbound messages")
    check_eq(len(msgs), 2, "inbound messages stored")
    by_from = {m.get("from"): m for m in msgs}
    m = by_from.get("+639171234567")
    if check(m is not None, "inbound from +639171234567 (normalised) listed: %r" % list(by_from)):
        check_eq(m.get("direction"), "inbound", "direction")
        check_eq(m.get("status"), "received", "status")
        check_eq(m.get("to"), None, "to of an inbound message")
        check_eq(m.get("message"), "hello from a phone", "message")
        check_eq(m.get("device_id"), dev_id, "device_id")
        check_time(m.get("received_at"), "received_at (the device's time)")
        check_time(m.get("created_at"), "created_at")
        check_eq(m.get("safe_word_verified"), False, "safe_word_verified without the word")
        g = api.get("/messages/%d" % m["id"])
        check_eq(g.status, 200, "GET of an inbound message")
    g = by_from.get("GCash")
    if check(g is not None, "inbound from the alphanumeric sender GCash stored as given: %r" % list(by_from)):
        check_eq(g.get("status"), "received", "status of the GCash message")

    # pinned to the receiving device; the device learns the pin; GCash is not pinned
    r = api.get("/devices/%d/pins/%s" % (dev_id, quote("+639171234567", safe="")))
    must(r.status == 200, "GET the pin made by an inbound SMS: %r" % r)
    word = r.body.get("safe_word")
    check_eq(r.body.get("device_id"), dev_id, "pin device_id")
    check(isinstance(word, str) and len(word.split()) >= 2, "safe word %r" % word)
    r = api.get("/devices/%d/pins" % dev_id)
    check_eq(r.status, 200, "GET /devices/{id}/pins")
    numbers = [p.get("number") for p in (r.body or {}).get("data", [])]
    check_eq(numbers, ["+639171234567"], "pins of the device (alphanumeric senders are never pinned)")
    sim.wait_event(lambda e: e.get("event") == "pins" and isinstance(e.get("payload"), dict)
                   and e["payload"].get("number") == "+639171234567" and e["payload"].get("safe_word") == word,
                   20, "P/pins with the new pin's safe word")

    # an outbound reply goes through the pin and carries the word
    out = api.send("+639171234567", "reply")
    check_eq(out.get("routing"), "pinned", "routing of a reply to an inbound-pinned number")
    ev = sim.wait_event(lambda e: e.get("event") == "send" and e.get("id") == out["id"], 20, "send of the reply")
    check_eq(ev.get("safe_word"), word, "safe_word on the wire")

    # safe word verification, dedupe by id, ack after store
    fancy = "-".join(w.capitalize() for w in word.split()) + "!"
    mqtt_pub(broker.port, P + "/inbound", {"id": "manual-1", "from": "+639171234567",
                                           "message": "It is me. " + fancy + " ok"})
    acks.wait_for(lambda t, p: isinstance(p, dict) and p.get("inbound") == "manual-1", 20, "ack of manual-1")
    mqtt_pub(broker.port, P + "/inbound", {"id": "manual-1", "from": "+639171234567",
                                           "message": "It is me. " + fancy + " ok"})
    time.sleep(T(1))
    n_acks = len([1 for t, p in acks.snapshot() if isinstance(p, dict) and p.get("inbound") == "manual-1"])
    check(n_acks >= 2, "every repeat of an inbound id is acknowledged (acks seen: %d)" % n_acks)
    mine = [x for x in inbound_list(api) if "It is me." in (x.get("message") or "")]
    check_eq(len(mine), 1, "one message per device and inbound id")
    if mine:
        check_eq(mine[0].get("safe_word_verified"), True, "safe word %r inside %r" % (word, mine[0].get("message")))

    glued = "".join(word.split())
    mqtt_pub(broker.port, P + "/inbound", {"id": "manual-2", "from": "+639171234567", "message": "x" + glued})
    acks.wait_for(lambda t, p: isinstance(p, dict) and p.get("inbound") == "manual-2", 20, "ack of manual-2")
    m2 = [x for x in inbound_list(api) if x.get("message") == "x" + glued]
    if check_eq(len(m2), 1, "manual-2 stored"):
        check_eq(m2[0].get("safe_word_verified"), False, "words glued together do not match")

    # invalid payload with an id: acknowledged, not stored
    before = len(inbound_list(api))
    mqtt_pub(broker.port, P + "/inbound", {"id": "broken-1", "message": "no sender"})
    acks.wait_for(lambda t, p: isinstance(p, dict) and p.get("inbound") == "broken-1", 20,
                  "ack of an invalid inbound payload that has an id")
    check_eq(len(inbound_list(api)), before, "an invalid inbound payload is not stored")

    # no id: stored once per publish, not acknowledged
    mqtt_pub(broker.port, P + "/inbound", {"from": "+639178888888", "message": "anonymous"})
    mqtt_pub(broker.port, P + "/inbound", {"from": "+639178888888", "message": "anonymous"})
    wait_until(lambda: len([x for x in inbound_list(api) if x.get("message") == "anonymous"]) >= 2, T(10),
               "two id-less inbound messages")
    check_eq(len([x for x in inbound_list(api) if x.get("message") == "anonymous"]), 2, "id-less inbound per publish")

    # published while the server is down: not lost, stored once, acknowledged
    n = len(inbound_list(api))
    sim.term()
    check_eq(srv.term(), 0, "server exit code after SIGTERM")
    sim2 = DevSim(dev, ["--inbound", "+639175550000:while you were out"])
    sim2.wait_event(lambda e: e.get("event") == "inbound", 20, "inbound published while the server is down")
    srv.start()
    sim2.wait_event(lambda e: e.get("event") == "ack", 40, "ack after the server is back")
    late = [x for x in inbound_list(api) if x.get("message") == "while you were out"]
    check_eq(len(late), 1, "inbound published while the server was down, stored once")
    check_eq(len(inbound_list(api)), n + 1, "inbound count after the restart")

    # filters
    r = api.get("/messages?direction=outbound")
    check(all(x.get("direction") == "outbound" for x in (r.body or {}).get("data", [])), "direction filter")
    r = api.get("/messages?number=%s" % quote("+63 917 123 4567", safe=""))
    check_eq(r.status, 200, "number filter")
    got = set(x.get("from") or x.get("to") for x in (r.body or {}).get("data", []))
    check_eq(got, {"+639171234567"}, "number filter matches to or from (normalised)")
    check(srv.alive() and sim2.alive(), "server alive")


def test_inbound_ids_remembered_seven_days():
    """A repeated inbound id is stored once for 7 days (API.md 8); after that
    the same id is a new SMS (phones reuse ids)."""
    broker = Broker()
    srv = Server(broker=broker, extra=["--test-clock", "1"])
    api = srv.api()
    dev = api.create_device("week")
    first = DevSim(dev)  # the server subscribed the device's topics once it shows online
    api.wait_online(dev["id"])
    first.term()

    def inbound(text):
        sim = DevSim(dev, ["--inbound-id", "same-id-1", "--inbound", "+639175550000:" + text])
        sim.wait_event(lambda e: e.get("event") == "ack" and e.get("inbound") == "same-id-1", 20,
                       "the inbound SMS acknowledged")
        sim.term()

    def count():
        return len(api.list_all(query="direction=inbound"))

    inbound("first")
    check_eq(count(), 1, "inbound messages after the first SMS")
    inbound("first again")
    check_eq(count(), 1, "a repeat of the id within 7 days is not stored again")
    r = api.post("/_test/clock", {"advance_seconds": 7 * 24 * 3600 + 60})
    check_eq(r.status, 200, "moving the clock")
    inbound("a week later")
    check_eq(count(), 2, "the same id after 7 days is a new SMS")


if __name__ == "__main__":
    run([test_inbound, test_inbound_ids_remembered_seven_days])
