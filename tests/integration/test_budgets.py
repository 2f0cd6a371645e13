"""Budget pools through the real proxy (memory store): a pool's effort cap halts calls
once spent, the admin API shows the spend, and a call that never reached an upstream
is refunded."""
import json
import os
import unittest

from tollgate_harness import HttpOrigin, Tollgate, closed_port, curl, parse_response, raw_exchange, wait_for

POLICY = """
apiVersion: tollgate/v1
kind: Policy
tools:
  - {name: notes.write, match: {host: 127.0.0.1, methods: [POST]}, class: write, cost: {effort: 4, risk: 1}}
pools:
  - {name: team, effort: {limit: 10, period: 1h}, risk: {limit: 100, period: 1d}}
agents:
  - {id: "agent-*", pool: team}
rules:
  - {id: writes, effect: allow, match: {tool: notes.write}}
"""


class BudgetTest(unittest.TestCase):
    def start(self, policy=POLICY):
        tg = Tollgate()
        with open(os.path.join(tg.dir, "policy.yaml"), "w") as f:
            f.write(policy)
        tg.config.pop("hosts")
        tg.config["policies"] = ["policy.yaml"]
        with open(tg.config_path, "w") as f:
            json.dump(tg.config, f)
        return tg

    def cost_call(self, tg, origin, query):
        """A POST to the origin's /cost (query: its X-Cost-* headers) by agent-1: the response."""
        rc, out, _ = curl("-i", "-H", "X-Agent-Id: agent-1", "--data", "x", origin.url("/cost" + query), proxy=tg.proxy)
        return parse_response(out)

    def metric(self, tg, series):
        """The value of one series (name and labels as rendered) on /metrics; None: absent."""
        _, text = tg.admin("/metrics")
        for line in text.decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return None

    def pools(self, tg):
        code, body = tg.admin("/v1/pools")
        self.assertEqual(code, 200)
        return {(p["pool"], p["dimension"]): p for p in json.loads(body)}

    def test_the_reverse_listener_charges_the_same_pools(self):
        """A reverse listener in front of the tool charges the pools as the forward proxy
        does: the same reserve before the call, the same halt once spent."""
        with HttpOrigin() as origin:
            tg = self.start(POLICY.replace("host: 127.0.0.1", "host: notes.test"))
            tg.config["listeners"] = [{"name": "egress", "kind": "reverse", "address": "127.0.0.1:0",
                                       "identity": {"header": "X-Agent-Id"},
                                       "routes": [{"host": "notes.test", "upstream": f"http://127.0.0.1:{origin.port}"}]}]
            with open(tg.config_path, "w") as f:
                json.dump(tg.config, f)
            with tg:
                replies = []
                for _ in range(3):
                    out, _ = raw_exchange(tg.proxy_port, b"POST /echo HTTP/1.1\r\nHost: notes.test\r\n"
                                          b"X-Agent-Id: agent-1\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
                    replies.append(parse_response(out))
                self.assertEqual([r[0] for r in replies], [200, 200, 403])
                doc = json.loads(replies[2][2])
                self.assertEqual(doc["rule"], "budget")
                self.assertIn("budget_exhausted", doc["reason"])
                self.assertEqual(len(origin.requests), 2)
                wait_for(lambda: self.pools(tg)[("team", "effort")]["held"] == 0, timeout=3, what="the settle")
                p = self.pools(tg)[("team", "effort")]
                self.assertEqual((p["committed"], p["held"], p["remaining"]), (8, 0, 2))

    def test_cap_halts_once_spent(self):
        with HttpOrigin() as origin, self.start() as tg:
            statuses = []
            for _ in range(3):
                rc, out, err = curl("-i", "-H", "X-Agent-Id: agent-1", "--data", "x", origin.url("/echo"), proxy=tg.proxy)
                statuses.append(parse_response(out)[0])
            self.assertEqual(statuses, [200, 200, 403])  # 4 + 4 fit in 10, a third 4 does not
            rc, out, _ = curl("-i", "-H", "X-Agent-Id: agent-2", "--data", "x", origin.url("/echo"), proxy=tg.proxy)
            status, headers, body = parse_response(out)
            self.assertEqual(status, 403)
            doc = json.loads(body)
            self.assertEqual(doc["rule"], "budget")
            self.assertIn("budget_exhausted", doc["reason"])
            self.assertEqual(len(origin.requests), 2)
            # Settled right after each response went out: wait for the second settle.
            wait_for(lambda: self.pools(tg)[("team", "effort")]["held"] == 0, timeout=3, what="the settle")
            p = self.pools(tg)[("team", "effort")]
            self.assertEqual((p["limit"], p["committed"], p["held"], p["remaining"]), (10, 8, 0, 2))
            self.assertEqual(self.pools(tg)[("team", "risk")]["committed"], 2)
            _, metrics = tg.admin("/metrics")
            self.assertIn('tollgate_pool_remaining{dimension="effort",pool="team"} 2', metrics.decode())
            # The two budget halts count as such, not as a policy rule's, and as the agents'
            # steps (they were missing from agent_steps_total).
            self.assertEqual(self.metric(tg, 'tollgate_halts_total{reason="budget"}'), 2)
            self.assertIsNone(self.metric(tg, 'tollgate_halts_total{reason="rule"}'))
            self.assertEqual(self.metric(tg, 'tollgate_agent_steps_total{agent_class="agent-*",decision="halt"}'), 2)
            self.assertEqual(self.metric(tg, 'tollgate_agent_steps_total{agent_class="agent-*",decision="allow"}'), 2)
            # What the pool spent, though /metrics was not read before (the store counts it).
            self.assertEqual(self.metric(tg, 'tollgate_pool_spent_total{dimension="effort",pool="team"}'), 8)
            self.assertEqual(self.metric(tg, 'tollgate_pool_spent_total{dimension="risk",pool="team"}'), 2)

    def test_a_call_that_never_left_is_refunded(self):
        with self.start() as tg:
            rc, out, _ = curl("-i", "-H", "X-Agent-Id: agent-1", "--data", "x", f"http://127.0.0.1:{closed_port()}/",
                              proxy=tg.proxy)
            self.assertEqual(parse_response(out)[0], 502)
            wait_for(lambda: self.pools(tg)[("team", "effort")]["held"] == 0, timeout=3, what="the release")
            p = self.pools(tg)[("team", "effort")]
            self.assertEqual((p["committed"], p["held"]), (0, 0))

    def test_the_real_cost_comes_from_the_response_and_an_overrun_trips_the_pool(self):
        policy = POLICY.replace("cost: {effort: 4, risk: 1}",
                                "cost: {effort: 4, risk: 1, effort_header: X-Cost-Effort, risk_header: X-Cost-Risk}")
        with HttpOrigin() as origin, self.start(policy) as tg:
            def call(query):
                return self.cost_call(tg, origin, query)
            self.assertEqual(call("?effort=1&risk=0")[0], 200)
            wait_for(lambda: self.pools(tg)[("team", "effort")]["held"] == 0, timeout=3, what="the settle")
            p = self.pools(tg)
            self.assertEqual((p[("team", "effort")]["committed"], p[("team", "risk")]["committed"]), (1, 0))
            # No header, or a header that is not a plain integer: the estimate is charged.
            self.assertEqual(call("")[0], 200)
            self.assertEqual(call("?effort=-3")[0], 200)
            wait_for(lambda: self.pools(tg)[("team", "effort")]["held"] == 0, timeout=3, what="the settle")
            self.assertEqual(self.pools(tg)[("team", "effort")]["committed"], 9)
            self.assertFalse(self.pools(tg)[("team", "effort")]["tripped"])
            # 9 + 4 > 10: refused before it is sent.
            self.assertEqual(call("?effort=0")[0], 403)
        policy = policy.replace("limit: 10, period: 1h", "limit: 100, period: 1h")
        with HttpOrigin() as origin, self.start(policy) as tg:
            rc, out, _ = curl("-i", "-H", "X-Agent-Id: agent-1", "--data", "x", origin.url("/cost?effort=50"),
                              proxy=tg.proxy)
            self.assertEqual(parse_response(out)[0], 200)  # the response already went out
            wait_for(lambda: self.pools(tg)[("team", "effort")]["tripped"], timeout=3, what="the trip")
            p = self.pools(tg)[("team", "effort")]
            self.assertEqual((p["committed"], p["held"]), (4, 0))  # never more than was held
            rc, out, _ = curl("-i", "-H", "X-Agent-Id: agent-1", "--data", "x", origin.url("/cost?effort=1"),
                              proxy=tg.proxy)
            status, _, body = parse_response(out)
            self.assertEqual(status, 403)
            self.assertIn("budget_tripped", json.loads(body)["reason"])
            self.assertEqual(len(origin.requests), 1)

    def test_the_real_cost_comes_from_a_field_of_the_json_response_body(self):
        """cost.effort_field: a model API says what a call cost in its body
        ({"usage": {"total_tokens": N}}); the settle reads it once the body has passed, and
        a body it cannot read settles at the estimate."""
        policy = POLICY.replace("cost: {effort: 4, risk: 1}",
                                "cost: {effort: 4, risk: 1, effort_field: usage.total_tokens}")
        policy = policy.replace("limit: 10, period: 1h", "limit: 100, period: 1h")
        with HttpOrigin() as origin, self.start(policy) as tg:
            def call(body):
                rc, out, _ = curl("-i", "-H", "X-Agent-Id: agent-1", "-H", "Content-Type: application/json",
                                  "--data-binary", body, origin.url("/echo"), proxy=tg.proxy)
                status, _, got = parse_response(out)
                self.assertEqual((status, got), (200, body.encode()))  # the agent gets it all
                wait_for(lambda: self.pools(tg)[("team", "effort")]["held"] == 0, timeout=3, what="the settle")
                return self.pools(tg)[("team", "effort")]["committed"]
            self.assertEqual(call('{"id": "r1", "usage": {"total_tokens": 3, "prompt_tokens": 2}}'), 3)
            # Not a non-negative integer, absent, not JSON: the estimate (4) is charged.
            self.assertEqual(call('{"usage": {"total_tokens": "3"}}'), 7)
            self.assertEqual(call('{"usage": {"total_tokens": 2.5}}'), 11)
            self.assertEqual(call('{"usage": {"total_tokens": -1}}'), 15)
            self.assertEqual(call('{"usage": {}}'), 19)
            self.assertEqual(call('not json'), 23)
            # Larger than the policy's max_body_bytes (64 KiB): not kept, the estimate.
            big = '{"pad": "' + "x" * (70 * 1024) + '", "usage": {"total_tokens": 1}}'
            self.assertEqual(call(big), 27)
            self.assertEqual(call('{"usage": {"total_tokens": 0}}'), 27)
            self.assertFalse(self.pools(tg)[("team", "effort")]["tripped"])
            # Above the hold: the hold is committed and the pool trips.
            self.assertEqual(call('{"usage": {"total_tokens": 50}}'), 31)
            self.assertTrue(self.pools(tg)[("team", "effort")]["tripped"])
            self.assertEqual(self.pools(tg)[("team", "risk")]["committed"], 9)  # 9 calls: risk at its estimate

    def test_a_pool_without_a_risk_budget_and_a_cost_too_large_for_64_bits(self):
        # The tool costs effort and risk; the pool limits effort only: risk is not charged
        # (it was: every call halted as budget_uninitialised).
        policy = POLICY.replace("cost: {effort: 4, risk: 1}",
                                "cost: {effort: 4, risk: 1, effort_header: X-Cost-Effort}")
        policy = policy.replace("{name: team, effort: {limit: 10, period: 1h}, risk: {limit: 100, period: 1d}}",
                                "{name: team, effort: {limit: 100, period: 1h}}")
        with HttpOrigin() as origin, self.start(policy) as tg:
            def call(query):
                return self.cost_call(tg, origin, query)
            status, _, body = call("?effort=1")
            self.assertEqual(status, 200, body)
            wait_for(lambda: self.pools(tg)[("team", "effort")]["committed"] == 1, timeout=3, what="the settle")
            self.assertNotIn(("team", "risk"), self.pools(tg))
            # A real cost of 20 digits is more than any hold, not "no cost named".
            self.assertEqual(call("?effort=99999999999999999999")[0], 200)
            wait_for(lambda: self.pools(tg)[("team", "effort")]["tripped"], timeout=3, what="the trip")
            self.assertEqual(self.pools(tg)[("team", "effort")]["committed"], 5)
            status, _, body = call("?effort=1")
            self.assertEqual(status, 403)
            self.assertIn("budget_tripped", json.loads(body)["reason"])

    def test_a_cost_header_given_twice_counts_its_largest_value(self):
        policy = POLICY.replace("cost: {effort: 4, risk: 1}", "cost: {effort: 4, risk: 1, effort_header: X-Cost-Effort}")
        policy = policy.replace("limit: 10, period: 1h", "limit: 100, period: 1h")
        with HttpOrigin() as origin, self.start(policy) as tg:
            self.assertEqual(self.cost_call(tg, origin, "?effort=1&effort=9")[0], 200)
            # 9 of the two, above the 4 held: an overrun (the first, 1, would have passed).
            wait_for(lambda: self.pools(tg)[("team", "effort")]["tripped"], timeout=3, what="the trip")
            self.assertEqual(self.pools(tg)[("team", "effort")]["committed"], 4)

    def test_a_rejected_reload_changes_no_budget_and_a_removed_pool_is_not_listed(self):
        with self.start() as tg:
            self.assertEqual(self.pools(tg)[("team", "effort")]["limit"], 10)
            # A set that parses, but that the audit archive cannot keep (a file where its
            # directory goes): the reload is refused after the policy checks, budgets included.
            archive = os.path.join(tg.dir, "var", "audit", "policies")
            os.rename(archive, archive + ".moved")
            with open(archive, "w") as f:
                f.write("in the way\n")
            with open(os.path.join(tg.dir, "policy.yaml"), "w") as f:
                f.write(POLICY.replace("limit: 10", "limit: 2"))

            def rejected():
                _, metrics = tg.admin("/metrics")
                return 'tollgate_reloads_total{result="error"} 1' in metrics.decode()
            wait_for(rejected, timeout=5, what="the rejected reload")
            self.assertEqual(self.pools(tg)[("team", "effort")]["limit"], 10)
            os.unlink(archive)
            os.rename(archive + ".moved", archive)
            # A good reload that renames the pool: only the new one is listed.
            with open(os.path.join(tg.dir, "policy.yaml"), "w") as f:
                f.write(POLICY.replace("name: team", "name: crew").replace("pool: team", "pool: crew"))
            wait_for(lambda: ("crew", "effort") in self.pools(tg), timeout=5, what="the reload")
            self.assertNotIn(("team", "effort"), self.pools(tg))
            # So in /metrics: the old pool's series are gone, not frozen at their last figures.
            _, metrics = tg.admin("/metrics")
            self.assertNotIn('pool="team"', metrics.decode())
            self.assertEqual(self.metric(tg, 'tollgate_pool_limit{dimension="effort",pool="crew"}'), 10)
            self.assertEqual(self.metric(tg, 'tollgate_pool_available{dimension="effort",pool="crew"}'), 1)

    def test_shared_pools_are_refused_by_the_memory_store(self):
        tg = Tollgate()
        with open(os.path.join(tg.dir, "policy.yaml"), "w") as f:
            f.write(POLICY.replace("{name: team,", "{name: team, scope: shared,"))
        tg.config.pop("hosts")
        tg.config["policies"] = ["policy.yaml"]
        with open(tg.config_path, "w") as f:
            json.dump(tg.config, f)
        with self.assertRaisesRegex(AssertionError, "exited with 2"):
            with tg:
                pass


if __name__ == "__main__":
    unittest.main()
