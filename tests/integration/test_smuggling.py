"""Request smuggling shapes: each is a 400, the connection is closed, nothing reaches
the origin, and the rejection is recorded."""
import json
import unittest

from tollgate_harness import HttpOrigin, Tollgate, parse_response, raw_exchange


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

    def test_rejections_are_audited(self):
        doc = self.assertRejected(b"POST TARGET HTTP/1.1\r\nHost: HOSTPORT\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        code, tail = self.tg.admin("/v1/audit/tail?n=100")
        records = [json.loads(l) for l in tail.splitlines()]
        match = [r for r in records if r["seq"] == doc["audit_seq"]]
        self.assertEqual(len(match), 1)
        self.assertEqual(match[0]["decision"], "halt")
        self.assertEqual(match[0]["rule"], "http.bad_request")


if __name__ == "__main__":
    unittest.main()
