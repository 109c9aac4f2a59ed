#!/usr/bin/python3
"""it_tokens: API tokens as a user of /tokens sees them (API.md 7, 1).

GET /tokens lists token objects {id, name, prefix, created_at, last_used_at}
and never a secret; POST /tokens shows the new secret once (tt_ + 32
base62); DELETE revokes at once (the next request is 401, also for a token
revoking itself); another account's token id is 404; last_used_at is set by
use, visible without a restart, and kept across a SIGTERM restart; names are
validated; the data directory holds no token secret in clear.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Broker, Server, TOKEN_RE, T, check, check_eq, check_problem,  # noqa: E402
                     check_time, check_validation, must, run)

TOKEN_KEYS = ["created_at", "id", "last_used_at", "name", "prefix"]


def tokens(api, what):
    r = api.get("/tokens")
    must(r.status == 200 and isinstance(r.body, dict) and isinstance(r.body.get("data"), list),
         "%s: GET /tokens: %r" % (what, r))
    check("next_cursor" in r.body, "%s: GET /tokens has no next_cursor: %r" % (what, r.body))
    return r


def by_id(r, tid):
    return next((t for t in r.body["data"] if t.get("id") == tid), None)


def check_token_object(t, what):
    check_eq(sorted(t.keys()) if isinstance(t, dict) else t, TOKEN_KEYS, "%s: keys of the token object" % what)
    check(isinstance(t.get("id"), int) and t.get("id") > 0, "%s: id %r" % (what, t.get("id")))
    check_time(t.get("created_at"), "%s created_at" % what)


def check_unauthorized(r, what):
    check_problem(r, 401, "unauthorized", what)
    check(("bearer" in (r.header("www-authenticate") or "").lower()),
          "%s: WWW-Authenticate: Bearer, seen %r" % (what, r.header("www-authenticate")))


def grep_dir(root, needles, skip=()):
    hits = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if p in skip:
                continue
            try:
                with open(p, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            for nd in needles:
                if nd in data:
                    hits.append((p, nd))
    return hits


def test_tokens():
    broker = Broker()
    srv = Server(broker=broker)
    api = srv.api()
    secrets = [srv.token]

    # the initial token
    r = tokens(api, "initial")
    check_eq(len(r.body["data"]), 1, "tokens of a fresh account")
    t0 = r.body["data"][0] if r.body["data"] else {}
    check_token_object(t0, "initial token")
    check_eq(t0.get("prefix"), srv.token[:7], "prefix of the initial token")
    check(len(t0.get("prefix") or "") == 7 and (t0.get("prefix") or "").startswith("tt_"),
          "prefix is tt_ + 4: %r" % t0.get("prefix"))
    check(srv.token not in r.text and srv.token[3:] not in r.text, "GET /tokens shows the secret")
    check(isinstance(t0.get("name"), str), "initial token name: %r" % t0.get("name"))

    # validation
    check_validation(api.post("/tokens", {}), "name", "POST /tokens without name")
    check_validation(api.post("/tokens", {"name": 7}), "name", "POST /tokens with a number as name")
    check_validation(api.post("/tokens", {"name": ""}), "name", "POST /tokens with an empty name")
    check_eq(len(tokens(api, "after rejected creates").body["data"]), 1, "a rejected create stores no token")
    check_unauthorized(api.post("/tokens", {"name": "x"}, token=None), "POST /tokens without a token")

    # create: 201 with the secret once
    r = api.post("/tokens", {"name": "ci deploy"})
    must(r.status == 201 and isinstance(r.body, dict), "POST /tokens: expected 201, seen %r" % r)
    new = r.body
    tok = new.get("token")
    must(isinstance(tok, str), "POST /tokens: no token in %r" % new)
    secrets.append(tok)
    check(TOKEN_RE.match(tok) is not None, "new token format tt_ + 32 base62: %r" % tok)
    check(tok != srv.token, "the new token differs from the initial one")
    check_eq(new.get("name"), "ci deploy", "name of the new token")
    check_eq(new.get("prefix"), tok[:7], "prefix of the new token")
    check_eq(new.get("last_used_at"), None, "last_used_at of a new token")
    check_time(new.get("created_at"), "created_at of the new token")
    check(isinstance(new.get("id"), int) and new.get("id") != t0.get("id"), "new token id %r" % new.get("id"))
    tid = new.get("id")

    r = tokens(api, "after create")
    check_eq([t.get("id") for t in r.body["data"]], sorted([t0.get("id"), tid]), "token list by id")
    listed = by_id(r, tid) or {}
    check_token_object(listed, "listed new token")
    check_eq(listed.get("name"), "ci deploy", "listed name")
    check_eq(listed.get("prefix"), tok[:7], "listed prefix")
    check_eq(listed.get("last_used_at"), None, "listed last_used_at before any use")
    check(tok not in r.text and tok[3:] not in r.text, "GET /tokens shows the new secret")

    # the new token works and last_used_at follows its use, in the same process
    t_before = time.time()
    api2 = srv.api(tok)
    check_eq(api2.get("/devices").status, 200, "GET /devices with the new token")
    r = tokens(api, "after use")
    lu = (by_id(r, tid) or {}).get("last_used_at")
    if check_time(lu, "last_used_at after one use (no restart)"):
        check(lu >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_before - 2)),
              "last_used_at is about now: %r" % lu)
    # the initial token was used by every call above
    check(by_id(r, t0.get("id")) is not None and by_id(r, t0.get("id")).get("last_used_at") is not None,
          "the initial token's last_used_at after use: %r" % by_id(r, t0.get("id")))
    time.sleep(1.1)
    check_eq(api2.get("/tokens").status, 200, "GET /tokens with the new token")
    lu2 = (by_id(tokens(api, "after second use"), tid) or {}).get("last_used_at")
    check(isinstance(lu2, str) and isinstance(lu, str) and lu2 > lu,
          "last_used_at moves with a later use: %r then %r" % (lu, lu2))

    # last_used_at and the tokens survive a SIGTERM restart
    check_eq(srv.term(), 0, "exit code after SIGTERM")
    srv.start()
    r = tokens(api, "after restart")
    check_eq((by_id(r, tid) or {}).get("last_used_at"), lu2, "last_used_at kept across a SIGTERM restart")
    check_eq(api2.get("/devices").status, 200, "the new token works after the restart")

    # revoke: the next request is 401 at once
    r = api.delete("/tokens/%d" % tid)
    check_eq(r.status, 204, "DELETE /tokens/{id}")
    check_eq(r.raw, b"", "DELETE /tokens/{id} has no body")
    check_unauthorized(api2.get("/devices"), "a revoked token (immediately)")
    check_unauthorized(api2.get("/tokens"), "a revoked token on /tokens")
    check_eq(by_id(tokens(api, "after revoke"), tid), None, "a revoked token leaves the list")
    check_problem(api.delete("/tokens/%d" % tid), 404, "not_found", "DELETE of a revoked token")
    check_problem(api.delete("/tokens/999999"), 404, "not_found", "DELETE of an unknown token id")

    # a token may revoke itself
    r = api.post("/tokens", {"name": "self"})
    must(r.status == 201, "POST /tokens self: %r" % r)
    api3 = srv.api(r.body["token"])
    secrets.append(r.body["token"])
    r = api3.delete("/tokens/%d" % r.body["id"])
    check_eq(r.status, 204, "a token revoking itself")
    check_unauthorized(api3.get("/devices"), "the token that revoked itself")
    check_eq(api.get("/devices").status, 200, "the initial token still works")

    # revocation survives a kill -9 (the 204 was durable)
    r = api.post("/tokens", {"name": "crash"})
    must(r.status == 201, "POST /tokens crash: %r" % r)
    crash_tok, crash_id = r.body["token"], r.body["id"]
    secrets.append(crash_tok)
    check_eq(api.delete("/tokens/%d" % crash_id).status, 204, "DELETE before kill -9")
    srv.kill()
    srv.start()
    check_unauthorized(srv.api(crash_tok).get("/devices"), "a token revoked before kill -9")

    # another account's token id is 404
    keep = api.post("/tokens", {"name": "keeper"})
    must(keep.status == 201, "POST /tokens keeper: %r" % keep)
    secrets.append(keep.body["token"])
    check_eq(srv.term(), 0, "exit code after SIGTERM")
    acct = srv.account_create("other")
    secrets.append(acct["token"])
    srv.start()
    other = srv.api(acct["token"])
    r = other.get("/tokens")
    check_eq(r.status, 200, "GET /tokens of the other account")
    ob = [t.get("id") for t in (r.body or {}).get("data", [])]
    check_eq(len(ob), 1, "the other account lists only its own token: %r" % ob)
    check(keep.body["id"] not in ob and t0.get("id") not in ob, "the other account lists our tokens: %r" % ob)
    check_problem(other.delete("/tokens/%d" % keep.body["id"]), 404, "not_found", "DELETE of another account's token")
    check_problem(other.delete("/tokens/%d" % t0.get("id")), 404, "not_found",
                  "DELETE of another account's initial token")
    check_eq(srv.api(keep.body["token"]).get("/devices").status, 200, "our token after the other's DELETE")
    mine = [t.get("id") for t in tokens(api, "after other's DELETE").body["data"]]
    check(keep.body["id"] in mine and t0.get("id") in mine and not (set(ob) & set(mine)),
          "our list after the other's DELETE: %r (other's %r)" % (mine, ob))
    if ob:
        check_problem(api.delete("/tokens/%d" % ob[0]), 404, "not_found", "our DELETE of the other's token")
        check_eq(other.get("/tokens").status, 200, "the other's token still works")

    # no secret in clear anywhere in the data directory (but the initial-token file)
    time.sleep(T(0.5))
    skip = {os.path.join(srv.data, "initial-token")}
    needles = []
    for s in secrets:
        needles += [s.encode(), s[3:].encode()]
    check_eq(grep_dir(srv.data, needles, skip), [], "data files holding a token secret (server running)")
    check_eq(srv.term(), 0, "exit code after SIGTERM")
    check_eq(grep_dir(srv.data, needles, skip), [], "data files holding a token secret (server stopped)")


if __name__ == "__main__":
    run([test_tokens])
