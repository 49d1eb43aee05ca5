#!/usr/bin/env python3
"""make soak DURATION=10m: one instance on its own database and Redis prefix, its capacity measured
for a mix of token issuance and authenticated reads, then half of that held for DURATION, with the
process's RSS and open file descriptors sampled over time. Prints the curve and whether memory
levelled off (the second half's peak within 10% of the first half's). Standard library only.

Environment: AGENTIDP_BIN (default target/debug/agentidp), SOAK_THREADS (default 8).
"""

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.environ.get("AGENTIDP_BIN", os.path.join(TARGET, "debug", "agentidp"))
PG = os.environ.get("AGENTIDP_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("AGENTIDP_TEST_REDIS_URL", "redis://127.0.0.1:6379")
THREADS = int(os.environ.get("SOAK_THREADS", "8"))


def seconds(text):
    m = re.fullmatch(r"(\d+)([smh]?)", text.strip())
    if not m:
        sys.exit(f"soak: DURATION {text!r}: use e.g. 90s, 10m, 1h")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


class Client:
    """One keep-alive connection, reopened after an error."""

    def __init__(self, port):
        self.port, self.conn = port, None

    def call(self, method, path, headers, body=None):
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                return r.status, data
            except (OSError, http.client.HTTPException):
                if self.conn:
                    self.conn.close()
                self.conn = None
        return 0, b""


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def main():
    duration = seconds(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DURATION", "2m"))
    if not os.access(BIN, os.X_OK):
        sys.exit(f"soak: {BIN} missing: cargo build --bin agentidp")
    db = f"agentidp_soak_{uuid.uuid4().hex[:12]}"
    subprocess.run(["psql", "-q", PG, "-c", f"create database {db}"], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    env.update({
        "AGENTIDP_DATABASE__URL": PG.rsplit("/", 1)[0] + "/" + db,
        "AGENTIDP_REDIS__URL": REDIS,
        "AGENTIDP_REDIS__KEY_PREFIX": f"soak:{db}:",
        "AGENTIDP_SERVER__BIND": f"127.0.0.1:{port}",
        "AGENTIDP_SERVER__PUBLIC_URL": f"http://127.0.0.1:{port}",
        "AGENTIDP_LOG__LEVEL": "warn",
        "AGENTIDP_TIERS__PLANS__FREE__API_CALLS_PER_DAY": "unlimited",
        "AGENTIDP_TIERS__PLANS__FREE__TOKENS_PER_DAY": "unlimited",
        "AGENTIDP_TIERS__PLANS__FREE__TOKENS_PER_MONTH": "unlimited",
        "AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__REQUESTS_PER_MINUTE": "6000000",
        "AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__BURST": "1000000",
    })
    work = tempfile.mkdtemp(prefix="agentidp-soak-")
    server = None
    try:
        subprocess.run([BIN, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        password = "soak-" + uuid.uuid4().hex
        subprocess.run([BIN, "bootstrap", "--org", "Soak", "--email", "admin@soak.test", "--password-stdin"],
                       env=env, input=password.encode(), check=True, stdout=subprocess.DEVNULL)
        server = subprocess.Popen([BIN, "serve"], env=env, stdout=open(os.path.join(work, "server.log"), "wb"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        c = Client(port)
        for _ in range(300):
            if c.call("GET", "/health", {})[0] == 200:
                break
            time.sleep(0.1)
        st, body = c.call("POST", "/auth/login", {"content-type": "application/json"},
                          json.dumps({"email": "admin@soak.test", "password": password}))
        login = json.loads(body)
        auth = {"authorization": f"Bearer {login['session_token']}", "content-type": "application/json"}
        key = json.loads(c.call("POST", "/auth/api-keys", auth, json.dumps({"description": "soak"}))[1])["key"]
        agent = json.loads(c.call("POST", "/api/v1/agents", auth,
                                  json.dumps({"name": "soak", "allowed_scopes": ["agents:read"]}))[1])
        cred = json.loads(c.call("POST", f"/api/v1/agents/{agent['id']}/credentials", auth, "{}")[1])
        basic = {"authorization": "Basic " + base64.b64encode(
            f"{cred['client_id']}:{cred['client_secret']}".encode()).decode(),
            "content-type": "application/x-www-form-urlencoded"}
        read = {"authorization": f"Bearer {key}"}

        counts = {"ok": 0, "err": 0}
        lock = threading.Lock()

        def one(client, i):
            # One token in four; the rest authenticated reads.
            if i % 4 == 0:
                st, _ = client.call("POST", "/api/v1/token", basic, "grant_type=client_credentials")
            else:
                st, _ = client.call("GET", "/api/v1/agents?limit=5", read)
            with lock:
                counts["ok" if 200 <= st < 300 else "err"] += 1

        def run(stop, period):
            client, i = Client(port), 0
            next_at = time.monotonic()
            while not stop.is_set():
                one(client, i)
                i += 1
                if period:
                    next_at += period
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        stop.wait(delay)

        # Capacity: as fast as THREADS closed-loop clients go, 15 s.
        stop = threading.Event()
        ts = [threading.Thread(target=run, args=(stop, 0), daemon=True) for _ in range(THREADS)]
        t0 = time.monotonic()
        for t in ts:
            t.start()
        time.sleep(15)
        stop.set()
        for t in ts:
            t.join()
        capacity = counts["ok"] / (time.monotonic() - t0)
        target = capacity / 2
        print(f"soak: capacity {capacity:.0f} req/s with {THREADS} clients "
              f"({counts['err']} errors); holding {target:.0f} req/s for {duration}s", flush=True)

        counts.update(ok=0, err=0)
        stop = threading.Event()
        period = THREADS / target
        ts = [threading.Thread(target=run, args=(stop, period), daemon=True) for _ in range(THREADS)]
        for t in ts:
            t.start()
        every = max(5, duration // 30)
        samples = []
        start = time.monotonic()
        last_ok = 0
        print(f"{'t (s)':>7} {'RSS (MiB)':>10} {'fds':>5} {'req/s':>7} {'errors':>7}", flush=True)
        while time.monotonic() - start < duration:
            time.sleep(every)
            with lock:
                ok, err = counts["ok"], counts["err"]
            t = time.monotonic() - start
            rate = (ok - last_ok) / every
            last_ok = ok
            samples.append((t, rss_kb(server.pid) / 1024, fds(server.pid), rate, err))
            print(f"{t:7.0f} {samples[-1][1]:10.1f} {samples[-1][2]:5d} {rate:7.0f} {err:7d}", flush=True)
        stop.set()
        for t in ts:
            t.join()
        half = len(samples) // 2
        first = max(s[1] for s in samples[:half]) if half else 0
        second = max(s[1] for s in samples[half:])
        fd_first = max(s[2] for s in samples[:half]) if half else 0
        fd_second = max(s[2] for s in samples[half:])
        level = half and second <= first * 1.10
        print(f"soak: {ok} requests, {err} errors; RSS peak first half {first:.1f} MiB, second half "
              f"{second:.1f} MiB; fds {fd_first} then {fd_second}: "
              + ("memory levelled off" if level else "memory still growing"), flush=True)
        return 0 if level and err == 0 else 1
    finally:
        if server and server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        subprocess.run(["psql", "-q", PG, "-c", f"drop database if exists {db} with (force)"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    sys.exit(main())
