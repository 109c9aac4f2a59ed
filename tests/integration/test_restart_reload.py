#!/usr/bin/python3
"""it_restart_reload: unfinished messages survive a restart (DESIGN inv. 5).

Messages forced to an offline device, and messages handed to a device that
never reported, are all delivered after SIGTERM and a restart: queued ones
once, in-flight ones dispatched again with the next attempt.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Broker, DevSim, Server, check, check_eq, run  # noqa: E402


def test_restart_reload():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    dev = api.create_device("reload", rate_per_minute=600)
    dev_id = dev["id"]
    queued = [api.send("+63917500%04d" % i, "queued %d" % i, dev_id=dev_id, force=True)["id"] for i in range(10)]
    queued += [api.send("+63917510%04d" % i, "routed %d" % i, force=True)["id"] for i in range(5)]
    check_eq(api.device(dev_id).get("queue", {}).get("pending"), 15, "queue before the restart")

    check_eq(srv.term(), 0, "exit code after SIGTERM")
    srv.start()
    check_eq(api.device(dev_id).get("queue", {}).get("pending"), 15, "queue after the restart")
    sim = DevSim(dev)
    for i in queued:
        api.wait_message(i, "delivered", 30)
    got = {}
    for e in sim.sends():
        got.setdefault(e["id"], []).append(e.get("attempt"))
    check_eq(sorted(got), sorted(queued), "ids handed over after the restart")
    check(all(v == [1] for v in got.values()), "each queued message handed over once, attempt 1: %r" % got)

    # in flight at the stop: handed over, never reported
    sim.term()
    api.wait_online(dev_id, online=False)
    mute = DevSim(dev, ["--report", "none"])
    api.wait_online(dev_id)
    inflight = [api.send("+63917520%04d" % i, "inflight %d" % i, dev_id=dev_id)["id"] for i in range(5)]
    mute.wait_for(lambda evs: set(inflight) <= set(e.get("id") for e in evs if e.get("event") == "send"),
                  20, "in-flight sends")
    check_eq(api.device(dev_id).get("queue", {}).get("in_flight"), 5, "in_flight before the stop")
    check_eq(srv.term(), 0, "exit code after SIGTERM with messages in flight")
    mute.term()
    srv.start()
    api.wait_online(dev_id, online=False)
    sim2 = DevSim(dev)
    for i in inflight:
        m = api.wait_message(i, "delivered", 30)
        check_eq(m.get("attempts"), 2, "attempts of a message in flight across the restart")
    check(srv.alive(), "server alive")


if __name__ == "__main__":
    run([test_restart_reload])
