#!/usr/bin/env python3
"""make chaos: three instances of agentidp behind a round-robin proxy on loopback, on a Postgres,
a Redis and a NATS of their own (so that no other user of the machine's services is disturbed),
under bounded steady load, with faults injected one at a time. After each fault it checks the
invariants and prints one table of them all; the exit status is 1 when any invariant broke.

Load: token issuance (client_credentials), authenticated reads, agent creation (each emits
agent.created to a webhook endpoint at a local receiver), usage events published to NATS JetStream,
delegation command checks against a budget, and revoked tokens presented again.

Faults: Redis FLUSHALL; Redis stopped 30 s; Postgres restarted; NATS restarted; kill -9 of one
instance (restarted after); the webhook receiver down 30 s and back.

Standard library only. Every process it starts is stopped by its pid; its directory is removed.
Environment: AGENTIDP_BIN (default target/debug/agentidp), CHAOS_OBSERVE_SECS (default 15).
"""

import base64
import collections
import glob
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.environ.get("AGENTIDP_BIN", os.path.join(TARGET, "debug", "agentidp"))
OBSERVE = float(os.environ.get("CHAOS_OBSERVE_SECS", "15"))
RATE_PER_MIN, BURST = 600, 30
DELEGATION_BUDGET, DELEGATION_TRIES = 40, 60
STARTED = time.monotonic()


def log(msg):
    print(f"chaos [{time.monotonic() - STARTED:6.1f}s] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=30.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


# ---- processes ---------------------------------------------------------------------------------

WORK = tempfile.mkdtemp(prefix="agentidp-chaos-")
PROCS = {}  # name -> Popen


def start(name, argv, env=None, **kw):
    out = open(os.path.join(WORK, f"{name}.log"), "ab")
    p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, **kw)
    PROCS[name] = p
    return p


def stop(name, sig=signal.SIGTERM, wait=15.0):
    p = PROCS.pop(name, None)
    if p is None or p.poll() is not None:
        return
    os.kill(p.pid, sig)
    try:
        p.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()


class Postgres:
    """A throwaway cluster in WORK, run as the postgres user when we are root."""

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            sys.exit("chaos: no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin = bins[-1]
        self.port = free_port()
        self.data = os.path.join(WORK, "pg")
        self.sock = os.path.join(WORK, "pgsock")
        os.makedirs(self.sock)
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(WORK, "postgres")
            shutil.chown(self.sock, "postgres")
        subprocess.run(self.as_user + [f"{self.bin}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                                       "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL)
        self.opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                     f"-c max_connections=100 -c synchronous_commit=off")
        self.url = f"postgres://postgres@127.0.0.1:{self.port}"

    def ctl(self, *args):
        subprocess.run(self.as_user + [f"{self.bin}/pg_ctl", "-D", self.data, "-l", os.path.join(WORK, "pg.log"),
                                       "-o", self.opts, "-w", "-t", "60", *args],
                       check=True, stdout=subprocess.DEVNULL)

    def start(self):
        self.ctl("start")

    def restart(self):
        self.ctl("-m", "fast", "restart")

    def pid(self):
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def stop(self):
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, signal.SIGINT)  # fast shutdown, by the postmaster's pid
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
            except ProcessLookupError:
                pass

    def psql(self, db, sql):
        r = subprocess.run(["psql", "-qAt", f"{self.url}/{db}", "-c", sql], capture_output=True, text=True)
        return r.stdout.strip()


# ---- HTTP ----------------------------------------------------------------------------------------


def request(port, method, path, headers=None, body=None, timeout=10.0):
    """(status, parsed body or text); status 0 when no answer came."""
    headers = dict(headers or {})
    data = None
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
        headers.setdefault("content-type", "application/json")
    elif isinstance(body, str):
        data = body.encode()
        headers.setdefault("content-type", "application/x-www-form-urlencoded")
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        raw = r.read()
        c.close()
    except (OSError, http.client.HTTPException):
        return 0, None
    try:
        return r.status, json.loads(raw) if raw else None
    except ValueError:
        return r.status, raw.decode(errors="replace")


def bearer(token, org=None):
    h = {"authorization": f"Bearer {token}"}
    if org:
        h["x-org-id"] = org
    return h


def basic(client_id, secret):
    return {"authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


class Proxy:
    """Round-robin TCP proxy: each connection goes to the next instance that accepts it."""

    def __init__(self, backends):
        self.backends = backends
        self.i = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        with self.lock:
            first = self.i
            self.i += 1
        for k in range(len(self.backends)):
            port = self.backends[(first + k) % len(self.backends)]
            try:
                b = socket.create_connection(("127.0.0.1", port), timeout=1.0)
                b.settimeout(None)
                break
            except OSError:
                continue
        else:
            c.close()
            return
        threading.Thread(target=self.pump, args=(b, c), daemon=True).start()
        self.pump(c, b)

    @staticmethod
    def pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Receiver:
    """The webhook receiver: records each delivery's webhook-id and body; can be taken down."""

    def __init__(self):
        self.port = free_port()
        self.hits = collections.Counter()
        self.bodies = {}
        self.lock = threading.Lock()
        self.server = None

    def start(self):
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                wid = self.headers.get("webhook-id", "")
                with outer.lock:
                    outer.hits[wid] += 1
                    outer.bodies[wid] = body.decode(errors="replace")
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def agents_seen(self):
        with self.lock:
            seen = collections.Counter()
            for wid, body in self.bodies.items():
                try:
                    data = json.loads(body).get("data", {})
                except ValueError:
                    continue
                aid = data.get("agent_id") or data.get("id")
                if aid:
                    seen[aid] += self.hits[wid]
            return seen


class Nats:
    """JetStream publishing over the NATS text protocol: HPUB with Nats-Msg-Id, waiting for the ack."""

    def __init__(self, port):
        self.port = port
        self.sock = None
        self.buf = b""
        self.n = 0

    def connect(self):
        self.close()
        s = socket.create_connection(("127.0.0.1", self.port), timeout=3)
        s.settimeout(3)
        self.sock, self.buf = s, b""
        self.line()  # INFO
        self.inbox = f"_INBOX.{uuid.uuid4().hex}"
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n')
        s.sendall(f"SUB {self.inbox}.* 1\r\nPING\r\n".encode())
        while self.line() != b"PONG":
            pass

    def close(self):
        if self.sock:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("nats closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("nats closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def publish(self, subject, msg_id, payload):
        """True once JetStream acknowledged the message."""
        try:
            if self.sock is None:
                self.connect()
            self.n += 1
            reply = f"{self.inbox}.{self.n}"
            hdr = f"NATS/1.0\r\nNats-Msg-Id: {msg_id}\r\n\r\n".encode()
            self.sock.sendall(f"HPUB {subject} {reply} {len(hdr)} {len(hdr) + len(payload)}\r\n".encode()
                              + hdr + payload + b"\r\n")
            while True:
                line = self.line()
                if line == b"PING":
                    self.sock.sendall(b"PONG\r\n")
                    continue
                parts = line.split()
                if parts[:1] == [b"MSG"]:
                    body = self.read(int(parts[-1]))
                    if parts[1].decode() == reply:
                        return b'"seq"' in body
                elif parts[:1] == [b"HMSG"]:
                    self.read(int(parts[-1]))  # a no-responders status: the stream is not there yet
                    if parts[1].decode() == reply:
                        return False
                elif parts[:1] == [b"-ERR"]:
                    raise OSError(line.decode())
        except OSError:
            self.close()
            return False


# ---- the run -----------------------------------------------------------------------------------


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.phase = "setup"
        self.statuses = collections.defaultdict(collections.Counter)  # phase -> status -> n
        self.revoked_ok = collections.Counter()

    def record(self, status):
        with self.lock:
            self.statuses[self.phase][status] += 1


def main():
    if not os.access(BIN, os.X_OK):
        sys.exit(f"chaos: {BIN} missing: cargo build --bin agentidp")
    pg = Postgres()
    pg.start()
    subprocess.run(["psql", "-q", f"{pg.url}/postgres", "-c", "create database agentidp_chaos"], check=True)
    db_url = f"{pg.url}/agentidp_chaos"
    redis_port, nats_port = free_port(), free_port()
    redis_argv = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    nats_argv = ["nats-server", "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", os.path.join(WORK, "nats")]
    start("redis", redis_argv)
    start("nats", nats_argv)
    assert wait_port(redis_port) and wait_port(nats_port), "redis and nats listen"

    ports = [free_port() for _ in range(3)]
    proxy = Proxy(ports)
    public = f"http://127.0.0.1:{proxy.port}"
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    env.update({
        "AGENTIDP_DATABASE__URL": db_url,
        "AGENTIDP_DATABASE__MAX_CONNECTIONS": "10",
        "AGENTIDP_DATABASE__CONNECT_RETRY_SECS": "60",
        "AGENTIDP_REDIS__URL": f"redis://127.0.0.1:{redis_port}",
        "AGENTIDP_REDIS__KEY_PREFIX": "chaos:",
        "AGENTIDP_SERVER__PUBLIC_URL": public,
        "AGENTIDP_SERVER__SHUTDOWN_GRACE_SECS": "5",
        "AGENTIDP_LOG__FORMAT": "json",
        "AGENTIDP_LOG__LEVEL": "info,sqlx=warn",
        "AGENTIDP_USAGE__NATS__ENABLED": "true",
        "AGENTIDP_USAGE__NATS__URL": f"nats://127.0.0.1:{nats_port}",
        "AGENTIDP_USAGE__NATS__FETCH_WAIT_MS": "100",
        "AGENTIDP_EVENTS__NATS__ENABLED": "true",
        "AGENTIDP_EVENTS__NATS__URL": f"nats://127.0.0.1:{nats_port}",
        "AGENTIDP_WEBHOOKS__ALLOW_PRIVATE_NETWORKS": "true",
        "AGENTIDP_WEBHOOKS__POLL_INTERVAL_MS": "200",
        "AGENTIDP_WEBHOOKS__RETRY_SCHEDULE_SECS": "[1, 2, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8]",
        "AGENTIDP_WEBHOOKS__TIMEOUT_SECS": "3",
        "AGENTIDP_WEBHOOKS__LEASE_SECS": "6",
        "AGENTIDP_TIERS__PLANS__FREE__MAX_AGENTS": "unlimited",
        "AGENTIDP_TIERS__PLANS__FREE__API_CALLS_PER_DAY": "unlimited",
        "AGENTIDP_TIERS__PLANS__FREE__TOKENS_PER_DAY": "unlimited",
        "AGENTIDP_TIERS__PLANS__FREE__TOKENS_PER_MONTH": "unlimited",
        "AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__REQUESTS_PER_MINUTE": str(RATE_PER_MIN),
        "AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__BURST": str(BURST),
        "AGENTIDP_AUTH__KEY_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
    })
    subprocess.run([BIN, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    password = "chaos-" + uuid.uuid4().hex
    subprocess.run([BIN, "bootstrap", "--org", "Chaos", "--email", "admin@chaos.test", "--password-stdin"],
                   env=env, input=password.encode(), check=True, stdout=subprocess.DEVNULL)

    def start_instance(i):
        e = dict(env, AGENTIDP_SERVER__BIND=f"127.0.0.1:{ports[i]}")
        start(f"instance{i}", [BIN, "serve"], env=e)

    for i in range(3):
        start_instance(i)
    for p in ports:
        assert wait_port(p, 60), f"instance on {p} listens"
    rx = Receiver()
    rx.start()
    stats = Stats()
    P = proxy.port

    st, login = request(P, "POST", "/auth/login", body={"email": "admin@chaos.test", "password": password})
    assert st == 200, (st, login)
    session, org = login["session_token"], login["actor"]["org_id"]
    admin = bearer(session, org)

    def must(method, path, body=None, headers=None, want=(200, 201)):
        for _ in range(50):
            st, b = request(P, method, path, headers or admin, body)
            if st in want:
                return b
            time.sleep(0.2)
        raise SystemExit(f"chaos: setup {method} {path}: {st} {b}")

    phases = ["baseline", "redis FLUSHALL", "redis stopped 30s", "postgres restart", "nats restart",
              "kill -9 instance", "webhook receiver down"]
    keys = [must("POST", "/auth/api-keys", {"description": f"reader {i}"})["key"] for i in range(3)]
    probe_keys = {ph: must("POST", "/auth/api-keys", {"description": f"rate {ph}"})["key"] for ph in phases}
    scopes = ["agents:read", "tools:read", "tools:write", "delegations:read"]
    clients = []
    for i in range(3):
        a = must("POST", "/api/v1/agents", {"name": f"loader {i}", "allowed_scopes": scopes})
        c = must("POST", f"/api/v1/agents/{a['id']}/credentials", {})
        clients.append((a["id"], c["client_id"], c["client_secret"]))
    must("POST", "/api/v1/webhooks", {"url": f"http://127.0.0.1:{rx.port}/hook", "event_types": ["agent.created"]})

    stop_load = threading.Event()
    created = []  # agent ids confirmed by a 201
    acked = []  # usage event ids JetStream acknowledged
    revoked = []  # tokens whose revocation returned 200
    lock = threading.Lock()

    def pace(period, fn):
        def run():
            while not stop_load.is_set():
                t = time.monotonic()
                fn()
                stop_load.wait(max(0.0, period - (time.monotonic() - t)))
        th = threading.Thread(target=run, daemon=True)
        th.start()
        return th

    def issue(client):
        st, b = request(P, "POST", "/api/v1/token", basic(client[1], client[2]), "grant_type=client_credentials")
        stats.record(st)
        return b.get("access_token") if st == 200 and isinstance(b, dict) else None

    def reader(key):
        return lambda: stats.record(request(P, "GET", "/api/v1/agents?limit=1", bearer(key))[0])

    def writer():
        st, b = request(P, "POST", "/api/v1/agents", admin, {"name": f"w-{uuid.uuid4().hex[:8]}"})
        stats.record(st)
        if st == 201:
            with lock:
                created.append(b["id"])

    nats = Nats(nats_port)
    usage_paused = threading.Event()
    usage_lock = threading.Lock()

    def usage():
        if usage_paused.is_set():
            return
        with usage_lock:
            publish_usage()

    def publish_usage():
        eid = str(uuid.uuid4())
        ev = {"kind": "llm", "event_id": eid, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "actor_id": "service:chaos", "actor_type": "service", "org_id": org, "model": "chaos-model",
              "provider": "chaos", "prompt_tokens": 1, "completion_tokens": 0, "latency_ms": 1, "success": True}
        payload = json.dumps(ev).encode()
        while not stop_load.is_set():  # the same event until acknowledged: at least once, counted once
            if nats.publish("usage.llm", eid, payload):
                with lock:
                    acked.append(eid)
                return
            stop_load.wait(0.5)

    def revoked_checker():
        with lock:
            toks = list(revoked)
        for t in toks[-6:]:
            st, _ = request(P, "GET", "/auth/me", bearer(t))
            if st == 200:
                with stats.lock:
                    stats.revoked_ok[stats.phase] += 1

    threads = [pace(0.25, lambda: issue(clients[0]))]
    threads += [pace(0.2, reader(k)) for k in keys]
    threads += [pace(0.5, writer), pace(0.2, usage), pace(0.5, revoked_checker)]

    def revoke_some(n=3):
        for _ in range(n):
            c = clients[1]
            tok = None
            for _ in range(100):
                tok = issue(c)
                if tok:
                    break
                time.sleep(0.2)
            for _ in range(100):
                st, _ = request(P, "POST", "/api/v1/token/revoke", basic(c[1], c[2]), f"token={tok}")
                if st == 200:
                    with lock:
                        revoked.append(tok)
                    break
                time.sleep(0.2)

    def delegation_overshoot():
        """A fresh budget, more concurrent commands than it allows: how many past it were permitted."""
        d = None
        for _ in range(100):
            st, d = request(P, "POST", "/api/v1/delegations", admin,
                            {"agent_id": clients[2][0], "scope": {"max_commands": DELEGATION_BUDGET,
                                                                  "scopes": ["tools:read"]}})
            if st == 201:
                break
            time.sleep(0.3)
        else:
            return None
        permitted = []

        def go():
            for _ in range(10):
                st, b = request(P, "POST", f"/api/v1/delegations/{d['delegation_id']}/commands",
                                bearer(d["agent_token"]), {"command": "read"})
                if st == 200:
                    if b.get("decision") == "permit":
                        with lock:
                            permitted.append(1)
                    return
                time.sleep(0.3)

        ts = [threading.Thread(target=go) for _ in range(DELEGATION_TRIES)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return max(0, len(permitted) - DELEGATION_BUDGET), f"{len(permitted)}/{DELEGATION_BUDGET}"

    def rate_overshoot(key, phase):
        """Requests as fast as one client can, against the documented bound: the excess let through.

        The bound is the plan's burst plus its rate over the time taken; while Redis is down each
        instance decides alone, and src/tiers/limiter.rs documents up to N times that for N
        instances; a FLUSHALL forgets the client's bucket, so one more burst is due."""
        ok, t0 = 0, time.monotonic()
        for _ in range(150):
            st, _ = request(P, "GET", "/auth/me", bearer(key))
            if 200 <= st < 300:
                ok += 1
        bound = BURST + RATE_PER_MIN / 60.0 * (time.monotonic() - t0) + 1
        if phase == "redis stopped 30s":
            bound *= len(ports)
        if phase == "redis FLUSHALL":
            bound += BURST
        return max(0, int(ok - bound)), f"{ok}/{int(bound)}"

    def recovered():
        """Every instance answers ready, issues a token and serves a read."""
        for p in ports:
            if request(p, "GET", "/ready", timeout=3)[0] != 200:
                return False
            c = clients[0]
            if request(p, "POST", "/api/v1/token", basic(c[1], c[2]), "grant_type=client_credentials")[0] != 200:
                return False
            if request(p, "GET", "/api/v1/agents?limit=1", bearer(keys[0]))[0] != 200:
                return False
        return True

    def wait_recovered(limit=120.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if recovered():
                return time.monotonic() - t0
            time.sleep(0.25)
        return None

    def usage_total():
        st, b = request(P, "GET", "/api/v1/usage/summary", admin)
        if st != 200 or not isinstance(b, dict):
            return None
        return (b.get("llm") or {}).get("prompt_tokens")

    rows = []

    def settle(phase, recovery, deleg, rate):
        """After a fault: webhooks and usage caught up (bounded waits), audit verified."""
        # Usage is paused while it is counted: what was acknowledged is all that may be counted.
        usage_paused.set()
        with usage_lock, lock:
            want = set(created)
            want_usage = len(set(acked))
        lost = want
        for _ in range(240):
            seen = rx.agents_seen()
            lost = want - set(seen)
            if not lost:
                break
            time.sleep(0.5)
        seen = rx.agents_seen()
        dups = sum(1 for a in want if seen.get(a, 0) > 1)
        total = None
        for _ in range(120):
            total = usage_total()
            if total is not None and total >= want_usage:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # what arrives late would show as counted twice
        total = usage_total()
        usage_paused.clear()
        st, v = request(P, "GET", "/api/v1/audit/verify", admin, timeout=30)
        audit = st == 200 and isinstance(v, dict) and v.get("valid") is True
        s = stats.statuses[phase]
        rows.append({
            "phase": phase,
            "requests": sum(s.values()),
            "5xx (not 503)": sum(n for k, n in s.items() if k >= 500 and k != 503),
            "503": s.get(503, 0),
            "no answer": s.get(0, 0),
            "revoked accepted": stats.revoked_ok.get(phase, 0),
            "webhooks lost": len(lost),
            "webhooks dup": dups,
            "usage lost": max(0, want_usage - (total or 0)),
            "usage double": max(0, (total or 0) - want_usage),
            "rate ok/bound": rate[1],
            "rate overshoot": rate[0],
            "deleg permits/budget": deleg[1] if deleg else "n/a",
            "deleg overshoot": deleg[0] if deleg else "n/a",
            "audit ok": audit,
            "recovery s": f"{recovery:.1f}" if recovery is not None else "never",
        })
        log(f"{phase}: {rows[-1]}")

    def observe():
        time.sleep(OBSERVE)

    def fault(name):
        if name == "baseline":
            return
        if name == "redis FLUSHALL":
            subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], check=True, stdout=subprocess.DEVNULL)
        elif name == "redis stopped 30s":
            stop("redis")
            time.sleep(30)
            start("redis", redis_argv)
            wait_port(redis_port)
        elif name == "postgres restart":
            pg.restart()
        elif name == "nats restart":
            stop("nats")
            time.sleep(5)
            start("nats", nats_argv)
            wait_port(nats_port)
        elif name == "kill -9 instance":
            stop("instance1", signal.SIGKILL)
            time.sleep(5)
            start_instance(1)
            wait_port(ports[1], 60)
        elif name == "webhook receiver down":
            rx.stop()
            time.sleep(30)
            rx.start()

    assert wait_recovered(60) is not None, "the instances came up"
    revoked_before = 0
    try:
        for phase in phases:
            with stats.lock:
                stats.phase = phase
            log(f"phase: {phase}")
            revoke_some()
            results = {}
            bg = threading.Thread(target=lambda: results.update(
                deleg=delegation_overshoot(), rate=rate_overshoot(probe_keys[phase], phase)))
            bg.start()
            fault(phase)
            recovery = wait_recovered()
            observe()
            bg.join()
            settle(phase, recovery, results.get("deleg"), results.get("rate", (0, "n/a")))
            revoked_before = len(revoked)
    finally:
        stop_load.set()
        for t in threads:
            t.join(timeout=15)
        for i in range(3):
            stop(f"instance{i}")
        stop("nats")
        stop("redis")
        pg.stop()
        rx.stop()
        proxy.sock.close()
    del revoked_before

    cols = list(rows[0].keys())
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print()
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(widths[c]) for c in cols))
    print()
    broken = []
    for r in rows:
        ph = r["phase"]
        if r["5xx (not 503)"]:
            broken.append(f"{ph}: 5xx other than 503")
        if r["503"] and ph != "postgres restart":
            broken.append(f"{ph}: 503 outside the Postgres restart")
        for k in ("revoked accepted", "webhooks lost", "usage lost", "usage double", "rate overshoot"):
            if r[k]:
                broken.append(f"{ph}: {k} {r[k]}")
        if r["webhooks dup"] and ph != "kill -9 instance":
            broken.append(f"{ph}: webhooks duplicated without a crash")
        if r["deleg overshoot"] not in (0,):
            broken.append(f"{ph}: delegation overshoot {r['deleg overshoot']}")
        if not r["audit ok"]:
            broken.append(f"{ph}: audit chain does not verify")
        if r["recovery s"] == "never":
            broken.append(f"{ph}: never recovered")
    total = time.monotonic() - STARTED
    print(f"chaos: {len(rows)} faults in {total:.0f}s; " + ("every invariant held" if not broken else
                                                          "BROKEN: " + "; ".join(broken)))
    return 1 if broken else 0


if __name__ == "__main__":
    code = 1
    try:
        code = main()
    finally:
        for name in list(PROCS):
            stop(name, signal.SIGKILL)
        if os.environ.get("CHAOS_KEEP") is None:
            shutil.rmtree(WORK, ignore_errors=True)
        else:
            print(f"chaos: logs kept in {WORK}")
    sys.exit(code)
