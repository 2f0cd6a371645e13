"""Where the audit stream goes besides its own directory, with the real sidecar: a Redis
Stream replica (a real redis-server) holding every record once and in order, also across
Redis going away and a sidecar restart; and an export directory receiving each sealed
segment and every checkpoint, which `tollgate audit verify` accepts on its own."""
import glob
import json
import os
import shutil
import subprocess
import tempfile
import unittest

from audit_log import segment_text, segments
from redis_harness import RedisServer
from tollgate_harness import BIN, HttpOrigin, Tollgate, curl, parse_response, wait_for


def log_lines(audit_dir):
    out = []
    for seg in segments(audit_dir):
        out += segment_text(seg).splitlines()
    return out


def stream(redis, audit_dir):
    with open(os.path.join(audit_dir, "LOG_ID")) as f:
        log_id = f.read().strip()
    entries = redis("XRANGE", f"tollgate:audit:{log_id}", "-", "+")
    # [[id, [field, value]], …]
    return [(e[0], e[1][1]) for e in entries]


def calls(tg, origin, n, tag):
    for i in range(n):
        rc, out, _ = curl("-i", "-H", f"X-Agent-Id: agent-{i % 3}", origin.url(f"/hello?{tag}={i}"),
                          proxy=tg.proxy)
        assert parse_response(out)[0] == 200, out


class AuditReplicaTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="tollgate-replica-")
        self.audit = os.path.join(self.tmp, "audit")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def sidecar(self, audit_extra=None):
        audit = {"dir": self.audit}
        audit.update(audit_extra or {})
        return Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": audit})

    def assertStreamIsTheLog(self, redis):
        lines = log_lines(self.audit)
        entries = stream(redis, self.audit)
        self.assertEqual([e[0] for e in entries], [f"{i}-0" for i in range(1, len(lines) + 1)])
        self.assertEqual([e[1] for e in entries], lines)
        return lines

    def wait_replicated(self, tg, at_least):
        """The replica's metrics once it holds every record up to `at_least` and lags none."""
        def replica_metrics():
            _, text = tg.admin("/metrics")
            vals = {}
            for line in text.decode().splitlines():
                if line.startswith("tollgate_audit_replica_") or line.startswith("tollgate_audit_records_total"):
                    name, value = line.rsplit(" ", 1)
                    vals[name] = float(value)
            return vals if vals.get("tollgate_audit_replica_lag_records") == 0 and \
                vals.get("tollgate_audit_replica_seq", 0) >= at_least else None
        return wait_for(replica_metrics, timeout=10, what="the replica caught up, in /metrics")

    def test_every_record_is_in_the_stream_once_and_in_order(self):
        with RedisServer() as redis, HttpOrigin() as origin:
            tg = self.sidecar({"replica": {"url": redis.url}})
            with tg:
                calls(tg, origin, 20, "a")
                vals = self.wait_replicated(tg, 40)
                self.assertEqual(vals["tollgate_audit_replica_dropped_records"], 0)
                self.assertEqual(tg.stop(), 0)
            lines = self.assertStreamIsTheLog(redis)
            self.assertEqual(json.loads(lines[-1])["kind"], "checkpoint")  # the seal went too
            self.assertEqual(sum(json.loads(l)["kind"] == "call" for l in lines), 20)

    def test_a_redis_that_asks_for_a_password_gets_it(self):
        with RedisServer(password="s3cret") as redis, HttpOrigin() as origin:
            tg = self.sidecar({"replica": {"url": f"redis://:s3cret@127.0.0.1:{redis.port}"}})
            with tg:
                calls(tg, origin, 3, "a")
                self.wait_replicated(tg, 6)
            entries = redis("XLEN", f"tollgate:audit:{open(os.path.join(self.audit, 'LOG_ID')).read().strip()}")
            self.assertGreaterEqual(entries, 6)

    def test_redis_away_and_back_then_a_restart_leave_no_gap(self):
        with HttpOrigin() as origin:
            redis = RedisServer()
            redis.start()
            try:
                tg = self.sidecar({"replica": {"url": redis.url}})
                with tg:
                    calls(tg, origin, 5, "before")
                    redis.shutdown_nosave()  # everything in it is gone, too
                    calls(tg, origin, 10, "away")  # calls go on: the replica is not a trust root
                    redis.start()
                    calls(tg, origin, 5, "back")
                    self.assertEqual(tg.stop(), 0)
                # The empty stream was filled from the log, from seq 1.
                first = len(self.assertStreamIsTheLog(redis))
                # A sidecar without the replica writes more; the next one with it catches up.
                plain = self.sidecar()
                with plain:
                    calls(plain, origin, 4, "plain")
                    self.assertEqual(plain.stop(), 0)
                again = self.sidecar({"replica": {"url": redis.url}})
                with again:
                    calls(again, origin, 3, "again")
                    self.assertEqual(again.stop(), 0)
                self.assertGreater(len(self.assertStreamIsTheLog(redis)), first + 7)
            finally:
                redis.__exit__(None, None, None)

    def test_a_catch_up_reads_the_log_segment_by_segment(self):
        # A log of many small segments written without the replica; the next sidecar, with
        # it, fills the empty stream from seq 1 across every segment (reading the one that
        # holds the next seq each time, not the whole log).
        with RedisServer() as redis, HttpOrigin() as origin:
            plain = self.sidecar({"segment_size": "4k"})
            with plain:
                calls(plain, origin, 40, "plain")
                self.assertEqual(plain.stop(), 0)
            self.assertGreater(len(glob.glob(os.path.join(self.audit, "segment-*.jsonl"))), 5)
            tg = self.sidecar({"segment_size": "4k", "replica": {"url": redis.url}})
            with tg:
                calls(tg, origin, 2, "after")
                self.wait_replicated(tg, len(log_lines(self.audit)))
                self.assertEqual(tg.stop(), 0)
            lines = self.assertStreamIsTheLog(redis)
            self.assertEqual(sum(json.loads(l)["kind"] == "call" for l in lines), 42)

    def test_sealed_segments_and_checkpoints_are_exported_and_verify(self):
        export = os.path.join(self.tmp, "archive")
        with HttpOrigin() as origin:
            tg = self.sidecar({"segment_size": "4k", "checkpoint_every": 10, "export": {"dir": export}})
            with tg:
                calls(tg, origin, 60, "x")
                self.assertEqual(tg.stop(), 0)
            # The last segment was sealed at shutdown; the next start exports it.
            again = self.sidecar({"segment_size": "4k", "export": {"dir": export}})
            with again:
                wait_for(lambda: len(glob.glob(os.path.join(export, "segment-*.jsonl"))) ==
                         len(glob.glob(os.path.join(self.audit, "segment-*.jsonl"))) - 1,
                         timeout=10, what="every sealed segment exported")
                self.assertEqual(again.stop(), 0)
        segs = sorted(glob.glob(os.path.join(self.audit, "segment-*.jsonl")))
        exported = sorted(glob.glob(os.path.join(export, "segment-*.jsonl")))
        self.assertGreaterEqual(len(exported), 3)
        for path in exported:  # byte for byte
            with open(path, "rb") as a, open(os.path.join(self.audit, os.path.basename(path)), "rb") as b:
                self.assertEqual(a.read(), b.read(), path)
        self.assertEqual([os.path.basename(p) for p in exported], [os.path.basename(p) for p in segs[:len(exported)]])
        r = subprocess.run([BIN, "audit", "verify", export], capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        with open(os.path.join(export, "checkpoints.jsonl")) as f:
            exported_cps = [l.rstrip("\n") for l in f]
        log_cps = [l for l in log_lines(self.audit) if json.loads(l)["kind"] == "checkpoint"]
        self.assertEqual(exported_cps, log_cps)  # every checkpoint, once, in order

    def test_bad_replica_and_export_settings_stop_startup_with_the_line(self):
        tg = self.sidecar({"replica": {"stream": "x"}})
        with self.assertRaisesRegex(AssertionError, r"tollgate.yaml:\d+:\d+: audit.replica.url: required"):
            with tg:
                pass


if __name__ == "__main__":
    unittest.main()
