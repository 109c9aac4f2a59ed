#!/usr/bin/python3
"""it_message_ops: the rest of the message and device routes (API.md 1-3).

Idempotency-Key replay (same status and body, nothing new, also across a
restart; a different body is 422 idempotency_key_reused; a bad key is 422 on
field Idempotency-Key), cancel (DELETE /messages/{id}), batch sends (207,
per-item results in order, the second item to a number pinned by the first
is pinned), ttl expiry, and PATCH / DELETE / credential rotation of devices.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, T, check, check_eq, check_problem, check_validation,  # noqa: E402
                     must, run, wait_until)


def count_messages(api):
    return len(api.list_all())


def test_idempotency():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("idem")
    dev_id = dev["id"]
    body = {"to": "+639171234567", "message": "once", "device_id": dev_id, "force": True}
    r1 = api.post("/messages", body, headers={"Idempotency-Key": "order-1"})
    must(r1.status == 202, "first keyed POST: %r" % r1)
    n = count_messages(api)
    r2 = api.post("/messages", {"force": True, "device_id": dev_id, "message": "once", "to": "+639171234567"},
                  headers={"Idempotency-Key": "order-1"})
    check_eq(r2.status, 202, "replay status")
    check_eq(r2.body, r1.body, "replay body (key order of the request does not matter)")
    check_eq(count_messages(api), n, "a replay creates nothing")
    r3 = api.post("/messages", dict(body, message="twice"), headers={"Idempotency-Key": "order-1"})
    check_problem(r3, 422, "idempotency_key_reused", "same key, different body")
    r4 = api.post("/devices/%d/messages" % dev_id, {"to": "+639171234567", "message": "once", "force": True},
                  headers={"Idempotency-Key": "order-1"})
    check_eq(r4.status, 202, "the same key on another route is another key")
    check(r4.body.get("id") != r1.body.get("id"), "another route's key creates its own message")
    for bad in ("", "x" * 256, "caf\u00e9".encode("utf-8").decode("latin-1")):
        r = api.post("/messages", body, headers={"Idempotency-Key": bad})
        check_validation(r, "Idempotency-Key", "Idempotency-Key %r" % bad[:20])
    # a 409 is stored too: the same key answers 409 again even once the device is online
    r5 = api.post("/messages", {"to": "+639170000001", "message": "x", "device_id": dev_id},
                  headers={"Idempotency-Key": "offline-1"})
    check_problem(r5, 409, "device_offline", "keyed send to an offline device")
    check_eq(srv.term(), 0, "exit code")
    srv.start()
    r6 = api.post("/messages", body, headers={"Idempotency-Key": "order-1"})
    check_eq((r6.status, r6.body), (202, r1.body), "replay after a restart")
    sim = DevSim(dev)
    api.wait_online(dev_id)
    r7 = api.post("/messages", {"to": "+639170000001", "message": "x", "device_id": dev_id},
                  headers={"Idempotency-Key": "offline-1"})
    check_eq((r7.status, r7.body), (r5.status, r5.body), "a stored 409 is replayed")
    api.wait_message(r1.body["id"], "delivered", 20)
    check_eq(len(sim.sends(r1.body["id"])), 1, "the keyed message is handed over once")


def test_cancel_ttl_batch():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("ops", rate_per_minute=600)
    dev_id = dev["id"]
    keep = api.send("+639171234567", "keep", dev_id=dev_id, force=True)
    drop = api.send("+639171234567", "drop", dev_id=dev_id, force=True)
    short = api.send("+639171234567", "short-lived", dev_id=dev_id, force=True, ttl=10)
    r = api.delete("/messages/%d" % drop["id"])
    check_eq(r.status, 200, "DELETE of a pending message")
    check_eq((r.body or {}).get("status"), "cancelled", "status in the DELETE body")
    check_eq(api.message(drop["id"]).get("status"), "cancelled", "GET after cancel")
    check_problem(api.delete("/messages/%d" % drop["id"]), 409, "not_cancellable", "cancel twice")
    check_problem(api.delete("/messages/99999999"), 404, "not_found", "cancel of no message")

    t0 = time.time()
    f = api.wait_message(short["id"], "failed", 25)
    check_eq(f.get("error"), "expired", "error of an expired message")
    check(time.time() - t0 < T(20), "expired within its ttl and a little")

    # batch
    items = [{"to": "+639175550001", "message": "b1"}, {"to": "+63 917 555 0001", "message": "b2"},
             {"to": "nope", "message": "b3"}, {"to": "+639175550002", "message": "b4", "device_id": 99999999},
             {"to": "+639175550003", "message": "b5", "device_id": dev_id}]
    sim = DevSim(dev)
    api.wait_online(dev_id)
    r = api.post("/messages/batch", {"messages": items})
    must(r.status == 207, "POST /messages/batch: %r" % r)
    data = (r.body or {}).get("data", [])
    check_eq([x.get("status") for x in data], [202, 202, 422, 404, 202], "per-item statuses in order")
    if len(data) == 5:
        check_eq(data[0].get("message", {}).get("routing"), "auto", "first item routing")
        check_eq(data[1].get("message", {}).get("routing"), "pinned", "second item to the number the first pinned")
        check_eq(data[2].get("error", {}).get("code"), "validation_failed", "error of an invalid item")
        check_eq(data[3].get("error", {}).get("code"), "not_found", "error of an item naming no device")
        check_eq(data[4].get("message", {}).get("routing"), "direct", "routing of an item with device_id")
        for x in (data[0], data[1], data[4]):
            mid = x.get("message", {}).get("id")
            if mid:
                api.wait_message(mid, "delivered", 20)
    r = api.post("/messages/batch", {"messages": [{"to": "+639175550001", "message": "x"}] * 1001})
    check_problem(r, 422, "validation_failed", "batch of 1001 items")
    r = api.post("/messages/batch", {"messages": []})
    check_problem(r, 422, "validation_failed", "empty batch")

    api.wait_message(keep["id"], "delivered", 20)
    check_eq(api.message(drop["id"]).get("status"), "cancelled", "cancelled stays cancelled")
    check_eq(sim.sends(drop["id"]), [], "a cancelled message is never handed over")
    check_eq(sim.sends(short["id"]), [], "an expired message is never handed over")
    check_problem(api.delete("/messages/%d" % keep["id"]), 409, "not_cancellable", "cancel of a delivered message")


def test_device_admin():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("old name")
    dev_id = dev["id"]
    r = api.patch("/devices/%d" % dev_id, {"name": "new name", "rate_per_minute": 12})
    check_eq(r.status, 200, "PATCH /devices/{id}")
    check_eq(((r.body or {}).get("name"), (r.body or {}).get("rate_per_minute")), ("new name", 12), "patched fields")
    check("mqtt" not in (r.body or {}), "PATCH must not reveal credentials")
    check_validation(api.patch("/devices/%d" % dev_id, {"rate_per_minute": 601}), "rate_per_minute", "PATCH rate 601")
    check_eq(api.device(dev_id).get("name"), "new name", "GET after PATCH")

    r = api.post("/devices/%d/credentials" % dev_id)
    check_eq(r.status, 200, "POST /devices/{id}/credentials")
    mq = (r.body or {}).get("mqtt") or {}
    check(mq.get("password") and mq.get("password") != dev["mqtt"]["password"], "a new password")
    check_eq(mq.get("topic_prefix"), dev["mqtt"]["topic_prefix"], "topic prefix kept")

    queued = api.send("+639171234567", "doomed", dev_id=dev_id, force=True)
    r = api.delete("/devices/%d" % dev_id)
    check_eq(r.status, 204, "DELETE /devices/{id}")
    check_eq(r.raw, b"", "204 has no body")
    check_problem(api.get("/devices/%d" % dev_id), 404, "not_found", "GET a deleted device")
    m = api.message(queued["id"])
    check_eq((m.get("status"), m.get("error")), ("failed", "device_deleted"), "a deleted device's queued message")
    check_problem(api.post("/devices/%d/messages" % dev_id, {"to": "+639171234567", "message": "x", "force": True}),
                  404, "not_found", "send through a deleted device")
    r = api.post("/messages", {"to": "+639171234567", "message": "x", "force": True})
    check_problem(r, 409, "no_devices", "routed send after the only device was deleted")


if __name__ == "__main__":
    run([test_idempotency, test_cancel_ttl_batch, test_device_admin])
