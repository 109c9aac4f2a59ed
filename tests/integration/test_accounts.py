#!/usr/bin/python3
"""it_accounts: accounts are isolated (API.md 1, 7, 10).

A second account made with `taratxtd account create` (server stopped) gets
its own token; it sees none of the first account's messages or devices: each
is 404 (never 403), lists are empty, sends through the other's device are
404. The first account is unaffected.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, Server, TOKEN_RE, check, check_eq, check_problem, must, run)  # noqa: E402


def ids(r, what):
    """ids of a list response, or None (recorded as a failure) when it is not 200."""
    if not check_eq(r.status, 200, what):
        return None
    return [x.get("id") for x in (r.body or {}).get("data", [])]


def test_accounts():
    broker = Broker()
    srv = Server(broker=broker)
    a1 = srv.api()
    dev = a1.create_device("first's phone")
    dev_id = dev["id"]
    m = a1.send("+639171234567", "private", dev_id=dev_id, force=True)
    mid = m["id"]

    rc = srv.term()
    check_eq(rc, 0, "exit code after SIGTERM")
    acct = srv.account_create("second")
    check(isinstance(acct.get("account_id"), int) and acct.get("account_id") > 0,
          "account create: account_id %r" % acct)
    tok2 = acct.get("token")
    must(isinstance(tok2, str), "account create printed no token: %r" % acct)
    check(TOKEN_RE.match(tok2) is not None, "token format %r" % tok2)
    check(tok2 != srv.token, "the second account's token differs from the first")
    acct3 = srv.account_create("third")
    check(acct3.get("account_id") != acct.get("account_id"), "account ids are distinct: %r %r" % (acct, acct3))

    srv.start()
    a2 = srv.api(tok2)

    r = a2.get("/messages/%d" % mid)
    check_problem(r, 404, "not_found", "another account's message")
    r = a2.get("/messages")
    check_eq(r.status, 200, "GET /messages as the second account")
    check_eq((r.body or {}).get("data"), [], "second account's message list")
    r = a2.get("/messages?device_id=%d" % dev_id)
    check_eq((r.body or {}).get("data"), [], "second account's list filtered by the first's device")
    r = a2.get("/devices/%d" % dev_id)
    check_problem(r, 404, "not_found", "another account's device")
    r = a2.get("/devices")
    check_eq(r.status, 200, "GET /devices as the second account")
    check_eq((r.body or {}).get("data"), [], "second account's device list")
    r = a2.post("/devices/%d/messages" % dev_id, {"to": "+639171234567", "message": "hijack", "force": True})
    check_problem(r, 404, "not_found", "send through another account's device")
    r = a2.post("/messages", {"to": "+639171234567", "message": "hijack", "device_id": dev_id, "force": True})
    check_problem(r, 404, "not_found", "POST /messages with another account's device_id")
    r = a2.post("/messages", {"to": "+639171234567", "message": "no devices", "force": True})
    check_problem(r, 409, "no_devices", "POST /messages from an account without devices")
    r = a2.patch("/devices/%d" % dev_id, {"name": "mine now"})
    check_problem(r, 404, "not_found", "PATCH another account's device")
    r = a2.delete("/messages/%d" % mid)
    check_problem(r, 404, "not_found", "DELETE another account's message")

    # the second account's own device does not leak to the first
    d2 = a2.create_device("second's phone")
    r = a1.get("/devices/%d" % d2["id"])
    check_problem(r, 404, "not_found", "first account reading the second's device")
    got = ids(a1.get("/devices"), "GET /devices as the first account")
    if got is not None:
        check_eq(got, [dev_id], "first account's devices")
    m2 = a2.send("+639170000000", "second's", dev_id=d2["id"], force=True)
    check_problem(a1.get("/messages/%d" % m2["id"]), 404, "not_found", "first account reading the second's message")
    got = ids(a1.get("/messages"), "GET /messages as the first account")
    if got is not None:
        check_eq(got, [mid], "first account's messages")

    # first account unaffected
    check_eq(a1.get("/messages/%d" % mid).status, 200, "first account still reads its message")
    check_eq(a1.get("/devices/%d" % dev_id).body.get("name"), "first's phone", "first account's device unchanged")
    check_eq(a1.get("/devices/%d" % dev_id).body.get("queue", {}).get("pending"), 1, "first device's queue")
    r = srv.api(acct3.get("token")).get("/devices")
    check_eq(r.status, 200, "third account's token works")


if __name__ == "__main__":
    run([test_accounts])
