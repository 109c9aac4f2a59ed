#!/usr/bin/python3
"""it_pins: the pins API and the device's copy of its safe words (API.md 4, 5, 8).

Pins made by sending are listed by number with cursor paging, read by the
raw or the URL-encoded normalised number, edited (with validation),
regenerated, reset one by one and all at once; every change is published to
the device on P/pins, and a send to a pinned number carries the pin's
current safe word. A reset number is pinned afresh by its next send.
"""
import os
import re
import sys
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, check, check_eq, check_problem, check_validation,  # noqa: E402
                     must, run)

WORDS = re.compile(r"^[a-z]{3,8}( [a-z]{3,8}){3}$")


def q(number):
    return quote(number, safe="")


def test_pins_api():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("pins")
    d = dev["id"]
    sim = DevSim(dev)
    sim.wait_connected()
    api.wait_online(d)
    numbers = ["+6391700000%02d" % i for i in range(7)]
    for n in numbers:
        m = api.send(n, "pin " + n)
        check_eq(m.get("routing"), "auto", "first send to %s" % n)
    check_eq(api.device(d).get("pins"), 7, "the device's pin count")

    # paging by number
    seen, cursor, pages = [], None, 0
    while True:
        r = api.get("/devices/%d/pins?limit=3%s" % (d, "&cursor=" + q(cursor) if cursor else ""))
        must(r.status == 200, "GET pins: %r" % r)
        seen += [p["number"] for p in r.body["data"]]
        cursor = r.body.get("next_cursor")
        pages += 1
        if cursor is None or pages > 10:
            break
    check_eq(seen, sorted(numbers), "all pins, by number, each once")
    check_eq(pages, 3, "pages of 3")

    # one pin, by raw and by encoded normalised number
    target = numbers[0]
    p1 = api.get("/devices/%d/pins/%s" % (d, q(target)))
    p2 = api.get("/devices/%d/pins/%s" % (d, q("+63 917-000-0000")))
    check_eq(p1.status, 200, "GET pin by %2B form")
    check_eq(p2.status, 200, "GET pin by raw form")
    check_eq(p1.body, p2.body, "both forms name one pin")
    check(WORDS.match(p1.body.get("safe_word", "")) is not None, "a safe word of four words: %r" % p1.body)
    check_eq(p1.body.get("device_id"), d, "pin device")
    check_problem(api.get("/devices/%d/pins/%s" % (d, q("+639999999999"))), 404, "not_found", "no such pin")
    check_problem(api.get("/devices/%d/pins/%s" % (d, "not-a-number")), 404, "not_found", "not a number")

    def pins_events():
        return [e.get("payload") for e in sim.snapshot() if e.get("event") == "pins"]

    # edit
    for bad in ("ab", "x" * 65, "hi there!", "----"):
        check_validation(api.patch("/devices/%d/pins/%s" % (d, q(target)), {"safe_word": bad}), "safe_word",
                         "PATCH safe_word %r" % bad)
    r = api.patch("/devices/%d/pins/%s" % (d, q(target)), {"safe_word": "blue-fox 42"})
    check_eq((r.status, r.body.get("safe_word")), (200, "blue-fox 42"), "PATCH safe_word")
    sim.wait_for(lambda evs: any(e.get("event") == "pins" and e.get("payload") ==
                                 {"number": target, "safe_word": "blue-fox 42"} for e in evs), 15,
                 "the edited word published")
    m = api.send(target, "pinned now")
    check_eq(m.get("routing"), "pinned", "second send to a pinned number")
    ev = sim.wait_event(lambda e: e.get("event") == "send" and e.get("id") == m["id"], 15, "the send")
    check_eq(ev.get("safe_word"), "blue-fox 42", "the send carries the current safe word")

    # regenerate
    r = api.post("/devices/%d/pins/%s/safe-word" % (d, q(target)), {})
    check_eq(r.status, 200, "regenerate")
    new = r.body.get("safe_word", "")
    check(WORDS.match(new) is not None and new != "blue-fox 42", "a new generated word: %r" % new)
    sim.wait_for(lambda evs: any(e.get("event") == "pins" and e.get("payload") == {"number": target, "safe_word": new}
                                 for e in evs), 15, "the new word published")

    # reset one
    check_eq(api.delete("/devices/%d/pins/%s" % (d, q(target))).status, 204, "DELETE one pin")
    sim.wait_for(lambda evs: any(e.get("event") == "pins" and e.get("payload") == {"number": target, "removed": True}
                                 for e in evs), 15, "the removal published")
    check_problem(api.get("/devices/%d/pins/%s" % (d, q(target))), 404, "not_found", "a reset pin")
    check_eq(api.device(d).get("pins"), 6, "pin count after one reset")
    m = api.send(target, "again")
    check_eq(m.get("routing"), "auto", "a reset number is pinned again by its next send")

    # reset all
    check_eq(api.delete("/devices/%d/pins" % d).status, 204, "DELETE all pins")
    sim.wait_for(lambda evs: any(e.get("event") == "pins" and e.get("payload") == {"removed_all": True}
                                 for e in evs), 15, "removed_all published")
    r = api.get("/devices/%d/pins" % d)
    check_eq((r.status, r.body.get("data"), r.body.get("next_cursor")), (200, [], None), "no pins after reset")
    check_eq(api.device(d).get("pins"), 0, "pin count after reset all")
    check(len(pins_events()) >= 7 + 3, "every change reached the device: %d events" % len(pins_events()))


if __name__ == "__main__":
    run([test_pins_api])
