#!/usr/bin/python3
"""it_lists: GET /messages filters and paging, and concurrent Idempotency-Keys.

Every filter of API.md 2 (direction, status, device_id, number in raw or
normalised form, since/until on created_at) narrows the list to exactly the
messages it names, newest first; bad filter values are 422 on the parameter.
Paging with a small limit while new messages keep arriving neither skips nor
repeats a message that existed when paging began. Two concurrent requests
with one Idempotency-Key create one message: the other gets the same answer
(it arrived after) or 409 idempotency_key_in_use (it arrived while the first
ran), never a second message.
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, T, check, check_eq, check_problem, check_validation,  # noqa: E402
                     must, run, wait_until)


def ids(items):
    return [m["id"] for m in items]


def test_filters_and_paging():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    a, b = api.create_device("A"), api.create_device("B")
    sim_a = DevSim(a)
    sim_a.wait_connected()
    api.wait_online(a["id"])
    m1 = api.send("+639170000001", "one", dev_id=a["id"])
    api.wait_message(m1["id"], "delivered", 20)
    time.sleep(0.05)  # distinct created_at times for since/until
    m2 = api.send("+639170000002", "two", dev_id=b["id"], force=True)      # pending on offline B
    m3 = api.send("+639170000001", "three", dev_id=b["id"], force=True)    # same number, other device
    sim_a.term()
    api.wait_online(a["id"], online=False)
    # an inbound message from a number: listed with direction inbound
    DevSim(b, ["--inbound", "+63 917 000 0001:hello back"]).wait_event(
        lambda e: e.get("event") == "ack", 20, "inbound acknowledged")
    inbound = wait_until(lambda: api.list_all(query="direction=inbound"), T(20), "inbound listed")
    check_eq(len(inbound), 1, "inbound messages")
    every = api.list_all()
    check_eq(ids(every), sorted(ids(every), reverse=True), "newest first")
    check_eq(set(ids(every)), {m1["id"], m2["id"], m3["id"], inbound[0]["id"]}, "all messages listed")

    def listed(query):
        return ids(api.list_all(query=query))

    check_eq(listed("direction=outbound"), [m3["id"], m2["id"], m1["id"]], "direction=outbound")
    check_eq(listed("status=delivered"), [m1["id"]], "status=delivered")
    check_eq(set(listed("status=pending")), {m2["id"], m3["id"]}, "status=pending")
    check_eq(listed("device_id=%d" % a["id"]), [m1["id"]], "device_id=A")
    check_eq(listed("device_id=999999"), [], "device_id of no device: an empty list")
    check_eq(listed("number=%2B639170000001"), [inbound[0]["id"], m3["id"], m1["id"]],
             "number (to or from), normalised form")
    check_eq(listed("number=%2B63%20917%20000%200001"), [inbound[0]["id"], m3["id"], m1["id"]],
             "number, raw form")
    created = {m["id"]: m["created_at"] for m in every}
    since = created[m2["id"]]
    check_eq(set(listed("since=" + since)), {m2["id"], m3["id"], inbound[0]["id"]}, "since (inclusive)")
    check_eq(listed("until=" + since), [m1["id"]], "until (exclusive)")
    check_eq(listed("since=%s&until=%s" % (since, created[m3["id"]])), [m2["id"]], "since and until")
    for bad in ("direction=sideways", "status=lost", "since=yesterday", "until=2026-13-01T00:00:00Z",
                "limit=0", "limit=501", "cursor=abc", "device_id=x"):
        r = api.get("/messages?" + bad)
        check_validation(r, bad.split("=")[0], "GET /messages?" + bad)


def test_paging_while_arriving():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("P")
    for i in range(40):
        api.send("+6391700%05d" % i, "before %d" % i, dev_id=dev["id"], force=True)
    before = set(ids(api.list_all()))
    seen, cursor, pages = [], None, 0
    while True:
        q = "limit=7" + ("&cursor=" + cursor if cursor else "")
        r = api.get("/messages?" + q)
        must(r.status == 200, "GET /messages?%s: %r" % (q, r))
        seen.extend(ids(r.body["data"]))
        # new messages arrive between pages
        api.send("+6391799%05d" % pages, "during", dev_id=dev["id"], force=True)
        cursor = r.body.get("next_cursor")
        pages += 1
        if cursor is None or pages > 50:
            break
    check_eq(len(seen), len(set(seen)), "no message repeated while paging")
    check(before <= set(seen), "no message that existed when paging began was skipped: missing %s"
          % sorted(before - set(seen)))
    check_eq(seen, sorted(seen, reverse=True), "pages stay newest first")


def test_concurrent_idempotency():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("I")
    body = {"to": "+639171234567", "message": "exactly once", "device_id": dev["id"], "force": True}
    for round_no in range(5):
        key = "race-%d" % round_no
        results = [None] * 8
        gate = threading.Barrier(8)

        def one(i):
            gate.wait()
            results[i] = api.post("/messages", body, headers={"Idempotency-Key": key})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [r for r in results if r.status == 202]
        busy = [r for r in results if r.status == 409]
        check(len(ok) + len(busy) == 8, "every answer is 202 or 409: %s" % [r.status for r in results])
        check(len(ok) >= 1, "at least one request of round %d succeeded" % round_no)
        check(len(set(r.body["id"] for r in ok)) == 1, "one message for one key: %s"
              % sorted(set(r.body["id"] for r in ok)))
        for r in busy:
            check_problem(r, 409, "idempotency_key_in_use", "a concurrent request with the same key")
    outbound = api.list_all(query="direction=outbound")
    check_eq(len(outbound), 5, "five keys, five messages")


if __name__ == "__main__":
    run([test_filters_and_paging, test_paging_while_arriving, test_concurrent_idempotency])
