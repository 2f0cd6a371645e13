"""The TLS-terminating reverse listener (issue 6, `kind: reverse`) through the real binary:
certificates chosen by SNI, routes by host and path prefix to http:// and https://
upstreams, agent identity from an mTLS client certificate (subject CN or SAN URI) or from a
bearer token stored hashed; the same policy and audit as the forward path."""
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import unittest

from audit_log import read_lines
from tls_fixtures import TestPki, server_context
from tollgate_harness import BIN, HttpOrigin, Tollgate, closed_port, curl, parse_response, raw_exchange, wait_for

POLICY = """
apiVersion: tollgate/v1
kind: Policy
metadata: {name: reverse}
tools:
  - {name: tickets.read, match: {host: tickets.test, methods: [GET], paths: ["/hello", "/headers", "/v1/**", "/down/**", "/meta/**"]}, class: read}
  - {name: kb.read, match: {host: kb.test, methods: [GET], paths: ["/hello", "/headers"]}, class: read}
agents:
  - {id: "*"}
rules:
  - {id: triage-reads, effect: allow, match: {tool: tickets.read, agent: "spiffe://swarm/triage"}}
  - {id: cn-reads, effect: allow, match: {tool: kb.read, agent: "agent-cn"}}
  - {id: bearer-reads, effect: allow, match: {tool: "*", agent: "agent-bearer"}}
"""

TOKEN = "tool-token-123"


class ReverseTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="tollgate-rev-")
        cls.servers = TestPki(os.path.join(cls.tmp, "public"), name="public CA")
        cls.certs = {n: cls.servers.leaf(n, names=(n + ".test",), ips=()) for n in ("tickets", "kb")}
        cls.agents = TestPki(os.path.join(cls.tmp, "agents"), name="agents CA")
        cls.triage = cls.agents.client("ignored-cn", uris=("spiffe://swarm/triage",))
        cls.by_cn = cls.agents.client("agent-cn")
        cls.stranger = TestPki(os.path.join(cls.tmp, "stranger"), name="stranger CA").client("agent-cn")
        cls.upstreams = TestPki(os.path.join(cls.tmp, "upstream"), name="upstream CA")
        cls.plain = HttpOrigin().__enter__()
        cls.secure = HttpOrigin(tls=server_context(*cls.upstreams.valid())).__enter__()
        cls.down_port = closed_port()
        cls.rogue = HttpOrigin(tls=server_context(*TestPki(os.path.join(cls.tmp, "rogue"), name="rogue CA").valid())).__enter__()

        def listener(name, **extra):
            l = {"name": name, "kind": "reverse", "address": "127.0.0.1:0",
                 "routes": [{"host": "tickets.test", "path_prefix": "/v1/", "upstream": f"https://localhost:{cls.secure.port}"},
                            # Upstreams that fail: nothing listens; an address egress.deny_addresses
                            # forbids; a certificate for another name.
                            {"host": "tickets.test", "path_prefix": "/down/", "upstream": f"http://127.0.0.1:{cls.down_port}"},
                            {"host": "tickets.test", "path_prefix": "/meta/", "upstream": f"http://127.0.0.2:{cls.plain.port}"},
                            {"host": "kb.test", "path_prefix": "/v1/", "upstream": f"https://localhost:{cls.rogue.port}"},
                            {"host": "tickets.test", "upstream": f"http://127.0.0.1:{cls.plain.port}"},
                            {"host": "kb.test", "upstream": f"http://127.0.0.1:{cls.plain.port}"}]}
            l.update(extra)
            return l
        certs = [{"cert": cls.certs[n].cert, "key": cls.certs[n].key} for n in ("tickets", "kb")]
        listeners = [
            listener("egress", tls={"certificates": certs, "client_ca": cls.agents.ca_cert},
                     identity={"mtls": "san_uri"}),
            listener("cn", tls={"certificates": certs, "client_ca": cls.agents.ca_cert}, identity={"mtls": "subject_cn"}),
            listener("bearer", tls={"certificates": certs},
                     identity={"bearer": {"sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest(): "agent-bearer"}}),
        ]
        cls.tg = Tollgate({"tls": {"upstream_ca_file": cls.upstreams.ca_cert}, "listeners": listeners,
                           "egress": {"deny_addresses": ["127.0.0.2/32"]}},
                          policy=POLICY)
        cls.tg.__enter__()
        cls.ports = {l["listener"]: int(l["address"].rsplit(":", 1)[1]) for l in cls.tg.logs("listening")}
        cls.audit_dir = os.path.join(cls.tg.dir, "var", "audit")

    @classmethod
    def tearDownClass(cls):
        cls.tg.__exit__(None, None, None)
        cls.plain.__exit__(None, None, None)
        cls.secure.__exit__(None, None, None)
        cls.rogue.__exit__(None, None, None)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def get(self, listener, host, path, *args, cert=None):
        port = self.ports[listener]
        extra = ["--resolve", f"{host}:{port}:127.0.0.1", "--cacert", self.servers.ca_cert]
        if cert:
            extra += ["--cert", cert[0], "--key", cert[1]]
        rc, out, err = curl("-i", *extra, *args, f"https://{host}:{port}{path}")
        return rc, out, err

    def records(self, **match):
        def find():
            return [r for r in map(json.loads, read_lines(self.audit_dir))
                    if all(r.get(k) == v for k, v in match.items())]
        return wait_for(find, timeout=5, what=f"audit records {match}")

    def test_an_mtls_agent_is_named_by_its_spiffe_uri_and_routed_by_path(self):
        before_plain, before_secure = len(self.plain.requests), len(self.secure.requests)
        rc, out, err = self.get("egress", "tickets.test", "/hello", cert=self.triage)
        self.assertEqual(rc, 0, err)
        self.assertEqual(parse_response(out)[::2], (200, b"hello"))
        self.assertEqual(len(self.plain.requests), before_plain + 1)
        # /v1/ goes to the https:// upstream, verified against its CA.
        rc, out, err = self.get("egress", "tickets.test", "/v1/../v1/headers", "--path-as-is",
                                cert=self.triage)
        self.assertEqual(rc, 0, err)
        status, _, body = parse_response(out)
        self.assertEqual(status, 404)  # the upstream's own answer for /v1/headers
        self.assertEqual(len(self.secure.requests), before_secure + 1)
        self.assertEqual(self.secure.requests[-1][1], "/v1/headers")  # the path the policy judged
        self.assertEqual(self.secure.requests[-1][2]["host"], [f"localhost:{self.secure.port}"])
        rec = self.records(agent="spiffe://swarm/triage", path="/hello", decision="allow")[-1]
        self.assertEqual((rec["tool"], rec["rule"], rec["authority"]), ("tickets.read", "triage-reads", f"tickets.test:{self.ports['egress']}"))

    def test_the_certificate_is_chosen_by_sni(self):
        for host in ("tickets.test", "kb.test"):
            r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{self.ports['bearer']}",
                                "-servername", host, "-CAfile", self.servers.ca_cert, "-verify_hostname", host,
                                "-verify_return_error"], input=b"", capture_output=True, timeout=20)
            self.assertIn(b"Verify return code: 0 (ok)", r.stdout, r.stderr)
            self.assertIn(f"CN = {host}".encode(), r.stdout)

    def test_a_client_without_a_certificate_cannot_connect_and_a_foreign_one_is_refused(self):
        before = len(self.plain.requests)
        rc, out, err = self.get("egress", "tickets.test", "/hello")
        self.assertNotEqual(rc, 0)  # the handshake is refused: certificate required
        self.assertIn("certificate required", err)
        rc, out, err = self.get("cn", "kb.test", "/hello", cert=self.stranger)
        self.assertNotEqual(rc, 0)  # signed by a CA the listener does not trust
        self.assertIn("unknown ca", err)
        self.assertEqual(len(self.plain.requests), before)  # neither reached the upstream
        rc, out, err = self.get("cn", "kb.test", "/hello", cert=self.by_cn)
        self.assertEqual(rc, 0, err)
        self.assertEqual(parse_response(out)[::2], (200, b"hello"))
        self.assertTrue(self.records(agent="agent-cn", rule="cn-reads", decision="allow"))

    def test_an_agent_is_only_allowed_what_the_policy_gives_it(self):
        before = len(self.plain.requests)
        rc, out, err = self.get("egress", "kb.test", "/hello", cert=self.triage)
        self.assertEqual(rc, 0, err)
        status, headers, body = parse_response(out)
        self.assertEqual(status, 403)
        self.assertEqual(json.loads(body)["rule"], "default-deny")
        self.assertEqual(len(self.plain.requests), before)

    def test_a_bearer_token_names_the_agent_and_is_not_forwarded(self):
        rc, out, err = self.get("bearer", "kb.test", "/headers", "-H", f"Authorization: Bearer {TOKEN}")
        self.assertEqual(rc, 0, err)
        status, _, body = parse_response(out)
        self.assertEqual(status, 200)
        self.assertNotIn("authorization", json.loads(body))
        self.assertTrue(self.records(agent="agent-bearer", path="/headers", decision="allow"))
        rc, out, err = self.get("bearer", "kb.test", "/headers", "-H", "Authorization: Bearer wrong")
        self.assertEqual(parse_response(out)[0], 403)

    def test_a_failing_upstream_is_not_named_to_the_client(self):
        # The client never named the route's upstream: its 502/403 says what failed, not the
        # internal name, address or certificate; the outcome record and the log say why.
        cases = [("tickets.test", "/down/x", 502, "upstream_unavailable", "the route's upstream did not answer",
                  "connect: connection refused", str(self.down_port)),
                 ("tickets.test", "/meta/x", 403, "address_denied",
                  "the route's upstream is at an address egress.deny_addresses forbids", "127.0.0.2", "127.0.0.2"),
                 ("kb.test", "/v1/x", 502, "upstream_tls", "TLS to the route's upstream failed",
                  "certificate verify failed", str(self.rogue.port))]
        for host, path, status, error, told, cause, internal in cases:
            with self.subTest(path=path):
                rc, out, err = self.get("bearer", host, path, "-H", f"Authorization: Bearer {TOKEN}")
                self.assertEqual(rc, 0, err)
                got, _, body = parse_response(out)
                self.assertEqual((got, body[:1]), (status, b"{"), out)
                doc = json.loads(body)
                self.assertEqual((got, doc["error"]), (status, error), body)
                self.assertEqual(doc["reason"], told + " (the call's outcome record has the cause)")
                self.assertEqual(doc["upstream"], f"{host}:{self.ports['bearer']}")  # the name the client used
                self.assertNotIn(internal, body.decode())
                call = self.records(agent="agent-bearer", path=path, decision="allow")[-1]
                outcome = self.records(kind="outcome", call_seq=str(call["seq"]))[0]
                self.assertIn(cause, outcome["error"])
                logged = wait_for(lambda: [l for l in self.tg.logs("request") if l.get("audit_seq") == call["seq"]],
                                  timeout=5, what="the request's log line")
                self.assertIn(cause, logged[0]["error"])

    def test_a_host_that_disagrees_with_the_sni_is_a_halt_and_unrouted_paths_are_404(self):
        rc, out, err = self.get("bearer", "kb.test", "/hello", "-H", "Host: tickets.test",
                                "-H", f"Authorization: Bearer {TOKEN}")
        self.assertEqual(rc, 0, err)
        status, _, body = parse_response(out)
        self.assertEqual((status, json.loads(body)["rule"]), (403, "tls.host_mismatch"))
        rc, out, err = self.get("bearer", "other.test", "/hello", "-k", "-H", f"Authorization: Bearer {TOKEN}")
        status, _, body = parse_response(out)
        self.assertEqual((status, json.loads(body)["error"]), (404, "no_route"))
        # Recorded against the agent that sent it, not as anonymous.
        self.assertTrue(self.records(rule="http.no_route", decision="halt", agent="agent-bearer"))

    def test_a_request_the_parser_refuses_is_recorded_against_the_certificates_agent(self):
        # Refused before its head is complete (Content-Length beside chunked): the agent is
        # the connection's, known from its certificate.
        rc, out, err = self.get("cn", "kb.test", "/smuggle", "-H", "Transfer-Encoding: chunked",
                                "-H", "Content-Length: 3", "-d", "abc", cert=self.by_cn)
        status, _, body = parse_response(out)
        self.assertEqual(status, 400, out)
        seq = json.loads(body)["audit_seq"]
        rec = self.records(seq=seq)[0]
        self.assertEqual((rec["agent"], rec["decision"]), ("agent-cn", "halt"))


    def test_a_server_name_with_its_trailing_dot_is_the_same_host(self):
        # "kb.test." is kb.test as a name (fully qualified): not fronting. And the
        # scheme and the token of an Authorization may be apart by more than one space.
        request = (f"GET /hello HTTP/1.1\r\nHost: kb.test\r\nAuthorization: Bearer   {TOKEN}\r\n"
                   "Connection: close\r\n\r\n").encode()
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{self.ports['bearer']}",
                            "-servername", "kb.test.", "-quiet", "-ign_eof"],
                           input=request, capture_output=True, timeout=20)
        head = r.stdout.split(b"\r\n", 1)[0]
        self.assertEqual(head, b"HTTP/1.1 200 OK", r.stdout + r.stderr)
        self.assertTrue(r.stdout.endswith(b"hello"), r.stdout)


class ReverseConfigTest(unittest.TestCase):
    def check(self, listener, expect):
        """`expect["msg"]` is in what `tollgate run` prints before it exits with 2."""
        d = tempfile.mkdtemp(prefix="tollgate-rev-")
        try:
            path = os.path.join(d, "t.yaml")
            with open(path, "w") as f:
                json.dump({"listeners": [listener], "hosts": {"allow": ["*"]}}, f, indent=1)
            r = subprocess.run([BIN, "run", "-c", path], capture_output=True, text=True, timeout=10)
            self.assertEqual(r.returncode, 2, r.stderr)  # a config error, like every other
            self.assertIn(expect["msg"], r.stderr)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_bad_reverse_configs_stop_startup_with_the_key(self):
        base = {"name": "r", "kind": "reverse", "address": "127.0.0.1:0"}
        self.check(base, {"msg": "routes: a reverse listener needs routes"})
        self.check(dict(base, routes=[{"upstream": "ftp://x"}]), {"msg": "expected http://host:port or https://host:port"})
        self.check(dict(base, routes=[{"upstream": "http://x:1"}], identity={"mtls": "san_uri"}),
                   {"msg": "identity.mtls: needs tls.client_ca"})
        self.check(dict(base, routes=[{"upstream": "http://x:1"}], tls={"certificates": [{"cert": "no.pem", "key": "no.key"}]}),
                   {"msg": "t.yaml:14:6: listeners[0].tls.certificates[0]: cannot load"})  # where it is
        self.check({"name": "f", "address": "127.0.0.1:0", "routes": [{"upstream": "http://x:1"}]},
                   {"msg": "only for reverse listeners"})
        # A client certificate cannot be required without a CA to check it against.
        self.check(dict(base, routes=[{"upstream": "http://x:1"}],
                        tls={"certificates": [{"cert": "no.pem", "key": "no.key"}], "require_client_cert": True}),
                   {"msg": "tls.require_client_cert: needs tls.client_ca"})


class ReverseRoutingTest(unittest.TestCase):
    """A plain-HTTP reverse listener on hosts: lists (no policies): only its routes scope
    what reaches the upstreams, so route choice, paths and Host ports are checked here."""

    def setUp(self):
        self.mine = HttpOrigin().__enter__()
        self.catch_all = HttpOrigin().__enter__()
        routes = [
            # Listed first, with the longer prefix: it must still not take tickets.example.
            {"host": "*", "path_prefix": "/public/very/long/", "upstream": f"http://127.0.0.1:{self.catch_all.port}"},
            {"host": "tickets.example", "path_prefix": "/public/", "upstream": f"http://127.0.0.1:{self.mine.port}"},
        ]
        self.tg = Tollgate({"hosts": {"allow": ["tickets.example", "other.example"]},
                            "listeners": [{"name": "egress", "kind": "reverse", "address": "127.0.0.1:0",
                                           "routes": routes}]}).__enter__()
        self.port = self.tg.proxy_port

    def tearDown(self):
        self.tg.__exit__(None, None, None)
        self.mine.__exit__(None, None, None)
        self.catch_all.__exit__(None, None, None)

    def send(self, host, path):
        out, _ = raw_exchange(self.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return parse_response(out)

    def test_the_host_is_chosen_before_the_longest_prefix(self):
        self.send("tickets.example", "/public/very/long/x")
        self.send("other.example", "/public/very/long/x")
        self.assertEqual([r[1] for r in self.mine.requests], ["/public/very/long/x"])
        self.assertEqual([r[1] for r in self.catch_all.requests], ["/public/very/long/x"])
        # A path of tickets.example outside its routes is not handed to the * route.
        status, _, body = self.send("tickets.example", "/private/very/long/x")
        self.assertEqual(status, 404, body)
        # A path parameter does not take a call out of the route servers that strip them
        # (Tomcat, Spring) would serve it from; it is sent on as it came.
        self.send("other.example", "/public;v=1/very/long/x")
        self.assertEqual([r[1] for r in self.catch_all.requests][1:], ["/public;v=1/very/long/x"])
        status, _, body = self.send("tickets.example", "/private;x/very/long/x")
        self.assertEqual(status, 404, body)

    def test_a_path_that_cannot_be_normalised_does_not_leave_its_route(self):
        for path in ("/public/../admin/%FF", "/public/..%2Fadmin", "/public/../admin%00"):
            status, _, body = self.send("tickets.example", path)
            self.assertEqual(status, 400, (path, body))
            self.assertIn("cannot be normalised", json.loads(body)["reason"])
        self.assertEqual(self.mine.requests, [])
        self.assertEqual(self.catch_all.requests, [])
        # The normalised ones still go, with the path the route was chosen for.
        self.send("tickets.example", "/public/a/../b")
        self.assertEqual([r[1] for r in self.mine.requests], ["/public/b"])

    def test_a_port_in_host_is_not_trusted(self):
        for host in ("tickets.example", "tickets.example:1", f"tickets.example:{self.port}"):
            self.send(host, "/public/x")
        lines = wait_for(lambda: (lambda ls: ls if len(ls) == 3 else None)(
            [json.loads(l) for l in read_lines(os.path.join(self.tg.dir, "var", "audit"))
             if '"kind":"call"' in l and "/public/x" in l]), timeout=5, what="three call records")
        self.assertEqual({r["authority"] for r in lines}, {f"tickets.example:{self.port}"})


if __name__ == "__main__":
    unittest.main()
