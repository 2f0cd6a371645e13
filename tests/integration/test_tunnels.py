"""CONNECT tunnels to a TLS origin and WebSocket-style upgrades."""
import json
import socket
import socketserver
import threading
import time
import unittest

from tollgate_harness import (HttpOrigin, Tollgate, TlsOrigin, UpgradeEchoOrigin, curl, parse_response, pattern,
                              raw_exchange, recv_until, wait_for)


class TunnelTest(unittest.TestCase):
    def test_connect_tunnel_to_a_tls_origin(self):
        with TlsOrigin() as origin, Tollgate({"hosts": {"allow": ["localhost", "127.0.0.1"]}}) as tg:
            rc, out, err = curl("--cacert", origin.cert, f"https://localhost:{origin.port}/",
                                proxy=tg.proxy, env_proxy=True)
            self.assertEqual(rc, 0, err)
            self.assertEqual(out, b"tls-hello")

    def test_connect_to_a_denied_host_is_halted(self):
        with Tollgate({"hosts": {"allow": ["localhost"], "deny": ["evil.example"]}}) as tg:
            out, _ = raw_exchange(tg.proxy_port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
                                  read_until_close=False)
            status, headers, body = parse_response(out)
            self.assertEqual(status, 403)
            self.assertEqual(json.loads(body)["rule"], "hosts.deny")
            rc, out, err = curl("https://evil.example/", proxy=tg.proxy, env_proxy=True)
            self.assertNotEqual(rc, 0)
            self.assertIn("403", err)

    def test_upgrade_is_tunnelled_once_allowed(self):
        with UpgradeEchoOrigin() as origin, Tollgate() as tg:
            s = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=5)
            s.sendall(b"GET http://127.0.0.1:%d/ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\n" % (origin.port, origin.port))
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                self.assertTrue(chunk)
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 101"), head)
            self.assertIn(b"upgrade: websocket", head.lower())
            for message in (b"ping-1", b"x" * 100000, b"ping-3"):
                s.sendall(message)
                got = rest
                rest = b""
                while len(got) < len(message):
                    chunk = s.recv(65536)
                    self.assertTrue(chunk)
                    got += chunk
                self.assertEqual(got, message)
            s.close()

    def test_an_upgrade_to_another_protocol_than_websocket_is_not_sent_on(self):
        """h2c after a 101 would carry HTTP/2 requests no one decides: the Upgrade is not
        offered to the upstream, the call goes on as HTTP/1.1 on a connection that stays
        usable, and a 101 the upstream sends anyway is refused."""
        heads = []

        class AnyUpgrade(socketserver.BaseRequestHandler):
            def handle(self):
                while True:  # one request at a time: the client waits for each answer
                    head = recv_until(self.request, b"\r\n\r\n")
                    if not head.endswith(b"\r\n\r\n"):
                        return
                    heads.append(head.lower())
                    if b"\r\nupgrade:" in head.lower() or b"/force-101" in head:
                        self.request.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                                             b"Connection: Upgrade\r\n\r\n")
                        return
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), AnyUpgrade)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        try:
            with Tollgate() as tg:
                s = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=5)
                req = (b"GET http://127.0.0.1:%d/a HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                       b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
                s.sendall(req % (port, port))
                data = recv_until(s, b"plain")
                self.assertTrue(data.startswith(b"HTTP/1.1 200") and data.endswith(b"plain"), data)
                self.assertNotIn(b"upgrade", heads[0])
                # The connection goes on as HTTP/1.1.
                s.sendall(b"GET http://127.0.0.1:%d/b HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
                data = recv_until(s, b"plain")
                self.assertTrue(data.startswith(b"HTTP/1.1 200") and data.endswith(b"plain"), data)
                s.close()
                out, _ = raw_exchange(tg.proxy_port, b"GET http://127.0.0.1:%d/force-101 HTTP/1.1\r\n"
                                      b"Host: 127.0.0.1:%d\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n" % (port, port),
                                      read_until_close=False)
                self.assertEqual(parse_response(out)[0], 502, out)
                # WebSocket listed beside h2c (one header or two) is tunnelled as WebSocket
                # alone: the upstream is offered nothing else, and its 101 to h2c is a 502.
                for upgrade in (b"Upgrade: h2c, websocket\r\n", b"Upgrade: h2c\r\nUpgrade: websocket\r\n"):
                    heads.clear()
                    out, _ = raw_exchange(tg.proxy_port, b"GET http://127.0.0.1:%d/mixed HTTP/1.1\r\n"
                                          b"Host: 127.0.0.1:%d\r\nConnection: Upgrade\r\n%s"
                                          b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n" % (port, port, upgrade),
                                          read_until_close=False)
                    self.assertEqual(parse_response(out)[0], 502, out)
                    self.assertIn(b"only websocket was asked for", out)
                    self.assertEqual(len(heads), 1, heads)
                    self.assertIn(b"\r\nupgrade: websocket\r\n", heads[0])
                    self.assertNotIn(b"h2c", heads[0])
                    self.assertNotIn(b"http2-settings", heads[0])
        finally:
            server.shutdown()
            server.server_close()

    def test_a_tunnel_s_lifetime_is_not_a_request_duration(self):
        """A tunnel's request is its setup, in request_duration_seconds once the tunnel is
        up; how long the tunnel then stays open (up to tunnel_idle, an hour) goes to
        tunnel_duration_seconds. Request latency measured connection lifetimes before. Its
        bytes count in bytes_total as they flow, not at the close."""
        def metric(tg, series):
            _, text = tg.admin("/metrics")
            line = [l for l in text.decode().splitlines() if l.startswith(series + " ")]
            return float(line[0].split()[-1]) if line else None

        upgrade = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        with UpgradeEchoOrigin() as origin, Tollgate() as tg:
            for kind in ("connect", "websocket"):
                with self.subTest(kind):
                    requests = 'tollgate_request_duration_seconds_%s{listener="egress"}'
                    tunnels = 'tollgate_tunnel_duration_seconds_%s{listener="egress"}'
                    bytes_in = 'tollgate_bytes_total{direction="in",listener="egress"}'
                    bytes_out = 'tollgate_bytes_total{direction="out",listener="egress"}'
                    before = {n: metric(tg, n) for n in (requests % "count", requests % "sum",
                                                         tunnels % "count", tunnels % "sum",
                                                         bytes_in, bytes_out)}
                    s = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=5)
                    if kind == "connect":
                        s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                                  % (origin.port, origin.port))
                        self.assertTrue(recv_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 200"))
                        s.sendall(upgrade % origin.port)  # through the tunnel, to the origin
                    else:
                        s.sendall(upgrade.replace(b"/ws", b"http://127.0.0.1:%d/ws" % origin.port) % origin.port)
                    self.assertTrue(recv_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 101"))
                    payload = pattern(100000, seed=7)
                    s.sendall(payload)
                    echoed = b""
                    while len(echoed) < len(payload):
                        chunk = s.recv(65536)
                        self.assertTrue(chunk)
                        echoed += chunk
                    self.assertEqual(echoed, payload)
                    wait_for(lambda: metric(tg, bytes_in) - before[bytes_in] >= len(payload) and
                             metric(tg, bytes_out) - before[bytes_out] >= len(payload),
                             timeout=5, what="the open tunnel's bytes in bytes_total")
                    # Observed once the tunnel was up, while it is still open.
                    wait_for(lambda: metric(tg, requests % "count") == before[requests % "count"] + 1,
                             timeout=5, what="the tunnel's setup in request_duration_seconds")
                    self.assertEqual(metric(tg, tunnels % "count"), before[tunnels % "count"])
                    time.sleep(1.5)
                    s.close()
                    wait_for(lambda: metric(tg, tunnels % "count") == before[tunnels % "count"] + 1,
                             timeout=5, what="the tunnel's lifetime in tunnel_duration_seconds")
                    self.assertGreaterEqual(metric(tg, tunnels % "sum") - before[tunnels % "sum"], 1.5)
                    self.assertEqual(metric(tg, requests % "count"), before[requests % "count"] + 1)
                    self.assertLess(metric(tg, requests % "sum") - before[requests % "sum"], 1.5)
                    # The tunnel's outcome record says how much went through it.
                    def outcome():
                        _, tail = tg.admin("/v1/audit/tail?n=5")
                        recs = [json.loads(l) for l in tail.splitlines()]
                        return [r for r in recs if r["kind"] == "outcome"][-1:]
                    [rec] = wait_for(outcome, timeout=5, what="the tunnel's outcome record")
                    self.assertGreaterEqual(int(rec["bytes_in"]), len(payload), rec)
                    self.assertGreaterEqual(int(rec["bytes_out"]), len(payload), rec)

    def test_upgrade_to_a_denied_host_is_halted(self):
        # Every host allowed but this one: the upgrade meets the deny list itself.
        with Tollgate({"hosts": {"allow": ["*"], "deny": ["127.0.0.1"]}}) as tg:
            out, _ = raw_exchange(tg.proxy_port, b"GET http://127.0.0.1:9/ws HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"
                                  b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n", read_until_close=False)
            status, headers, body = parse_response(out)
            self.assertEqual(status, 403)
            self.assertEqual(json.loads(body)["rule"], "hosts.deny")
            self.assertEqual(headers["x-tollgate-decision"], ["halt; rule=hosts.deny"])


class _ByteServer:
    """A plain TCP origin: reads until the client's FIN, then sends `size` pattern bytes and
    closes (a CONNECT tunnel's far end); or, with idle=True, accepts and says nothing."""

    def __init__(self, size=0, idle=False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.size, self.idle, self.sent = size, idle, 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(20)
            try:
                if self.idle:
                    conn.recv(1)  # until the proxy closes the tunnel
                    return
                while conn.recv(65536):
                    pass
                block = pattern(65536, seed=7)
                while self.sent < self.size:
                    conn.sendall(block)
                    self.sent += len(block)
            except OSError:
                pass

    def close(self):
        self.sock.close()


class TunnelEndTest(unittest.TestCase):
    """The end of a connection while the proxy still holds bytes for the agent: more than
    the kernel's buffers take (8 MiB, queued up to a 16 MiB write_watermark while the agent
    does not read). They reach the agent before the close; closing at once cancelled them,
    and the agent saw a clean end after about 4 MiB."""

    SIZE = 8 << 20
    CONFIG = {"limits": {"write_watermark": "16m"}}

    def connect(self, tg, port):
        s = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
        head = recv_until(s, b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        return s

    @staticmethod
    def read_all_later(s):
        time.sleep(0.5)  # the agent reads nothing until both ends have sent their FIN
        data = []
        while True:
            part = s.recv(65536)
            if not part:
                break
            data.append(part)
        s.close()
        return b"".join(data)

    def test_the_end_of_a_tunnel_delivers_what_is_still_queued(self):
        origin = _ByteServer(self.SIZE)
        try:
            with Tollgate(self.CONFIG) as tg:
                s = self.connect(tg, origin.port)
                s.sendall(b"x")
                s.shutdown(socket.SHUT_WR)
                self.assertEqual(len(self.read_all_later(s)), self.SIZE)
        finally:
            origin.close()

    def test_an_agent_that_half_closes_after_its_request_gets_the_whole_response(self):
        with HttpOrigin() as origin, Tollgate(self.CONFIG) as tg:
            s = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            s.sendall(b"GET http://127.0.0.1:%d/stream?bytes=%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                      % (origin.port, self.SIZE, origin.port))
            s.shutdown(socket.SHUT_WR)
            head, _, body = self.read_all_later(s).partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200"), head[:200])
            plain, rest = [], body  # de-chunk
            while True:
                line, _, rest = rest.partition(b"\r\n")
                n = int(line, 16)
                if n == 0:
                    break
                plain.append(rest[:n])
                rest = rest[n + 2:]
            self.assertEqual(len(b"".join(plain)), self.SIZE)

    def test_an_idle_tunnel_ends_at_tunnel_idle(self):
        origin = _ByteServer(idle=True)
        try:
            with Tollgate({"timeouts": {"tunnel_idle": "1s"}}) as tg:
                s = self.connect(tg, origin.port)
                start = time.monotonic()
                self.assertEqual(s.recv(4096), b"")  # closed by the proxy
                self.assertLess(time.monotonic() - start, 5)
                self.assertGreater(time.monotonic() - start, 0.9)
                s.close()
        finally:
            origin.close()

if __name__ == "__main__":
    unittest.main()
