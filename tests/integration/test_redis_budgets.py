"""Shared budget pools in a real redis-server: exact accounting with several sidecars and
many concurrent agents, holds of a killed sidecar committed once, fail-closed behaviour
when Redis is shut down, paused or flushed, and `tollgate pools init`."""
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import unittest

from redis_harness import RedisServer, Resp, swarm
from tollgate_harness import BIN, HttpOrigin, Tollgate, curl, parse_response, wait_for

POLICY = """
apiVersion: tollgate/v1
kind: Policy
tools:
  - name: notes.write
    match: {host: 127.0.0.1, methods: [POST]}
    class: write
    cost: {effort: %(estimate)d, risk: 1, effort_header: X-Cost-Effort}
pools:
  - {name: team, scope: shared, effort: {limit: %(limit)d, period: 1d}, risk: {limit: 1000000, period: 1d}}
agents:
  - {id: "agent-*", pool: team}
rules:
  - {id: writes, effect: allow, match: {tool: notes.write}}
"""

KEY = "tollgate:{team}:b"
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"  # Debian's faketime package


def sidecar(redis_urls, limit=10, estimate=4, store=None, workers=2, policy=None, **kw):
    tg = Tollgate({"workers": workers}, **kw)
    with open(os.path.join(tg.dir, "policy.yaml"), "w") as f:
        f.write(policy or POLICY % {"limit": limit, "estimate": estimate})
    tg.config.pop("hosts")
    tg.config["policies"] = ["policy.yaml"]
    tg.config["store"] = {"backend": "redis", "urls": redis_urls, **(store or {})}
    with open(tg.config_path, "w") as f:
        json.dump(tg.config, f)
    return tg


def pools_init(tg, *extra):
    return subprocess.run([BIN, "pools", "init", "-c", tg.config_path, *extra], capture_output=True, text=True,
                          timeout=30)


def spend(redis):
    v = redis("HMGET", KEY, "effort:committed", "effort:held")
    return int(v[0] or 0), int(v[1] or 0)


def call(tg, origin, cost=None, agent="agent-1", path_extra=""):
    path = ("/cost?x=1" if cost is None else f"/cost?effort={cost}") + path_extra
    rc, out, _ = curl("-i", "-H", f"X-Agent-Id: {agent}", "--data", "x", origin.url(path), proxy=tg.proxy)
    status, _, body = parse_response(out)
    return status, body


class RedisBudgetTest(unittest.TestCase):
    def test_a_pool_is_used_only_once_initialised(self):
        with RedisServer() as redis, HttpOrigin() as origin:
            tg = sidecar([redis.url])
            with tg:
                status, body = call(tg, origin, 1)
                self.assertEqual(status, 403)
                self.assertIn("budget_uninitialised", json.loads(body)["reason"])
                self.assertIn("tollgate pools init", json.loads(body)["reason"])
                _, pools = tg.admin("/v1/pools")
                self.assertFalse(json.loads(pools)[0]["initialised"])
                _, metrics = tg.admin("/metrics")
                self.assertIn('tollgate_pool_initialised{dimension="effort",pool="team"} 0\n', metrics.decode())
                self.assertIn('tollgate_pool_available{dimension="effort",pool="team"} 1\n', metrics.decode())
                r = pools_init(tg)
                self.assertEqual((r.returncode, r.stdout), (0, "team: created with zero spend\n"))
                self.assertEqual(call(tg, origin, 3)[0], 200)
                self.assertEqual(call(tg, origin, 4)[0], 200)
                wait_for(lambda: spend(redis) == (7, 0), timeout=3, what="both settles")
                status, body = call(tg, origin, 1)  # 7 + 4 held > 10
                self.assertEqual(status, 403)
                self.assertIn("budget_exhausted", json.loads(body)["reason"])
                self.assertEqual(len(origin.requests), 2)
                # A second init keeps the spend; --reset erases it.
                r = pools_init(tg)
                self.assertEqual((r.returncode, r.stdout), (0, "team: exists, kept\n"))
                self.assertEqual(spend(redis), (7, 0))
                code, pools = tg.admin("/v1/pools")
                effort = [p for p in json.loads(pools) if p["dimension"] == "effort"][0]
                self.assertEqual((effort["committed"], effort["held"], effort["remaining"], effort["initialised"]),
                                 (7, 0, 3, True))
                _, metrics = tg.admin("/metrics")
                metrics = metrics.decode()
                self.assertIn('tollgate_budget_operations_total{op="reserve",result="budget_exhausted"} 1', metrics)
                self.assertIn('tollgate_budget_operations_total{op="settle",result="ok"} 2', metrics)
                self.assertIn('tollgate_pool_committed{dimension="effort",pool="team"} 7', metrics)
                self.assertIn('tollgate_pool_initialised{dimension="effort",pool="team"} 1\n', metrics)
                self.assertIn('tollgate_pool_tripped{dimension="effort",pool="team"} 0\n', metrics)
                # Seen uninitialised at the last scrape: all 7 were spent since.
                self.assertIn('tollgate_pool_spent_total{dimension="effort",pool="team"} 7\n', metrics)
                r = pools_init(tg, "--reset")
                self.assertEqual((r.returncode, r.stdout), (0, "team: reset to zero spend\n"))
                self.assertEqual(spend(redis), (0, 0))
                # The reset is a new base for the spend, not a spend of its own.
                spent = 'tollgate_pool_spent_total{dimension="effort",pool="team"} %d\n'
                self.assertIn(spent % 7, tg.admin("/metrics")[1].decode())
                self.assertEqual(call(tg, origin, 2)[0], 200)
                wait_for(lambda: spend(redis) == (2, 0), timeout=3, what="the settle after the reset")
                self.assertIn(spent % 9, tg.admin("/metrics")[1].decode())
                # Redis unreachable: init fails with exit 1 and says why.
                redis.shutdown_nosave()
                # The metrics say the figures are not current (they froze without a word).
                _, metrics = tg.admin("/metrics")
                self.assertIn('tollgate_pool_available{dimension="effort",pool="team"} 0\n', metrics.decode())
                self.assertIn('tollgate_pool_committed{dimension="effort",pool="team"} 2\n', metrics.decode())
                self.assertIn(spent % 9, metrics.decode())
                r = pools_init(tg)
                self.assertEqual(r.returncode, 1)
                self.assertIn("redis 127.0.0.1:", r.stderr)

    def test_a_redis_that_asks_for_a_password(self):
        with RedisServer() as redis, HttpOrigin() as origin:
            # An ACL user for the sidecars, and a password on the default user: a client
            # that does not AUTH is refused everything.
            redis("ACL", "SETUSER", "tollgate", "on", ">p@ss:word", "~*", "&*", "+@all")
            redis("CONFIG", "SET", "requirepass", "not-for-sidecars")

            def spend_as_tollgate():
                c = Resp(redis.port)
                try:
                    c("AUTH", "tollgate", "p@ss:word")
                    v = c("HMGET", KEY, "effort:committed", "effort:held")
                    return int(v[0] or 0), int(v[1] or 0)
                finally:
                    c.close()
            url = f"redis://tollgate:p%40ss%3Aword@127.0.0.1:{redis.port}"
            with sidecar([url]) as tg:
                r = pools_init(tg)
                self.assertEqual((r.returncode, r.stdout), (0, "team: created with zero spend\n"), r.stderr)
                self.assertEqual(call(tg, origin, 2)[0], 200)
                wait_for(lambda: spend_as_tollgate() == (2, 0), timeout=3, what="the settle")
            # The password from a file of its own (a mounted secret), the ACL user in the URL.
            tg = sidecar([f"redis://tollgate@127.0.0.1:{redis.port}"], store={"password_file": "secrets/redis"})
            os.makedirs(os.path.join(tg.dir, "secrets"))
            with open(os.path.join(tg.dir, "secrets", "redis"), "w") as f:
                f.write("p@ss:word\n")
            with tg:
                self.assertEqual(call(tg, origin, 3)[0], 200)
                wait_for(lambda: spend_as_tollgate() == (5, 0), timeout=3, what="the settle")
            # A wrong password: charged calls are halted, and their audit records say why.
            with sidecar([f"redis://tollgate:wrong@127.0.0.1:{redis.port}"]) as tg:
                docs = [json.loads(call(tg, origin, 1)[1]) for _ in range(2)]
                self.assertTrue(all(d["reason"].startswith("budget_unavailable") for d in docs), docs)
                _, tail = tg.admin("/v1/audit/tail?n=10")
                record = next(r for r in map(json.loads, tail.splitlines()) if r["seq"] == docs[-1]["audit_seq"])
                self.assertIn("AUTH", record["reason"])
            self.assertEqual(len(origin.requests), 2)
            # None at all: the error says what is missing.
            r = pools_init(sidecar([f"redis://127.0.0.1:{redis.port}"]))
            self.assertEqual(r.returncode, 1)
            self.assertIn("asks for a password", r.stderr)

    def test_init_missing_in_the_config_creates_the_pool_at_start(self):
        with RedisServer() as redis, HttpOrigin() as origin:
            with sidecar([redis.url], store={"init_missing": True}) as tg:
                self.assertEqual(call(tg, origin, 2)[0], 200)
                wait_for(lambda: spend(redis) == (2, 0), timeout=3, what="the settle")
                # A pool a reload adds is created too (it halted as budget_uninitialised).
                with open(os.path.join(tg.dir, "policy.yaml"), "w") as f:
                    f.write((POLICY % {"limit": 10, "estimate": 4}).replace("name: team", "name: crew")
                            .replace("pool: team", "pool: crew"))
                status, body = tg.admin("/v1/reload", "POST")
                self.assertEqual(status, 200, body)
                self.assertEqual(call(tg, origin, 3)[0], 200)
                wait_for(lambda: int(redis("HMGET", "tollgate:{crew}:b", "effort:committed")[0] or 0) == 3, timeout=3,
                         what="the new pool's settle")
                self.assertTrue(tg.logs("pool initialised"))

    def test_shutdown_pause_and_flush_fail_closed_and_recover(self):
        with RedisServer() as redis, HttpOrigin() as origin:
            with sidecar([redis.url], limit=1000, store={"timeout": "100ms"}) as tg:
                self.assertEqual(pools_init(tg).returncode, 0)
                self.assertEqual(call(tg, origin, 1)[0], 200)

                # Stopped: halted at once, not hung; the sidecar stays up.
                redis.shutdown_nosave()
                for _ in range(5):
                    t0 = time.monotonic()
                    status, body = call(tg, origin, 1)
                    self.assertEqual(status, 403)
                    self.assertIn("budget_unavailable", json.loads(body)["reason"])
                    self.assertLess(time.monotonic() - t0, 1.0)
                self.assertIsNone(tg.proc.poll())
                # The agent is not told where the store is (a way in to its own budgets);
                # the call's audit record is, with the cause.
                doc = json.loads(body)
                self.assertEqual(doc["reason"], "budget_unavailable: the budget store did not answer "
                                                "(the call's audit record has the cause)")
                self.assertNotIn(str(redis.port), body.decode())
                _, tail = tg.admin("/v1/audit/tail?n=20")
                record = next(r for r in map(json.loads, tail.splitlines()) if r["seq"] == doc["audit_seq"])
                self.assertTrue(record["reason"].startswith("budget_unavailable: redis 127.0.0.1:%d" % redis.port),
                                record["reason"])
                # Back without its data: the pool stays halted until initialised.
                redis.start()
                status, body = wait_for(lambda: (lambda r: r if b"unavailable" not in r[1] else None)(
                    call(tg, origin, 1)), timeout=5, what="the sidecar to reconnect")
                self.assertEqual(status, 403)
                self.assertIn("budget_uninitialised", json.loads(body)["reason"])
                self.assertEqual(pools_init(tg).returncode, 0)
                # Each worker reconnects at the end of its breaker's backoff (at most 1 s).
                time.sleep(1.1)
                self.assertEqual(call(tg, origin, 1)[0], 200)

                # Paused: each call is answered within the timeout (plus curl's own time).
                redis("CLIENT", "PAUSE", 1500, "ALL")
                paused_at = time.monotonic()
                times = []
                while time.monotonic() - paused_at < 1.0:
                    t0 = time.monotonic()
                    status, body = call(tg, origin, 1)
                    times.append(time.monotonic() - t0)
                    self.assertEqual(status, 403, body)
                    self.assertIn("budget_unavailable", json.loads(body)["reason"])
                self.assertLess(max(times), 0.6, times)
                # Unpaused: allowed again without a restart.
                wait_for(lambda: call(tg, origin, 1)[0] == 200, timeout=5, what="recovery after the pause")
                # The calls halted during the pause were never charged: their reserves were
                # dropped with the connection or released once Redis answered again.
                try:
                    wait_for(lambda: spend(redis)[1] == 0, timeout=5, what="no hold left")
                except AssertionError:
                    print("pool state:", redis("HGETALL", KEY), flush=True)  # the holders' records
                    raise
                # (The first call's spend went with the restart; each later call cost 1.)
                self.assertEqual(spend(redis)[0], len(origin.requests) - 1)

                # Every worker is back within the breaker's longest backoff (1 s).
                time.sleep(1.1)
                # Flushed: halted as uninitialised, never recreated at zero spend by a call.
                redis("FLUSHALL")
                for _ in range(3):
                    status, body = call(tg, origin, 1)
                    self.assertEqual(status, 403)
                    self.assertIn("budget_uninitialised", json.loads(body)["reason"])
                self.assertEqual(redis("EXISTS", KEY), 0)
                self.assertIsNone(tg.proc.poll())

    def test_a_settlement_redis_missed_is_delivered_without_further_traffic(self):
        """The call ends while Redis is paused, so its settlement times out; no other call
        follows. It must still be delivered once Redis answers (its real cost, 2), not left
        for the hold's expiry to commit the estimate (4) half a minute later."""
        with RedisServer() as redis, HttpOrigin() as origin:
            tg = sidecar([redis.url], limit=100, store={"timeout": "100ms", "hold_ttl": "30s"})
            with tg:
                self.assertEqual(pools_init(tg).returncode, 0)
                result = {}
                t = threading.Thread(target=lambda: result.update(r=call(tg, origin, path_extra="&ms=700", cost=2)))
                t.start()
                wait_for(lambda: spend(redis)[1] == 4, timeout=5, what="the call's hold")
                redis("CLIENT", "PAUSE", 1200, "ALL")  # the call ends and settles meanwhile
                t.join(timeout=10)
                self.assertEqual(result["r"][0], 200)
                wait_for(lambda: spend(redis) == (2, 0), timeout=5, what="the settlement, with no traffic")

    def test_an_agent_gone_before_its_reserve_is_answered_holds_nothing(self):
        """The agent resets its connection while Redis is slow to answer the reserve; the
        reserve then succeeds. The call was never sent: its hold is released at once, not
        left held until hold_ttl and then committed."""
        with RedisServer() as redis, HttpOrigin() as origin:
            tg = sidecar([redis.url], limit=100, store={"timeout": "3s", "hold_ttl": "30s"})
            with tg:
                self.assertEqual(pools_init(tg).returncode, 0)
                redis("CLIENT", "PAUSE", 800, "ALL")
                s = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=5)
                s.sendall(b"POST http://127.0.0.1:%d/cost HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                          b"X-Agent-Id: agent-1\r\nContent-Length: 1\r\n\r\nx" % (origin.port, origin.port))
                time.sleep(0.3)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()  # a reset, while the reserve waits for Redis
                time.sleep(1.0)  # Redis answers the reserve, then the release
                wait_for(lambda: spend(redis) == (0, 0), timeout=5, what="no hold and nothing committed")
                self.assertEqual(len(origin.requests), 0)

    def test_a_fail_open_pool_lets_calls_through_uncharged_while_redis_is_down(self):
        with RedisServer() as redis, HttpOrigin() as origin:
            tg = sidecar([redis.url], limit=100)
            with open(os.path.join(tg.dir, "policy.yaml")) as f:
                text = f.read()
            with open(os.path.join(tg.dir, "policy.yaml"), "w") as f:
                f.write(text.replace("{name: team, scope: shared,", "{name: team, scope: shared, fail_open: true,"))
            with tg:
                self.assertEqual(pools_init(tg).returncode, 0)
                self.assertEqual(call(tg, origin, 3)[0], 200)
                wait_for(lambda: spend(redis) == (3, 0), timeout=3, what="the settle")
                redis.shutdown_nosave()
                for _ in range(3):
                    self.assertEqual(call(tg, origin, 3)[0], 200)  # explicitly fail-open
                self.assertEqual(len(origin.requests), 4)
                _, metrics = tg.admin("/metrics")
                self.assertIn('tollgate_budget_operations_total{op="reserve",result="budget_unavailable"} 3',
                              metrics.decode())

    def test_a_killed_sidecar_s_holds_expire_and_are_committed_once(self):
        with RedisServer() as redis, HttpOrigin() as origin:
            store = {"hold_ttl": "1s"}
            with sidecar([redis.url], limit=100, store=store) as victim, sidecar([redis.url], limit=100,
                                                                              store=store) as peer:
                self.assertEqual(pools_init(peer).returncode, 0)
                calls = []
                for i in range(3):
                    t = threading.Thread(target=lambda: curl("-s", "-H", "X-Agent-Id: agent-9", "--data", "x",
                                                             origin.url("/delay?ms=3000"), proxy=victim.proxy))
                    t.start()
                    calls.append(t)
                wait_for(lambda: spend(redis)[1] == 12, timeout=5, what="three holds")
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(timeout=5)
                for t in calls:
                    t.join(timeout=10)
                # The holds expire after 1 s; the next operation on the pool commits them.
                time.sleep(1.2)
                self.assertEqual(call(peer, origin, 2)[0], 200)
                wait_for(lambda: spend(redis) == (14, 0), timeout=3, what="12 committed from holds + 2")
                time.sleep(0.5)
                self.assertEqual(spend(redis), (14, 0))  # nothing counted twice
                code, pools = peer.admin("/v1/pools")
                effort = [p for p in json.loads(pools) if p["dimension"] == "effort"][0]
                self.assertEqual((effort["committed"], effort["held"]), (14, 0))

    def test_a_trip_and_a_flushed_script_cache_reach_every_sidecar(self):
        """A pool tripped through one sidecar halts its calls on every sidecar (the trip is in
        the pool's keys); a SCRIPT FLUSH under a running store is met by loading the script
        again (NOSCRIPT), not by failed calls; /v1/pools gives each period's end and the
        store's latency is measured."""
        with RedisServer() as redis, HttpOrigin() as origin:
            a, b = sidecar([redis.url], limit=100), sidecar([redis.url], limit=100)
            with a, b:
                self.assertEqual(pools_init(a).returncode, 0)
                self.assertEqual(call(b, origin, 2)[0], 200)
                redis("SCRIPT", "FLUSH")
                self.assertEqual(call(b, origin, 3)[0], 200)  # NOSCRIPT: loaded again, then run
                self.assertEqual(call(a, origin, 1)[0], 200)
                wait_for(lambda: spend(redis) == (6, 0), timeout=3, what="three settles")
                for tg in (a, b):
                    _, metrics = tg.admin("/metrics")
                    self.assertNotIn('result="budget_unavailable"', metrics.decode())
                    count = [l for l in metrics.decode().splitlines()
                             if l.startswith("tollgate_budget_store_seconds_count")]
                    self.assertTrue(count and float(count[0].split()[-1]) >= 1, count)
                # Through a: a real cost above the hold (4) trips the pool.
                self.assertEqual(call(a, origin, 50)[0], 200)
                wait_for(lambda: redis("HGET", KEY, "effort:tripped") not in (None, "0", ""), timeout=3,
                         what="the trip in Redis")
                status, body = call(b, origin, 1)  # b never saw the overrun
                self.assertEqual(status, 403)
                self.assertIn("budget_tripped", json.loads(body)["reason"])
                _, pools = b.admin("/v1/pools")
                effort = [p for p in json.loads(pools) if p["dimension"] == "effort"][0]
                self.assertTrue(effort["tripped"])
                # The period (1d) ends at the next day's boundary of Redis's clock.
                now_ms = int(redis("TIME")[0]) * 1000
                self.assertGreater(effort["period_end_ms"], now_ms)
                self.assertLessEqual(effort["period_end_ms"], now_ms + 86400 * 1000)
                self.assertEqual(effort["period_end_ms"] % (86400 * 1000), 0)

    def test_periods_follow_redis_time_not_the_sidecars_clock(self):
        """A sidecar whose clock is three days ahead (libfaketime) charges the same period
        as one whose clock is right: periods are Redis's, from TIME, never the sidecar's."""
        with RedisServer() as redis, HttpOrigin() as origin:
            right = sidecar([redis.url], limit=100, workers=1)
            # Preloaded, not wrapped: faketime(1) would stand between the test and the pid.
            # (An ASan build wants its runtime first; it lets the preload come before it.)
            ahead = sidecar([redis.url], limit=100, workers=1,
                            env={"LD_PRELOAD": LIBFAKETIME, "FAKETIME": "+3d", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                                 "ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"})
            with right, ahead:
                self.assertEqual(pools_init(right).returncode, 0)
                self.assertEqual(call(right, origin, 2)[0], 200)
                wait_for(lambda: spend(redis) == (2, 0), timeout=3, what="the first settle")
                self.assertEqual(call(ahead, origin, 3)[0], 200)
                # Still the period it was: a sidecar-clock period would have started anew.
                wait_for(lambda: spend(redis) == (5, 0), timeout=3, what="the second settle")
                ends = []
                for tg in (right, ahead):
                    _, pools = tg.admin("/v1/pools")
                    effort = [p for p in json.loads(pools) if p["dimension"] == "effort"][0]
                    self.assertEqual(effort["committed"], 5)
                    ends.append(effort["period_end_ms"])
                self.assertEqual(ends[0], ends[1])
                now_ms = int(redis("TIME")[0]) * 1000
                self.assertTrue(now_ms < ends[0] <= now_ms + 86400 * 1000, (now_ms, ends))
                # The skewed sidecar's own clock is three days on (the wrapper worked).
                r = subprocess.run(["faketime", "-f", "+3d", "date", "+%s"], capture_output=True, text=True,
                                   env=dict(os.environ, FAKETIME_DONT_FAKE_MONOTONIC="1"), timeout=10)
                self.assertGreater(int(r.stdout) * 1000, ends[0] + 86400 * 1000)

    def test_a_cascade_on_one_sidecar_quarantines_neighbours_on_every_sidecar(self):
        policy = """
apiVersion: tollgate/v1
kind: Policy
tools:
  - {name: notes.read, match: {host: 127.0.0.1, methods: [GET]}, class: read}
  - {name: notes.delete, match: {host: 127.0.0.1, methods: [DELETE]}, class: delete}
agents:
  - {id: "support-1", neighbours: ["support-2"]}
  - {id: "support-*"}
rules:
  - {id: reads, effect: allow, match: {tool: notes.read}}
  - {id: no-deletes, effect: halt, match: {tool: notes.delete}, cascade: {quarantine: 2s}}
"""
        with RedisServer() as redis, HttpOrigin() as origin:
            a, b = sidecar([redis.url], policy=policy), sidecar([redis.url], policy=policy)
            with a, b:
                def get(tg, agent):
                    rc, out, _ = curl("-i", "-H", f"X-Agent-Id: {agent}", origin.url("/hello"), proxy=tg.proxy)
                    status, _, body = parse_response(out)
                    return status, body
                self.assertEqual(get(b, "support-2")[0], 200)
                rc, out, _ = curl("-i", "-X", "DELETE", "-H", "X-Agent-Id: support-1", origin.url("/notes/1"),
                                  proxy=a.proxy)
                self.assertEqual(parse_response(out)[0], 403)
                # The neighbour is quarantined on the other sidecar too, for the cascade's time.
                status, body = wait_for(lambda: (lambda r: r if r[0] == 403 else None)(get(b, "support-2")),
                                        timeout=2, what="the quarantine to reach the other sidecar")
                self.assertEqual(json.loads(body)["rule"], "cascade")
                self.assertEqual(get(b, "support-3")[0], 200)  # not a neighbour
                # A sidecar started during the quarantine learns it from Redis at start.
                with sidecar([redis.url], policy=policy, workers=1) as c:
                    status, body = wait_for(lambda: (lambda r: r if r[0] == 403 else None)(get(c, "support-2")),
                                            timeout=2, what="the quarantine on a new sidecar")
                    self.assertEqual(json.loads(body)["rule"], "cascade")
                # It ends on every sidecar.
                wait_for(lambda: get(b, "support-2")[0] == 200, timeout=5, what="the quarantine to end")

    def test_exact_accounting_with_four_sidecars_and_64_agents_each(self):
        limit = 6000
        with RedisServer() as redis, HttpOrigin() as origin:
            sidecars = [sidecar([redis.url], limit=limit, estimate=8) for _ in range(4)]
            for s in sidecars:
                s.__enter__()
            try:
                self.assertEqual(pools_init(sidecars[0]).returncode, 0)
                samples, stop = [], threading.Event()

                def sample():
                    while not stop.is_set():
                        samples.append(spend(redis))
                        time.sleep(0.005)
                sampler = threading.Thread(target=sample)
                sampler.start()
                results = swarm([s.proxy_port for s in sidecars], origin.port, agents_per_proxy=64,
                                calls_per_agent=12, max_cost=8, seed=1234)
                stop.set()
                sampler.join(timeout=5)
                wait_for(lambda: spend(redis)[1] == 0, timeout=5, what="every hold settled")
                committed, held = spend(redis)
                allowed = [c for _, status, c in results if status == 200]
                refused = [c for _, status, c in results if status == 403]
                self.assertEqual(len(results), 4 * 64 * 12)
                self.assertEqual(len(allowed) + len(refused), len(results))
                self.assertGreater(len(refused), 0)  # the pool ran out: the limit was contended
                self.assertEqual(committed, sum(allowed))
                self.assertEqual(len(origin.requests), len(allowed))
                self.assertGreater(len(samples), 10)
                self.assertLessEqual(max(c + h for c, h in samples), limit)
            finally:
                for s in sidecars:
                    s.__exit__()


if __name__ == "__main__":
    unittest.main()
