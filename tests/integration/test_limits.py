"""Limits and timeouts from the config, each with its status."""
import json
import socket
import time
import unittest

from tollgate_harness import HttpOrigin, SilentOrigin, Tollgate, closed_port, curl, parse_response, raw_exchange, wait_for

CONFIG = {
    "limits": {"max_header_bytes": "4k", "max_headers": 20, "max_uri_bytes": "1k", "max_body_bytes": "1m"},
    "timeouts": {"header_read": "1s", "upstream_connect": "1s", "upstream_response": "1s", "idle": "2s"},
}


class LimitsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.origin = HttpOrigin().__enter__()
        cls.tg = Tollgate(CONFIG, listener={"max_connections": 5}).__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.tg.__exit__(None, None, None)
        cls.origin.__exit__(None, None, None)

    def request(self, raw, close=True):
        out, closed = raw_exchange(self.tg.proxy_port, raw, read_until_close=close)
        return parse_response(out) + (closed,)

    def target(self, path="/hello"):
        return b"http://127.0.0.1:%d%s" % (self.origin.port, path.encode())

    def test_header_bytes_and_count(self):
        status, _, body, _ = self.request(b"GET " + self.target() + b" HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        self.assertEqual(status, 431)
        self.assertEqual(json.loads(body)["error"], "headers_too_large")
        many = b"".join(b"X-%d: v\r\n" % i for i in range(25))
        status, _, _, _ = self.request(b"GET " + self.target() + b" HTTP/1.1\r\n" + many + b"\r\n")
        self.assertEqual(status, 431)

    def test_uri_length(self):
        status, _, body, _ = self.request(b"GET " + self.target("/" + "a" * 2000) + b" HTTP/1.1\r\n\r\n")
        self.assertEqual(status, 414)
        self.assertEqual(json.loads(body)["error"], "uri_too_long")

    def test_body_size(self):
        status, headers, body, closed = self.request(
            b"POST " + self.target("/sink") + b" HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 1000)
        self.assertEqual(status, 413)
        self.assertTrue(closed)
        s = socket.create_connection(("127.0.0.1", self.tg.proxy_port), timeout=5)
        s.sendall(b"POST " + self.target("/sink") + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (256 << 10) + b"y" * (256 << 10) + b"\r\n"
        data = b""
        try:
            for _ in range(8):
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while True:
                part = s.recv(65536)
                if not part:
                    break
                data += part
        except (ConnectionResetError, socket.timeout):
            pass
        s.close()
        # The origin started receiving the stream, so the agent may see the connection cut
        # before it reads the 413; what the proxy must never do is end the body for it: the
        # origin answers /sink only once it has read the last chunk, so a 200 here means the
        # proxy sent a terminator the agent never did.
        if data:
            status, _, body = parse_response(data)
            self.assertEqual(status, 413, data[:300])
            self.assertEqual(json.loads(body)["error"], "body_too_large")

    def test_slowloris_gets_408(self):
        s = socket.create_connection(("127.0.0.1", self.tg.proxy_port), timeout=5)
        start = time.monotonic()
        data = b""
        try:
            for byte in b"GET " + self.target() + b" HTTP/1.1\r\nX-Slow: ":
                s.sendall(bytes([byte]))
                time.sleep(0.05)
                if time.monotonic() - start > 4:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while True:
                part = s.recv(4096)
                if not part:
                    break
                data += part
        except ConnectionResetError:
            pass
        elapsed = time.monotonic() - start
        s.close()
        self.assertEqual(parse_response(data)[0], 408)
        self.assertLess(elapsed, 3.5)

    def test_stalled_upload_is_cut_off(self):
        """A body that stops coming mid-upload does not hold the connection forever."""
        before = len(self.origin.requests)
        s = socket.create_connection(("127.0.0.1", self.tg.proxy_port), timeout=8)
        s.sendall(b"POST " + self.target("/sink") + b" HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        start = time.monotonic()
        data = b""
        try:
            while True:
                part = s.recv(4096)
                if not part:
                    break
                data += part
        except (ConnectionResetError, socket.timeout):
            pass
        s.close()
        self.assertLess(time.monotonic() - start, 6)
        self.assertEqual(parse_response(data)[0], 408, data)
        wait_for(lambda: len(self.origin.requests) == before + 1, timeout=3, what="the request at the origin")

    def test_upstream_refused_is_502(self):
        rc, out, err = curl("-i", f"http://127.0.0.1:{closed_port()}/", proxy=self.tg.proxy)
        status, _, body = parse_response(out)
        self.assertEqual(status, 502)
        doc = json.loads(body)
        self.assertEqual(doc["error"], "upstream_unavailable")
        self.assertIn("refused", doc["reason"])

    def test_unresolvable_host_is_502(self):
        rc, out, err = curl("-i", "http://nonexistent.invalid/", proxy=self.tg.proxy)
        status, _, body = parse_response(out)
        self.assertEqual(status, 502)
        self.assertIn("resolve", json.loads(body)["reason"])

    def test_silent_upstream_is_504(self):
        with SilentOrigin() as silent:
            start = time.monotonic()
            rc, out, err = curl("-i", f"http://127.0.0.1:{silent.port}/", proxy=self.tg.proxy)
            status, _, body = parse_response(out)
            self.assertEqual(status, 504)
            self.assertEqual(json.loads(body)["error"], "upstream_timeout")
            self.assertLess(time.monotonic() - start, 5)

    def test_idle_keep_alive_is_closed(self):
        s = socket.create_connection(("127.0.0.1", self.tg.proxy_port), timeout=6)
        s.sendall(b"GET " + self.target() + b" HTTP/1.1\r\n\r\n")
        self.assertIn(b"hello", s.recv(4096))
        start = time.monotonic()
        self.assertEqual(s.recv(4096), b"")
        self.assertGreater(time.monotonic() - start, 1.5)
        s.close()

    def test_max_connections(self):
        conns = [socket.create_connection(("127.0.0.1", self.tg.proxy_port), timeout=5) for _ in range(5)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", self.tg.proxy_port), timeout=5)
        data = b""
        try:
            while True:
                part = extra.recv(4096)
                if not part:
                    break
                data += part
        except ConnectionResetError:
            pass
        extra.close()
        self.assertTrue(data.startswith(b"HTTP/1.1 503"), data)
        for c in conns:
            c.sendall(b"GET " + self.target() + b" HTTP/1.1\r\n\r\n")
            self.assertIn(b"hello", c.recv(4096))
            c.close()
        # The operator is told, once for a burst, not once per connection.
        [warn] = wait_for(lambda: self.tg.logs("connections refused"), timeout=5, what="the refusal logged")
        self.assertEqual((warn["listener"], warn["at_max_connections"], warn["max_connections"]), ("egress", 1, 5))


class OutOfDescriptorsTest(unittest.TestCase):
    def test_the_open_file_limit_coming_near_is_logged_with_a_hint(self):
        # A hard open-file limit of 64: the sidecar cannot raise it, and connections past it
        # are accepted and closed by libuv unseen (its reserve-descriptor trick), which left
        # no trace at all. A descriptor numbered past 90% of the limit is the warning.
        with Tollgate(wrap=["prlimit", "--nofile=64:64"]) as tg:
            socks = []
            try:
                for _ in range(100):  # bounded: 64 descriptors, some the sidecar's own
                    socks.append(socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=5))
                lines = wait_for(lambda: tg.logs("open-file limit nearly reached"), timeout=5,
                                 what="the limit's nearness logged")
            finally:
                for s in socks:
                    s.close()
            # One line for the burst from each worker that took connections (not one each).
            self.assertLessEqual(len(lines), 2, lines)
            self.assertGreaterEqual(lines[0]["near_open_file_limit"], 1)
            self.assertEqual(lines[0]["open_file_limit"], 64)
            self.assertIn("raise it", lines[0]["hint"])
            self.assertIsNone(tg.proc.poll())


class LingerTest(unittest.TestCase):
    def test_a_connection_ended_after_its_reply_is_closed_though_the_agent_keeps_it(self):
        # A request with Connection: close is answered and the write side shut; an agent that
        # reads the reply but never closes its socket used to hold the connection (and its
        # max_connections slot) until it did: the linger now ends it.
        with HttpOrigin() as origin, Tollgate(listener={"max_connections": 1}) as tg:
            target = b"http://127.0.0.1:%d/hello" % origin.port
            first = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=5)
            first.sendall(b"GET " + target + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
            data = b""
            while not data.endswith(b"hello"):
                part = first.recv(4096)
                self.assertTrue(part, data)
                data += part
            self.assertEqual(first.recv(4096), b"")  # the proxy's FIN
            # The agent keeps its socket open. After the linger, the slot is free again.
            time.sleep(3)
            status, _, body = parse_response(raw_exchange(tg.proxy_port, b"GET " + target + b" HTTP/1.1\r\nConnection: close\r\n\r\n")[0])
            self.assertEqual((status, body), (200, b"hello"))
            first.close()

if __name__ == "__main__":
    unittest.main()
