#!/usr/bin/python3
"""it_send_delivered: the happy path a user sees (API.md 1-3, 8).

A message posted to /messages is accepted with 202, Location and the message
object of API.md 2; the device receives it once (attempt 1, with the pin's
safe word) and reports; GET shows it delivered. A direct send says
routing "direct". Lists are newest first and page with an opaque cursor,
without repeats or skips even while new messages arrive.
"""
import json
import os
import stat
import sys
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, T, check, check_eq, check_time, must, run,  # noqa: E402
                     TOKEN_RE)

MSG_KEYS = ["id", "direction", "status", "to", "from", "message", "device_id", "routing",
            "forced", "priority", "encoding", "segments", "attempts", "created_at",
            "dispatched_at", "sent_at", "delivered_at", "failed_at", "error"]


def check_message_object(m, what):
    for k in MSG_KEYS:
        check(k in m, "%s: field %r missing from %r" % (what, k, m))
    check(isinstance(m.get("id"), int) and m.get("id") > 0, "%s: id must be a positive integer: %r" % (what, m.get("id")))


def test_send_delivered():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()

    # initial token: written once, mode 0600, tt_ + 32 base62
    tokpath = os.path.join(srv.data, "initial-token")
    mode = stat.S_IMODE(os.stat(tokpath).st_mode)
    check_eq(oct(mode), oct(0o600), "mode of DIR/initial-token")
    check(TOKEN_RE.match(srv.token or "") is not None, "initial token format: %r" % srv.token)

    h = api.get("/healthz")
    check_eq(h.status, 200, "GET /healthz")
    check_eq((h.body or {}).get("status"), "ok", "healthz status")
    check_eq((h.body or {}).get("store"), "ok", "healthz store")

    dev = api.create_device("Office phone")
    dev_id = dev["id"]
    mq = dev["mqtt"]
    check_eq(mq.get("url"), broker.url, "mqtt.url (the server's --mqtt-url)")
    for k in ("client_id", "username", "password", "topic_prefix"):
        check(isinstance(mq.get(k), str) and mq.get(k), "mqtt.%s missing: %r" % (k, mq))
    check_eq(mq.get("topic_prefix"), "taratxt/v1/devices/%d" % dev_id, "mqtt.topic_prefix")
    check_eq(dev.get("name"), "Office phone", "device name")
    check_eq(dev.get("online"), False, "new device online")
    check_eq(dev.get("rate_per_minute"), 30, "default rate_per_minute")
    check_eq(dev.get("queue"), {"pending": 0, "in_flight": 0}, "new device queue")
    check_time(dev.get("created_at"), "device created_at")

    sim = DevSim(dev)
    sim.wait_connected()
    api.wait_online(dev_id)

    # ---- POST /messages: 202, Location, the object
    r = api.post("/messages", {"to": "+63 917-123-4567", "message": "hello"})
    must(r.status == 202, "POST /messages: expected 202, seen %r" % r)
    m = r.body
    check_message_object(m, "202 body")
    mid = m["id"]
    check_eq(r.header("location"), "/api/v1/messages/%d" % mid, "Location header")
    check_eq(m.get("to"), "+639171234567", "to (normalised)")
    check_eq(m.get("from"), None, "from")
    check_eq(m.get("message"), "hello", "message")
    check_eq(m.get("status"), "pending", "status at 202")
    check_eq(m.get("direction"), "outbound", "direction")
    check_eq(m.get("encoding"), "GSM-7", "encoding")
    check_eq(m.get("segments"), 1, "segments")
    check_eq(m.get("priority"), "normal", "priority")
    check_eq(m.get("forced"), False, "forced")
    check_eq(m.get("device_id"), dev_id, "device_id")
    check(m.get("routing") in ("auto", "direct"), "routing: expected auto, seen %r" % m.get("routing"))
    check_eq(m.get("routing"), "auto", "routing of a first send to an unpinned number")
    check(m.get("attempts") in (0, 1), "attempts at 202: %r" % m.get("attempts"))
    check_time(m.get("created_at"), "created_at")
    for k in ("sent_at", "delivered_at", "failed_at", "error"):
        check_eq(m.get(k), None, "%s at 202" % k)

    ev = sim.wait_event(lambda e: e.get("event") == "send" and e.get("id") == mid, 20, "send of %d" % mid)
    check_eq(ev.get("attempt"), 1, "attempt of the first hand-over")
    check_eq(ev.get("to"), "+639171234567", "to on the wire")
    check_eq(ev.get("message"), "hello", "message on the wire")
    check(isinstance(ev.get("safe_word"), str) and len(ev.get("safe_word")) >= 4,
          "a send to a number just pinned (routing auto) carries the pin's safe_word: %r" % ev.get("safe_word"))

    done = api.wait_message(mid, "delivered", 20)
    check_time(done.get("sent_at"), "sent_at after delivery")
    check_time(done.get("delivered_at"), "delivered_at")
    check_time(done.get("dispatched_at"), "dispatched_at")
    check_eq(done.get("attempts"), 1, "attempts after delivery")
    check_eq(done.get("error"), None, "error after delivery")
    check_eq(done.get("failed_at"), None, "failed_at after delivery")
    check_message_object(done, "GET /messages/{id}")
    check_eq(len(sim.sends(mid)), 1, "hand-overs of %d" % mid)

    # the same number again: pinned
    m2 = api.send("+639171234567", "again")
    check_eq(m2.get("routing"), "pinned", "routing of a second send to the same number")
    check_eq(m2.get("device_id"), dev_id, "device of the pinned send")

    # ---- direct send
    r = api.post("/devices/%d/messages" % dev_id, {"to": "+639170000001", "message": "direct one"})
    must(r.status == 202, "POST /devices/{id}/messages: %r" % r)
    d = r.body
    check_eq(d.get("routing"), "direct", "routing of a direct send")
    check_eq(d.get("device_id"), dev_id, "device_id of a direct send")
    check_eq(r.header("location"), "/api/v1/messages/%d" % d.get("id"), "Location of a direct send")
    api.wait_message(d["id"], "delivered", 20)

    # ---- encodings and segments
    u = api.send("+639170000002", "\u3053\u3093\u306b\u3061\u306f", dev_id=dev_id)
    check_eq((u.get("encoding"), u.get("segments")), ("UCS-2", 1), "encoding/segments of Japanese text")
    g = api.send("+639170000002", "a" * 161, dev_id=dev_id)
    check_eq((g.get("encoding"), g.get("segments")), ("GSM-7", 2), "encoding/segments of 161 GSM-7 chars")
    e = api.send("+639170000002", "\u20ac" * 80, dev_id=dev_id)
    check_eq((e.get("encoding"), e.get("segments")), ("GSM-7", 1), "80 euro signs (extension, two septets each)")
    e = api.send("+639170000002", "\u20ac" * 81, dev_id=dev_id)
    check_eq((e.get("encoding"), e.get("segments")), ("GSM-7", 2), "81 euro signs")

    ids = [mid, m2["id"], d["id"], u["id"], g["id"], e["id"] - 1, e["id"]]
    for i in range(5):
        ids.append(api.send("+63917555000%d" % i, "list %d" % i, dev_id=dev_id)["id"])
    # every message delivered, none handed over twice
    for i in ids:
        api.wait_message(i, "delivered", 60)
    dup = [x for x in sim.sends() if x.get("duplicate")]
    check_eq(dup, [], "duplicate hand-overs in a healthy run")

    # ---- devices list
    r = api.get("/devices")
    check_eq(r.status, 200, "GET /devices")
    if r.status == 200:
        check_eq([x.get("id") for x in r.body.get("data", [])], [dev_id], "GET /devices ids")
        check_eq(r.body.get("next_cursor"), None, "GET /devices next_cursor")
        for x in r.body.get("data", []):
            check("password" not in json.dumps(x), "GET /devices must not show the MQTT password")

    # ---- lists: newest first, cursor pages
    every = api.list_all(limit=500)
    listed = [x.get("id") for x in every]
    check_eq(listed, sorted(listed, reverse=True), "GET /messages order (newest first)")
    check(set(ids) <= set(listed), "GET /messages lacks ids %r" % (set(ids) - set(listed)))
    check_eq(len(listed), len(set(listed)), "GET /messages repeats")

    r = api.get("/messages")
    check_eq(r.status, 200, "GET /messages")
    check(isinstance(r.body, dict) and "data" in r.body and "next_cursor" in r.body,
          "list envelope {data,next_cursor}: %r" % r.text[:200])
    check_eq(r.body.get("next_cursor"), None, "next_cursor of a complete first page")

    pages = []
    cursor = None
    n_pages = 0
    inserted = None
    while True:
        q = "/messages?limit=3" + ("" if cursor is None else "&cursor=" + quote(cursor, safe=""))
        r = api.get(q)
        must(r.status == 200, "GET %s: %r" % (q, r))
        page = [x["id"] for x in r.body["data"]]
        check(len(page) <= 3, "page larger than limit: %r" % page)
        pages.extend(page)
        cursor = r.body.get("next_cursor")
        n_pages += 1
        if n_pages == 1:
            # a message arriving while paging must neither be repeated nor
            # shift the pages (it is newer than the cursor)
            inserted = api.send("+639175559999", "arrives mid-paging", dev_id=dev_id)["id"]
        if cursor is None:
            check(len(page) <= 3, "last page")
            break
        check(isinstance(cursor, str) and cursor, "next_cursor must be an opaque string: %r" % cursor)
        must(n_pages < 100, "paging does not end")
    check_eq(pages, listed, "ids seen paging by 3 (no repeats, no skips, newest first)")
    check(inserted not in pages, "a message created after the first page must not appear in later pages")
    check(n_pages >= 4, "paging by 3 over %d items took %d pages" % (len(listed), n_pages))

    r = api.get("/messages?limit=1")
    check_eq(len(r.body.get("data", [])), 1, "limit=1")
    check_eq(r.body["data"][0]["id"], inserted, "newest message first")

    check(srv.alive(), "server alive at the end")

if __name__ == "__main__":
    run([test_send_delivered])
