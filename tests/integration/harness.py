"""harness.py: black-box integration test harness for taratxtd.

Owns everything a test needs to drive real processes on loopback: free port
discovery, a mosquitto broker per test (its own config and persistence
directory), the taratxtd server (start, wait for /healthz, SIGKILL, SIGTERM,
restart on the same data directory), a plain HTTP client on http.client, raw
socket requests for what http.client refuses to send, the tt-devsim device
simulator (its JSON event lines parsed on a reader thread) and mosquitto_pub.

Design, after redis's start_server and mosquitto's test/broker: every process
is registered and killed when its test ends (try/finally in run()) and at
interpreter exit (atexit); every wait has a timeout; every temporary
directory is removed. Checks are soft (check() records and goes on) so one
run lists every broken expectation; must() stops the test. When a test
fails, the tails of the server, simulator and broker logs are printed.

Binary paths come from the environment: TARATXTD and TT_DEVSIM. IT_SLOW (a
float, default 1) multiplies every timeout, for sanitizer builds.
"""

import atexit
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

SLOW = float(os.environ.get("IT_SLOW", "1") or "1")
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TOKEN_RE = re.compile(r"^tt_[0-9A-Za-z]{32}$")
PROBLEM_CT = "application/problem+json"

_live = []          # every object with a .cleanup() started by the current test
_all_live = []      # the same, for the whole process (atexit)
_tmpdirs = []
_failures = []      # soft failures of the current test


def T(seconds):
    """A timeout scaled for slow (sanitizer) builds."""
    return seconds * SLOW


def log(msg):
    sys.stdout.write("[%7.2f] %s\n" % (time.time() - _T0, msg))
    sys.stdout.flush()


_T0 = time.time()


# ---------------------------------------------------------------- checks

def check(cond, msg):
    """Soft assertion: records the failure and lets the test go on."""
    if not cond:
        _failures.append(msg)
        log("CHECK FAILED: " + msg)
    return bool(cond)


def must(cond, msg):
    """Hard assertion: stops the current test."""
    if not cond:
        raise AssertionError(msg)


def check_eq(seen, expected, what):
    return check(seen == expected, "%s: expected %r, seen %r" % (what, expected, seen))


def wait_until(fn, timeout, desc, interval=0.1):
    """Calls fn until it returns something truthy; returns that value.
    Raises AssertionError with desc and the last value after timeout seconds
    (already scaled by the caller with T())."""
    deadline = time.time() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.time() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s (last: %s)"
                                 % (timeout, desc, _short(last)))
        time.sleep(interval)


def _short(v, n=400):
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."


# ---------------------------------------------------------------- plumbing

def mktemp(prefix):
    d = tempfile.mkdtemp(prefix="tt-it-" + prefix + "-")
    os.chmod(d, 0o755)
    _tmpdirs.append(d)
    return d


def free_port():
    """A loopback TCP port that was free a moment ago (bind to port 0)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path, lines=60):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return "(no log at %s)" % path
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:])


try:
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except Exception:  # not Linux: children may then outlive a killed test
    _PRCTL = None


def _die_with_parent():
    """preexec_fn: the child gets SIGKILL when this test process dies, even by
    SIGKILL (a ctest timeout), so no broker or server outlives its test. Only
    calls an already resolved function: nothing to import in the child."""
    if _PRCTL is not None:
        _PRCTL(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


_SAN_RE = re.compile(r"runtime error:|ERROR: (Address|Leak)Sanitizer|WARNING: ThreadSanitizer|"
                     r"SUMMARY: (Address|Undefined|Leak|Thread)Sanitizer")


def _sanitizer_lines(path, limit=5):
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    out = [l.strip() for l in text.splitlines() if _SAN_RE.search(l)]
    return out[:limit]


def _register(obj):
    _live.append(obj)
    _all_live.append(obj)


def _kill_proc(p):
    if p is not None and p.poll() is None:
        try:
            p.kill()
        except OSError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def binary(var):
    path = os.environ.get(var, "")
    must(path and os.path.exists(path),
         "environment variable %s must name a built binary (got %r)" % (var, path))
    return path


# ---------------------------------------------------------------- broker

class Broker:
    """A mosquitto on a loopback port with its own config and persistence."""

    def __init__(self, port=None, start=True, dynsec=False):
        self.fixed_port = port is not None
        self.port = port or free_port()
        self.dir = mktemp("broker")
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        self.logpath = os.path.join(self.dir, "mosquitto.log")
        self.proc = None
        # dynsec: the broker enforces access with its dynamic-security plugin;
        # admin_user/admin_password is the first admin (the server's user).
        self.dynsec = dynsec
        self.admin_user = "taratxt"
        self.admin_password = "admin-%d-pass" % self.port
        if dynsec:
            self.init_dynsec()
        self._write_conf()
        _register(self)
        if start:
            for attempt in range(3):
                try:
                    self.start()
                    break
                except AssertionError:
                    # another test may have taken the free port in between
                    if self.fixed_port or attempt == 2 or "in use" not in tail(self.logpath, 5).lower():
                        raise
                    self.port = free_port()
                    self._write_conf()

    def init_dynsec(self):
        """(Re)writes the plugin's file with only the first admin: what a
        broker that lost its plugin state looks like."""
        path = os.path.join(self.dir, "dynsec.json")
        if os.path.exists(path):
            os.unlink(path)
        r = subprocess.run(["mosquitto_ctrl", "dynsec", "init", path, self.admin_user, self.admin_password],
                           capture_output=True, timeout=T(15))
        must(r.returncode == 0, "mosquitto_ctrl dynsec init failed: %s" % r.stderr.decode(errors="replace"))

    def _write_conf(self):
        with open(self.conf, "w") as f:
            if self.dynsec:
                f.write("plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so\n"
                        "plugin_opt_config_file %s/dynsec.json\n" % self.dir)
            f.write("user root\n"
                    "listener %d 127.0.0.1\n"
                    "allow_anonymous %s\n"
                    "persistence true\n"
                    "persistence_location %s/\n"
                    "autosave_on_changes true\n"
                    "max_queued_messages 100000\n"
                    "max_inflight_messages 100\n"
                    "log_dest stderr\n"
                    "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
                    "connection_messages true\n" % (self.port, "false" if self.dynsec else "true", self.dir))

    @property
    def url(self):
        return "tcp://127.0.0.1:%d" % self.port

    def start(self):
        logf = open(self.logpath, "ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", self.conf], stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        logf.close()
        deadline = time.time() + T(10)
        while not port_open(self.port):
            if self.proc.poll() is not None:
                raise AssertionError("mosquitto exited (%s):\n%s"
                                     % (self.proc.returncode, tail(self.logpath)))
            if time.time() > deadline:
                raise AssertionError("mosquitto did not listen on %d" % self.port)
            time.sleep(0.05)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_proc(self.proc)

    def restart(self):
        self.stop()
        return self.start()

    def cleanup(self):
        _kill_proc(self.proc)

    def diagnostics(self):
        return "--- broker :%d log tail\n%s" % (self.port, tail(self.logpath, 20))


def mqtt_pub(broker_port, topic, payload, qos=1, retain=False, client_id=None):
    """Publishes one message with mosquitto_pub (as a separate client, so it
    does not take over a device's session)."""
    if not isinstance(payload, (str, bytes)):
        payload = json.dumps(payload)
    if isinstance(payload, bytes):
        payload = payload.decode()
    args = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker_port), "-t", topic,
            "-m", payload, "-q", str(qos), "-i", client_id or ("it-pub-%d" % os.getpid())]
    if retain:
        args.append("-r")
    r = subprocess.run(args, capture_output=True, timeout=T(15))
    must(r.returncode == 0, "mosquitto_pub failed: %s" % r.stderr.decode(errors="replace"))


# ---------------------------------------------------------------- HTTP

class Resp:
    """status, headers (lower-cased names), body (parsed JSON or None), text."""

    def __init__(self, status, headers, raw):
        self.status = status
        self.headers = headers
        self.raw = raw
        self.text = raw.decode("utf-8", "replace")
        self.body = None
        if raw:
            try:
                self.body = json.loads(self.text)
            except ValueError:
                self.body = None

    def __iter__(self):
        return iter((self.status, self.headers, self.body))

    def header(self, name):
        return self.headers.get(name.lower())

    def __repr__(self):
        return "<%d %s>" % (self.status, self.text[:300])


def http_request(port, method, path, body=None, token=None, headers=None, timeout=30):
    """One request on a new connection. body: dict/list (JSON-encoded), str or
    bytes (sent as is) or None. Returns Resp; raises OSError when the
    connection fails."""
    h = {"Connection": "close"}
    data = None
    if body is not None:
        if isinstance(body, (bytes, bytearray)):
            data = bytes(body)
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    if token is not None:
        h["Authorization"] = "Bearer " + token
    if headers:
        h.update(headers)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=T(timeout))
    try:
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            raw = r.read()
        except http.client.HTTPException as e:
            # a truncated or unparsable response: treat it like a lost connection
            raise ConnectionError("%s %s: %r" % (method, path, e))
        hdrs = {}
        for k, v in r.getheaders():
            k = k.lower()
            hdrs[k] = v if k not in hdrs else hdrs[k] + ", " + v
        return Resp(r.status, hdrs, raw)
    finally:
        conn.close()


def raw_request(port, data, timeout=15):
    """Sends raw bytes and parses one HTTP response. Returns Resp, or None when
    the server closed or reset the connection without a response."""
    s = socket.create_connection(("127.0.0.1", port), timeout=T(timeout))
    try:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may close early on an oversized request; read what it said
        r = http.client.HTTPResponse(s)
        try:
            r.begin()
            raw = r.read()
        except (http.client.HTTPException, OSError):
            return None
        hdrs = {}
        for k, v in r.getheaders():
            hdrs[k.lower()] = v
        return Resp(r.status, hdrs, raw)
    finally:
        s.close()


def raw_body_request(port, method, path, body, token=None, extra_headers=""):
    """A request with a Content-Length body over a raw socket: tolerates the
    server answering (413) and closing before the whole body was sent."""
    if isinstance(body, str):
        body = body.encode()
    head = "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" % (method, path)
    if token:
        head += "Authorization: Bearer %s\r\n" % token
    head += "%sContent-Length: %d\r\nConnection: close\r\n\r\n" % (extra_headers, len(body))
    return raw_request(port, head.encode() + body)


class Api:
    """A client for one server port and token. Paths are relative to /api/v1
    unless they start with '/healthz', '/metrics' or '/api'."""

    def __init__(self, server, token=None):
        self.server = server
        self.token = token

    def _path(self, path):
        if path.startswith(("/healthz", "/metrics", "/api")):
            return path
        return "/api/v1" + path

    def req(self, method, path, body=None, headers=None, token=Ellipsis, timeout=30):
        tok = self.token if token is Ellipsis else token
        return http_request(self.server.port, method, self._path(path), body, tok, headers, timeout)

    def get(self, path, **kw):
        return self.req("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.req("POST", path, body, **kw)

    post_json = post

    def patch(self, path, body=None, **kw):
        return self.req("PATCH", path, body, **kw)

    def delete(self, path, **kw):
        return self.req("DELETE", path, **kw)

    # ---- helpers on top of the contract

    def create_device(self, name="phone", rate_per_minute=None):
        body = {"name": name}
        if rate_per_minute is not None:
            body["rate_per_minute"] = rate_per_minute
        r = self.post("/devices", body)
        must(r.status == 201 and isinstance(r.body, dict) and "mqtt" in r.body,
             "POST /devices: expected 201 with mqtt, seen %r" % r)
        return r.body

    def device(self, dev_id):
        r = self.get("/devices/%d" % dev_id)
        must(r.status == 200, "GET /devices/%d: %r" % (dev_id, r))
        return r.body

    def wait_online(self, dev_id, online=True, timeout=20):
        def ok():
            d = self.device(dev_id)
            return d if d.get("online") is online else None
        return wait_until(ok, T(timeout), "device %d online=%s" % (dev_id, online), 0.1)

    def message(self, mid):
        r = self.get("/messages/%d" % mid)
        must(r.status == 200, "GET /messages/%d: %r" % (mid, r))
        return r.body

    def send(self, to, message, expect=202, dev_id=None, **fields):
        """POST /messages (or /devices/{dev_id}/messages); asserts the status
        and returns the body."""
        body = {"to": to, "message": message}
        body.update(fields)
        path = "/messages" if dev_id is None else "/devices/%d/messages" % dev_id
        r = self.post(path, body)
        must(r.status == expect, "POST %s %s: expected %d, seen %r" % (path, json.dumps(body)[:200], expect, r))
        return r.body

    def wait_message(self, mid, status, timeout=20):
        def ok():
            m = self.message(mid)
            return m if m.get("status") == status else None
        try:
            return wait_until(ok, T(timeout), "message %d status %s" % (mid, status), 0.1)
        except AssertionError as e:
            raise AssertionError("%s; message now %r" % (e, self.message(mid)))

    def list_all(self, path="/messages", limit=500, query=""):
        """Follows next_cursor; returns all items in order."""
        items, cursor, pages = [], None, 0
        while True:
            q = "limit=%d" % limit + (("&" + query) if query else "")
            if cursor is not None:
                q += "&cursor=" + _urlquote(cursor)
            r = self.get(path + "?" + q)
            must(r.status == 200 and isinstance(r.body, dict) and "data" in r.body,
                 "GET %s?%s: %r" % (path, q, r))
            items.extend(r.body["data"])
            cursor = r.body.get("next_cursor")
            pages += 1
            must(pages < 10000, "pagination does not end")
            if cursor is None:
                return items


def _urlquote(s):
    from urllib.parse import quote
    return quote(str(s), safe="")


def check_problem(r, status, code=None, what=""):
    """Checks an RFC 9457 problem response: status, content type, and a body
    with type/title/status/code (code equal to the expected one if given)."""
    what = what or "response"
    ok = check(r.status == status, "%s: expected status %d, seen %d (%s)" % (what, status, r.status, r.text[:300]))
    ct = (r.header("content-type") or "").split(";")[0].strip().lower()
    ok &= check(ct == PROBLEM_CT, "%s: Content-Type %r, expected %s" % (what, r.header("content-type"), PROBLEM_CT))
    b = r.body
    if not check(isinstance(b, dict), "%s: body is not a JSON object: %r" % (what, r.text[:200])):
        return False
    ok &= check(isinstance(b.get("type"), str) and isinstance(b.get("title"), str) and b.get("title"),
                "%s: problem body lacks type/title: %r" % (what, b))
    ok &= check(b.get("status") == r.status, "%s: body status %r != HTTP %d" % (what, b.get("status"), r.status))
    if code is not None:
        ok &= check(b.get("code") == code, "%s: code %r, expected %r" % (what, b.get("code"), code))
    else:
        ok &= check(isinstance(b.get("code"), str), "%s: no code in %r" % (what, b))
    return ok


def check_validation(r, field, what=""):
    """422 validation_failed with an errors[] entry for field."""
    what = what or "validation"
    if not check_problem(r, 422, "validation_failed", what):
        return False
    errs = r.body.get("errors")
    if not check(isinstance(errs, list) and errs, "%s: no errors[] in %r" % (what, r.body)):
        return False
    fields = [e.get("field") for e in errs if isinstance(e, dict)]
    ok = check(field in fields, "%s: errors[].field %r, expected %r" % (what, fields, field))
    ok &= check(all(isinstance(e, dict) and isinstance(e.get("message"), str) for e in errs),
                "%s: every error needs field and message: %r" % (what, errs))
    return ok


def check_time(v, what):
    return check(isinstance(v, str) and RFC3339_MS.match(v) is not None,
                 "%s: expected RFC 3339 UTC with ms and Z, seen %r" % (what, v))


# ---------------------------------------------------------------- server

class Server:
    """taratxtd serve on a free loopback port with its own data directory."""

    def __init__(self, mqtt_url=None, broker=None, extra=None, env=None, data=None, start=True):
        self.bin = binary("TARATXTD")
        self.port = free_port()
        self.data = data or os.path.join(mktemp("server"), "data")
        self.dir = os.path.dirname(self.data)
        self.mqtt_url = mqtt_url or (broker.url if broker else "tcp://127.0.0.1:%d" % free_port())
        self.extra = list(extra or [])
        self.env = dict(env or {})
        self.logpath = os.path.join(self.dir, "taratxtd.log")
        self.proc = None
        self.token = None
        self.starts = 0
        _register(self)
        if start:
            for attempt in range(3):
                try:
                    self.start()
                    break
                except AssertionError:
                    # another test may have taken the free port in between
                    log_tail = tail(self.logpath, 5).lower()
                    if attempt == 2 or self.alive() or not ("in use" in log_tail or "eaddrinuse" in log_tail):
                        raise
                    self.port = free_port()

    def args(self):
        return [self.bin, "serve", "--listen", "127.0.0.1:%d" % self.port, "--data", self.data,
                "--mqtt-url", self.mqtt_url] + self.extra

    def start(self, timeout=30):
        """Starts the server and waits for GET /healthz 200; reads the initial
        token on the first start."""
        self.starts += 1
        with open(self.logpath, "ab") as f:
            f.write(("\n===== start #%d: %s\n" % (self.starts, " ".join(self.args()))).encode())
        logf = open(self.logpath, "ab")
        env = dict(os.environ)
        env.update(self.env)
        self.proc = subprocess.Popen(self.args(), stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, env=env)
        logf.close()
        deadline = time.time() + T(timeout)
        last = None
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("taratxtd exited with %s during start:\n%s"
                                     % (self.proc.returncode, tail(self.logpath)))
            try:
                r = http_request(self.port, "GET", "/healthz", timeout=5)
                last = r
                if r.status == 200:
                    break
            except OSError as e:
                last = e
            if time.time() > deadline:
                raise AssertionError("taratxtd not healthy after %ds (last %r):\n%s"
                                     % (timeout, last, tail(self.logpath)))
            time.sleep(0.05)
        if self.token is None:
            path = os.path.join(self.data, "initial-token")
            wait_until(lambda: os.path.exists(path), T(5), "initial-token file")
            with open(path) as f:
                self.token = f.read().strip()
        return self

    def api(self, token=Ellipsis):
        return Api(self, self.token if token is Ellipsis else token)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self):
        return None if self.proc is None else self.proc.poll()

    def kill(self):
        """SIGKILL, then reap."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait(timeout=10)
        return self.proc.returncode

    def term(self, timeout=15, sig=signal.SIGTERM):
        """Sends SIGTERM (or sig), waits; returns the exit code (None when it did
        not exit in time; the process is then killed)."""
        if not self.alive():
            return self.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=T(timeout))
        except subprocess.TimeoutExpired:
            _kill_proc(self.proc)
            return None

    def restart(self, **kw):
        if self.alive():
            self.term()
        return self.start(**kw)

    def run_cli(self, *args, timeout=30):
        """Runs taratxtd with args (the server should be stopped); returns
        CompletedProcess with text output."""
        return subprocess.run([self.bin] + list(args), capture_output=True, text=True,
                              timeout=T(timeout), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def account_create(self, name):
        must(not self.alive(), "account create needs the server stopped")
        r = self.run_cli("account", "create", "--data", self.data, "--name", name)
        must(r.returncode == 0, "account create exited %d: %s %s" % (r.returncode, r.stdout, r.stderr))
        for line in reversed(r.stdout.strip().splitlines()):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
        raise AssertionError("account create printed no JSON object: %r" % r.stdout)

    def cleanup(self):
        _kill_proc(self.proc)

    def sanitizer_reports(self):
        """Lines of the log where ASan, UBSan, LSan or TSan reported a bug."""
        return _sanitizer_lines(self.logpath)

    def diagnostics(self):
        return "--- taratxtd :%d log tail (%s)\n%s" % (self.port, self.logpath, tail(self.logpath, 80))


# ---------------------------------------------------------------- device simulator

class DevSim:
    """tt-devsim for one device (creds: the POST /devices body) or a fleet
    (a list of them). Events (stdout JSON lines) land in self.events."""

    _n = 0

    def __init__(self, creds, args=None, start=True):
        self.bin = binary("TT_DEVSIM")
        DevSim._n += 1
        self.dir = mktemp("devsim")
        self.credpath = os.path.join(self.dir, "creds.json")
        with open(self.credpath, "w") as f:
            json.dump(creds, f)
        self.args = list(args or [])
        self.logpath = os.path.join(self.dir, "devsim.stderr")
        self.events = []
        self.cond = threading.Condition()
        self.proc = None
        self.reader = None
        self.name = "devsim#%d" % DevSim._n
        _register(self)
        if start:
            self.start()

    def start(self):
        logf = open(self.logpath, "ab")
        self.proc = subprocess.Popen([self.bin, "--credentials", self.credpath] + self.args,
                                     stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        logf.close()
        self.reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self.reader.start()
        return self

    def _read(self, proc):
        for line in proc.stdout:
            line = line.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                with self.cond:
                    self.events.append(ev)
                    self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def snapshot(self):
        with self.cond:
            return list(self.events)

    def sends(self, mid=None, device_id=None):
        return [e for e in self.snapshot() if e.get("event") == "send"
                and (mid is None or e.get("id") == mid)
                and (device_id is None or e.get("device_id") == device_id)]

    def sent_ids(self):
        return set(e.get("id") for e in self.sends())

    def wait_for(self, predicate, timeout=20, desc="devsim event"):
        """Waits until predicate(events) is truthy; returns its value."""
        deadline = time.time() + T(timeout)
        with self.cond:
            while True:
                v = predicate(self.events)
                if v:
                    return v
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError("%s: timed out after %.0fs waiting for %s; last events: %s"
                                         % (self.name, T(timeout), desc, _short(self.events[-8:], 1500)))
                self.cond.wait(min(left, 0.2))

    def wait_event(self, pred, timeout=20, desc="devsim event"):
        """Waits for the first event e with pred(e); returns it."""
        return self.wait_for(lambda evs: next((e for e in evs if pred(e)), None), timeout, desc)

    def wait_connected(self, timeout=20):
        return self.wait_event(lambda e: e.get("event") == "connected", timeout, "connected")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def term(self, timeout=10):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=T(timeout))
            except subprocess.TimeoutExpired:
                _kill_proc(self.proc)
        return self.proc.returncode if self.proc else None

    def kill(self):
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait(timeout=10)
        return self.proc.returncode

    def cleanup(self):
        _kill_proc(self.proc)

    def sanitizer_reports(self):
        return _sanitizer_lines(self.logpath)

    def diagnostics(self):
        evs = self.snapshot()
        return "--- %s (%s) %d events, last: %s\n--- %s stderr tail\n%s" % (
            self.name, " ".join(self.args), len(evs), _short(evs[-5:], 1200),
            self.name, tail(self.logpath, 15))


# ---------------------------------------------------------------- runner

def _cleanup(objs):
    for o in reversed(objs):
        try:
            o.cleanup()
        except Exception:
            pass


def _cleanup_all():
    _cleanup(_all_live)
    for d in _tmpdirs:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup_all)


def _on_signal(signum, frame):
    _cleanup_all()
    os._exit(128 + signum)


signal.signal(signal.SIGTERM, _on_signal)


def run(tests):
    """Runs each test function in order with its own processes; prints
    diagnostics for failures; exits 0 only when every test passed."""
    failed = []
    only = os.environ.get("IT_ONLY")
    for fn in tests:
        name = fn.__name__
        if only and only not in name:
            continue
        del _failures[:]
        del _live[:]
        log("=== %s" % name)
        t0 = time.time()
        err = None
        try:
            fn()
        except Exception:
            err = traceback.format_exc()
            log("ERROR in %s:\n%s" % (name, err))
        for o in _live:
            scan = getattr(o, "sanitizer_reports", None)
            if scan:
                for line in scan():
                    check(False, "sanitizer report in %s: %s" % (o.logpath, line))
        ok = err is None and not _failures
        if not ok:
            failed.append(name)
            for o in _live:
                try:
                    sys.stdout.write(o.diagnostics() + "\n")
                except Exception:
                    pass
            for f in _failures:
                log("  failed check: " + f)
        _cleanup(list(_live))
        log("--- %s: %s (%.1fs)" % (name, "PASS" if ok else "FAIL", time.time() - t0))
    if failed:
        log("FAILED: " + ", ".join(failed))
        sys.stdout.flush()
        _cleanup_all()
        os._exit(1)
    log("all passed")
    sys.stdout.flush()
    _cleanup_all()
    os._exit(0)


# ---------------------------------------------------------------- MQTT watcher

class MqttSub:
    """mosquitto_sub on a topic filter; collects (topic, payload) pairs."""

    def __init__(self, broker_port, topic):
        self.items = []
        self.cond = threading.Condition()
        self.logpath = os.path.join(mktemp("sub"), "sub.stderr")
        logf = open(self.logpath, "ab")
        self.proc = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker_port), "-q", "1",
                                      "-v", "-t", topic, "-i", "it-sub-%d-%d" % (os.getpid(), free_port())],
                                     stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        logf.close()
        _register(self)
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.3)   # let the subscription settle before anything is published

    def _read(self):
        for line in self.proc.stdout:
            line = line.decode("utf-8", "replace").rstrip("\n")
            topic, _, payload = line.partition(" ")
            try:
                payload = json.loads(payload)
            except ValueError:
                pass
            with self.cond:
                self.items.append((topic, payload))
                self.cond.notify_all()

    def wait_for(self, pred, timeout=20, desc="MQTT message"):
        deadline = time.time() + T(timeout)
        with self.cond:
            while True:
                for it in self.items:
                    if pred(it[0], it[1]):
                        return it
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError("timed out after %.0fs waiting for %s; seen %s"
                                         % (T(timeout), desc, _short(self.items[-8:], 1000)))
                self.cond.wait(min(left, 0.2))

    def snapshot(self):
        with self.cond:
            return list(self.items)

    def cleanup(self):
        _kill_proc(self.proc)

    def diagnostics(self):
        return "--- mosquitto_sub: %s" % _short(self.snapshot()[-10:], 1200)
