#!/usr/bin/python3
"""it_isolation: one account can neither see nor touch another's resources
(API.md 1, 2, 3, 4, 6, 7).

Account A has devices (one online with a simulator), a pin with its safe
word, a pending and a delivered message, an extra token and an OTP code.
Account B, made with `taratxtd account create` while the server is stopped,
walks every route with A's ids: each answer is 404 not_found (never 403,
never a body with A's data); a body device_id of A's is 404, a filter on it
gives an empty list; B's lists hold none of A's items; B cannot verify A's
OTP code. Afterwards A's device, pin, messages, tokens and code are exactly
as before, and A's device kept its broker connection.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, T, check, check_eq, check_problem, must, run)  # noqa: E402

NUMBER = "+639172220001"
ENC = "%2B639172220001"


def test_isolation():
    broker = Broker()
    srv = Server(broker=broker)
    a = srv.api()

    dev = a.create_device("A's phone", rate_per_minute=40)
    dev_id = dev["id"]
    sim = DevSim(dev)
    sim.wait_connected()
    a.wait_online(dev_id)
    first = a.send(NUMBER, "A's private text")          # auto: pins NUMBER to dev
    check_eq(first.get("routing"), "auto", "routing of A's first send")
    a.wait_message(first["id"], "delivered")
    r = a.get("/devices/%d/pins/%s" % (dev_id, ENC))
    must(r.status == 200, "A's pin: %r" % r)
    pin = r.body
    off = a.create_device("A's offline phone")
    off_id = off["id"]
    pending = a.send("+639172220002", "A's queued text", dev_id=off_id, force=True)
    r = a.post("/tokens", {"name": "A's extra"})
    must(r.status == 201, "POST /tokens: %r" % r)
    a_tok_id, a_tok = r.body["id"], r.body["token"]

    # B is made while the server is stopped
    must(srv.term() == 0, "SIGTERM exit code")
    acct = srv.account_create("B")
    srv.start()
    a.wait_online(dev_id)
    connects = len([e for e in sim.snapshot() if e.get("event") == "connected"])
    pin_events = len([e for e in sim.snapshot() if e.get("event") == "pins"])

    # A's OTP code, sent after the restart (the simulator prints the text)
    r = a.post("/otp/send", {"number": NUMBER})
    must(r.status == 202, "A's OTP send: %r" % r)
    otp_mid = r.body["message_id"]
    ev = sim.wait_event(lambda e: e.get("event") == "send" and e.get("id") == otp_mid, 20, "A's OTP")
    code = "".join(ch for ch in ev.get("message", "").split("code is ")[-1].split(".")[0] if ch.isdigit())
    must(len(code) == 6, "OTP code from %r" % ev.get("message"))

    b = srv.api(acct["token"])
    secrets = [NUMBER, "private text", "queued text", pin.get("safe_word") or "\x00", "A's phone",
               "A's offline", "A's extra", dev["mqtt"]["password"]]

    def walk(method, path, body=None):
        r = b.req(method, path, body)
        what = "B: %s %s" % (method, path)
        check_problem(r, 404, "not_found", what)
        check(r.status != 403, "%s: 403 leaks existence" % what)
        for s in secrets:
            check(s not in r.text, "%s: the answer shows A's data %r: %s" % (what, s, r.text[:200]))
        return r

    d = dev_id
    walk("GET", "/messages/%d" % first["id"])
    walk("GET", "/messages/%d" % pending["id"])
    walk("GET", "/messages/%d" % otp_mid)
    walk("DELETE", "/messages/%d" % pending["id"])
    walk("GET", "/devices/%d" % d)
    walk("GET", "/devices/%d" % off_id)
    walk("PATCH", "/devices/%d" % d, {"name": "B owns it", "rate_per_minute": 1})
    walk("POST", "/devices/%d/messages" % d, {"to": NUMBER, "message": "from B", "force": True})
    walk("POST", "/devices/%d/messages" % off_id, {"to": NUMBER, "message": "from B", "force": True})
    walk("POST", "/devices/%d/credentials" % d, {})
    walk("GET", "/devices/%d/pins" % d)
    walk("GET", "/devices/%d/pins/%s" % (d, ENC))
    walk("GET", "/devices/%d/pins/%s" % (d, NUMBER))
    walk("PATCH", "/devices/%d/pins/%s" % (d, ENC), {"safe_word": "stolen word here"})
    walk("POST", "/devices/%d/pins/%s/safe-word" % (d, ENC), {})
    walk("DELETE", "/devices/%d/pins/%s" % (d, ENC))
    walk("DELETE", "/devices/%d/pins" % d)
    walk("DELETE", "/tokens/%d" % a_tok_id)
    walk("DELETE", "/devices/%d" % off_id)
    walk("DELETE", "/devices/%d" % d)
    walk("POST", "/messages", {"to": NUMBER, "message": "via A's device", "device_id": d, "force": True})
    walk("POST", "/otp/send", {"number": NUMBER, "device_id": d})

    # POST /devices/{id} is no route of the contract (405 comes before the
    # resource check): B must get exactly what an unknown id gets
    r = b.post("/devices/%d" % d, {})
    r0 = b.post("/devices/999999", {})
    check(r.status in (404, 405) and r.status != 403, "B: POST /devices/{id} of A's device: %r" % r)
    check_eq((r.status, (r.body or {}).get("code")), (r0.status, (r0.body or {}).get("code")),
             "B: POST /devices/{id}: A's id answers like an unknown id")
    check(all(s not in r.text for s in secrets), "B: POST /devices/{id} shows A's data: %s" % r.text[:200])

    # a batch naming A's device: the item is 404
    r = b.post("/messages/batch", {"messages": [{"to": NUMBER, "message": "x", "device_id": d, "force": True}]})
    if check_eq(r.status, 207, "B: batch with A's device_id"):
        item = ((r.body or {}).get("data") or [{}])[0]
        check_eq(item.get("status"), 404, "B: batch item with A's device_id")

    # filters and lists
    for q in ("device_id=%d" % d, "device_id=%d" % off_id, "number=" + ENC, ""):
        r = b.get("/messages" + ("?" + q if q else ""))
        check_eq(r.status, 200, "B: GET /messages?%s" % q)
        check_eq((r.body or {}).get("data"), [], "B: GET /messages?%s" % q)
    for path in ("/devices",):
        r = b.get(path)
        check_eq((r.status, (r.body or {}).get("data")), (200, []), "B: GET %s" % path)
    r = b.get("/tokens")
    ids = [t.get("id") for t in (r.body or {}).get("data", [])]
    check_eq(len(ids), 1, "B lists its own token only: %r" % ids)
    check(a_tok_id not in ids, "B's token list shows A's token")

    # OTP codes are per account
    r = b.post("/otp/verify", {"number": NUMBER, "code": code})
    check_eq(r.status, 200, "B: POST /otp/verify for A's number")
    check_eq(r.body, {"verified": False, "reason": "not_found"}, "B verifying A's code")
    for _ in range(6):
        b.post("/otp/verify", {"number": NUMBER, "code": "000000" if code != "000000" else "111111"})

    # nothing B did changed A's resources
    time.sleep(T(0.5))
    dv = a.device(dev_id)
    check_eq(dv.get("name"), "A's phone", "A's device name")
    check_eq(dv.get("rate_per_minute"), 40, "A's device rate_per_minute")
    check_eq(dv.get("online"), True, "A's device still online")
    check_eq(dv.get("pins"), 1, "A's device pin count")
    check_eq(a.device(off_id).get("name"), "A's offline phone", "A's offline device")
    r = a.get("/devices/%d/pins/%s" % (dev_id, ENC))
    check_eq(r.status, 200, "A's pin still there")
    check_eq((r.body or {}).get("safe_word"), pin.get("safe_word"), "A's safe word unchanged")
    check_eq([p.get("number") for p in a.list_all("/devices/%d/pins" % dev_id)], [NUMBER], "A's pins")
    check_eq(a.message(pending["id"]).get("status"), "pending", "A's queued message not cancelled")
    check_eq(a.message(first["id"]).get("status"), "delivered", "A's delivered message")
    check_eq(sorted(x.get("id") for x in a.list_all()), sorted([first["id"], pending["id"], otp_mid]),
             "A's messages: nothing added by B")
    check_eq(srv.api(a_tok).get("/devices").status, 200, "A's extra token still works")
    check_eq(sorted(x.get("id") for x in a.list_all("/devices")), sorted([dev_id, off_id]), "A's devices")
    check_eq(len([e for e in sim.snapshot() if e.get("event") == "connected"]), connects,
             "A's device was not disconnected (no credential rotation by B)")
    sent_from_b = [e for e in sim.sends() if e.get("message") in ("from B", "via A's device", "x")]
    check_eq(sent_from_b, [], "A's device sent nothing for B")
    pushed = [e for e in sim.snapshot() if e.get("event") == "pins"][pin_events:]
    check_eq(pushed, [], "pin changes published to A's device after B's requests")
    check_eq(a.post("/otp/verify", {"number": NUMBER, "code": code}).body, {"verified": True},
             "A's code verifies after B's tries")


if __name__ == "__main__":
    run([test_isolation])
