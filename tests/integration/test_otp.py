#!/usr/bin/python3
"""it_otp: one-time codes as a user of POST /otp/send and /otp/verify sees
them (API.md 6, 2, 1).

The server runs with --test-clock 1 so that expiry, the 30 s cooldown and
the sliding hour can be crossed without waiting: POST /api/v1/_test/clock
{"advance_seconds":N} moves the server's clock forward. The device (tt-devsim)
prints the real text it was asked to send, so the test reads the code there;
every API response must show it masked.

Cases: the 202 body and the message (high priority, masked in GET and lists);
validation (length, expires_in, code type); verify once; five wrong tries;
expiry; cooldown and the hourly window with Retry-After; a failed send uses
no quota and keeps the current code; two concurrent verifies, one winner;
kill -9 keeps codes, attempts and limits; the data directory holds neither
the code nor the clear text; pinning and Idempotency-Key apply.
"""
import datetime
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, T, check, check_eq, check_problem,  # noqa: E402
                     check_time, check_validation, log, must, run)

DEFAULT_RE = re.compile(r"^Your verification code is (\d+)\. It expires in (\d+) minutes\.$")
CLOCK_FLAG = ["--test-clock", "1"]


# ---------------------------------------------------------------- helpers

def setup(extra=None, devices=1):
    """Broker, server with the test clock, one or more online devices with
    their simulators. Returns (srv, api, [(dev, sim), ...])."""
    broker = Broker()
    srv = Server(broker=broker, extra=CLOCK_FLAG + list(extra or []))
    api = srv.api()
    devs = []
    for i in range(devices):
        dev = api.create_device("otp phone %d" % i)
        sim = DevSim(dev)
        sim.wait_connected()
        api.wait_online(dev["id"])
        devs.append((dev, sim))
    return srv, api, devs


def advance(api, seconds):
    r = api.post("/_test/clock", {"advance_seconds": seconds})
    must(r.status in (200, 204), "POST /_test/clock %d: %r" % (seconds, r))


def otp_send(api, number, expect=202, headers=None, **fields):
    body = {"number": number}
    body.update(fields)
    r = api.post("/otp/send", body, headers=headers)
    must(r.status == expect, "POST /otp/send %r: expected %d, seen %r" % (body, expect, r))
    return r


def verify(api, number, code):
    r = api.post("/otp/verify", {"number": number, "code": code})
    must(r.status == 200 and isinstance(r.body, dict),
         "POST /otp/verify %s: expected 200 with an object, seen %r" % (number, r))
    return r.body


def code_of(sim, mid, regex=DEFAULT_RE, timeout=20):
    """Waits for the device's send of message mid; returns (code, event)."""
    ev = sim.wait_event(lambda e: e.get("event") == "send" and e.get("id") == mid, timeout,
                        "send of OTP message %d" % mid)
    text = ev.get("message") or ""
    m = regex.match(text)
    must(m is not None, "OTP text on the device %r does not match the template %s" % (text, regex.pattern))
    return m.group(1), ev


def send_and_code(api, sim, number, regex=DEFAULT_RE, **fields):
    r = otp_send(api, number, **fields)
    code, _ = code_of(sim, r.body["message_id"], regex)
    return code, r.body


def wrong_code(code):
    """A code of the same length that differs in every digit."""
    return "".join(str((int(c) + 1) % 10) for c in code)


def parse_time(s):
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def retry_after(r, what):
    v = r.header("retry-after")
    if not check(v is not None and re.match(r"^[0-9]+$", v.strip()) is not None,
                 "%s: Retry-After must be integer seconds, seen %r" % (what, v)):
        return None
    return int(v.strip())


def check_rate_limited(r, what):
    check_problem(r, 429, "rate_limited", what)
    return retry_after(r, what)


# ---------------------------------------------------------------- cases

def test_send_and_verify():
    srv, api, devs = setup()
    dev, sim = devs[0]

    r = otp_send(api, "+63 917-555-0101")
    b = r.body
    check_eq(sorted(b.keys()) if isinstance(b, dict) else b,
             ["expires_at", "length", "message_id", "number"], "202 body keys")
    check_eq(b.get("number"), "+639175550101", "number (normalised)")
    check_eq(b.get("length"), 6, "default length")
    check(isinstance(b.get("message_id"), int) and b["message_id"] > 0, "message_id: %r" % b.get("message_id"))
    if check_time(b.get("expires_at"), "expires_at"):
        left = parse_time(b["expires_at"]) - time.time()
        check(240 < left <= 301, "expires_at about 5 minutes from now (default): %.1f s" % left)
    mid = b["message_id"]
    code, ev = code_of(sim, mid)
    check(re.match(r"^[0-9]{6}$", code) is not None, "6 digits on the device: %r" % code)
    check_eq(ev.get("to"), "+639175550101", "to on the wire")
    check_eq(ev.get("message"), "Your verification code is %s. It expires in 5 minutes." % code,
             "the default template on the device")
    check_eq(ev.get("device_id"), dev["id"], "the device that got the OTP")

    masked = "Your verification code is ******. It expires in 5 minutes."
    m = api.message(mid)
    check_eq(m.get("priority"), "high", "priority of the OTP message")
    check_eq(m.get("message"), masked, "message text in GET /messages/{id}")
    check_eq(m.get("to"), "+639175550101", "to of the OTP message")
    check(code not in api.get("/messages/%d" % mid).text, "the code appears in GET /messages/{id}")
    lst = api.get("/messages")
    check(code not in lst.text, "the code appears in GET /messages")
    inlist = [x for x in (lst.body or {}).get("data", []) if x.get("id") == mid]
    check(len(inlist) == 1 and inlist[0].get("message") == masked,
          "GET /messages shows the OTP message masked: %r" % inlist)
    lst = api.get("/messages?number=%2B639175550101")
    check(code not in lst.text and masked in lst.text, "GET /messages?number= masks the code: %s" % lst.text[:300])
    api.wait_message(mid, "delivered")
    check_eq(api.message(mid).get("message"), masked, "message text after delivery")

    # wrong, right, again
    v = verify(api, "+639175550101", wrong_code(code))
    check_eq(v, {"verified": False, "reason": "invalid_code", "attempts_left": 4}, "verify a wrong code")
    v = verify(api, "+63 (917) 555.0101", code)
    check_eq(v, {"verified": True}, "verify the right code (number in another form)")
    v = verify(api, "+639175550101", code)
    check_eq(v.get("verified"), False, "the code verifies once")
    check_eq(v.get("reason"), "not_found", "reason after the code was used")
    v = verify(api, "+639170000999", "123456")
    check_eq(v.get("reason"), "not_found", "verify for a number that never got a code")

    # lengths
    for n, length in (("+639175550102", 4), ("+639175550103", 10)):
        code, body = send_and_code(api, sim, n, length=length)
        check_eq(body.get("length"), length, "length in the 202 body")
        check(re.match(r"^[0-9]{%d}$" % length, code) is not None, "%d digits on the device: %r" % (length, code))
        m = api.message(body["message_id"])
        check_eq(m.get("message"), "Your verification code is %s. It expires in 5 minutes." % ("*" * length),
                 "masked text of a %d-digit code" % length)
        check_eq(verify(api, n, code), {"verified": True}, "verify a %d-digit code" % length)

    # expires_in shows up in the text and expires_at
    r = otp_send(api, "+639175550104", expires_in=60)
    code, ev = code_of(sim, r.body["message_id"])
    check(ev.get("message", "").endswith("It expires in 60 minutes."), "minutes in the text: %r" % ev.get("message"))
    if check_time(r.body.get("expires_at"), "expires_at (60 min)"):
        left = parse_time(r.body["expires_at"]) - time.time()
        check(3540 < left <= 3601, "expires_at about 60 minutes from now: %.1f s" % left)

    # validation
    n = "+639175550105"
    check_validation(api.post("/otp/send", {"number": n, "length": 3}), "length", "length 3")
    check_validation(api.post("/otp/send", {"number": n, "length": 11}), "length", "length 11")
    check_validation(api.post("/otp/send", {"number": n, "length": "6"}), "length", "length as a string")
    check_validation(api.post("/otp/send", {"number": n, "expires_in": 0}), "expires_in", "expires_in 0")
    check_validation(api.post("/otp/send", {"number": n, "expires_in": 61}), "expires_in", "expires_in 61")
    check_validation(api.post("/otp/send", {}), "number", "number missing")
    check_validation(api.post("/otp/send", {"number": "12"}), "number", "number too short")
    check_validation(api.post("/otp/verify", {"number": "+639175550104", "code": int(code)}), "code",
                     "code as a JSON number")
    check_validation(api.post("/otp/verify", {"number": "+639175550104"}), "code", "code missing")
    check_validation(api.post("/otp/verify", {"number": "+639175550104", "code": "12a456"}), "code",
                     "code with a letter")
    check_validation(api.post("/otp/verify", {"code": code}), "number", "verify without number")
    # none of those rejected calls counted as a wrong try
    check_eq(verify(api, "+639175550104", code), {"verified": True}, "code after rejected verify calls")
    check_problem(api.post("/otp/send", {"number": n}, token=None), 401, "unauthorized", "OTP send without token")


def test_attempts_and_expiry():
    srv, api, devs = setup()
    dev, sim = devs[0]
    n = "+639175550201"
    code, _ = send_and_code(api, sim, n)
    bad = wrong_code(code)
    seen = [verify(api, n, bad) for _ in range(5)]
    check_eq([s.get("attempts_left") for s in seen], [4, 3, 2, 1, 0], "attempts_left over five wrong tries")
    check(all(s.get("verified") is False and s.get("reason") == "invalid_code" for s in seen),
          "five wrong tries are invalid_code: %r" % seen)
    v = verify(api, n, code)
    check_eq(v.get("verified"), False, "the right code after five wrong tries")
    check_eq(v.get("reason"), "too_many_attempts", "reason after five wrong tries")
    v = verify(api, n, bad)
    check_eq(v.get("reason"), "too_many_attempts", "a sixth wrong try")
    advance(api, 31)
    code2, _ = send_and_code(api, sim, n)
    v = verify(api, n, wrong_code(code2))
    check_eq(v, {"verified": False, "reason": "invalid_code", "attempts_left": 4}, "a new send resets the tries")
    check_eq(verify(api, n, code2), {"verified": True}, "the new code verifies")
    if code2 != code:
        check_eq(verify(api, n, code).get("verified"), False, "the replaced code")

    # a new send replaces the previous code
    n = "+639175550202"
    c1, _ = send_and_code(api, sim, n)
    advance(api, 31)
    c2, _ = send_and_code(api, sim, n)
    if c1 != c2:
        v = verify(api, n, c1)
        check_eq(v.get("reason"), "invalid_code", "the replaced code is wrong now")
    check_eq(verify(api, n, c2), {"verified": True}, "the replacing code")

    # expiry on the server's clock
    n = "+639175550203"
    c, body = send_and_code(api, sim, n, expires_in=1)
    if check_time(body.get("expires_at"), "expires_at (1 min)"):
        left = parse_time(body["expires_at"]) - time.time()
        # the clock was moved by 62 s above; expires_at is on the server's clock
        check(60 + 62 - 5 < left <= 60 + 62 + 1, "expires_at one minute ahead on the server clock: %.1f s" % left)
    advance(api, 61)
    v = verify(api, n, c)
    check_eq(v.get("verified"), False, "verify after expiry")
    check_eq(v.get("reason"), "expired", "reason after expiry")

    # the route needs the flag
    srv2 = Server()   # no broker: it must not share the first server's broker client ids
    r = srv2.api().post("/_test/clock", {"advance_seconds": 10})
    check_problem(r, 404, "not_found", "POST /_test/clock without --test-clock")


def test_limits():
    srv, api, devs = setup()
    dev, sim = devs[0]
    n = "+639175550301"
    c1, _ = send_and_code(api, sim, n)

    # cooldown
    r = api.post("/otp/send", {"number": n})
    ra = check_rate_limited(r, "second send within 30 s")
    if ra is not None:
        check(0 < ra <= 30, "cooldown Retry-After in (0, 30]: %d" % ra)
    advance(api, 20)
    r = api.post("/otp/send", {"number": n})
    ra = check_rate_limited(r, "send 20 s after")
    if ra is not None:
        check(0 < ra <= 11, "Retry-After 20 s into the cooldown: %d" % ra)
    check_eq(verify(api, n, c1), {"verified": True}, "a 429 leaves the current code valid")
    advance(api, 11)
    send_and_code(api, sim, n)    # 2nd send at t=31

    # hourly: 5 sends in the window (t=0, 31, 62, 93, 124), then 429
    for _ in range(3):
        advance(api, 31)
        send_and_code(api, sim, n)
    advance(api, 31)              # t=155
    r = api.post("/otp/send", {"number": n})
    ra = check_rate_limited(r, "sixth send within the hour")
    if ra is not None:
        check(3600 - 155 - T(10) <= ra <= 3600 - 155 + 1,
              "Retry-After is the time until the first send leaves the hour (about %d): %d" % (3600 - 155, ra))
    advance(api, 600)
    r = api.post("/otp/send", {"number": n})
    ra2 = check_rate_limited(r, "send still within the hour")
    if ra is not None and ra2 is not None:
        check(ra - 605 <= ra2 <= ra - 595, "Retry-After counts down with the clock: %d then %d" % (ra, ra2))
    # another number and another account's limit are separate
    send_and_code(api, sim, "+639175550302")
    advance(api, (ra2 or 3000) + 1)
    code, _ = send_and_code(api, sim, n)
    check_eq(verify(api, n, code), {"verified": True}, "the send allowed after the oldest left the hour")
    # only one slot freed: the next send once the cooldown is over needs the t=31 send to leave
    advance(api, 31)
    r = api.post("/otp/send", {"number": n})
    if r.status != 202:
        # t=31 has left the hour too: (ra2+1) + 155 + 600 > 3600 + 31
        check(False, "expected 202 once the second oldest left the hour, seen %r" % r)

    # a failed send uses no quota and leaves the code in place
    n = "+639175550303"
    c, _ = send_and_code(api, sim, n)
    advance(api, 31)
    check_validation(api.post("/otp/send", {"number": n, "length": 3}), "length", "failed send (422)")
    # the number is pinned to the device; take the device offline and drop the pin
    sim.term()
    api.wait_online(dev["id"], online=False)
    r = api.post("/otp/send", {"number": n})
    check_problem(r, 409, "device_offline", "OTP to a number pinned to an offline device")
    r = api.delete("/devices/%d/pins/%%2B639175550303" % dev["id"])
    check_eq(r.status, 204, "DELETE the pin")
    r = api.post("/otp/send", {"number": n})
    check_problem(r, 409, "no_device_online", "OTP with no device online")
    v = verify(api, n, wrong_code(c))
    check_eq(v.get("attempts_left"), 4, "the code survived the failed sends (attempts_left after one wrong try)")
    check_eq(verify(api, n, c), {"verified": True}, "the current code after failed sends")
    sim2 = DevSim(dev)
    sim2.wait_connected()
    api.wait_online(dev["id"])
    # if the failed sends had used quota this would be within the cooldown
    r = otp_send(api, n)
    code_of(sim2, r.body["message_id"])


def test_concurrent_verify():
    srv, api, devs = setup()
    dev, sim = devs[0]
    for i in range(4):
        n = "+63917555040%d" % i
        code, _ = send_and_code(api, sim, n)
        results = [None, None]
        barrier = threading.Barrier(2)

        def worker(k):
            barrier.wait()
            results[k] = api.post("/otp/verify", {"number": n, "code": code})

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(T(30))
        bodies = [r.body if r is not None and r.status == 200 else r for r in results]
        wins = [b for b in bodies if isinstance(b, dict) and b.get("verified") is True]
        check_eq(len(wins), 1, "round %d: concurrent verifies of the right code that won (%r)" % (i, bodies))
        losers = [b for b in bodies if not (isinstance(b, dict) and b.get("verified") is True)]
        check(all(isinstance(b, dict) and b.get("reason") == "not_found" for b in losers),
              "round %d: the loser sees not_found: %r" % (i, losers))


def test_restart():
    srv, api, devs = setup()
    dev, sim = devs[0]
    n = "+639175550501"
    code, body = send_and_code(api, sim, n)
    bad = wrong_code(code)
    for left in (4, 3):
        check_eq(verify(api, n, bad).get("attempts_left"), left, "wrong try before the crash")
    n2 = "+639175550502"
    code2, _ = send_and_code(api, sim, n2)
    t_send = time.time()
    srv.kill()
    srv.start()
    api.wait_online(dev["id"])
    elapsed = time.time() - t_send
    v = verify(api, n, bad)
    check_eq(v, {"verified": False, "reason": "invalid_code", "attempts_left": 2},
             "attempts are kept across kill -9")
    check_eq(verify(api, n, code), {"verified": True}, "the code verifies after kill -9")
    r = api.post("/otp/send", {"number": n2})
    if elapsed < 25:
        ra = check_rate_limited(r, "cooldown right after the restart")
        if ra is not None:
            check(0 < ra <= 30, "Retry-After after the restart: %d" % ra)
    else:
        log("restart took %.1f s: cooldown not checked" % elapsed)
    # the message is masked after the restart too, and was delivered once
    m = api.message(body["message_id"])
    check_eq(m.get("message"), "Your verification code is ******. It expires in 5 minutes.", "masked after restart")
    check(m.get("priority") == "high", "priority after restart: %r" % m.get("priority"))
    srv.kill()
    srv.start()
    if r.status == 429:
        check_eq(verify(api, n2, code2), {"verified": True}, "an untouched code verifies after a second kill -9")
    check_eq(verify(api, n, code).get("reason"), "not_found", "a used code stays used after kill -9")


def grep_dir(root, needles):
    """Returns [(path, needle)] for every file under root holding a needle
    (bytes, exact)."""
    hits = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                with open(p, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            for nd in needles:
                if nd in data:
                    hits.append((p, nd))
    return hits


def test_secrecy():
    tmpl = "Code {code} ({minutes} min)"
    regex = re.compile(r"^Code (\d+) \((\d+) min\)$")
    srv, api, devs = setup(extra=["--otp-template", tmpl])
    dev, sim = devs[0]
    codes, texts = [], []
    for i in range(3):
        n = "+63917555060%d" % i
        code, body = send_and_code(api, sim, n, regex=regex, length=10, expires_in=7)
        check(re.match(r"^[0-9]{10}$", code) is not None, "10 digits: %r" % code)
        codes.append(code)
        texts.append("Code %s (7 min)" % code)
        api.wait_message(body["message_id"], "delivered")
        m = api.message(body["message_id"])
        check_eq(m.get("message"), "Code ********** (7 min)", "masked text with --otp-template")
    # one code used, one with a wrong try, one untouched
    check_eq(verify(api, "+639175550600", codes[0]), {"verified": True}, "verify with --otp-template")
    verify(api, "+639175550601", wrong_code(codes[1]))
    needles = [c.encode() for c in codes] + [t.encode() for t in texts]
    time.sleep(T(1))
    hits = grep_dir(srv.data, needles)
    check_eq(hits, [], "files of the running server's data directory that hold a code or its clear text")
    check_eq(srv.term(), 0, "exit code after SIGTERM")
    hits = grep_dir(srv.data, needles)
    check_eq(hits, [], "files of the stopped server's data directory that hold a code or its clear text")
    srv.start()
    check_eq(verify(api, "+639175550602", codes[2]), {"verified": True}, "a code verifies after SIGTERM restart")
    srv.kill()
    hits = grep_dir(srv.data, needles)
    check_eq(hits, [], "data directory after kill -9")


def test_pinning_and_idempotency():
    broker = Broker()
    srv = Server(broker=broker, extra=CLOCK_FLAG)
    api = srv.api()
    dev_a = api.create_device("A")
    dev_b = api.create_device("B")
    sim_b = DevSim(dev_b)
    sim_b.wait_connected()
    api.wait_online(dev_b["id"])
    n = "+639175550701"
    m = api.send(n, "pin me to B")
    check_eq(m.get("device_id"), dev_b["id"], "the pinning message went through B")
    sim_a = DevSim(dev_a)
    sim_a.wait_connected()
    api.wait_online(dev_a["id"])
    api.wait_message(m["id"], "delivered")

    # with both online and equal queues an unpinned number would go to A (lowest id)
    r = otp_send(api, n)
    mid = r.body["message_id"]
    code, ev = code_of(sim_b, mid)
    check_eq(ev.get("device_id"), dev_b["id"], "the pinned device sent the OTP")
    msg = api.message(mid)
    check_eq(msg.get("device_id"), dev_b["id"], "device_id of the OTP to a pinned number")
    check_eq(msg.get("routing"), "pinned", "routing of the OTP to a pinned number")
    check(isinstance(ev.get("safe_word"), str) and ev.get("safe_word"),
          "the OTP to a pinned number carries the pin's safe word: %r" % ev.get("safe_word"))
    check_eq(sim_a.sends(mid), [], "A never got the OTP")
    check_eq(verify(api, n, code), {"verified": True}, "pinned OTP verifies")

    # Idempotency-Key: the same key returns the same answer and sends nothing new
    n2 = "+639175550702"
    key = {"Idempotency-Key": "otp-key-1"}
    r1 = otp_send(api, n2, headers=key)
    mid2 = r1.body["message_id"]
    owner = sim_a if api.message(mid2).get("device_id") == dev_a["id"] else sim_b
    code2, _ = code_of(owner, mid2)
    r2 = api.post("/otp/send", {"number": n2}, headers=key)
    check_eq(r2.status, 202, "replay of the same Idempotency-Key (not a 429)")
    check_eq(r2.body, r1.body, "replayed body")
    advance(api, 31)
    r3 = api.post("/otp/send", {"number": n2}, headers=key)
    check_eq((r3.status, r3.body), (202, r1.body), "replay after the cooldown is over")
    time.sleep(T(1.5))
    to_n2 = [e for e in sim_a.sends() + sim_b.sends() if e.get("to") == n2]
    check_eq(len(to_n2), 1, "SMS handed over to %s (%r)" % (n2, to_n2))
    msgs = api.list_all(query="number=%2B639175550702")
    check_eq([x.get("id") for x in msgs], [mid2], "messages to %s" % n2)
    check_eq(verify(api, n2, code2), {"verified": True}, "the code of the first send is the current one")
    r4 = api.post("/otp/send", {"number": n2, "length": 8}, headers=key)
    check_problem(r4, 422, "idempotency_key_reused", "same key with another body")


if __name__ == "__main__":
    run([test_send_and_verify, test_attempts_and_expiry, test_limits, test_concurrent_verify,
         test_restart, test_secrecy, test_pinning_and_idempotency])
