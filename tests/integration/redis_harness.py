"""Real redis-server processes for the budget tests: a standalone server and a 3-master
Redis Cluster on loopback ports, a small RESP client, and a swarm driver that sends
budgeted calls through sidecars from many concurrent agents.

Every wait is bounded; every server is a context manager that kills what it started.
"""
import http.client
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time

from tollgate_harness import closed_port, wait_for


class Resp:
    """A minimal RESP2 client: one connection, one command at a time."""

    def __init__(self, port, host="127.0.0.1", timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def close(self):
        self.f.close()
        self.sock.close()

    def __call__(self, *args):
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        self.sock.sendall(out)
        return self._read()

    def _read(self):
        line = self.f.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)[:-2]
            return data.decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise ValueError(f"bad RESP line {line!r}")


class RedisError(Exception):
    pass


def redis_call(port, *args, timeout=5.0, password=None):
    c = Resp(port, timeout=timeout)
    try:
        if password:
            c("AUTH", password)
        return c(*args)
    finally:
        c.close()


class RedisServer:
    """redis-server on a free loopback port, without persistence."""

    def __init__(self, extra=(), port=None, password=None):
        self.dir = tempfile.mkdtemp(prefix="tollgate-redis-")
        self.port = port or closed_port()
        self.password = password  # requirepass: every client AUTHs with it
        self.extra = list(extra) + (["--requirepass", password] if password else [])
        self.proc = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--logfile", os.path.join(self.dir, "log")] + self.extra,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._ping, timeout=10, what=f"redis on {self.port}")
        return self

    def _ping(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}")
        try:
            return redis_call(self.port, "PING", timeout=1, password=self.password) == "PONG"
        except OSError:
            return False

    def __call__(self, *args):
        return redis_call(self.port, *args, password=self.password)

    def shutdown_nosave(self):
        try:
            redis_call(self.port, "SHUTDOWN", "NOSAVE", password=self.password)
        except (ConnectionError, OSError):
            pass
        self.proc.wait(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _cluster_port():
    """A free port whose cluster bus port (+10000) is valid and free too."""
    for _ in range(1000):
        p = closed_port()
        if p + 10000 > 65535:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
        finally:
            s.close()
    raise AssertionError("no free port pair for a cluster node")


class RedisCluster:
    """Three masters (no replicas) on loopback, created with redis-cli --cluster create."""

    def __init__(self, masters=3):
        self.nodes = [RedisServer(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                   "--cluster-node-timeout", "5000"], port=_cluster_port()) for _ in range(masters)]

    @property
    def urls(self):
        return [n.url for n in self.nodes]

    def __enter__(self):
        for n in self.nodes:
            n.start()
        subprocess.run(["redis-cli", "--cluster", "create"] + [f"127.0.0.1:{n.port}" for n in self.nodes] +
                       ["--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        wait_for(lambda: all("cluster_state:ok" in n("CLUSTER", "INFO") for n in self.nodes), timeout=20,
                 what="cluster_state:ok on every node")
        return self

    def __exit__(self, *exc):
        for n in self.nodes:
            n.__exit__()

    def owner(self, slot):
        for start, end, master, *_ in self.nodes[0]("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == master[1])
        raise AssertionError(f"no owner for slot {slot}")

    def key_slot(self, key):
        return self.nodes[0]("CLUSTER", "KEYSLOT", key)

    def migrate_slot(self, slot, dst, pause=0.0):
        """Moves one slot with its keys, the way redis-cli --cluster reshard does; `pause`
        seconds are spent after IMPORTING/MIGRATING and again after the keys moved, while
        the source answers ASK for them."""
        src = self.owner(slot)
        src_id, dst_id = src("CLUSTER", "MYID"), dst("CLUSTER", "MYID")
        dst("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        time.sleep(pause)
        while True:
            keys = src("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            src("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
        time.sleep(pause)
        for n in (dst, src) + tuple(n for n in self.nodes if n not in (src, dst)):
            n("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return src


def swarm(proxies, origin_port, agents_per_proxy, calls_per_agent, max_cost, seed, deadline_s=120,
          pool_of=lambda agent: None):
    """Sends budgeted calls from agents_per_proxy concurrent agents per sidecar. Each call
    POSTs /cost?effort=C (C random in 0..max_cost, the real cost the origin reports).
    Returns [(agent, status, cost)] for every call."""
    results = []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def agent(proxy_port, name, rng):
        conn = None
        mine = []
        for _ in range(calls_per_agent):
            if time.monotonic() > stop_at:
                break
            cost = rng.randint(0, max_cost)
            for attempt in range(2):
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
                    conn.request("POST", f"http://127.0.0.1:{origin_port}/cost?effort={cost}", body=b"x",
                                 headers={"X-Agent-Id": name})
                    resp = conn.getresponse()
                    resp.read()
                    mine.append((name, resp.status, cost))
                    break
                except (OSError, http.client.HTTPException):
                    conn = None
                    if attempt:
                        mine.append((name, 0, cost))
        if conn:
            conn.close()
        with lock:
            results.extend(mine)

    threads = []
    rng = random.Random(seed)
    for i, port in enumerate(proxies):
        for a in range(agents_per_proxy):
            t = threading.Thread(target=agent, args=(port, f"agent-{i}-{a}", random.Random(rng.random())))
            threads.append(t)
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, stop_at - time.monotonic() + 15))
    return results
