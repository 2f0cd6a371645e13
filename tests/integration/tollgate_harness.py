"""Test harness: starts the real tollgate binary and real origins on 127.0.0.1 port 0.

Every wait is bounded; every server is a context manager that stops its threads.
"""
import gzip
import hashlib
import http
import json
import os
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.parse

BIN = os.environ.get("TOLLGATE_BIN", os.path.join(os.path.dirname(__file__), "..", "..", "build", "tollgate"))
HERE = os.path.dirname(os.path.abspath(__file__))
# Set by CTest for a sanitizer build (TOLLGATE_SANITIZE). Such a binary takes ~150 ms of CPU
# to start and exit (the sanitizer runtime, the leak check) against ~15 ms: a sweep that runs
# the CLI hundreds of times takes a sample of its cases there, and the release suite runs it
# whole. A sample still covers what the sanitizers look for, the same code paths.
SANITIZED = os.environ.get("TOLLGATE_SANITIZED") == "1"
# CI runs as root and sets it: a test that needs root's facilities (network namespaces,
# mounts) and cannot have them fails instead of skipping.
REQUIRE_ROOT_TESTS = os.environ.get("TOLLGATE_REQUIRE_NETNS") == "1"


def skip_unless_required(reason):
    """Skips the test (or its class, from setUpClass) for REASON, or fails it when CI
    requires every root test to run."""
    if REQUIRE_ROOT_TESTS:
        raise AssertionError(f"TOLLGATE_REQUIRE_NETNS=1 but the test cannot run: {reason}")
    raise unittest.SkipTest(reason)


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pattern(n, seed=0):
    """Deterministic bytes: the same n and seed give the same content."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    out = bytearray()
    while len(out) < n:
        out += block[: n - len(out)]
    return bytes(out)


class Tollgate:
    """The sidecar under test, with a config built from defaults and overrides."""

    def __init__(self, overrides=None, listener=None, stderr_to_file=False, policy=None, env=None, wrap=None):
        """policy: the text of a policy set, written to policy.yaml and loaded instead of
        the default `hosts: {allow: ["*"]}`; env: variables set for the process; wrap: a
        command prefix (`ip netns exec NAME`)."""
        self.env = dict(os.environ, **(env or {}))
        self.wrap = list(wrap or [])
        self.dir = tempfile.mkdtemp(prefix="tollgate-test-")
        listener_cfg = {"name": "egress", "kind": "forward", "address": "127.0.0.1:0",
                        "identity": {"header": "X-Agent-Id"}}
        listener_cfg.update(listener or {})
        self.config = {
            "workers": 2,
            "listeners": [listener_cfg],
            "admin": {"address": "127.0.0.1:0"},
            "hosts": {"allow": ["*"]},
        }
        self.config.update(overrides or {})
        if policy is not None:
            with open(os.path.join(self.dir, "policy.yaml"), "w") as f:
                f.write(policy)
            self.config.pop("hosts", None)
            self.config["policies"] = ["policy.yaml"]
        self.config_path = os.path.join(self.dir, "tollgate.yaml")
        with open(self.config_path, "w") as f:
            json.dump(self.config, f)  # JSON is YAML
        self.lines = []
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(self.wrap + [BIN, "run", "-c", self.config_path], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        listening = wait_for(lambda: self._listening(), timeout=10, what="listening log lines")
        self.proxy_port = listening["egress"]
        self.admin_port = listening["admin"]
        return self

    def _read(self):
        for raw in self.proc.stderr:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"raw": raw.decode(errors="replace")})

    def _listening(self):
        found = {}
        for line in list(self.lines):
            if line.get("msg") == "listening":
                found[line["listener"]] = int(line["address"].rsplit(":", 1)[1])
        if self.proc.poll() is not None:
            self.reader.join(timeout=5)  # what it said before exiting
            raise AssertionError(f"tollgate exited with {self.proc.returncode}: {self.lines}")
        return found if "egress" in found and "admin" in found else None

    @property
    def proxy(self):
        return f"http://127.0.0.1:{self.proxy_port}"

    def logs(self, msg=None):
        return [l for l in list(self.lines) if msg is None or l.get("msg") == msg]

    def rss_kb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def admin(self, path, method="GET", token=None):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, body

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.reader.join(timeout=5)

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc:
            self.reader.join(timeout=5)
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def curl(*args, proxy=None, timeout=30, env_proxy=False):
    """Runs the real curl; returns (exit code, stdout bytes, stderr text)."""
    cmd = ["curl", "-sS", "--max-time", str(timeout)]
    env = dict(os.environ)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "ALL_PROXY"):
        env.pop(k, None)
    if proxy and env_proxy:
        env["http_proxy"] = proxy
        env["HTTPS_PROXY"] = proxy
    elif proxy:
        cmd += ["--proxy", proxy]
    r = subprocess.run(cmd + list(args), capture_output=True, env=env, timeout=timeout + 10)
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


def raw_exchange(port, data, timeout=5.0, read_until_close=True):
    """Sends raw bytes to 127.0.0.1:port; returns everything read until close or timeout."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                return out, True
            out += chunk
            if not read_until_close:
                break
    except socket.timeout:
        pass
    finally:
        s.close()
    return out, False


def recv_until(sock, marker):
    """What sock sends until marker has arrived, or until it closes (then without it)."""
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def parse_response(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    return status, headers, body


class _ThreadingServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # hundreds of agents connect at once in the budget tests


class Serving:
    """A server in its own thread: subclasses set self.server (a socketserver) in __init__."""

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class HttpOrigin(Serving):
    """A keep-alive HTTP/1.1 origin on raw sockets that records what reaches it.

    GET /hello -> "hello"; POST /echo -> the body; POST /sink -> {"bytes","sha256"} of the
    body (content-length or chunked, streamed); GET /stream?bytes=N -> N pattern bytes,
    chunked; GET /delay?ms=N -> "late" after N ms; GET /status/NNN -> that status;
    any /cost?effort=N&risk=M[&ms=D] -> "done" with X-Cost-Effort: N and X-Cost-Risk: M (after D ms;
    a parameter given twice, its header twice);
    GET /gzip-chunked -> "hello, gzip" gzipped, with Transfer-Encoding: gzip, chunked.
    """

    def __init__(self, tls=None):
        """tls: an ssl.SSLContext (server side) to serve HTTPS; the SNI of each handshake
        is kept in self.snis."""
        self.connections = 0
        self.requests = []  # (method, target, {lower name: [values]})
        self.snis = []             # the SNI of each handshake (None: none sent)
        self.client_subjects = []  # per verified client certificate: {"commonName": ..., ...}
        self.handshake_errors = []
        self.resumed = []          # per handshake: whether the client resumed a session
        self.lock = threading.Lock()
        self.tls = tls
        origin = self
        if tls is not None:
            def on_sni(_sslobj, name, _ctx):
                with origin.lock:
                    origin.snis.append(name)
            tls.sni_callback = on_sni

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                with origin.lock:
                    origin.connections += 1
                sock = self.request
                try:
                    if origin.tls is not None:
                        try:
                            sock = origin.tls.wrap_socket(sock, server_side=True)
                        except (OSError, ssl.SSLError) as e:
                            with origin.lock:
                                origin.handshake_errors.append(str(e))
                            return
                        with origin.lock:
                            origin.resumed.append(sock.session_reused)
                        peer = sock.getpeercert()
                        if peer:
                            with origin.lock:
                                origin.client_subjects.append({k: v for rdn in peer.get("subject", ())
                                                               for (k, v) in rdn})
                    f = sock.makefile("rb")
                    while origin.serve_one(f, sock):
                        pass
                except (ConnectionError, OSError, ValueError):
                    pass

        self.server = _ThreadingServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def url(self, path, host="127.0.0.1"):
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def serve_one(self, f, sock):
        line = f.readline(65536)
        if not line:
            return False
        method, target, _version = line.decode("latin-1").split()
        headers = {}
        while True:
            h = f.readline(65536)
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers.setdefault(k.strip().lower(), []).append(v.strip())
        with self.lock:
            self.requests.append((method, target, headers))
        digest = hashlib.sha256()
        nbytes = 0
        body = b""
        if "content-length" in headers:
            remaining = int(headers["content-length"][0])
            while remaining:
                chunk = f.read(min(remaining, 1 << 16))
                if not chunk:
                    return False
                remaining -= len(chunk)
                nbytes += len(chunk)
                digest.update(chunk)
                if target == "/echo":
                    body += chunk
        elif headers.get("transfer-encoding", [""])[0].lower().endswith("chunked"):
            while True:
                size = int(f.readline().split(b";")[0], 16)
                if size == 0:
                    while f.readline() not in (b"\r\n", b""):
                        pass
                    break
                remaining = size
                while remaining:
                    chunk = f.read(min(remaining, 1 << 16))
                    if not chunk:
                        return False
                    remaining -= len(chunk)
                    nbytes += len(chunk)
                    digest.update(chunk)
                    if target == "/echo":
                        body += chunk
                f.readline()
        path, _, query = target.partition("?")
        params = urllib.parse.parse_qs(query)
        if path == "/hello":
            return self.reply(sock, 200, b"hello")
        if path == "/close":  # answered, then the connection is closed (never pooled)
            self.reply(sock, 200, b"closing", b"Connection: close\r\n")
            return False
        if path == "/echo":
            return self.reply(sock, 200, body)
        if path == "/sink":
            return self.reply(sock, 200, json.dumps({"bytes": nbytes, "sha256": digest.hexdigest()}).encode())
        if path == "/headers":
            return self.reply(sock, 200, json.dumps(headers).encode())
        if path == "/gzip-chunked":  # a transfer coding under the chunking
            data = gzip.compress(b"hello, gzip")
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                         + b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n")
            return True
        if path == "/delay":
            time.sleep(int(params.get("ms", ["1000"])[0]) / 1000)
            return self.reply(sock, 200, b"late")
        if path.startswith("/status/"):
            return self.reply(sock, int(path.split("/")[2]), b"status")
        if path == "/cost":
            time.sleep(int(params.get("ms", ["0"])[0]) / 1000)
            extra = b"".join(b"X-Cost-%s: %s\r\n" % (k.capitalize().encode(), v.encode())
                             for k in ("effort", "risk") for v in params.get(k, []))
            return self.reply(sock, 200, b"done", extra)
        if path == "/mcp":
            # An MCP server answering over SSE: two events, sent as they are ready.
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for event in (b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n',
                          b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{"content":[]}}\n\n'):
                sock.sendall(b"%x\r\n" % len(event) + event + b"\r\n")
                time.sleep(0.05)
            sock.sendall(b"0\r\n\r\n")
            return True
        if path == "/stream":
            n = int(params.get("bytes", ["0"])[0])
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n")
            data = pattern(n, seed=1)
            for i in range(0, n, 1 << 16):
                piece = data[i:i + (1 << 16)]
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
            return True
        return self.reply(sock, 404, b"not found")

    @staticmethod
    def reply(sock, status, body, extra=b""):
        try:
            phrase = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b"Status Of Its Own"  # one no registry knows: the proxy passes it on
        sock.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
                     % (status, phrase, len(body), extra) + body)
        return True


class ForgetfulOrigin(Serving):
    """Answers the first request of each connection (200 "first", keep-alive), then reads
    the second and closes without an answer: a pooled connection that the upstream gave up
    just as the proxy sent on it. Records (connection number, method, path)."""

    def __init__(self):
        self.requests = []
        self.connections = 0
        origin = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                origin.connections += 1
                number = origin.connections
                for answer in (True, False):
                    head = recv_until(self.request, b"\r\n\r\n")
                    if b"\r\n\r\n" not in head:
                        return
                    method, path = head.split(b" ", 2)[:2]
                    origin.requests.append((number, method.decode(), path.decode()))
                    if answer:
                        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")

        self.server = _ThreadingServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]


class CloseDelimitedOrigin(Serving):
    """Answers GET /whole?bytes=N and GET /cut?bytes=N with a response that has neither
    Content-Length nor chunking: N pattern bytes (seed 5) and then the end of the
    connection. /whole ends it in order (for TLS, with a close_notify); /cut ends it
    abruptly: a TCP reset, or for TLS the TCP end without a close_notify (a truncation)."""

    def __init__(self, tls=None):
        self.tls = tls

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                sock = self.request
                try:
                    if tls:
                        sock = tls.wrap_socket(sock, server_side=True)
                    head = recv_until(sock, b"\r\n\r\n")
                    if b"\r\n\r\n" not in head:
                        return
                    target = head.split(b" ", 2)[1].decode()
                    path, _, query = target.partition("?")
                    n = int(urllib.parse.parse_qs(query).get("bytes", ["1000"])[0])
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + pattern(n, seed=5))
                    if path == "/whole":
                        if tls:
                            sock = sock.unwrap()  # close_notify
                        sock.shutdown(socket.SHUT_WR)
                        recv_until(sock, b"never")  # until the proxy closes its end
                    elif not tls:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()  # for TLS: no close_notify, just the TCP end
                except (OSError, ssl.SSLError):
                    pass

        self.server = _ThreadingServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def url(self, path, host="127.0.0.1"):
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"


def request_heads(sock):
    """The heads of the requests sock sends, one at a time, until it closes (bodies are
    left unread: for origins that only take bodiless requests)."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        yield head


class ScriptedOrigin(Serving):
    """A keep-alive origin that answers each request with the raw bytes scripted for its
    path (a path not scripted: 404), as a hostile or broken upstream would; a script of
    (bytes, "close") closes the connection after them. Records (method, path)."""

    def __init__(self, script):
        self.requests = []
        origin = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                try:
                    for head in request_heads(self.request):
                        method, path = head.split(b" ", 2)[:2]
                        origin.requests.append((method.decode(), path.decode()))
                        reply = script.get(path.decode(), b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                        close = isinstance(reply, tuple)
                        self.request.sendall(reply[0] if close else reply)
                        if close:
                            self.request.shutdown(socket.SHUT_WR)
                            return
                except OSError:
                    pass

        self.server = _ThreadingServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def url(self, path, host="127.0.0.1"):
        return f"http://{host}:{self.port}{path}"


class SilentOrigin:
    """Accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()


class UpgradeEchoOrigin(Serving):
    """Answers an Upgrade request with 101, then echoes raw bytes back."""

    def __init__(self):
        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                if b"upgrade: websocket" not in head.lower():
                    self.request.sendall(b"HTTP/1.1 400 X\r\nContent-Length: 0\r\n\r\n")
                    return
                self.request.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                if rest:
                    self.request.sendall(rest)
                while True:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    self.request.sendall(chunk)

        self.server = _ThreadingServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]


class TlsOrigin(Serving):
    """An HTTPS origin with a certificate for localhost/127.0.0.1 made with openssl."""

    def __init__(self):
        import ssl
        self.dir = tempfile.mkdtemp(prefix="tollgate-tls-")
        self.cert = os.path.join(self.dir, "cert.pem")
        key = os.path.join(self.dir, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", key, "-out", self.cert, "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=30)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, key)

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                try:
                    tls = ctx.wrap_socket(self.request, server_side=True)
                    if b"\r\n\r\n" not in recv_until(tls, b"\r\n\r\n"):
                        return
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntls-hello")
                    tls.close()
                except (OSError, ssl.SSLError):
                    pass

        self.server = _ThreadingServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __exit__(self, *exc):
        super().__exit__(*exc)
        shutil.rmtree(self.dir, ignore_errors=True)


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
