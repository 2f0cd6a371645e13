"""TLS interception through the real binary (issue 6): curl through HTTPS_PROXY, Python's
requests and openssl s_client against HTTPS origins this test makes, with a Tollgate local
CA from `tollgate certs init`. Allow and halt inside the tunnel, passthrough, SNI and Host
that name another host, upstream certificates that fail verification, an agent that does
not trust the CA, name constraints, and the audit records of all of it."""
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import unittest

from audit_log import read_lines
from tls_fixtures import TestPki, server_context
from tollgate_harness import BIN, CloseDelimitedOrigin, HttpOrigin, Tollgate, curl, parse_response, pattern, raw_exchange, wait_for


POLICY = """
apiVersion: tollgate/v1
kind: Policy
metadata: {name: tls}
tools:
  - {name: api.read, match: {host: localhost, methods: [GET], paths: ["/hello", "/headers", "/stream", "/close", "/whole", "/cut"]}, class: read}
  - {name: api.write, match: {host: localhost, methods: [POST], paths: ["/echo"]}, class: write}
  - {name: blind, match: {host: 127.0.0.1, methods: [CONNECT]}, class: read}
agents:
  - {id: "agent-*"}
rules:
  - {id: allow-reads, effect: allow, match: {tool: api.read}}
  - {id: allow-blind, effect: allow, match: {tool: blind}}
  - {id: no-writes, effect: halt, match: {tool: api.write}, reason: "writes need a ticket"}
"""


class TlsInterceptTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="tollgate-tls-")
        cls.pki = TestPki(os.path.join(cls.tmp, "origins"))
        cls.origin = HttpOrigin(tls=server_context(*cls.pki.valid())).__enter__()
        cls.expired = HttpOrigin(tls=server_context(*cls.pki.expired())).__enter__()
        cls.self_signed = HttpOrigin(tls=server_context(*cls.pki.self_signed())).__enter__()
        cls.wrong_name = HttpOrigin(tls=server_context(*cls.pki.wrong_name("other.test"))).__enter__()
        cls.ca_dir = os.path.join(cls.tmp, "ca")
        r = subprocess.run([BIN, "certs", "init", cls.ca_dir], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        cls.ca = os.path.join(cls.ca_dir, "ca.crt")
        cls.tg = Tollgate({"tls": {"ca_dir": cls.ca_dir, "upstream_ca_file": cls.pki.ca_cert}},
                          listener={"intercept_tls": True, "passthrough": ["127.0.0.1"]}, policy=POLICY)
        cls.tg.__enter__()
        cls.audit_dir = os.path.join(cls.tg.dir, "var", "audit")

    @classmethod
    def tearDownClass(cls):
        cls.tg.__exit__(None, None, None)
        for o in (cls.origin, cls.expired, cls.self_signed, cls.wrong_name):
            o.__exit__(None, None, None)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def https(self, origin, path, *args, agent="agent-1", ca=None, host="localhost"):
        rc, out, err = curl("-i", "--cacert", ca or self.ca, "-H", f"X-Agent-Id: {agent}", *args,
                            origin.url(path, host=host), proxy=self.tg.proxy, env_proxy=True)
        return rc, out, err

    def records(self, **match):
        def find():
            out = []
            for line in read_lines(self.audit_dir):
                r = json.loads(line)
                if all(r.get(k) == v for k, v in match.items()):
                    out.append(r)
            return out
        return wait_for(find, timeout=5, what=f"audit records {match}")

    def test_an_allowed_call_goes_through_the_intercepted_tunnel(self):
        before = len(self.origin.requests)
        rc, out, err = self.https(self.origin, "/hello")
        self.assertEqual(rc, 0, err)
        status, headers, body = parse_response(out.split(b"\r\n\r\n", 1)[1])  # after the 200 of CONNECT
        self.assertEqual((status, body), (200, b"hello"))
        # The origin saw the request re-originated by the proxy, with its Via.
        method, target, seen = self.origin.requests[before]
        self.assertEqual((method, target), ("GET", "/hello"))
        self.assertTrue(seen["via"][0].startswith("1.1 tollgate-"))
        self.assertIn("localhost", self.origin.snis)
        # The CONNECT and the call inside are both on record.
        self.assertTrue(self.records(method="CONNECT", rule="tls.intercept", authority=f"localhost:{self.origin.port}"))
        call = self.records(kind="call", method="GET", path="/hello", agent="agent-1", decision="allow")[-1]
        self.assertEqual(call["tool"], "api.read")
        self.assertTrue(self.records(kind="outcome", call_seq=str(call["seq"]), status="200", sent="true"))

    def test_a_large_response_streams_through_both_tls_legs(self):
        rc, out, err = self.https(self.origin, "/stream?bytes=3000000")
        self.assertEqual(rc, 0, err)
        status, _, body = parse_response(out.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(status, 200)
        self.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(pattern(3000000, seed=1)).hexdigest())

    def test_an_upstream_tls_end_without_close_notify_is_a_cut_not_the_end_of_the_body(self):
        with CloseDelimitedOrigin(tls=server_context(*self.pki.valid())) as origin:
            rc, out, err = self.https(origin, "/whole?bytes=200000")
            self.assertEqual(rc, 0, err)
            self.assertEqual(out.split(b"\r\n\r\n", 2)[2], pattern(200000, seed=5))
            # The upstream's TCP end without a close_notify may be an attacker's cut: the
            # agent's response ends without its last chunk.
            rc, out, err = self.https(origin, "/cut?bytes=200000")
            self.assertIn(rc, (18, 56), err)
            record = self.records(kind="outcome", failed="true")[-1]
            self.assertIn("close_notify", record["error"])

    def test_a_new_upstream_connection_resumes_the_session_of_the_last_one(self):
        # /close ends each upstream connection: every call needs a new one.
        before = len(self.origin.resumed)
        for _ in range(3):
            rc, out, err = self.https(self.origin, "/close")
            self.assertEqual(rc, 0, err)
            self.assertTrue(out.endswith(b"closing"), out)
        # The origin saw the proxy's handshakes: after the first, resumed (the chain was
        # verified once for localhost:port); the agent's own side is another story.
        self.assertEqual(self.origin.resumed[before + 1:], [True] * (len(self.origin.resumed) - before - 1))
        # (the first call may have taken a connection pooled by an earlier test)
        self.assertGreaterEqual(len(self.origin.resumed) - before, 2)

    def test_leaves_are_minted_once_per_host_and_counted(self):
        for _ in range(3):
            rc, _, err = self.https(self.origin, "/hello")
            self.assertEqual(rc, 0, err)
        _, metrics = self.tg.admin("/metrics")
        values = dict(line.rsplit(" ", 1) for line in metrics.decode().splitlines()
                      if line.startswith("tollgate_tls_leaf"))
        self.assertGreaterEqual(float(values["tollgate_tls_leaf_cache_hits_total"]), 2)
        # localhost and the hosts the fronting tests named, never one per connection
        self.assertLessEqual(float(values["tollgate_tls_leaf_signings_total"]), 4)
        self.assertGreaterEqual(float(values["tollgate_tls_leaf_cache_entries"]), 1)

    def test_a_forbidden_call_gets_403_inside_the_tunnel(self):
        before = len(self.origin.requests)
        rc, out, err = self.https(self.origin, "/echo", "-d", '{"x":1}', "-H", "Content-Type: application/json")
        self.assertEqual(rc, 0, err)
        status, headers, body = parse_response(out.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(status, 403)
        doc = json.loads(body)
        self.assertEqual((doc["rule"], doc["reason"], doc["tool"]), ("no-writes", "writes need a ticket", "api.write"))
        self.assertEqual(headers["x-tollgate-decision"], ["halt; rule=no-writes"])
        self.assertEqual(len(self.origin.requests), before)
        self.assertTrue(self.records(method="POST", path="/echo", decision="halt", rule="no-writes"))

    def test_keep_alive_inside_the_tunnel_reuses_one_upstream_connection(self):
        before_conn, before = self.origin.connections, len(self.origin.requests)
        rc, out, err = self.https(self.origin, "/hello", "--next", "--cacert", self.ca, "-H", "X-Agent-Id: agent-1",
                                  self.origin.url("/headers", host="localhost"))
        self.assertEqual(rc, 0, err)
        self.assertIn(b"hello", out)
        self.assertIn(b'"via"', out)
        self.assertEqual(out.count(b"HTTP/1.1 200 Connection established"), 1)  # one tunnel, two calls
        self.assertEqual(len(self.origin.requests) - before, 2)
        self.assertLessEqual(self.origin.connections - before_conn, 1)  # pooled TLS upstream

    def test_python_requests_honours_https_proxy_and_the_bundle(self):
        code = ("import requests,sys; r=requests.get(sys.argv[1], headers={'X-Agent-Id':'agent-py'}, timeout=10); "
                "print(r.status_code, r.text)")
        env = dict(os.environ, HTTPS_PROXY=self.tg.proxy, REQUESTS_CA_BUNDLE=self.ca)
        env.pop("NO_PROXY", None)
        env.pop("no_proxy", None)
        r = subprocess.run(["/usr/bin/python3", "-c", code, self.origin.url("/hello", host="localhost")],
                           capture_output=True, text=True, env=env, timeout=30)
        self.assertEqual(r.stdout.strip(), "200 hello", r.stderr)
        r = subprocess.run(["/usr/bin/python3", "-c", code, self.origin.url("/nothing-here", host="localhost")],
                           capture_output=True, text=True, env=env, timeout=30)
        self.assertTrue(r.stdout.startswith("403 "), r.stdout + r.stderr)
        self.assertEqual(json.loads(r.stdout[4:])["rule"], "default-deny")

    def s_client(self, servername, request):
        r = subprocess.run(["openssl", "s_client", "-quiet", "-proxy", f"127.0.0.1:{self.tg.proxy_port}",
                            "-connect", f"localhost:{self.origin.port}", "-servername", servername,
                            "-CAfile", self.ca, "-verify_return_error"],
                           input=request, capture_output=True, timeout=20)
        return r.stdout

    def test_an_sni_naming_another_host_is_a_halt(self):
        before = len(self.origin.requests)
        out = self.s_client("evil.test", f"GET /hello HTTP/1.1\r\nHost: localhost:{self.origin.port}\r\n"
                                          "X-Agent-Id: agent-1\r\n\r\n".encode())
        status, headers, body = parse_response(out)
        self.assertEqual(status, 403)
        doc = json.loads(body)
        self.assertEqual(doc["rule"], "tls.sni_mismatch")
        self.assertIn("evil.test", doc["reason"])
        self.assertEqual(len(self.origin.requests), before)
        self.assertTrue(self.records(rule="tls.sni_mismatch", decision="halt"))

    def test_the_agent_named_on_the_connect_owns_the_calls_inside_the_tunnel(self):
        # Proxy-Authorization goes on the CONNECT only: the requests inside the tunnel carry
        # no identity of their own and are the CONNECT's agent's.
        with Tollgate({"tls": {"ca_dir": self.ca_dir, "upstream_ca_file": self.pki.ca_cert}},
                      listener={"intercept_tls": True, "identity": {"proxy_basic": True}},
                      policy=POLICY) as tg:
            rc, out, err = curl("-i", "--cacert", self.ca, "--proxy-user", "agent-7:secret",
                                self.origin.url("/hello", host="localhost"), proxy=tg.proxy, env_proxy=True)
            self.assertEqual(rc, 0, err)
            status, _, body = parse_response(out.split(b"\r\n\r\n", 1)[1])
            self.assertEqual((status, body), (200, b"hello"))
            audit_dir = os.path.join(tg.dir, "var", "audit")

            def call():
                for line in read_lines(audit_dir):
                    r = json.loads(line)
                    if r.get("kind") == "call" and r.get("path") == "/hello":
                        return r
            record = wait_for(call, timeout=5, what="the call's audit record")
            self.assertEqual((record["agent"], record["decision"]), ("agent-7", "allow"))

    def test_a_host_naming_another_host_is_a_halt(self):
        before = len(self.origin.requests)
        out = self.s_client("localhost", b"GET /hello HTTP/1.1\r\nHost: evil.test\r\nX-Agent-Id: agent-1\r\n\r\n")
        status, _, body = parse_response(out)
        self.assertEqual(status, 403)
        doc = json.loads(body)
        self.assertEqual(doc["rule"], "tls.host_mismatch")
        self.assertIn("evil.test", doc["reason"])
        # The absolute form may name the tunnel only.
        out = self.s_client("localhost", b"GET https://evil.test/hello HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        self.assertEqual(json.loads(parse_response(out)[2])["rule"], "tls.host_mismatch")
        self.assertEqual(len(self.origin.requests), before)
        self.assertTrue(self.records(rule="tls.host_mismatch", decision="halt"))

    def test_upstream_certificates_that_fail_verification_are_502_with_the_reason(self):
        for origin, why in ((self.expired, "certificate has expired"),
                            (self.self_signed, "self-signed certificate"),
                            (self.wrong_name, "hostname mismatch")):
            with self.subTest(why=why):
                rc, out, err = self.https(origin, "/hello")
                self.assertEqual(rc, 0, err)
                status, _, body = parse_response(out.split(b"\r\n\r\n", 1)[1])
                self.assertEqual(status, 502)
                doc = json.loads(body)
                self.assertEqual(doc["error"], "upstream_tls")
                self.assertIn(why, doc["reason"])
                self.assertEqual(origin.requests, [])  # not one byte of the call reached it
                calls = self.records(kind="call", authority=f"localhost:{origin.port}", decision="allow")
                outcome = self.records(kind="outcome", call_seq=str(calls[-1]["seq"]))[-1]
                self.assertEqual((outcome["status"], outcome["sent"]), ("502", "false"))
                self.assertIn(why, outcome["error"])

    def test_passthrough_hosts_are_tunnelled_blind(self):
        # 127.0.0.1 is in the passthrough list: the agent sees the origin's own certificate.
        rc, out, err = self.https(self.origin, "/hello", ca=self.pki.ca_cert, host="127.0.0.1")
        self.assertEqual(rc, 0, err)
        self.assertTrue(out.endswith(b"hello"))
        self.assertTrue(self.records(method="CONNECT", rule="allow-blind", authority=f"127.0.0.1:{self.origin.port}"))
        # With the Tollgate CA alone the agent cannot verify it: nobody intercepted.
        rc, _, err = self.https(self.origin, "/hello", host="127.0.0.1")
        self.assertEqual(rc, 60, err)

    def test_an_agent_that_does_not_trust_the_ca_fails_its_handshake_and_nothing_is_sent(self):
        before = len(self.origin.requests)
        rc, _, err = self.https(self.origin, "/hello", ca=self.pki.ca_cert)
        self.assertEqual(rc, 60, err)  # curl: peer certificate cannot be authenticated
        self.assertEqual(len(self.origin.requests), before)
        _, metrics = self.tg.admin("/metrics")
        self.assertIn('tollgate_tls_handshake_failures_total{side="agent"}', metrics.decode())
        rc, out, err = self.https(self.origin, "/hello")  # and the sidecar serves on
        self.assertEqual(rc, 0, err)


class TlsConfigTest(unittest.TestCase):
    def init_ca(self, d, *args):
        """A local CA in d/ca made by `tollgate certs init` with args; its directory."""
        ca_dir = os.path.join(d, "ca")
        r = subprocess.run([BIN, "certs", "init", ca_dir, *args], capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        return ca_dir

    def test_intercept_without_a_ca_stops_startup_with_the_key_and_the_fix(self):
        d = tempfile.mkdtemp(prefix="tollgate-tls-")
        try:
            path = os.path.join(d, "t.yaml")
            with open(path, "w") as f:
                f.write("listeners: [{name: e, address: '127.0.0.1:0', intercept_tls: true}]\n"
                        "tls: {ca_dir: nowhere}\nhosts: {allow: ['*']}\n")
            r = subprocess.run([BIN, "run", "-c", path], capture_output=True, text=True, timeout=10)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("tls.ca_dir", r.stderr)
            self.assertIn("tollgate certs init", r.stderr)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_upstreams_are_never_trusted_through_the_sidecars_own_ca(self):
        """The agents are told to trust the local CA (SSL_CERT_FILE, the Debian store), and
        a sidecar sharing their environment used to trust it for upstreams too: a server
        with a leaf of that CA passed verification. The sidecar's trust is the system's
        store or tls.upstream_ca_file, never SSL_CERT_FILE/SSL_CERT_DIR, and a chain through
        its own CA is refused wherever the trust came from."""
        d = tempfile.mkdtemp(prefix="tollgate-tls-")
        try:
            ca_dir = self.init_ca(d)
            ca = os.path.join(ca_dir, "ca.crt")
            key = os.path.join(d, "leaf.key")
            r = subprocess.run([BIN, "certs", "mint", ca_dir, "localhost", "--key-out", key],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stderr)
            cert = os.path.join(d, "leaf.crt")
            with open(cert, "w") as f:
                f.write(r.stdout)
            with HttpOrigin(tls=server_context(cert, key)) as origin:
                for how, overrides, env in (
                        ("SSL_CERT_FILE", {}, {"SSL_CERT_FILE": ca}),
                        ("SSL_CERT_DIR", {}, {"SSL_CERT_DIR": ca_dir, "SSL_CERT_FILE": "/nonexistent"}),
                        ("upstream_ca_file", {"upstream_ca_file": ca}, {}),
                ):
                    with self.subTest(how=how):
                        if how == "SSL_CERT_DIR":  # a hashed directory holding the CA
                            subprocess.run(["openssl", "rehash", ca_dir], capture_output=True, timeout=30)
                        with Tollgate({"tls": {"ca_dir": ca_dir, **overrides}},
                                      listener={"intercept_tls": True}, env=env) as tg:
                            rc, out, err = curl("-i", "--cacert", ca, origin.url("/hello", host="localhost"),
                                                proxy=tg.proxy, env_proxy=True)
                            self.assertEqual(rc, 0, err)
                            status, _, body = parse_response(out.split(b"\r\n\r\n", 1)[1])
                            self.assertEqual(status, 502, out)
                            reply = json.loads(body)
                            self.assertEqual(reply["error"], "upstream_tls")
                            if how == "upstream_ca_file":
                                self.assertIn("own CA", reply["reason"])
                            else:
                                # Refused for want of a trusted issuer: the environment's
                                # store was never read (the own-CA check, the second line
                                # of defence, gives a reply of its own).
                                self.assertIn("unable to get local issuer certificate", reply["reason"])
                                self.assertNotIn("own CA", reply["reason"])
                self.assertEqual(origin.requests, [])
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_an_sni_the_ca_may_not_sign_for_is_a_recorded_halt(self):
        # Domain fronting with a name outside the CA's constraints: no leaf can be presented,
        # the handshake fails, and the attempt is still in the audit stream.
        d = tempfile.mkdtemp(prefix="tollgate-tls-")
        try:
            ca_dir = self.init_ca(d, "--permit", "example.com")
            with Tollgate({"tls": {"ca_dir": ca_dir}}, listener={"intercept_tls": True}) as tg:
                r = subprocess.run(["openssl", "s_client", "-quiet", "-proxy", f"127.0.0.1:{tg.proxy_port}",
                                    "-connect", "api.example.com:443", "-servername", "evil.other",
                                    "-CAfile", os.path.join(ca_dir, "ca.crt")],
                                   input=b"", capture_output=True, timeout=20)
                self.assertNotEqual(r.returncode, 0)  # no TLS for that name
                audit_dir = os.path.join(tg.dir, "var", "audit")

                def halts():
                    return [json.loads(l) for l in read_lines(audit_dir)
                            if '"tls.sni_mismatch"' in l]
                found = wait_for(halts, timeout=5, what="the fronting attempt's halt record")
                self.assertEqual(found[0]["decision"], "halt")
                self.assertEqual(found[0]["authority"], "api.example.com:443")
                self.assertIn("evil.other", found[0]["reason"])
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_a_ca_key_others_can_read_is_warned_about(self):
        d = tempfile.mkdtemp(prefix="tollgate-tls-")
        try:
            ca_dir = self.init_ca(d)
            warning = "the local CA's private key is readable by others than its owner"
            with Tollgate({"tls": {"ca_dir": ca_dir}}, listener={"intercept_tls": True}) as tg:
                self.assertFalse(any(l.get("msg") == warning for l in tg.logs()))
            os.chmod(os.path.join(ca_dir, "ca.key"), 0o644)  # a secret volume's default mode
            with Tollgate({"tls": {"ca_dir": ca_dir}}, listener={"intercept_tls": True}) as tg:
                found = [l for l in tg.logs() if l.get("msg") == warning]
                self.assertEqual(len(found), 1, tg.logs())
                self.assertEqual(found[0]["mode"], "0644")
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_a_host_the_ca_may_not_sign_for_is_refused_before_any_tls(self):
        d = tempfile.mkdtemp(prefix="tollgate-tls-")
        try:
            ca_dir = self.init_ca(d, "--permit", "example.com")
            with Tollgate({"tls": {"ca_dir": ca_dir}}, listener={"intercept_tls": True}) as tg:
                out, _ = raw_exchange(tg.proxy_port, b"CONNECT localhost:9 HTTP/1.1\r\nHost: localhost:9\r\n\r\n")
                status, headers, body = parse_response(out)
                self.assertEqual(status, 403, out)
                doc = json.loads(body)
                self.assertEqual(doc["rule"], "tls.intercept")
                self.assertIn("name constraints", doc["reason"])
        finally:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
