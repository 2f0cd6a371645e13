"""Request smuggling shapes: each is a 400, the connection is closed, nothing reaches
the origin, and the rejection is recorded. And the upstream's side: a response framed to
smuggle a second one into the agent's connection never reaches the agent as one."""
import http.client
import json
import unittest

from tollgate_harness import HttpOrigin, ScriptedOrigin, Tollgate, parse_response, raw_exchange


class SmugglingTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.origin = HttpOrigin().__enter__()
        cls.tg = Tollgate().__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.tg.__exit__(None, None, None)
        cls.origin.__exit__(None, None, None)

    def assertRejected(self, raw, reason_part=None):
        before = len(self.origin.requests)
        target = b"http://127.0.0.1:%d/echo" % self.origin.port
        host = b"127.0.0.1:%d" % self.origin.port
        data = raw.replace(b"TARGET", target).replace(b"HOSTPORT", host)
        out, closed = raw_exchange(self.tg.proxy_port, data)
        self.assertTrue(out, data)
        status, headers, body = parse_response(out)
        self.assertEqual(status, 400, out)
        self.assertTrue(closed, "the proxy must close the connection")
        self.assertEqual(headers.get("connection"), ["close"])
        doc = json.loads(body)
        self.assertEqual(doc["error"], "bad_request")
        if reason_part:
            self.assertIn(reason_part.lower(), doc["reason"].lower())
        self.assertEqual(len(self.origin.requests), before, "nothing may reach the origin")
        return doc

    def test_content_length_with_transfer_encoding(self):
        self.assertRejected(b"POST TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nContent-Length: 4\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "Transfer-Encoding")

    def test_duplicate_content_length(self):
        self.assertRejected(b"POST TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nContent-Length: 3\r\n"
                            b"Content-Length: 4\r\n\r\nabcd", "Content-Length")
        self.assertRejected(b"POST TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nContent-Length: 4\r\n"
                            b"Content-Length: 4\r\n\r\nabcd", "Content-Length")

    def test_invalid_content_length(self):
        for value in (b"12a", b"-1", b"0x10", b" ", b"1 2"):
            self.assertRejected(b"POST TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nContent-Length: " + value + b"\r\n\r\n")

    def test_bad_chunk_size(self):
        self.assertRejected(b"POST TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n")
        self.assertRejected(b"POST TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"ffffffffffffffffff\r\nab\r\n0\r\n\r\n")

    def test_transfer_encoding_not_ending_in_chunked(self):
        self.assertRejected(b"POST TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nTransfer-Encoding: chunked, gzip\r\n\r\n")
        self.assertRejected(b"POST TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nTransfer-Encoding: xchunked\r\n\r\n")

    def test_invalid_header_bytes(self):
        self.assertRejected(b"GET TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nX-A: a\x00b\r\n\r\n")
        self.assertRejected(b"GET TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nX-A: a\x7fb\r\n\r\n")
        self.assertRejected(b"GET TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nX-A : b\r\n\r\n")
        self.assertRejected(b"GET TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nX(A): b\r\n\r\n")

    def test_obs_fold(self):
        self.assertRejected(b"GET TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nX-A: a\r\n b\r\n\r\n", "folding")
        self.assertRejected(b"GET TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nX-A: a\r\n\tb\r\n\r\n", "folding")

    def test_absolute_uri_and_host_disagree(self):
        self.assertRejected(b"GET TARGET HTTP/1.1\r\nHost: other.example\r\n\r\n", "Host")
        self.assertRejected(b"GET TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nHost: HOSTPORT\r\n\r\n", "Host")

    def test_bare_lf_and_bad_versions(self):
        self.assertRejected(b"GET TARGET HTTP/1.1\nHost: HOSTPORT\n\n")
        self.assertRejected(b"GET TARGET HTTP/9.9\r\nHost: HOSTPORT\r\n\r\n")

    def test_obs_fold_after_an_empty_value(self):
        self.assertRejected(b"GET TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nX-A:\r\n b\r\n\r\n", "folding")

    def test_fragment_in_an_origin_form_target(self):
        self.assertRejected(b"GET /echo#/admin HTTP/1.1\r\nHost: HOSTPORT\r\n\r\n", "fragment")

    def test_a_method_override_that_would_run_another_method(self):
        for name in (b"X-HTTP-Method-Override", b"X-HTTP-Method", b"X-Method-Override"):
            self.assertRejected(b"GET TARGET HTTP/1.1\r\nHost: HOSTPORT\r\n" + name + b": DELETE\r\n\r\n",
                                "send the method itself")
        # Naming the method itself changes nothing: forwarded.
        out, _ = raw_exchange(self.tg.proxy_port, b"GET http://127.0.0.1:%d/echo HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                              b"X-HTTP-Method-Override: get\r\nConnection: close\r\n\r\n" % (self.origin.port, self.origin.port))
        self.assertEqual(parse_response(out)[0], 200, out)

    def test_rejections_are_audited(self):
        doc = self.assertRejected(b"POST TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        code, tail = self.tg.admin("/v1/audit/tail?n=100")
        records = [json.loads(l) for l in tail.splitlines()]
        match = [r for r in records if r["seq"] == doc["audit_seq"]]
        self.assertEqual(len(match), 1)
        self.assertEqual(match[0]["decision"], "halt")
        self.assertEqual(match[0]["rule"], "http.bad_request")


class UpstreamFramingTest(unittest.TestCase):
    """A hostile or broken upstream's response framing, seen by an agent on one keep-alive
    connection: each response it reads is the one to its own request."""

    FAKE = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfake"

    def exchange(self, origin, tg, paths):
        conn = http.client.HTTPConnection("127.0.0.1", tg.proxy_port, timeout=10)
        out = []
        try:
            for path in paths:
                conn.request("GET", origin.url(path))
                resp = conn.getresponse()
                out.append((resp.status, resp.read()))
        finally:
            conn.close()
        return out

    def test_an_interim_response_with_a_body_injects_nothing(self):
        # A 103 framed with a body that is a whole response, then the real one: an interim
        # response has no body, so the upstream is out of step: a 502, and the fake response
        # never reaches the agent; the next request on the connection gets its own answer.
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(self.FAKE), self.FAKE)
        for framing, body in ((b"Content-Length: %d\r\n" % len(self.FAKE), self.FAKE),
                              (b"Transfer-Encoding: chunked\r\n", chunked)):
            script = {
                "/a": b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n" + framing + b"\r\n" + body +
                      b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal",
                "/b": b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond",
            }
            with ScriptedOrigin(script) as origin, Tollgate() as tg:
                got = self.exchange(origin, tg, ["/a", "/b"])
                self.assertEqual([status for status, _ in got], [502, 200], (framing, got))
                self.assertIn(b"interim 103", got[0][1])
                self.assertEqual(got[1][1], b"second")

    def test_a_101_that_does_not_switch_is_a_502(self):
        # Asked to upgrade, the upstream says 101 with no Upgrade/Connection: the proxy would
        # go on reading HTTP while the agent talks WebSocket.
        origin = ScriptedOrigin({"/ws": (b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
                                         b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "close")})
        with origin, Tollgate() as tg:
            req = (b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                   % (origin.url("/ws").encode(), origin.port))
            out, _ = raw_exchange(tg.proxy_port, req)
            status, _, body = parse_response(out)
            self.assertEqual(status, 502, out)
            self.assertIn("101", json.loads(body)["reason"])

    def test_a_close_delimited_body_keeps_its_transfer_coding(self):
        # Transfer-Encoding: gzip with neither chunked nor Content-Length: the body runs to
        # the close, and its coding must reach the agent with it.
        import gzip
        data = gzip.compress(b"hello, gzip")
        origin = ScriptedOrigin({"/gz": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + data, "close")})
        with origin, Tollgate() as tg:
            out, _ = raw_exchange(tg.proxy_port, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                                  % (origin.url("/gz").encode(), origin.port))
            head, _, body = out.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), out)
            self.assertIn(b"\r\nTransfer-Encoding: gzip, chunked", head)
            plain = b""
            while True:  # de-chunk
                size, _, body = body.partition(b"\r\n")
                n = int(size, 16)
                if n == 0:
                    break
                plain, body = plain + body[:n], body[n + 2:]
            self.assertEqual(gzip.decompress(plain), b"hello, gzip")
            # An HTTP/1.0 agent knows no chunking, so no coding can reach it: a 502.
            out, _ = raw_exchange(tg.proxy_port, b"GET %s HTTP/1.0\r\nHost: 127.0.0.1:%d\r\n\r\n"
                                  % (origin.url("/gz").encode(), origin.port))
            self.assertTrue(out.startswith(b"HTTP/1.1 502 "), out)  # nothing of the 200 before it


if __name__ == "__main__":
    unittest.main()