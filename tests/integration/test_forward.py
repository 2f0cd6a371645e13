"""The forward proxy as an agent uses it: curl with HTTP_PROXY, decisions, keep-alive,
pipelining, 100-continue, hop-by-hop headers, admin endpoints, logs and traces."""
import gzip
import http.client
import json
import os
import re
import resource
import socket
import socketserver
import tempfile
import threading
import time
import unittest

from tollgate_harness import (ForgetfulOrigin, HttpOrigin, Serving, Tollgate, curl, parse_response, pattern, raw_exchange,
                              recv_until, request_heads, wait_for)


class DenyAddressesTest(unittest.TestCase):
    """egress.deny_addresses: whatever name or IP form an allowed call names, no connection
    goes to a denied address (the metadata service by a DNS name of it, say). Here loopback
    stands for it: the origin listens on 127.0.0.1."""

    def test_no_connection_goes_to_a_denied_address_by_any_name(self):
        with HttpOrigin() as origin:
            with Tollgate({"egress": {"deny_addresses": ["127.0.0.0/8", "::1"]}}) as tg:
                for host in ("127.0.0.1", "localhost", "127.1", "[::ffff:127.0.0.1]"):
                    with self.subTest(host=host):
                        rc, out, err = curl("-i", "-g", f"http://{host}:{origin.port}/hello", proxy=tg.proxy)
                        status, _, body = parse_response(out)
                        self.assertEqual(status, 403, out)
                        doc = json.loads(body)
                        self.assertEqual(doc["error"], "address_denied")
                        self.assertIn("egress.deny_addresses", doc["reason"])
                # A CONNECT tunnel is dialled the same way.
                out, _ = raw_exchange(tg.proxy_port, b"CONNECT localhost:%d HTTP/1.1\r\nHost: localhost:%d\r\n\r\n"
                                      % (origin.port, origin.port))
                self.assertEqual(parse_response(out)[0], 403, out)
                self.assertEqual(origin.requests, [])
            with Tollgate({"egress": {"deny_addresses": ["10.0.0.0/8", "fe80::/10"]}}) as tg:
                rc, out, err = curl("-i", f"http://localhost:{origin.port}/hello", proxy=tg.proxy)
                self.assertEqual(parse_response(out)[0], 200, out)


class HostListSpellingTest(unittest.TestCase):
    def test_a_denied_address_is_denied_in_every_spelling(self):
        # hosts: {allow: ["*"], deny: [127.0.0.1]}: each of these reaches 127.0.0.1, and each
        # used to pass the deny list (curl normalises some of them; a raw client does not).
        with HttpOrigin() as origin, Tollgate({"hosts": {"allow": ["*"], "deny": ["127.0.0.1"]}}) as tg:
            for host in (b"127.0.0.1", b"2130706433", b"0x7f000001", b"127.1", b"0177.0.0.1",
                         b"[::ffff:127.0.0.1]"):
                with self.subTest(host=host):
                    out, _ = raw_exchange(tg.proxy_port, b"GET http://%s:%d/hello HTTP/1.1\r\nHost: %s:%d\r\n"
                                          b"Connection: close\r\n\r\n" % (host, origin.port, host, origin.port))
                    status, _, body = parse_response(out)
                    self.assertEqual(status, 403, out)
                    self.assertEqual(json.loads(body)["rule"], "hosts.deny")
            self.assertEqual(origin.requests, [])


class ForwardProxyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.origin = HttpOrigin().__enter__()
        cls.tg = Tollgate({"hosts": {"allow": ["127.0.0.1"], "deny": ["evil.example"]}}).__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.tg.__exit__(None, None, None)
        cls.origin.__exit__(None, None, None)

    def test_get_and_post_with_http_proxy_env(self):
        rc, out, err = curl(self.origin.url("/hello"), proxy=self.tg.proxy, env_proxy=True)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, b"hello")
        rc, out, err = curl("--data-binary", "payload-1", self.origin.url("/echo"), proxy=self.tg.proxy)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, b"payload-1")

    def test_a_pooled_connection_closed_under_a_request_is_retried_only_when_that_is_safe(self):
        with ForgetfulOrigin() as origin:
            url = f"http://127.0.0.1:{origin.port}"
            conn = http.client.HTTPConnection("127.0.0.1", self.tg.proxy_port, timeout=10)

            def call(method, path, headers={}):
                conn.request(method, url + path, body=b"" if method == "POST" else None, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read()

            # One client connection, so one worker and its pool: the second call of each
            # pair goes out on the pooled connection, which the origin drops.
            self.assertEqual(call("GET", "/a"), (200, b"first"))
            status, body = call("POST", "/b")
            self.assertEqual(status, 502, body)
            doc = json.loads(body)
            self.assertEqual(doc["error"], "upstream_unavailable")
            self.assertIn("may have run", doc["reason"])
            self.assertEqual(call("GET", "/c"), (200, b"first"))
            self.assertEqual(call("GET", "/d"), (200, b"first"))  # sent again on a new connection
            self.assertEqual(call("POST", "/e", {"Idempotency-Key": "k-1"}), (200, b"first"))
            conn.close()
            # The POST without a key reached the origin once; the GET and the keyed POST
            # were sent again on a fresh connection.
            self.assertEqual(origin.requests, [(1, "GET", "/a"), (1, "POST", "/b"), (2, "GET", "/c"),
                                               (2, "GET", "/d"), (3, "GET", "/d"), (3, "POST", "/e"),
                                               (4, "POST", "/e")])

    def test_local_answers_to_head_have_no_body(self):
        # A 403 to HEAD, then a GET on the same connection: the 403's Content-Length
        # describes the GET's body, and the next bytes are the next response.
        out, closed = raw_exchange(self.tg.proxy_port,
                                   b"HEAD http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n\r\n"
                                   + f"GET {self.origin.url('/hello')} HTTP/1.1\r\nHost: 127.0.0.1:{self.origin.port}\r\n"
                                     "Connection: close\r\n\r\n".encode())
        self.assertTrue(closed)
        head, _, rest = out.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403 "), out)
        self.assertGreater(int(re.search(rb"(?i)content-length: (\d+)", head).group(1)), 0)
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 "), out)
        self.assertTrue(rest.endswith(b"\r\n\r\nhello"), out)
        # The admin listener too.
        out, closed = raw_exchange(self.tg.admin_port, b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n"
                                                       b"Connection: close\r\n\r\n")
        self.assertTrue(closed)
        head, _, rest = out.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), out)
        self.assertEqual(rest, b"")

    def test_transfer_codings_under_the_chunking_are_kept_and_http_1_0_gets_no_chunks(self):
        host = f"127.0.0.1:{self.origin.port}"
        # A response gzip-coded under its chunking: the agent is told both codings.
        out, _ = raw_exchange(self.tg.proxy_port, f"GET {self.origin.url('/gzip-chunked')} HTTP/1.1\r\n"
                              f"Host: {host}\r\nConnection: close\r\n\r\n".encode())
        status, headers, body = parse_response(out)
        self.assertEqual((status, headers["transfer-encoding"]), (200, ["gzip, chunked"]), out)
        size, _, rest = body.partition(b"\r\n")
        self.assertTrue(rest.endswith(b"\r\n0\r\n\r\n"), out)
        self.assertEqual(gzip.decompress(rest[:int(size, 16)]), b"hello, gzip")
        # And a request so coded reaches the upstream so.
        before = len(self.origin.requests)
        data = gzip.compress(b"payload")
        out, _ = raw_exchange(self.tg.proxy_port, f"POST {self.origin.url('/echo')} HTTP/1.1\r\nHost: {host}\r\n"
                              "Transfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n".encode()
                              + b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n")
        self.assertEqual(parse_response(out)[0], 200, out)
        self.assertEqual(self.origin.requests[before][2]["transfer-encoding"], ["gzip, chunked"])
        # An HTTP/1.0 agent knows no chunking: a chunked response reaches it close-delimited.
        out, closed = raw_exchange(self.tg.proxy_port, f"GET {self.origin.url('/stream?bytes=70000')} HTTP/1.0\r\n"
                                   f"Host: {host}\r\n\r\n".encode())
        self.assertTrue(closed)
        head, _, body = out.partition(b"\r\n\r\n")
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertEqual(body, pattern(70000, seed=1))
        # ...and one it cannot take whole (gzip under the chunking) is a 502 with the reason.
        out, _ = raw_exchange(self.tg.proxy_port, f"GET {self.origin.url('/gzip-chunked')} HTTP/1.0\r\n"
                              f"Host: {host}\r\n\r\n".encode())
        status, _, body = parse_response(out)
        self.assertEqual(status, 502, out)
        self.assertIn("HTTP/1.0", json.loads(body)["reason"])

    def test_an_http_1_0_agent_asking_for_keep_alive_gets_it_confirmed(self):
        # Without Connection: keep-alive in the response an HTTP/1.0 client closes after
        # each answer (RFC 9112 9.3): a proxied answer and a local one (a 403) say it.
        with socket.create_connection(("127.0.0.1", self.tg.proxy_port), timeout=5) as sock:
            for url, status in ((self.origin.url("/hello"), 200), ("http://evil.example/x", 403),
                                (self.origin.url("/hello"), 200)):
                sock.sendall(f"GET {url} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
                head = recv_until(sock, b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), head)
                self.assertIn(b"\r\nconnection: keep-alive\r\n", head.lower())
                length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
                body = head.partition(b"\r\n\r\n")[2]
                while len(body) < length:
                    body += sock.recv(4096)

    def test_the_upstream_gets_the_normalised_path_in_ascii(self):
        # Dot segments resolved and needless escapes decoded, as the policy saw it; a byte
        # outside ASCII stays escaped on the wire (it went out raw).
        before = len(self.origin.requests)
        rc, out, err = curl("--path-as-is", self.origin.url("/a/./b/../%7Ecaf%c3%a9/?x=%C3%A9"), proxy=self.tg.proxy)
        self.assertEqual(rc, 0, err)
        self.assertEqual(self.origin.requests[before][1], "/a/~caf%C3%A9/?x=%C3%A9")

    def test_the_upstreams_reason_phrase_is_passed_on(self):
        out, _ = raw_exchange(self.tg.proxy_port, f"GET {self.origin.url('/status/599')} HTTP/1.1\r\n"
                              f"Host: 127.0.0.1:{self.origin.port}\r\nConnection: close\r\n\r\n".encode())
        self.assertTrue(out.startswith(b"HTTP/1.1 599 Status Of Its Own\r\n"), out)

    def test_an_http_1_0_expectation_of_100_continue_is_ignored(self):
        # The head alone first: an HTTP/1.1 client would now be sent its 100 (see
        # test_expect_100_continue_upload); an HTTP/1.0 one just sends its body.
        with socket.create_connection(("127.0.0.1", self.tg.proxy_port), timeout=5) as sock:
            sock.sendall(f"POST {self.origin.url('/echo')} HTTP/1.0\r\nHost: 127.0.0.1:{self.origin.port}\r\n"
                         "Expect: 100-continue\r\nContent-Length: 5\r\n\r\n".encode())
            sock.settimeout(0.5)
            with self.assertRaises(socket.timeout):
                sock.recv(100)
            sock.settimeout(5)
            sock.sendall(b"hello")
            out = recv_until(sock, b"never")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertTrue(out.endswith(b"hello"), out)

    def test_halt_answers_403_with_the_contract_body(self):
        before = len(self.origin.requests)
        rc, out, err = curl("-i", "-H", "X-Agent-Id: agent-7", "http://evil.example/steal", proxy=self.tg.proxy)
        self.assertEqual(rc, 0, err)
        status, headers, body = parse_response(out)
        self.assertEqual(status, 403)
        self.assertEqual(headers["content-type"], ["application/json"])
        self.assertEqual(headers["x-tollgate-decision"], ["halt; rule=hosts.deny"])
        doc = json.loads(body)
        self.assertEqual(doc["error"], "halted")
        self.assertEqual(doc["rule"], "hosts.deny")
        self.assertEqual(doc["agent"], "agent-7")
        self.assertEqual(doc["tool"], "evil.example")
        self.assertIn("deny list", doc["reason"])
        self.assertIsInstance(doc["audit_seq"], int)
        self.assertGreater(doc["audit_seq"], 0)
        # Default deny: a host on neither list is halted too, and nothing reached the origin.
        rc, out, _ = curl("-i", "http://other.example/", proxy=self.tg.proxy)
        status, headers, body = parse_response(out)
        self.assertEqual(status, 403)
        self.assertEqual(json.loads(body)["rule"], "hosts.default-deny")
        self.assertEqual(json.loads(body)["agent"], "anonymous")
        self.assertEqual(len(self.origin.requests), before)
        # The audit tail holds the decision with the same sequence number.
        code, tail = self.tg.admin("/v1/audit/tail?n=50")
        self.assertEqual(code, 200)
        records = [json.loads(l) for l in tail.splitlines()]
        self.assertTrue(any(r["seq"] == doc["audit_seq"] and r["decision"] == "halt" for r in records))

    def test_keep_alive_reuses_one_upstream_connection(self):
        with HttpOrigin() as origin:
            urls = [origin.url("/hello")] * 20
            rc, out, err = curl(*urls, proxy=self.tg.proxy)
            self.assertEqual(rc, 0, err)
            self.assertEqual(out, b"hello" * 20)
            self.assertEqual(len(origin.requests), 20)
            # Two workers may each open one; never one per request.
            self.assertLessEqual(origin.connections, 2)

    def test_many_concurrent_agents_reuse_pooled_upstream_connections(self):
        """200 agents on keep-alive connections, 10 calls of 100 ms each, in step: the
        sidecar opens at most one upstream connection per call in flight, never one per call
        (a pool that keeps fewer idle connections than the calls in flight closes and reopens
        them: with 64 per worker this saw ~850 connections)."""
        agents, calls = 200, 10
        with HttpOrigin() as origin:
            start = threading.Barrier(agents)
            failures = []

            def agent():
                conn = http.client.HTTPConnection("127.0.0.1", self.tg.proxy_port, timeout=30)
                try:
                    for _ in range(calls):
                        start.wait(timeout=30)
                        conn.request("GET", origin.url("/delay?ms=100"))
                        r = conn.getresponse()
                        if (r.status, r.read()) != (200, b"late"):
                            failures.append(r.status)
                except Exception as e:  # noqa: BLE001 - reported below
                    failures.append(repr(e))
                finally:
                    conn.close()

            threads = [threading.Thread(target=agent) for _ in range(agents)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            self.assertEqual(failures, [])
            self.assertEqual(len(origin.requests), agents * calls)
            self.assertLessEqual(origin.connections, agents, "upstream connections")

    def test_upstream_idle_per_host_bounds_the_pool(self):
        with HttpOrigin() as origin, Tollgate({"hosts": {"allow": ["127.0.0.1"]},
                                               "limits": {"upstream_idle_per_host": 0}}) as tg:
            rc, out, err = curl(*[origin.url("/hello")] * 5, proxy=tg.proxy)
            self.assertEqual((rc, out), (0, b"hello" * 5), err)
            self.assertEqual(origin.connections, 5)  # none kept: one per call

    def test_pipelined_requests_are_answered_in_order(self):
        reqs = b"".join(
            b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (self.origin.url(p).encode(), self.origin.port)
            for p in ("/delay?ms=200", "/echo", "/hello"))
        reqs = reqs.replace(b"GET " + self.origin.url("/echo").encode(), b"POST " + self.origin.url("/echo").encode())
        reqs = reqs.replace(b"Host: 127.0.0.1:%d\r\n\r\nGET %s" % (self.origin.port, self.origin.url("/hello").encode()),
                            b"Host: 127.0.0.1:%d\r\nContent-Length: 4\r\n\r\nbodyGET %s" % (self.origin.port, self.origin.url("/hello").encode()))
        s = socket.create_connection(("127.0.0.1", self.tg.proxy_port), timeout=5)
        s.sendall(reqs)
        data = b""
        deadline = time.monotonic() + 5
        while data.count(b"HTTP/1.1 ") < 3 or not data.endswith(b"hello"):
            self.assertLess(time.monotonic(), deadline, data)
            chunk = s.recv(65536)
            self.assertTrue(chunk, data)
            data += chunk
        s.close()
        bodies = re.findall(rb"\r\n\r\n(late|body|hello)", data)
        self.assertEqual(bodies, [b"late", b"body", b"hello"])

    def test_expect_100_continue_upload(self):
        payload = pattern(2 << 20, seed=5)
        with tempfile.NamedTemporaryFile() as f:
            f.write(payload)
            f.flush()
            rc, out, err = curl("-H", "Expect: 100-continue", "--data-binary", "@" + f.name,
                                self.origin.url("/sink"), proxy=self.tg.proxy)
        self.assertEqual(rc, 0, err)
        import hashlib
        doc = json.loads(out)
        self.assertEqual(doc["bytes"], len(payload))
        self.assertEqual(doc["sha256"], hashlib.sha256(payload).hexdigest())

    def test_hop_by_hop_headers_removed_and_via_added(self):
        rc, out, err = curl("-H", "Connection: X-Foo", "-H", "X-Foo: secret", "-H", "Keep-Alive: timeout=5",
                            "-H", "TE: trailers", "-H", "Proxy-Authorization: Basic Zm9vOmJhcg==",
                            "-H", "Proxy-Connection: keep-alive", "-H", "X-Kept: yes",
                            self.origin.url("/headers"), proxy=self.tg.proxy)
        self.assertEqual(rc, 0, err)
        seen = json.loads(out)
        for h in ("x-foo", "keep-alive", "te", "proxy-authorization", "proxy-connection"):
            self.assertNotIn(h, seen)
        self.assertEqual(seen["x-kept"], ["yes"])
        self.assertTrue(seen["via"][0].startswith("1.1 tollgate"), seen["via"])
        self.assertEqual(seen["host"], ["127.0.0.1:%d" % self.origin.port])

    def test_traceparent_kept_or_started(self):
        tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        rc, out, _ = curl("-H", "traceparent: " + tp, self.origin.url("/headers"), proxy=self.tg.proxy)
        self.assertEqual(json.loads(out)["traceparent"], [tp])
        rc, out, _ = curl(self.origin.url("/headers"), proxy=self.tg.proxy)
        started = json.loads(out)["traceparent"][0]
        self.assertRegex(started, r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")
        trace_id = started.split("-")[1]
        lines = wait_for(lambda: [l for l in self.tg.logs("request") if l.get("trace_id") == trace_id],
                         timeout=3, what="request log line with the started trace id")
        line = lines[0]
        self.assertEqual(line["method"], "GET")
        self.assertEqual(line["status"], 200)
        self.assertEqual(line["decision"], "allow")
        self.assertEqual(line["authority"], "127.0.0.1:%d" % self.origin.port)
        wait_for(lambda: [l for l in self.tg.logs("request") if l.get("trace_id") == "4bf92f3577b34da6a3ce929d0e0e4736"],
                 timeout=3, what="request log line with the kept trace id")

    def test_a_traceparent_of_a_later_version_is_read_as_far_as_version_00_goes(self):
        """W3C Trace Context 3.2.4: a version above 00 may be longer; its first 55 characters
        are parsed when the 56th is a '-'. It goes upstream as a version 00 header (the only
        one this proxy knows) with its ids and sampled flag. ff, and a 00 that is longer, are
        invalid: the trace is started anew."""
        trace, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"

        def sent(tp):
            rc, out, err = curl("-H", "traceparent: " + tp, self.origin.url("/headers"), proxy=self.tg.proxy)
            self.assertEqual(rc, 0, err)
            return json.loads(out)["traceparent"][0]
        for tp, expected in ((f"01-{trace}-{parent}-01-and-what-version-01-adds", f"00-{trace}-{parent}-01"),
                             (f"01-{trace}-{parent}-03", f"00-{trace}-{parent}-01"),
                             (f"cc-{trace}-{parent}-08", f"00-{trace}-{parent}-00"),
                             (f"00-{trace}-{parent}-01", f"00-{trace}-{parent}-01")):
            with self.subTest(tp):
                self.assertEqual(sent(tp), expected)
        # The request log line carries the trace id of the later version too.
        wait_for(lambda: len([l for l in self.tg.logs("request") if l.get("trace_id") == trace]) == 4,
                 timeout=3, what="four request log lines with the kept trace id")
        for tp in (f"01-{trace}-{parent}-01x", f"ff-{trace}-{parent}-01", f"00-{trace}-{parent}-01-more",
                   f"01-{trace}-{parent}-0"):
            with self.subTest(tp):
                started = sent(tp)
                self.assertRegex(started, r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")
                self.assertNotEqual(started.split("-")[1], trace)

    def test_admin_endpoints_and_metrics(self):
        self.assertEqual(self.tg.admin("/healthz"), (200, b"ok\n"))
        self.assertEqual(self.tg.admin("/readyz")[0], 200)
        code, body = self.tg.admin("/v1/status")
        self.assertEqual(code, 200)
        status = json.loads(body)
        self.assertEqual(status["listeners"][0]["address"], "127.0.0.1:%d" % self.tg.proxy_port)

        def count(text, status):
            m = re.search(r'tollgate_requests_total\{listener="egress",status="%d"\} (\d+)' % status, text)
            return int(m.group(1)) if m else 0

        _, before = self.tg.admin("/metrics")
        for _ in range(3):
            curl(self.origin.url("/hello"), proxy=self.tg.proxy)
        curl("http://evil.example/", proxy=self.tg.proxy)
        before = before.decode()
        # A request is counted just after its reply is written (by its worker, while the
        # admin listener is served by worker 0): wait for the counts, then check they are exact.
        wait_for(lambda: count(self.tg.admin("/metrics")[1].decode(), 403) - count(before, 403) >= 1,
                 what="the 403 counted")
        _, after = self.tg.admin("/metrics")
        after = after.decode()
        self.assertEqual(count(after, 200) - count(before, 200), 3)
        self.assertEqual(count(after, 403) - count(before, 403), 1)
        for name in ("tollgate_request_duration_seconds_bucket", "tollgate_upstream_duration_seconds_bucket",
                     "tollgate_active_connections", "tollgate_bytes_total", "tollgate_decisions_total"):
            self.assertIn(name, after)
        # No append waited for the audit writer: four calls are far from a full queue.
        self.assertIn("\ntollgate_audit_backpressure_waits_total 0\n", after)
        self.assertEqual(self.tg.admin("/nope")[0], 404)
        # This sidecar runs on hosts: lists, which are read at start: a reload cannot change
        # them, and saying "reloaded" would tell the operator an edit is in force.
        status, body = self.tg.admin("/v1/reload", "POST")
        self.assertEqual(status, 409, body)
        reply = json.loads(body)
        self.assertEqual(reply["error"], "nothing_to_reload")
        self.assertIn("restart", reply["reason"])

    def test_an_admin_post_whose_body_comes_later_is_answered(self):
        # curl --data sends Expect: 100-continue and waits for the 100 before the body.
        with socket.create_connection(("127.0.0.1", self.tg.admin_port), timeout=5) as sock:
            sock.sendall(b"POST /v1/reload HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            self.assertEqual(recv_until(sock, b"\r\n\r\n"), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"{}")
            # Answered (409: this sidecar has no policies to reload), not left waiting.
            self.assertTrue(recv_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 409 "))
        # A body that never comes is a 408 after header_read (10 s, the default), not a
        # connection held forever; the socket's timeout is well past it (at 10 s it raced it).
        with socket.create_connection(("127.0.0.1", self.tg.admin_port), timeout=25) as sock:
            sock.sendall(b"POST /v1/reload HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")
            self.assertTrue(recv_until(sock, b"never").startswith(b"HTTP/1.1 408 "))


class NtlmOrigin(Serving):
    """An origin that authenticates connections as NTLM does: Authorization: NTLM <type 1>
    gets a 401 challenge, NTLM <type 3 of USER> makes the connection USER's, and from then
    on every request on that connection is USER's, whoever sends it."""

    def __init__(self):
        self.connections = 0
        origin = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                origin.connections += 1
                user = None
                for head in request_heads(self.request):
                    auth = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")[1:]
                            if l.lower().startswith(b"authorization:")]
                    extra = b""
                    if auth and auth[0] == b"NTLM TlRMTVNTUAABAAAA":
                        status, body, extra = b"401 Unauthorized", b"", b"WWW-Authenticate: NTLM TlRMTVNTUAACAAAA\r\n"
                    elif auth and auth[0].startswith(b"NTLM TlRMTVNTUAADAAAA-"):
                        user = auth[0].split(b"-", 1)[1]
                        status, body = b"200 OK", user
                    elif user:
                        status, body = b"200 OK", user
                    else:
                        status, body, extra = b"401 Unauthorized", b"who?", b"WWW-Authenticate: Basic realm=x, NTLM\r\n"
                    self.request.sendall(b"HTTP/1.1 " + status + b"\r\n" + extra +
                                         b"Content-Length: %d\r\n\r\n" % len(body) + body)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]


class ConnectionAuthTest(unittest.TestCase):
    """NTLM and Negotiate authenticate the upstream connection, not the request: once an
    agent has authenticated one, the connection is that agent's. Pooled for everyone, the
    next agent's call would go out on it and run as the first agent."""

    def exchange(self, sock, origin, auth=None):
        sock.sendall(b"GET http://127.0.0.1:%d/whoami HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n"
                     % (origin.port, origin.port, b"Authorization: " + auth + b"\r\n" if auth else b""))
        data = recv_until(sock, b"\r\n\r\n")
        status, headers, body = parse_response(data)
        length = int(headers["content-length"][0])
        while len(body) < length:
            chunk = sock.recv(4096)
            if not chunk:
                break
            body += chunk
        return status, body

    def test_a_connection_an_agent_authenticated_is_never_another_agents(self):
        with NtlmOrigin() as origin, Tollgate({"workers": 1, "hosts": {"allow": ["127.0.0.1"]}}) as tg:
            alice = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=10)
            # The challenge alone (WWW-Authenticate listing NTLM) makes the connection Alice's:
            # Dave's call goes out on a connection of its own.
            self.assertEqual(self.exchange(alice, origin), (401, b"who?"))
            dave = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=10)
            self.assertEqual(self.exchange(dave, origin), (401, b"who?"))
            self.assertEqual(origin.connections, 2)
            dave.close()
            self.assertEqual(self.exchange(alice, origin, b"NTLM TlRMTVNTUAABAAAA")[0], 401)
            self.assertEqual(self.exchange(alice, origin, b"NTLM TlRMTVNTUAADAAAA-alice"), (200, b"alice"))
            self.assertEqual(self.exchange(alice, origin), (200, b"alice"))  # her connection still
            # Bob, another agent, while Alice's connection is idle and while it is gone.
            bob = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=10)
            self.assertEqual(self.exchange(bob, origin), (401, b"who?"))
            self.assertEqual(self.exchange(alice, origin), (200, b"alice"))
            alice.close()
            time.sleep(0.2)
            carol = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=10)
            self.assertEqual(self.exchange(carol, origin), (401, b"who?"))
            bob.close()
            carol.close()
            self.assertGreaterEqual(origin.connections, 2)


class OpenFileLimitTest(unittest.TestCase):
    def test_a_low_soft_limit_is_raised_so_connections_beyond_it_are_served(self):
        """Started with a soft open-file limit of 256 (systemd's and many shells' is 1024),
        the sidecar raises it to the hard limit and serves 300 agents at once: 600
        descriptors, client and upstream."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1024:
            self.skipTest(f"the hard open-file limit here is {hard}: nothing to raise to")
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            tg = Tollgate({"hosts": {"allow": ["127.0.0.1"]}})
            tg.__enter__()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            with open(f"/proc/{tg.proc.pid}/limits") as f:
                line = [l for l in f if l.startswith("Max open files")][0].split()
            self.assertEqual(line[3], line[4], line)  # soft == hard
            with HttpOrigin() as origin:
                request = (f"GET {origin.url('/delay?ms=300')} HTTP/1.1\r\n"
                           f"Host: 127.0.0.1:{origin.port}\r\n\r\n").encode()
                socks = []
                try:
                    for _ in range(300):
                        s = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=30)
                        s.sendall(request)
                        socks.append(s)
                    statuses = []
                    for s in socks:
                        head = recv_until(s, b"\r\n")
                        statuses.append(head.split(b" ", 2)[1] if head else b"reset")
                finally:
                    for s in socks:
                        s.close()
                self.assertEqual(statuses, [b"200"] * 300)
        finally:
            tg.__exit__(None, None, None)


class IdentityTest(unittest.TestCase):
    """The agent id comes from one source per listener: a header, the Proxy-Authorization
    user, or the client's address."""

    def agent_of(self, tg, *args):
        rc, out, err = curl("-i", *args, "http://denied.example/", proxy=tg.proxy)
        status, _, body = parse_response(out)
        self.assertEqual(status, 403, err)
        return json.loads(body)["agent"]

    def test_proxy_basic_user(self):
        with Tollgate({"hosts": {"allow": []}}, listener={"identity": {"proxy_basic": True}}) as tg:
            self.assertEqual(self.agent_of(tg, "--proxy-user", "agent-alice:secret"), "agent-alice")
            self.assertEqual(self.agent_of(tg), "anonymous")
            # The header source is not consulted on this listener: it cannot be spoofed.
            self.assertEqual(self.agent_of(tg, "-H", "X-Agent-Id: root"), "anonymous")

    def test_source_address_map(self):
        with Tollgate({"hosts": {"allow": []}}, listener={"identity": {"source": {"127.0.0.1": "agent-local"}}}) as tg:
            self.assertEqual(self.agent_of(tg, "-H", "X-Agent-Id: spoofed"), "agent-local")

    def test_two_sources_is_a_config_error(self):
        tg = Tollgate(listener={"identity": {"header": "X-Agent-Id", "proxy_basic": True}})
        with self.assertRaises(AssertionError) as caught:
            tg.__enter__()
        tg.__exit__(None, None, None)
        self.assertEqual(tg.proc.returncode, 2)
        self.assertIn("listeners[0].identity: choose one of header, proxy_basic", str(caught.exception))


class ObserveModeTest(unittest.TestCase):
    def test_observe_forwards_and_records_the_halt(self):
        with HttpOrigin() as origin, Tollgate({"mode": "observe", "hosts": {"allow": [], "deny": ["127.0.0.1"]}}) as tg:
            rc, out, err = curl(origin.url("/hello"), proxy=tg.proxy)
            self.assertEqual((rc, out), (0, b"hello"), err)
            code, tail = tg.admin("/v1/audit/tail?n=1")
            self.assertEqual(json.loads(tail)["decision"], "observe-halt")


if __name__ == "__main__":
    unittest.main()
