#!/usr/bin/python3
"""it_metrics: GET /metrics as a Prometheus scraper sees it (API.md 7, 1).

After real traffic (a device online, a delivered message, a 404, a 401),
/metrics answers 200 text/plain without auth, passes `promtool check
metrics` silently, and shows requests by route pattern, method and status
(patterns, never raw paths), messages by status, devices online, mailbox
depths, the store's commit histograms and store_up. Counters move with the
traffic between two scrapes. /healthz needs no auth either.
"""
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, T, check, check_eq, must, run, wait_until)  # noqa: E402

SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?\s*')


def parse(text):
    """[(name, {labels}, float value)] of every sample line."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if not check(m is not None, "unparsable metrics line %r" % line):
            continue
        labels = dict(LABEL_RE.findall(m.group(3) or ""))
        try:
            v = float(m.group(4))
        except ValueError:
            check(False, "metrics value not a number: %r" % line)
            continue
        out.append((m.group(1), labels, v))
    return out


def find(samples, name, **labels):
    """Values of the samples named name whose labels include labels."""
    return [v for (n, l, v) in samples if n == name and all(l.get(k) == w for k, w in labels.items())]


def one(samples, name, what, **labels):
    vals = find(samples, name, **labels)
    check(len(vals) == 1, "%s: expected one sample %s%r, seen %r" % (what, name, labels, vals))
    return vals[0] if vals else None


def scrape(srv, what):
    api = srv.api(token=None)
    r = api.get("/metrics")
    must(r.status == 200, "%s: GET /metrics without a token: %r" % (what, r))
    ct = (r.header("content-type") or "").lower()
    check(ct.startswith("text/plain"), "%s: Content-Type %r, expected text/plain" % (what, ct))
    return r.text, parse(r.text)


def test_metrics():
    must(shutil.which("promtool") is not None,
         "promtool (Debian package prometheus) is not installed; scripts/test installs it")
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    anon = srv.api(token=None)

    h = anon.get("/healthz")
    check_eq(h.status, 200, "GET /healthz without a token")
    h = srv.api(token="tt_wrongwrongwrongwrongwrongwrongwron").get("/healthz")
    check_eq(h.status, 200, "GET /healthz with an unknown token")
    m = srv.api(token="tt_wrongwrongwrongwrongwrongwrongwron").get("/metrics")
    check_eq(m.status, 200, "GET /metrics with an unknown token")

    dev = api.create_device("metrics phone")
    sim = DevSim(dev)
    sim.wait_connected()
    api.wait_online(dev["id"])
    msg = api.send("+639171110001", "count me")
    api.wait_message(msg["id"], "delivered")
    check_eq(api.get("/messages/%d" % msg["id"]).status, 200, "GET /messages/{id}")
    check_eq(api.get("/messages/987654").status, 404, "GET of an unknown message")
    check_eq(api.get("/devices", token=None).status, 401, "GET /devices without a token")
    check_eq(api.get("/nothing-here").status, 404, "an unknown route")

    text, s = scrape(srv, "first scrape")
    p = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True,
                       timeout=T(30))
    check_eq(p.returncode, 0, "promtool check metrics exit code")
    out = (p.stdout + p.stderr).decode(errors="replace").strip()
    check_eq(out, "", "promtool check metrics output")

    # requests by route pattern, method and status
    req = "taratxt_http_requests_total"
    for route, method, status in (("/api/v1/devices", "POST", "201"),
                                  ("/api/v1/devices/{id}", "GET", "200"),
                                  ("/api/v1/messages", "POST", "202"),
                                  ("/api/v1/messages/{id}", "GET", "200"),
                                  ("/api/v1/messages/{id}", "GET", "404"),
                                  ("/healthz", "GET", "200")):
        v = find(s, req, route=route, method=method, status=status)
        check(len(v) == 1 and v[0] >= 1, "%s{route=%r,method=%r,status=%r} >= 1: %r"
              % (req, route, method, status, v))
    v401 = [v for (n, l, v) in s if n == req and l.get("status") == "401" and l.get("method") == "GET"]
    check(v401 and sum(v401) >= 1, "a 401 is counted: %r" % v401)
    routes = set(l.get("route") for (n, l, v) in s if n == req)
    check(not any(r and re.search(r"/[0-9]+(/|$)", r) for r in routes),
          "route labels are patterns, never raw ids: %r" % sorted(r for r in routes if r))
    check("/nothing-here" not in routes, "an unknown path is not a route label: %r" % sorted(routes))
    check(all(set(l) >= {"route", "method", "status"} for (n, l, v) in s if n == req),
          "every %s sample has route, method and status" % req)

    # messages, devices, mailboxes, store
    d = one(s, "taratxt_messages_total", "delivered messages", direction="outbound", status="delivered")
    check(d is not None and d >= 1, "taratxt_messages_total delivered >= 1: %r" % d)
    check_eq(one(s, "taratxt_devices", "devices online", state="online"), 1.0, "taratxt_devices{state=online}")
    check(len(find(s, "taratxt_mailbox_depth", actor="router")) == 1, "taratxt_mailbox_depth{actor=router}")
    for h_name in ("taratxt_store_commit_batch_size", "taratxt_store_commit_seconds"):
        inf = find(s, h_name + "_bucket", le="+Inf")
        cnt = find(s, h_name + "_count")
        check(len(inf) == 1 and inf[0] >= 1, "%s_bucket{le=\"+Inf\"} >= 1 after writes: %r" % (h_name, inf))
        check(inf == cnt, "%s: +Inf bucket %r equals _count %r" % (h_name, inf, cnt))
        check(("# TYPE %s histogram" % h_name) in text, "%s is typed histogram" % h_name)
    check_eq(one(s, "taratxt_store_up", "store up"), 1.0, "taratxt_store_up")

    # counters follow the traffic between scrapes
    before = find(s, req, route="/api/v1/messages/{id}", method="GET", status="404")
    b404 = before[0] if before else 0
    for _ in range(3):
        api.get("/messages/987654")
    m2 = api.send("+639171110001", "count me too")
    api.wait_message(m2["id"], "delivered")
    _, s2 = scrape(srv, "second scrape")
    after = find(s2, req, route="/api/v1/messages/{id}", method="GET", status="404")
    check_eq(after[0] - b404 if after else None, 3.0, "404s on /api/v1/messages/{id} counted between scrapes")
    d2 = one(s2, "taratxt_messages_total", "delivered after more", direction="outbound", status="delivered")
    check(d is not None and d2 is not None and d2 >= d + 1, "delivered counter moves: %r -> %r" % (d, d2))
    mc = find(s2, req, route="/metrics", method="GET", status="200")
    if mc:
        check(mc[0] >= 1, "GET /metrics counted: %r" % mc)

    # the device going offline shows
    sim.term()
    api.wait_online(dev["id"], online=False)
    wait_until(lambda: find(scrape(srv, "after offline")[1], "taratxt_devices", state="online") == [0.0],
               T(10), "taratxt_devices{state=online} 0 after the device left")
    check_eq(find(scrape(srv, "offline")[1], "taratxt_devices", state="offline"), [1.0],
             "taratxt_devices{state=offline}")


if __name__ == "__main__":
    run([test_metrics])
