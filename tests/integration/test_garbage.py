#!/usr/bin/python3
"""it_garbage: hostile and malformed input on every route (API.md 1, 2, 3).

Deep nesting, invalid UTF-8, non-object JSON, oversized bodies (also
chunked), unknown and wrong methods, a 100 KB header, missing or bad tokens,
and field validation. Every error is problem+json with type/title/status/
code, the order of checks of API.md 1 holds, and the server stays up.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, DevSim, Server, check, check_eq, check_problem, check_validation,  # noqa: E402
                     http_request, log, raw_body_request, raw_request, run, PROBLEM_CT)


def allow_set(r):
    return set(x.strip().upper() for x in (r.header("allow") or "").split(",") if x.strip())


def test_garbage():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    tok = srv.token
    dev = api.create_device("target")
    dev_id = dev["id"]
    sim = DevSim(dev, ["--report", "none"])
    api.wait_online(dev_id)
    m = api.send("+639171234567", "exists", dev_id=dev_id)
    mid = m["id"]

    body_routes = [("POST", "/api/v1/messages"), ("POST", "/api/v1/devices/%d/messages" % dev_id),
                   ("POST", "/api/v1/devices")]
    get_routes = [("GET", "/api/v1/messages"), ("GET", "/api/v1/messages/%d" % mid),
                  ("GET", "/api/v1/devices"), ("GET", "/api/v1/devices/%d" % dev_id), ("GET", "/healthz")]
    all_routes = body_routes + get_routes

    deep_small = "[" * 30000 + "]" * 30000          # 60,000 bytes: under the 64 KiB limit
    deep_obj = '{"a":' * 65 + "1" + "}" * 65        # 65 levels: one too many
    ok_depth = '{"to":"+639171234567","message":"x","z":' + '{"a":' * 63 + "1" + "}" * 63 + "}"  # 64 levels
    deep_huge = "[" * 100000 + "]" * 100000        # 200,000 bytes: size is checked first
    big = ('{"to":"+639171234567","message":"%s"}' % ("a" * 70000)).encode()
    bad_utf8 = b'{"to":"+639171234567","message":"\xff\xfe\xc3("}'

    for method, path in body_routes:
        w = "%s %s" % (method, path)
        r = http_request(srv.port, method, path, deep_small, tok)
        check_problem(r, 400, "invalid_json", w + " with JSON nested 30,000 deep")
        r = http_request(srv.port, method, path, deep_obj, tok)
        check_problem(r, 400, "invalid_json", w + " with objects nested 65 deep")
        r = raw_body_request(srv.port, method, path, deep_huge, tok)
        if check(r is not None, w + " with JSON nested 100,000 deep: no response"):
            check_problem(r, 413, "payload_too_large", w + " with JSON nested 100,000 deep (200 KB: size first)")
        r = http_request(srv.port, method, path, bad_utf8, tok)
        check_problem(r, 400, "invalid_json", w + " with invalid UTF-8")
        for bad in ("[]", '"x"', "1", "null", "true", "{", '{"a":1}x', "\x00"):
            r = http_request(srv.port, method, path, bad, tok)
            check_problem(r, 400, "invalid_json", "%s with body %r" % (w, bad))
        r = raw_body_request(srv.port, method, path, big, tok)
        if check(r is not None, w + " with a 70 KB body: no response"):
            check_problem(r, 413, "payload_too_large", w + " with a 70 KB body")
        # chunked body over the limit (no Content-Length)
        r = _chunked(srv.port, method, path, tok, big)
        if r is not None:
            check_problem(r, 413, "payload_too_large", w + " with a 70 KB chunked body")
        else:
            check(False, w + " with a 70 KB chunked body: connection closed without a response")
    r = http_request(srv.port, "POST", "/api/v1/messages", ok_depth, tok)
    check(r.status == 202, "64 levels of nesting are allowed: expected 202, seen %r" % r)

    for method, path in get_routes:
        w = "%s %s" % (method, path)
        for body in (deep_small, deep_huge, bad_utf8, "[]"):
            try:
                r = raw_body_request(srv.port, method, path, body, None if path == "/healthz" else tok)
            except OSError as e:
                r = None
                log("%s with a garbage body: connection error %s" % (w, e))
            if r is None:
                # closing the connection is a sane answer to a body nobody asked for
                continue
            # GET routes read no body: the server must answer sanely (not 5xx, no crash)
            check(r.status in (200, 400, 413), "%s with a garbage body (%d bytes): %r"
                  % (w, len(body), r))
            if r.status >= 400:
                check_problem(r, r.status, None, w + " garbage body error")
        check(srv.alive(), "server alive after garbage bodies on " + w)

    # ---- empty body is {}
    r = http_request(srv.port, "POST", "/api/v1/messages", b"", tok)
    check_validation(r, "to", "POST /messages with an empty body ({})")
    r = http_request(srv.port, "POST", "/api/v1/devices", b"", tok)
    check_validation(r, "name", "POST /devices with an empty body")
    r = http_request(srv.port, "POST", "/api/v1/messages",
                     '{"to":"+639171234567","message":"form type","device_id":%d}' % dev_id, tok,
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    check_eq(r.status, 202, "JSON body sent with a form Content-Type (curl -d)")

    # ---- unknown methods via a raw socket
    for path in ("/api/v1/messages", "/api/v1/devices/%d" % dev_id, "/healthz"):
        req = ("BREW %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
               "Connection: close\r\n\r\n" % (path, tok)).encode()
        r = raw_request(srv.port, req)
        if not check(r is not None, "BREW %s: no response" % path):
            continue
        check_problem(r, 405, "method_not_allowed", "BREW %s" % path)
        check(len(allow_set(r)) > 0, "BREW %s: 405 without Allow (%r)" % (path, r.headers))
    r = raw_request(srv.port, ("BREW /api/v1/nothing-here HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                               "Connection: close\r\n\r\n" % tok).encode())
    if check(r is not None, "BREW on an unknown route: no response"):
        check(400 <= r.status < 500, "BREW on an unknown route: %r" % r)
        check_problem(r, r.status, None, "BREW on an unknown route")

    # ---- 100 KB header
    req = (b"GET /api/v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + tok.encode() +
           b"\r\nX-Big: " + b"b" * 100000 + b"\r\nConnection: close\r\n\r\n")
    r = raw_request(srv.port, req)
    if r is not None:
        check(400 <= r.status < 500, "100 KB header: expected 4xx or a closed connection, seen %r" % r)
        ct = (r.header("content-type") or "").split(";")[0].strip()
        check_eq(ct, PROBLEM_CT, "content type of the 100 KB header error")
    check(srv.alive(), "server alive after a 100 KB header")

    # ---- wrong methods: 405 + Allow
    for method, path, must_allow in [
            ("PUT", "/api/v1/messages", {"GET", "POST"}),
            ("DELETE", "/api/v1/devices", {"GET", "POST"}),
            ("PUT", "/api/v1/messages/%d" % mid, {"GET", "DELETE"}),
            ("PUT", "/api/v1/devices/%d" % dev_id, {"GET", "PATCH", "DELETE"}),
            ("GET", "/api/v1/devices/%d/messages" % dev_id, {"POST"}),
            ("POST", "/healthz", {"GET"})]:
        r = http_request(srv.port, method, path, None, tok)
        w = "%s %s" % (method, path)
        check_problem(r, 405, "method_not_allowed", w)
        check(must_allow <= allow_set(r), "%s: Allow %r should include %r" % (w, r.header("allow"), must_allow))
        check(method not in allow_set(r), "%s: Allow lists the rejected method" % w)

    # ---- auth
    for method, path in all_routes:
        if path == "/healthz":
            continue
        for label, hdrs in [("no token", {}), ("unknown token", {"Authorization": "Bearer tt_" + "A" * 32}),
                            ("malformed", {"Authorization": "Bearer"}),
                            ("basic", {"Authorization": "Basic dXNlcjpwYXNz"}),
                            ("token without Bearer", {"Authorization": tok})]:
            r = http_request(srv.port, method, path, {"to": "+639171234567", "message": "x"} if method == "POST" else None,
                             None, headers=hdrs)
            w = "%s %s %s" % (method, path, label)
            check_problem(r, 401, "unauthorized", w)
            check((r.header("www-authenticate") or "").lower().startswith("bearer"),
                  "%s: WWW-Authenticate %r" % (w, r.header("www-authenticate")))
    r = http_request(srv.port, "GET", "/healthz", None, None)
    check_eq(r.status, 200, "GET /healthz without a token")

    # ---- order of checks
    r = http_request(srv.port, "GET", "/api/v1/no-such-route", None, None)
    check_problem(r, 401, "unauthorized", "unknown /api/v1 route without a token (auth before route)")
    r = http_request(srv.port, "GET", "/api/v1/no-such-route", None, tok)
    check_problem(r, 404, "not_found", "unknown /api/v1 route")
    r = http_request(srv.port, "GET", "/no-such-thing", None, None)
    check_problem(r, 404, "not_found", "unknown root route")
    r = raw_body_request(srv.port, "PUT", "/api/v1/messages", big, tok)
    if check(r is not None, "PUT with a big body: no response"):
        check_problem(r, 405, "method_not_allowed", "wrong method with a big body (method before size)")
    r = raw_body_request(srv.port, "POST", "/api/v1/messages", b"{" + b" " * 70000, tok)
    if check(r is not None, "POST with big invalid JSON: no response"):
        check_problem(r, 413, "payload_too_large", "big invalid JSON (size before JSON)")
    r = http_request(srv.port, "POST", "/api/v1/messages", {"to": "bad", "message": "x", "device_id": 99999999}, tok)
    check_validation(r, "to", "bad to and unknown device_id (validation before resource)")
    r = http_request(srv.port, "POST", "/api/v1/devices/99999999/messages", {"to": "bad", "message": "x"}, tok)
    check(r.status in (404, 422), "bad body to an unknown device: %r" % r)

    # ---- validation
    def v(body, field, what, path="/messages"):
        r = api.post(path, body)
        check_validation(r, field, "%s %s" % (path, what))

    base = {"to": "+639171234567", "message": "hi", "device_id": dev_id}
    for bad_to in ("abc", "12", "+", "+1234567890123456", "", "++639171234567", "63917x234567", 639171234567, None):
        v(dict(base, to=bad_to), "to", "to=%r" % (bad_to,))
    v({"message": "hi", "device_id": dev_id}, "to", "without to")
    v(dict(base, message=""), "message", "empty message")
    v(dict(base, message="a" * 1601), "message", "1601 ASCII characters")
    v(dict(base, message="\u00e9" * 1601), "message", "1601 two-byte code points")
    v(dict(base, message="\U0001F600" * 1601), "message", "1601 emoji (code points, not UTF-16 units)")
    v(dict(base, message=123), "message", "numeric message")
    v({"to": "+639171234567", "device_id": dev_id}, "message", "without message")
    v(dict(base, priority="urgent"), "priority", "priority=urgent")
    v(dict(base, priority=1), "priority", "priority=1")
    v(dict(base, force="yes"), "force", "force='yes'")
    v(dict(base, force=1), "force", "force=1")
    v(dict(base, device_id="%d" % dev_id), "device_id", "device_id as a string")
    v(dict(base, device_id=1.5), "device_id", "device_id=1.5")
    v(dict(base, device_id=True), "device_id", "device_id=true")
    v(dict(base, ttl=5), "ttl", "ttl=5")
    v(dict(base, ttl=604801), "ttl", "ttl=604801")
    v(dict(base, ttl="60"), "ttl", "ttl as a string")
    v({"to": "+639171234567", "message": ""}, "message", "empty message", "/devices/%d/messages" % dev_id)
    v({"to": "nope", "message": "x"}, "to", "bad to", "/devices/%d/messages" % dev_id)
    v({}, "name", "no name", "/devices")
    v({"name": 5}, "name", "numeric name", "/devices")
    v({"name": "x", "rate_per_minute": 0}, "rate_per_minute", "rate 0", "/devices")
    v({"name": "x", "rate_per_minute": 601}, "rate_per_minute", "rate 601", "/devices")
    v({"name": "x", "rate_per_minute": "30"}, "rate_per_minute", "rate as a string", "/devices")
    for q in ("limit=0", "limit=501", "limit=abc"):
        r = api.get("/messages?" + q)
        check_validation(r, "limit", "GET /messages?" + q)

    ok = api.post("/messages", dict(base, message="a" * 1600))
    check_eq(ok.status, 202, "1600 ASCII characters are allowed")
    if ok.status == 202:
        check_eq((ok.body.get("encoding"), ok.body.get("segments")), ("GSM-7", 11), "1600 GSM-7 characters")
    ok = api.post("/messages", dict(base, message="\U0001F600" * 1600))
    check_eq(ok.status, 202, "1600 emoji are allowed (code points)")
    if ok.status == 202:
        check_eq((ok.body.get("encoding"), ok.body.get("segments")), ("UCS-2", 49), "1600 emoji (3200 UTF-16 units, 33 per part)")
    ok = api.post("/messages", dict(base, message="\u00e9" * 1600, priority="high", ttl=10, force=False,
                                    unknown_field={"x": [1, 2]}))
    check_eq(ok.status, 202, "1600 two-byte characters, high priority, ttl 10, an unknown field")

    # ---- resources
    r = api.post("/messages", dict(base, device_id=99999999))
    check_problem(r, 404, "not_found", "device_id of no device")
    r = api.post("/devices/99999999/messages", {"to": "+639171234567", "message": "x"})
    check_problem(r, 404, "not_found", "POST /devices/99999999/messages")
    for path in ("/messages/99999999", "/messages/abc", "/messages/0", "/messages/-1",
                 "/devices/99999999", "/devices/abc", "/devices/0"):
        r = api.get(path)
        check_problem(r, 404, "not_found", "GET " + path)
    r = api.get("/messages?device_id=99999999")
    check_eq(r.status, 200, "GET /messages?device_id= of no device")
    check_eq((r.body or {}).get("data"), [], "list filtered by a device that does not exist")

    # ---- still alive
    r = http_request(srv.port, "GET", "/healthz")
    check_eq(r.status, 200, "GET /healthz after the garbage")
    check(srv.alive(), "server process alive after the garbage")
    log("sim saw %d sends" % len(sim.sends()))


def _chunked(port, method, path, tok, data):
    head = ("%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" % (method, path, tok)).encode()
    body = b""
    for i in range(0, len(data), 8192):
        part = data[i:i + 8192]
        body += b"%x\r\n" % len(part) + part + b"\r\n"
    body += b"0\r\n\r\n"
    return raw_request(port, head + body)


if __name__ == "__main__":
    run([test_garbage])
