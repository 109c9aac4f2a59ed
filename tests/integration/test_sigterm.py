#!/usr/bin/python3
"""it_sigterm: graceful stop (API.md 10).

SIGTERM while clients are posting: exit code 0 within a few seconds, every
202 survives the restart on the same data directory, the initial token keeps
working (and is not replaced), devices and messages are still there. SIGINT
behaves the same.
"""
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Broker, Server, T, check, check_eq, http_request, log, must, run  # noqa: E402


def test_sigterm():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    token1 = srv.token
    dev = api.create_device("offline phone", rate_per_minute=600)
    dev_id = dev["id"]
    first = [api.send("+63917000%04d" % i, "queued %d" % i, dev_id=dev_id, force=True)["id"] for i in range(10)]

    accepted = []
    lock = threading.Lock()
    stop = threading.Event()
    odd = []
    lost = []      # requests that got no response (the server was stopping)

    def worker(n):
        k = 0
        while not stop.is_set():
            k += 1
            try:
                r = http_request(srv.port, "POST", "/api/v1/devices/%d/messages" % dev_id,
                                 {"to": "+639180%02d%04d" % (n, k), "message": "t", "force": True},
                                 srv.token, timeout=20)
            except OSError as e:
                with lock:
                    lost.append("%s: %s" % (type(e).__name__, str(e)[:80]))
                return
            with lock:
                if r.status == 202:
                    accepted.append(r.body["id"])
                elif r.status != 503:
                    odd.append(r)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0 = time.time()
    rc = srv.term(timeout=10)
    took = time.time() - t0
    stop.set()
    for t in threads:
        t.join(timeout=30)
    log("SIGTERM: exit %r after %.2fs, %d accepted during the load" % (rc, took, len(accepted)))
    check_eq(rc, 0, "exit code after SIGTERM")
    check(took < T(5), "SIGTERM took %.1fs (expected a few seconds)" % took)
    check_eq(odd[:3], [], "responses other than 202/503 while stopping")

    srv.start()
    check_eq(srv.token, token1, "token")
    with open(os.path.join(srv.data, "initial-token")) as f:
        check_eq(f.read().strip(), token1, "initial-token after a restart (not replaced)")
    r = api.get("/devices/%d" % dev_id)
    check_eq(r.status, 200, "device after restart")
    check_eq((r.body or {}).get("name"), "offline phone", "device name after restart")
    missing = [i for i in first + accepted if api.get("/messages/%d" % i).status != 200]
    check_eq(missing[:10], [], "acknowledged messages missing after SIGTERM + restart")
    d = api.device(dev_id)
    pending = d.get("queue", {}).get("pending")
    check(pending is not None and pending >= len(first) + len(accepted),
          "queue.pending after restart %r < %d acknowledged" % (pending, len(first) + len(accepted)))
    # "finish what was accepted": a request the server stored must have been answered
    check_eq(pending, len(first) + len(accepted),
             "queue.pending after restart: messages stored = messages acknowledged "
             "(requests without a response: %r)" % lost)

    # SIGINT the same
    rc = srv.term(sig=signal.SIGINT, timeout=10)
    check_eq(rc, 0, "exit code after SIGINT")
    srv.start()
    check_eq(api.get("/devices/%d" % dev_id).status, 200, "device after the second restart")
    check_eq(api.get("/healthz").status, 200, "healthz after restarts")


if __name__ == "__main__":
    run([test_sigterm])
