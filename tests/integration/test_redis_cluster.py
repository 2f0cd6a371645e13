"""Shared pools on a real 3-master Redis Cluster: several pools on different masters,
four sidecars with 64 agents each, exact accounting, no CROSSSLOT, and a pool's slot
migrated to another master in the middle of the run."""
import json
import os
import subprocess
import threading
import time
import unittest

from redis_harness import RedisCluster, RedisError, swarm
from tollgate_harness import BIN, HttpOrigin, Tollgate, wait_for

POLICY_HEAD = """
apiVersion: tollgate/v1
kind: Policy
tools:
  - name: notes.write
    match: {host: 127.0.0.1, methods: [POST]}
    class: write
    cost: {effort: 8, risk: 1, effort_header: X-Cost-Effort}
rules:
  - {id: writes, effect: allow, match: {tool: notes.write}}
"""


class RedisClusterBudgetTest(unittest.TestCase):
    def test_four_sidecars_on_a_three_master_cluster_while_a_slot_moves(self):
        limit = 2500
        with RedisCluster() as cluster, HttpOrigin() as origin:
            # One pool per master, found by the slots of their hash tags.
            pools, owners = [], set()
            for i in range(200):
                name = f"pool-{i}"
                owner = cluster.owner(cluster.key_slot(f"tollgate:{{{name}}}:b")).port
                if owner not in owners:
                    owners.add(owner)
                    pools.append(name)
                if len(pools) == 3:
                    break
            self.assertEqual(len(pools), 3)
            policy = POLICY_HEAD + "pools:\n" + "".join(
                f"  - {{name: {p}, scope: shared, effort: {{limit: {limit}, period: 1d}}, "
                f"risk: {{limit: 1000000, period: 1d}}}}\n" for p in pools)
            # Sidecar i's agents charge pool i % 3: sidecars 0 and 3 share a pool.
            policy += "agents:\n" + "".join(f'  - {{id: "agent-{i}-*", pool: {pools[i % 3]}}}\n' for i in range(4))

            sidecars = []
            for i in range(4):
                tg = Tollgate({"workers": 2})
                with open(os.path.join(tg.dir, "policy.yaml"), "w") as f:
                    f.write(policy)
                tg.config.pop("hosts")
                tg.config["policies"] = ["policy.yaml"]
                # Each sidecar knows one seed only; it learns the rest from CLUSTER SLOTS.
                tg.config["store"] = {"backend": "redis", "urls": [cluster.urls[i % 3]], "timeout": "250ms"}
                with open(tg.config_path, "w") as f:
                    json.dump(tg.config, f)
                sidecars.append(tg)
            r = subprocess.run([BIN, "pools", "init", "-c", sidecars[0].config_path], capture_output=True,
                               text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(sorted(r.stdout.splitlines()), sorted(f"{p}: created with zero spend" for p in pools))
            for s in sidecars:
                s.__enter__()
            try:
                def spend(pool):
                    node = cluster.owner(cluster.key_slot(f"tollgate:{{{pool}}}:b"))
                    v = node("HMGET", f"tollgate:{{{pool}}}:b", "effort:committed", "effort:held")
                    return int(v[0] or 0), int(v[1] or 0)

                def redirects():
                    total = 0
                    for n in cluster.nodes:
                        for line in n("INFO", "errorstats").splitlines():
                            if line.startswith(("errorstat_MOVED:", "errorstat_ASK:")):
                                total += int(line.split("count=")[1].split(",")[0])
                    return total
                redirects_before = redirects()

                # Mid-run, the slot of the pool two sidecars share moves to another master.
                moved = {}
                slot = cluster.key_slot(f"tollgate:{{{pools[0]}}}:b")
                sampling = threading.Lock()  # the sampler's reads never meet the migration

                def migrate():
                    wait_for(lambda: spend(pools[0])[0] > limit // 4, timeout=60, what="the run to be under way")
                    with sampling:
                        src = cluster.owner(slot)
                        dst = next(n for n in cluster.nodes if n is not src)
                        moved["calls_before"] = len(origin.requests)
                        cluster.migrate_slot(slot, dst, pause=0.2)
                        moved["from"], moved["to"] = src.port, dst.port
                        moved["calls_after"] = len(origin.requests)

                # committed + held of every pool, sampled through the run: never above the limit.
                samples, done = [], threading.Event()

                def sample():
                    while not done.is_set():
                        with sampling:
                            for p in pools:
                                try:
                                    samples.append((p, sum(spend(p))))
                                except RedisError:
                                    pass
                        time.sleep(0.005)
                sampler = threading.Thread(target=sample)
                sampler.start()
                mover = threading.Thread(target=migrate)
                mover.start()
                try:
                    results = swarm([s.proxy_port for s in sidecars], origin.port, agents_per_proxy=64,
                                    calls_per_agent=10, max_cost=8, seed=99)
                finally:
                    mover.join(timeout=30)
                    done.set()
                    sampler.join(timeout=30)
                self.assertIn("to", moved, "the slot was not migrated during the run")
                self.assertEqual(cluster.owner(slot).port, moved["to"])
                # The migration fell inside the run: calls went out before it began and after it ended.
                self.assertGreater(moved["calls_before"], 0)
                self.assertLess(moved["calls_after"], len(origin.requests), "no call after the migration")
                # Calls met the moving slot: the sidecars were redirected (MOVED or ASK) and followed.
                self.assertGreater(redirects() - redirects_before, 0)
                self.assertGreaterEqual(len(samples), 15)  # at least 5 of each pool, under full load
                self.assertLessEqual(max(v for _, v in samples), limit)
                self.assertTrue(any(status == 403 for _, status, _ in results), "no pool was ever full")
                self.assertEqual(len(results), 4 * 64 * 10)
                for p in pools:
                    wait_for(lambda: spend(p)[1] == 0, timeout=5, what=f"every hold of {p} settled")
                by_pool = {p: 0 for p in pools}
                for agent, status, cost in results:
                    self.assertIn(status, (200, 403))
                    if status == 200:
                        by_pool[pools[int(agent.split("-")[1]) % 3]] += cost
                for p in pools:
                    committed, held = spend(p)
                    self.assertEqual(committed, by_pool[p], p)
                    self.assertLessEqual(committed, limit)
                self.assertEqual(len(origin.requests), sum(1 for _, status, _ in results if status == 200))
                # No CROSSSLOT (or any other store error) was ever answered.
                for s in sidecars:
                    for line in s.logs():
                        self.assertNotIn("CROSSSLOT", json.dumps(line))
                    _, metrics = s.admin("/metrics")
                    self.assertNotIn("CROSSSLOT", metrics.decode())
                    # MOVED and ASK were followed: no operation failed, even mid-migration.
                    failed = [l for l in metrics.decode().splitlines() if 'result="budget_unavailable"' in l]
                    self.assertEqual(failed, [])
                    self.assertIn('tollgate_budget_operations_total{op="reserve",result="ok"}', metrics.decode())
            finally:
                for s in sidecars:
                    s.__exit__()


if __name__ == "__main__":
    unittest.main()
