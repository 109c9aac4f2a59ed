#!/usr/bin/python3
"""it_crash_burst: a 202 survives SIGKILL (API.md 1 durability, DESIGN inv. 1, 5).

16 client threads post messages concurrently (each to its own device, so
the device rate limit does not stretch the run) and the server is killed
with SIGKILL in the middle of the burst. Every message that got a 202 must
exist after a restart on the same data directory, reach its device and end
delivered. Requests that got no response may or may not exist: not asserted.
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, T, check, check_eq, http_request, log, must, run,  # noqa: E402
                     wait_until)

THREADS = 16
PER_THREAD = 200
KILL_AFTER = 1200   # accepted messages before the kill (or KILL_TIME seconds)
KILL_TIME = 6.0


def test_crash_burst():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    devs = [api.create_device("burst-%d" % i, rate_per_minute=600) for i in range(THREADS)]
    ids = [d["id"] for d in devs]
    sim = DevSim(devs)
    for i in ids:
        api.wait_online(i, timeout=30)

    accepted = {}          # message id -> device id
    lock = threading.Lock()
    stop = threading.Event()
    errors = []
    statuses = {}

    def worker(n):
        dev_id = ids[n]
        for k in range(PER_THREAD):
            if stop.is_set():
                return
            body = {"to": "+6391%02d%06d" % (n, k), "message": "burst %d/%d" % (n, k)}
            try:
                r = http_request(srv.port, "POST", "/api/v1/devices/%d/messages" % dev_id, body,
                                 srv.token, timeout=20)
            except OSError:
                return     # the server is gone: this request's fate is unknown
            with lock:
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status == 202:
                    if isinstance(r.body, dict) and isinstance(r.body.get("id"), int):
                        accepted[r.body["id"]] = dev_id
                    else:
                        errors.append("202 without id: %r" % r)
                elif r.status != 503:
                    errors.append("unexpected %r" % r)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(THREADS)]
    t0 = time.time()
    for t in threads:
        t.start()
    while True:
        with lock:
            n = len(accepted)
        if n >= KILL_AFTER or time.time() - t0 > T(KILL_TIME) or not any(t.is_alive() for t in threads):
            break
        time.sleep(0.005)
    srv.kill()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    log("killed after %.2fs with %d accepted; statuses %r" % (time.time() - t0, len(accepted), statuses))
    check_eq(errors[:5], [], "responses other than 202/503 during the burst")
    must(len(accepted) > 0, "no request was accepted before the kill")
    check(len(accepted) < THREADS * PER_THREAD, "the kill happened after the burst ended (test too slow?)")

    srv.start()
    missing = []
    wrong = []
    for mid, dev_id in sorted(accepted.items()):
        r = http_request(srv.port, "GET", "/api/v1/messages/%d" % mid, token=srv.token)
        if r.status != 200:
            missing.append(mid)
        elif r.body.get("device_id") != dev_id:
            wrong.append((mid, r.body.get("device_id"), dev_id))
    check_eq(missing[:20], [], "acknowledged messages missing after SIGKILL + restart (%d of %d)"
             % (len(missing), len(accepted)))
    check_eq(wrong[:5], [], "acknowledged messages with another device after restart")

    want = set(accepted)
    try:
        sim.wait_for(lambda evs: want <= set(e.get("id") for e in evs if e.get("event") == "send"),
                     T(60), "every acknowledged message handed to its device")
    except AssertionError as e:
        seen = sim.sent_ids()
        check(False, "%d of %d acknowledged messages never reached a device, e.g. %r (%s)"
              % (len(want - seen), len(want), sorted(want - seen)[:10], str(e)[:200]))

    remaining = dict((i, None) for i in want)

    def poll():
        for i in list(remaining):
            r = http_request(srv.port, "GET", "/api/v1/messages/%d" % i, token=srv.token)
            st = r.body.get("status") if r.status == 200 and isinstance(r.body, dict) else r.status
            if st == "delivered":
                del remaining[i]
            else:
                remaining[i] = st
        return not remaining
    try:
        wait_until(poll, T(60), "all acknowledged messages delivered", 0.5)
    except AssertionError:
        check(False, "%d acknowledged messages not delivered, e.g. %r"
              % (len(remaining), sorted(remaining.items())[:10]))
    check(srv.alive(), "server alive")


if __name__ == "__main__":
    run([test_crash_burst])
