"""The policy engine through the real proxy: each decision kind with curl, approvals via
the admin API, JSON params, MCP over SSE, and reloads (valid, invalid, on file change)
while traffic flows."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

from audit_log import segment_text
from tollgate_harness import BIN, HttpOrigin, Tollgate, curl, parse_response, wait_for

TOKEN = "s3cret-admin-token"

POLICY = """
apiVersion: tollgate/v1
kind: Policy
metadata: {name: integration}
tools:
  - {name: notes.read, match: {host: 127.0.0.1, methods: [GET], paths: ["/hello", "/headers"]}, class: read}
  - {name: notes.write, match: {host: 127.0.0.1, methods: [POST], paths: ["/echo"]}, class: write}
  - {name: notes.delete, match: {host: 127.0.0.1, methods: [DELETE], paths: ["/hello"]}, class: delete}
  - {name: pay, match: {host: 127.0.0.1, methods: [POST], paths: ["/sink"]}, class: write}
  - {name: crm.lookup, match: {host: 127.0.0.1, methods: [POST], paths: ["/mcp"], mcp_tools: [lookup]}, class: read}
agents:
  - {id: "agent-*"}
rules:
  - {id: allow-reads, effect: allow, match: {class: read, agent: "agent-*"}}
  - {id: allow-writes, effect: allow, match: {tool: notes.write, agent: "agent-*"}}
  - {id: slow-agent, effect: allow, match: {tool: notes.read, agent: agent-slow}, rate_limit: {requests: 2, per: 1h}}
  - {id: pay-bound, effect: allow, match: {tool: pay}, when: {params.amount: {lte: 500}}}
  - {id: deletes-need-a-human, effect: approve, match: {tool: notes.delete}}
  - {id: no-evil, effect: halt, match: {agent: agent-evil}, reason: "agent-evil is banned"}
"""


class PolicyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.origin = HttpOrigin().__enter__()
        cls.tg = Tollgate({"admin": {"address": "127.0.0.1:0",
                                     "tokens": ["sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()]}},
                          policy=POLICY)
        cls.policy = os.path.join(cls.tg.dir, "policy.yaml")
        cls.tg.__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.tg.__exit__(None, None, None)
        cls.origin.__exit__(None, None, None)

    def call(self, agent, *args, url="/hello"):
        rc, out, err = curl("-i", "-H", f"X-Agent-Id: {agent}", *args, self.origin.url(url), proxy=self.tg.proxy)
        self.assertEqual(rc, 0, err)
        return parse_response(out)

    def test_allow_and_default_deny(self):
        status, _, body = self.call("agent-1")
        self.assertEqual((status, body), (200, b"hello"))
        status, headers, body = self.call("agent-1", url="/other")
        self.assertEqual(status, 403)
        doc = json.loads(body)
        self.assertEqual(doc["rule"], "default-deny")
        self.assertEqual(headers["x-tollgate-decision"], ["halt; rule=default-deny"])

    def test_halt_names_rule_reason_agent_tool(self):
        status, headers, body = self.call("agent-evil")
        self.assertEqual(status, 403)
        doc = json.loads(body)
        self.assertEqual((doc["rule"], doc["reason"], doc["agent"], doc["tool"]),
                         ("no-evil", "agent-evil is banned", "agent-evil", "notes.read"))
        _, metrics = self.tg.admin("/metrics")
        self.assertRegex(metrics.decode(), r'tollgate_halts_total\{reason="rule"\} [1-9]')
        self.assertIn("tollgate_policy_evaluation_seconds_bucket", metrics.decode())
        # With admin.tokens set, reading what the calls were needs the token: the admin
        # listener is reachable by the agents themselves. Probes and metrics stay open.
        code, body = self.tg.admin("/v1/audit/tail?n=5")
        self.assertEqual(code, 401, body)
        self.assertEqual(json.loads(body)["error"], "unauthorized")
        self.assertEqual(self.tg.admin("/v1/audit/tail?n=5", token="wrong")[0], 401)
        self.assertEqual(self.tg.admin("/v1/approvals")[0], 401)
        self.assertEqual(self.tg.admin("/healthz")[0], 200)
        self.assertEqual(self.tg.admin("/v1/pools")[0], 200)
        code, tail = self.tg.admin("/v1/audit/tail?n=5", token=TOKEN)
        self.assertEqual(code, 200, tail)
        record = [json.loads(l) for l in tail.splitlines() if json.loads(l)["seq"] == doc["audit_seq"]][0]
        self.assertTrue(record["policy_digest"].startswith("sha256:"))

    def test_steps_are_counted_by_agent_class_and_decision(self):
        def steps(agent_class, decision):
            _, metrics = self.tg.admin("/metrics")
            m = re.search(r'tollgate_agent_steps_total\{agent_class="%s",decision="%s"\} (\d+)'
                          % (re.escape(agent_class), decision), metrics.decode())
            return int(m.group(1)) if m else 0
        allowed, halted, unlisted = steps("agent-*", "allow"), steps("agent-*", "halt"), steps("unlisted", "halt")
        self.assertEqual(self.call("agent-steps")[0], 200)
        self.assertEqual(self.call("agent-steps")[0], 200)
        self.assertEqual(self.call("agent-evil")[0], 403)
        self.assertEqual(self.call("stranger")[0], 403)  # no agents: entry, no rule for it
        self.assertEqual(steps("agent-*", "allow"), allowed + 2)
        self.assertEqual(steps("agent-*", "halt"), halted + 1)
        self.assertEqual(steps("unlisted", "halt"), unlisted + 1)

    def test_throttle_answers_429_with_retry_after(self):
        statuses = [self.call("agent-slow")[0] for _ in range(2)]
        self.assertEqual(statuses, [200, 200])
        status, headers, body = self.call("agent-slow")
        self.assertEqual(status, 429)
        self.assertGreaterEqual(int(headers["retry-after"][0]), 1)
        self.assertEqual(json.loads(body)["rule"], "slow-agent")

    def test_params_bound_reads_the_json_body(self):
        before = len(self.origin.requests)
        status, _, body = self.call("agent-1", "-H", "Content-Type: application/json", "--data", '{"amount": 100}', url="/sink")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["bytes"], len('{"amount": 100}'))  # the body still reached the origin whole
        status, _, body = self.call("agent-1", "-H", "Content-Type: application/json", "--data", '{"amount": 1000}', url="/sink")
        self.assertEqual(status, 403)
        doc = json.loads(body)
        self.assertEqual(doc["rule"], "default-deny")
        self.assertEqual(len(self.origin.requests), before + 1)
        # Both records carry the hash of the params the policy read.
        # A halt is answered at once; its record is on disk a moment later.
        wait_for(lambda: doc["audit_seq"] in self.records(), timeout=5, what="the halt's record")
        recs = self.records()
        halted = recs[doc["audit_seq"]]
        self.assertEqual(halted["params_sha256"], "sha256:" + hashlib.sha256(b'{"amount": 1000}').hexdigest())
        allowed = [r for r in recs.values() if r.get("path") == "/sink" and r.get("decision") == "allow"]
        self.assertEqual(allowed[-1]["params_sha256"], "sha256:" + hashlib.sha256(b'{"amount": 100}').hexdigest())
        self.assertNotIn("params_sha256", [r for r in recs.values() if r.get("path") == "/hello"][-1])

    def records(self):
        """The sidecar's audit records by seq."""
        recs = {}
        for seg in sorted(os.listdir(os.path.join(self.tg.dir, "var", "audit"))):
            if seg.startswith("segment-"):
                for line in segment_text(os.path.join(self.tg.dir, "var", "audit", seg)).splitlines():
                    r = json.loads(line)
                    recs[r["seq"]] = r
        return recs

    def test_approval_flow(self):
        status, headers, body = self.call("agent-2", "-X", "DELETE")
        self.assertEqual(status, 403)
        doc = json.loads(body)
        self.assertEqual(doc["error"], "approval_required")
        approval = doc["approval_id"]
        self.assertIn(f"approval={approval}", headers["x-tollgate-decision"][0])
        code, listing = self.tg.admin("/v1/approvals", token=TOKEN)
        self.assertEqual(code, 200)
        pending = [a for a in json.loads(listing) if a["id"] == approval]
        self.assertEqual(pending[0]["state"], "pending")
        # Without the token: refused; with it: approved; then the same call goes through.
        rc, out, _ = curl("-i", "-X", "POST", f"http://127.0.0.1:{self.tg.admin_port}/v1/approvals/{approval}/approve")
        self.assertEqual(parse_response(out)[0], 401)
        # (the scheme in any case, RFC 9110 11.1; spaces after it are not the token's)
        rc, out, _ = curl("-i", "-X", "POST", "-H", f"Authorization: bearer   {TOKEN}",
                          f"http://127.0.0.1:{self.tg.admin_port}/v1/approvals/{approval}/approve")
        self.assertEqual(parse_response(out)[0], 200)
        # The human decision is in the audit stream, with the approver's token fingerprint.
        approvals = [r for r in self.records().values() if r["kind"] == "approval" and r["approval_id"] == approval]
        self.assertEqual(len(approvals), 1)
        self.assertEqual(approvals[0]["state"], "approved")
        self.assertEqual(approvals[0]["approver"], "sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:16])
        self.assertEqual((approvals[0]["agent"], approvals[0]["method"]), ("agent-2", "DELETE"))
        status, _, body = self.call("agent-2", "-X", "DELETE")
        self.assertEqual((status, body), (200, b"hello"))  # forwarded now
        # Another agent's identical call is a different call: it needs its own approval.
        self.assertEqual(self.call("agent-3", "-X", "DELETE")[0], 403)

    def test_mcp_tools_call_with_an_sse_answer(self):
        body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"lookup","arguments":{"id":7}}}'
        status, headers, out = self.call("agent-1", "-H", "Content-Type: application/json", "--data", body, url="/mcp")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], ["text/event-stream"])
        self.assertEqual(out.count(b"event: message"), 2)
        hidden = ('[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"lookup"}},'
                  '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"erase"}}]')
        status, _, out = self.call("agent-1", "-H", "Content-Type: application/json", "--data", hidden, url="/mcp")
        self.assertEqual(status, 403)
        doc = json.loads(out)
        self.assertEqual(doc["rule"], "default-deny")
        self.assertIn("mcp:erase", doc["reason"])  # halted for the call hidden in the batch
        # The same batch of declared calls only: allowed, so the halt above was the batch's.
        both = hidden.replace('"name":"erase"', '"name":"lookup"')
        status, _, out = self.call("agent-1", "-H", "Content-Type: application/json", "--data", both, url="/mcp")
        self.assertEqual(status, 200, out)

    def test_reload_valid_invalid_and_on_file_change_under_load(self):
        stop = threading.Event()
        results = []

        def load():
            while not stop.is_set() and len(results) < 2000:
                rc, out, _ = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "X-Agent-Id: agent-9",
                                  self.origin.url("/hello"), proxy=self.tg.proxy, timeout=10)
                results.append((rc, out))

        t = threading.Thread(target=load)
        t.start()
        try:
            # Invalid: rejected, the last good set stays.
            with open(self.policy, "w") as f:
                f.write(POLICY.replace("effect: allow, match: {class: read", "effect: maybe, match: {class: read"))
            rc, out, _ = curl("-s", "-i", "-X", "POST", "-H", f"Authorization: Bearer {TOKEN}",
                              f"http://127.0.0.1:{self.tg.admin_port}/v1/reload")
            status, _, body = parse_response(out)
            self.assertEqual(status, 500)
            self.assertIn("policy.yaml:", json.loads(body)["reason"])
            self.assertEqual(self.call("agent-1")[0], 200)
            _, metrics = self.tg.admin("/metrics")
            self.assertRegex(metrics.decode(), r'tollgate_reloads_total\{result="error"\} [1-9]')
            # Valid, picked up from the file change: agent-9 is banned from now on.
            with open(self.policy, "w") as f:
                f.write(POLICY + '  - {id: ban-9, effect: halt, match: {agent: agent-9}}\n')
            wait_for(lambda: self.call("agent-9")[0] == 403, timeout=5, what="the reloaded policy")
            # SIGHUP with the original set: allowed again.
            with open(self.policy, "w") as f:
                f.write(POLICY)
            self.tg.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: self.call("agent-9")[0] == 200, timeout=5, what="the policy after SIGHUP")
        finally:
            stop.set()
            t.join(timeout=30)
        self.assertGreater(len(results), 5)
        self.assertTrue(all(rc == 0 and out in (b"200", b"403") for rc, out in results), results[:20])


class PolicyTextTest(unittest.TestCase):
    def test_a_policy_file_that_is_not_utf8_is_refused_with_its_place(self):
        # As `policy check` says, so `tollgate run` and a reload: before, check passed it and
        # the audit archive refused it at run time, without a line.
        with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as f:
            f.write(b"apiVersion: tollgate/v1\nkind: Policy\n# caf\xe9\n")
        try:
            r = subprocess.run([BIN, "policy", "check", f.name], capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            self.assertIn(f.name + ":3:6: not UTF-8 text", r.stdout + r.stderr)
        finally:
            os.unlink(f.name)


class ConfigMapTest(unittest.TestCase):
    def test_a_kubernetes_configmap_update_is_picked_up(self):
        """A ConfigMap volume: policy.yaml -> ..data/policy.yaml, ..data -> ..v1; kubelet
        writes ..v2 and swaps ..data by renaming a new link over it."""
        with HttpOrigin() as origin:
            tg = Tollgate()
            conf = os.path.join(tg.dir, "conf")
            os.makedirs(os.path.join(conf, "..v1"))
            with open(os.path.join(conf, "..v1", "policy.yaml"), "w") as f:
                f.write(POLICY)
            os.symlink("..v1", os.path.join(conf, "..data"))
            os.symlink("..data/policy.yaml", os.path.join(conf, "policy.yaml"))
            tg.config.pop("hosts")
            tg.config["policies"] = ["conf/policy.yaml"]
            with open(tg.config_path, "w") as f:
                json.dump(tg.config, f)
            with tg:
                def status(agent):
                    rc, out, _ = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"X-Agent-Id: {agent}",
                                      origin.url("/hello"), proxy=tg.proxy)
                    return int(out)
                self.assertEqual(status("agent-9"), 200)
                os.makedirs(os.path.join(conf, "..v2"))
                with open(os.path.join(conf, "..v2", "policy.yaml"), "w") as f:
                    f.write(POLICY + '  - {id: ban-9, effect: halt, match: {agent: agent-9}}\n')
                os.symlink("..v2", os.path.join(conf, "..data_tmp"))
                os.rename(os.path.join(conf, "..data_tmp"), os.path.join(conf, "..data"))
                wait_for(lambda: status("agent-9") == 403, timeout=5, what="the ConfigMap's new policy")
                # kubelet then removes the old data; the next update is seen too.
                shutil.rmtree(os.path.join(conf, "..v1"))
                os.makedirs(os.path.join(conf, "..v3"))
                with open(os.path.join(conf, "..v3", "policy.yaml"), "w") as f:
                    f.write(POLICY)
                os.symlink("..v3", os.path.join(conf, "..data_tmp"))
                os.rename(os.path.join(conf, "..data_tmp"), os.path.join(conf, "..data"))
                wait_for(lambda: status("agent-9") == 200, timeout=5, what="the ConfigMap's third policy")


class PolicyWatchTest(unittest.TestCase):
    """Edits are applied once whole: a policy file still being written is not read half-way
    (its first rules can parse and say less than the whole), and a directory reached by a
    link that is swapped (`current -> releases/N`) is followed from one release to the next."""

    def status(self, tg, origin, agent):
        rc, out, _ = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"X-Agent-Id: {agent}",
                          origin.url("/hello"), proxy=tg.proxy)
        return int(out)

    def reloads(self, tg):
        return [l for l in tg.logs() if l.get("msg") in ("reload", "reload rejected")]

    def test_a_file_still_being_written_is_not_applied_half_way(self):
        with HttpOrigin() as origin, Tollgate({}, policy=POLICY) as tg:
            self.assertEqual(self.status(tg, origin, "agent-9"), 200)
            with open(os.path.join(tg.dir, "policy.yaml"), "w") as f:
                # The first half alone parses, and bans no one; the rest bans agent-9.
                f.write(POLICY)
                f.flush()
                time.sleep(1.0)  # a writer that pauses (a slow pipe, scp) past any debounce
                self.assertEqual(self.reloads(tg), [], "a half-written file was read")
                f.write('  - {id: ban-9, effect: halt, match: {agent: agent-9}}\n')
            wait_for(lambda: self.status(tg, origin, "agent-9") == 403, timeout=5, what="the whole policy")
            self.assertEqual(len(self.reloads(tg)), 1, self.reloads(tg))

    def test_a_swapped_release_link_is_followed_from_release_to_release(self):
        with HttpOrigin() as origin:
            tg = Tollgate()
            root = os.path.join(tg.dir, "deploy")
            for n, extra in ((1, ""), (2, '  - {id: ban-9, effect: halt, match: {agent: agent-9}}\n'), (3, "")):
                os.makedirs(os.path.join(root, "releases", str(n)))
                with open(os.path.join(root, "releases", str(n), "policy.yaml"), "w") as f:
                    f.write(POLICY + extra)
            os.symlink("releases/1", os.path.join(root, "current"))
            tg.config.pop("hosts")
            tg.config["policies"] = ["deploy/current/policy.yaml"]
            with open(tg.config_path, "w") as f:
                json.dump(tg.config, f)

            def swap(n):  # as deploy tools do: a new link renamed over the old one
                os.symlink(f"releases/{n}", os.path.join(root, "current.new"))
                os.rename(os.path.join(root, "current.new"), os.path.join(root, "current"))
            with tg:
                self.assertEqual(self.status(tg, origin, "agent-9"), 200)
                swap(2)
                wait_for(lambda: self.status(tg, origin, "agent-9") == 403, timeout=5, what="release 2")
                swap(3)
                wait_for(lambda: self.status(tg, origin, "agent-9") == 200, timeout=5, what="release 3")


class BreakerTest(unittest.TestCase):
    """A circuit breaker through the real proxy, as an operator watches it: GET /v1/breakers
    and tollgate_breaker_state while it opens on upstream failures, turns half-open after its
    cooldown, and closes on a good probe."""

    POLICY = """
apiVersion: tollgate/v1
kind: Policy
metadata: {name: breakers}
tools:
  - {name: flaky.get, match: {host: 127.0.0.1, methods: [GET]}, class: read}
agents:
  - {id: "agent-*"}
rules:
  - {id: allow-reads, effect: allow, match: {class: read, agent: "agent-*"}}
breakers:
  - {host: 127.0.0.1, failures: 2, cooldown: 1s}
"""

    def breakers(self, tg):
        code, body = tg.admin("/v1/breakers")
        self.assertEqual(code, 200, body)
        return json.loads(body)

    def state_metric(self, tg, upstream):
        _, metrics = tg.admin("/metrics")
        m = re.search(r'tollgate_breaker_state\{upstream="%s"\} (\d+)' % re.escape(upstream),
                      metrics.decode())
        return int(m.group(1)) if m else None

    def test_open_half_open_closed_in_the_admin_api_and_metrics(self):
        with HttpOrigin() as origin, Tollgate({}, policy=self.POLICY) as tg:
            upstream = f"127.0.0.1:{origin.port}"
            self.assertEqual(self.breakers(tg), [])

            def call(path):
                rc, out, err = curl("-i", "-H", "X-Agent-Id: agent-1", origin.url(path), proxy=tg.proxy)
                self.assertEqual(rc, 0, err)
                return parse_response(out)

            self.assertEqual(call("/status/503")[0], 503)
            [b] = self.breakers(tg)
            self.assertEqual((b["upstream"], b["state"], b["consecutive_failures"]), (upstream, "closed", 1))
            self.assertEqual(self.state_metric(tg, upstream), 0)
            self.assertEqual(call("/status/503")[0], 503)
            status, headers, body = call("/hello")
            self.assertEqual(status, 403)
            self.assertEqual(json.loads(body)["rule"], "breaker")
            [b] = self.breakers(tg)
            self.assertEqual(b["state"], "open")
            self.assertEqual((b["host"], b["consecutive_failures"], b["failures"], b["cooldown_ms"]),
                             ("127.0.0.1", 2, 2, 1000))
            self.assertGreater(b["open_until_ms"], time.time() * 1000)
            self.assertEqual(self.state_metric(tg, upstream), 2)

            wait_for(lambda: self.breakers(tg)[0]["state"] == "half-open", timeout=5,
                     what="the breaker to turn half-open after its cooldown")
            self.assertEqual(self.state_metric(tg, upstream), 1)
            self.assertFalse(self.breakers(tg)[0]["probe_in_flight"])
            self.assertEqual(call("/hello")[0], 200)  # the probe, answered well
            [b] = self.breakers(tg)
            self.assertEqual((b["state"], b["consecutive_failures"], b["open_until_ms"]), ("closed", 0, 0))
            self.assertEqual(self.state_metric(tg, upstream), 0)
            self.assertEqual(tg.admin("/v1/breakers", "POST")[0], 405)

    def test_without_policies_there_are_no_breakers(self):
        with Tollgate() as tg:
            code, body = tg.admin("/v1/breakers")
            self.assertEqual(code, 404, body)


class PolicyTestCliTest(unittest.TestCase):
    """`tollgate policy test` on cases that cannot be read: each fails with its reason and
    the run exits 1; none ends the run (it used to abort on an uncaught exception)."""

    def test_unreadable_cases_fail_with_their_reason(self):
        quickstart = os.path.join(os.path.dirname(BIN), "..", "examples", "quickstart", "policy.yaml")
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "cases.test.yaml")
            with open(path, "w") as f:
                f.write(f"""apiVersion: tollgate/v1
kind: PolicyTest
policies: [{os.path.abspath(quickstart)}]
tests:
  - name: good
    call: {{agent: agent-7, method: GET, url: "http://notes.local/notes/1"}}
    expect: {{decision: allow, rule: allow-notes}}
  - name: port is not a number
    call: {{agent: agent-7, method: GET, url: "http://notes.local:x/notes/1"}}
    expect: {{decision: allow}}
  - name: port out of range
    call: {{agent: agent-7, method: GET, url: "http://notes.local:70000/notes/1"}}
    expect: {{decision: allow}}
  - name: times is not a number
    times: three
    call: {{agent: agent-7, method: GET, url: "http://notes.local/notes/1"}}
    expect: {{decision: allow}}
  - name: no expectation
    call: {{agent: agent-7, method: GET, url: "http://notes.local/notes/1"}}
  - name: advance is not a duration
    advance: 1.5s
    call: {{agent: agent-7, method: GET, url: "http://notes.local/notes/1"}}
    expect: {{decision: allow}}
""")
            r = subprocess.run([BIN, "policy", "test", path], capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            out = r.stdout
            self.assertIn("ok   " + path + ": good", out)
            self.assertIn("port is not a number: call.url must be an http(s) URL", out)
            self.assertIn("port out of range: call.url must be an http(s) URL", out)
            self.assertIn("times is not a number: the case cannot be read", out)
            self.assertIn("no expectation: the case cannot be read: expect: {decision: …} is required", out)
            self.assertIn("advance is not a duration: the case cannot be read: advance:", out)

    def run_test_file(self, d, text):
        path = os.path.join(d, "cases.test.yaml")
        with open(path, "w") as f:
            f.write("apiVersion: tollgate/v1\nkind: PolicyTest\n" + text)
        r = subprocess.run([BIN, "policy", "test", path], capture_output=True, text=True, timeout=30)
        if r.returncode == 2:  # not a test file: said on stderr, nothing on stdout
            self.assertEqual(r.stdout, "")
            return r.returncode, r.stderr.replace(path, "FILE")
        return r.returncode, r.stdout.replace(path, "FILE")

    def test_a_test_file_is_schema_checked(self):
        """Each of these passed: a misspelt key was ignored (the case tested something else),
        `policies:` as a scalar or an empty list tested against an empty set (so every halt
        expectation held), `times: 0` compared the expectation with an empty decision."""
        quickstart = os.path.abspath(os.path.join(os.path.dirname(BIN), "..", "examples", "quickstart",
                                                  "policy.yaml"))
        halt = '    call: {agent: agent-7, method: GET, url: "http://notes.local/notes/1"}\n' \
               '    expect: {decision: halt}\n'
        with tempfile.TemporaryDirectory() as d:
            self.assertEqual(self.run_test_file(d, f"policies: [{quickstart}]\ntests:\n  - name: failures\n"
                                                   f"    outcom: failed\n{halt}"),
                             (2, "FILE:6:5: tests[0].outcom: unknown key\n"))
            self.assertEqual(self.run_test_file(d, f"policies: [{quickstart}]\ntests:\n  - name: by rule\n"
                                                   '    call: {agent: agent-7, url: "http://notes.local/notes/1"}\n'
                                                   "    expect: {decision: allow, rul: allow-notes}\n"),
                             (2, "FILE:7:31: tests[0].expect.rul: unknown key\n"))
            self.assertEqual(self.run_test_file(d, f"policies: {quickstart}\ntests:\n  - name: a\n{halt}"),
                             (2, "FILE:3:11: policies: expected a non-empty list of policy files\n"))
            self.assertEqual(self.run_test_file(d, f"policies: []\ntests:\n  - name: a\n{halt}"),
                             (2, "FILE:3:11: policies: expected a non-empty list of policy files\n"))
            rc, out = self.run_test_file(d, f"policies: [{quickstart}]\ntests:\n  - name: never run\n"
                                            f"    times: 0\n{halt}")
            self.assertEqual(rc, 1, out)
            self.assertIn("FAIL FILE: never run: the case cannot be read: times: expected at least 1", out)


class PolicyCheckLintTest(unittest.TestCase):
    def test_tool_globs_that_name_undeclared_calls_can_match(self):
        """A call to no declared tool is named host:HOST, an MCP tools/call that no tool
        declares mcp:NAME, and the engine matches rules on "host:*" or "mcp:*" against them:
        `policy check` reported such rules as ones that can never match, and exited 1."""
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "p.yaml")
            with open(path, "w") as f:
                f.write("""apiVersion: tollgate/v1
kind: Policy
tools:
  - {name: notes.read, match: {host: notes.local, methods: [GET]}, class: read}
rules:
  - {id: notes, effect: allow, match: {tool: "notes.*"}}
  - {id: any-host, effect: allow, match: {tool: "host:*", agent: trusted}}
  - {id: no-evil, effect: halt, match: {tool: "host:*.evil.example"}}
  - {id: undeclared-mcp, effect: halt, match: {tool: "mcp:*", class: write}}
""")
            r = subprocess.run([BIN, "policy", "check", path], capture_output=True, text=True, timeout=10)
            self.assertEqual(r.returncode, 0, r.stdout)
            self.assertTrue(r.stdout.startswith("ok: 1 tools"), r.stdout)
            # The engine does match them: the lint was wrong, not the rules.
            with open(os.path.join(d, "p.test.yaml"), "w") as f:
                f.write("""apiVersion: tollgate/v1
kind: PolicyTest
policies: [p.yaml]
tests:
  - name: an undeclared host for a trusted agent
    call: {agent: trusted, url: "http://elsewhere.example/"}
    expect: {decision: allow, rule: any-host}
  - name: an evil one
    call: {agent: trusted, url: "http://api.evil.example/"}
    expect: {decision: halt, rule: no-evil}
""")
            r = subprocess.run([BIN, "policy", "test", os.path.join(d, "p.test.yaml")], capture_output=True,
                               text=True, timeout=10)
            self.assertEqual(r.returncode, 0, r.stdout)
            # A glob that can name neither a declared tool nor an undeclared call still can't.
            with open(path, "a") as f:
                f.write('  - {id: typo, effect: allow, match: {tool: "ntoes.*"}}\n'
                        '  - {id: mcp-read, effect: allow, match: {tool: "mcp:*", class: read}}\n')
            r = subprocess.run([BIN, "policy", "check", path], capture_output=True, text=True, timeout=10)
            self.assertEqual(r.returncode, 1, r.stdout)
            self.assertEqual(r.stdout.count("can never match"), 2, r.stdout)
            self.assertIn("rule 'typo' can never match", r.stdout)
            self.assertIn("rule 'mcp-read' can never match", r.stdout)


class InPlaceWriteTest(unittest.TestCase):
    def test_a_policy_file_caught_between_truncation_and_text_is_not_loaded(self):
        """A writer that truncates the file and writes its text 600 ms later (a slow pipe,
        `cat > policy.yaml`): the watch waits for the file to be closed, and a SIGHUP that
        reads it in between finds it empty and keeps the last good set. The new set loads
        once the text is written."""
        with HttpOrigin() as origin, Tollgate(policy=POLICY) as tg:
            policy = os.path.join(tg.dir, "policy.yaml")

            def status(agent):
                rc, out, err = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                                    f"X-Agent-Id: {agent}", origin.url("/hello"), proxy=tg.proxy)
                return int(out)

            self.assertEqual(status("agent-1"), 200)
            with open(policy, "w") as f:
                f.flush()
                os.fsync(f.fileno())
                time.sleep(0.6)
                self.assertEqual(tg.logs("reload") + tg.logs("reload rejected"), [], "read while written")
                tg.proc.send_signal(signal.SIGHUP)
                wait_for(lambda: tg.logs("reload rejected"), timeout=5, what="the refused empty file")
                self.assertIn("policy.yaml: the file is empty now", tg.logs("reload rejected")[-1]["error"])
                self.assertEqual(status("agent-1"), 200)  # the last good set still decides
                f.write(POLICY + '  - {id: ban-1, effect: halt, match: {agent: agent-1}}\n')
            wait_for(lambda: status("agent-1") == 403, timeout=5, what="the new set")
            digests = {r["digest"] for r in tg.logs("reload") if r.get("digest")}
            self.assertEqual(len(digests), 1, digests)  # one reload: the full text


class BadPolicyTest(unittest.TestCase):
    def test_startup_with_a_bad_policy_exits_2_naming_the_line(self):
        import tempfile
        d = tempfile.mkdtemp()
        with open(os.path.join(d, "p.yaml"), "w") as f:
            f.write("apiVersion: tollgate/v1\nkind: Policy\nrules:\n  - {id: a, effect: sometimes}\n")
        with open(os.path.join(d, "t.yaml"), "w") as f:
            f.write("listeners: [{name: e, address: '127.0.0.1:0'}]\npolicies: [p.yaml]\n")
        r = subprocess.run([BIN, "run", "-c", os.path.join(d, "t.yaml")], capture_output=True, text=True, timeout=10)
        self.assertEqual(r.returncode, 2)
        self.assertIn("p.yaml:4:", r.stderr)
        self.assertIn("rules[0].effect", r.stderr)

    def test_a_directory_named_as_a_policy_is_refused(self):
        """A directory opens and reads as nothing: it loaded as an empty policy, so `policy
        check` said ok and `run` halted every call."""
        with tempfile.TemporaryDirectory() as d:
            policies = os.path.join(d, "policies")
            os.mkdir(policies)
            r = subprocess.run([BIN, "policy", "check", policies + "/"], capture_output=True, text=True,
                               timeout=10)
            self.assertEqual(r.returncode, 2, r.stdout)
            self.assertIn(policies + "/: is a directory", r.stderr)  # usage errors go to stderr
            self.assertEqual(r.stdout, "")
            with open(os.path.join(d, "t.yaml"), "w") as f:
                f.write("listeners: [{name: e, address: '127.0.0.1:0'}]\npolicies: [policies]\n"
                        f"audit: {{dir: {d}/audit}}\n")
            r = subprocess.run([BIN, "run", "-c", os.path.join(d, "t.yaml")], capture_output=True, text=True,
                               timeout=5)
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn(policies + ": is a directory", r.stderr)


if __name__ == "__main__":
    unittest.main()
