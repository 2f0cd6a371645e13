"""The durable audit stream written by the real sidecar: every decision on disk as a
hash-chained record, sealed by a signed checkpoint at shutdown, checked by `tollgate audit
verify`; tampering found with its place; restart continues the chain; a torn last record
moved aside with a recovery record; one writer per log."""
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

from audit_log import segment_text, segments
from tollgate_harness import BIN, HttpOrigin, Tollgate, curl, parse_response, skip_unless_required, wait_for


def verify(audit_dir, *extra):
    return subprocess.run([BIN, "audit", "verify", audit_dir, *extra], capture_output=True, text=True, timeout=60)


def records(audit_dir, torn_ok=False):
    """The log's records; torn_ok: skip an unterminated last line (a write cut short)."""
    out = []
    for seg in segments(audit_dir):
        for line in segment_text(seg).splitlines(keepends=True):
            if torn_ok and not line.endswith("\n"):
                continue
            out.append(json.loads(line))
    return out


class AuditStreamTest(unittest.TestCase):
    def sidecar(self, audit_dir):
        tg = Tollgate({"hosts": {"allow": ["127.0.0.1"], "deny": ["blocked.example"]}, "audit": {"dir": audit_dir}})
        return tg

    def test_every_decision_is_recorded_sealed_and_verifiable(self):
        with HttpOrigin() as origin:
            tg = self.sidecar("audit")
            audit_dir = os.path.join(tg.dir, "audit")
            seqs = {}
            with tg:
                for i in range(5):
                    rc, out, _ = curl("-i", "-H", f"X-Agent-Id: agent-{i}", origin.url(f"/hello?i={i}"), proxy=tg.proxy)
                    status, headers, _ = parse_response(out)
                    self.assertEqual(status, 200)
                rc, out, _ = curl("-i", "http://blocked.example/x", proxy=tg.proxy)
                status, _, body = parse_response(out)
                self.assertEqual(status, 403)
                seqs["halt"] = json.loads(body)["audit_seq"]
                self.assertEqual(tg.stop(), 0)
                recs = records(audit_dir)
                calls = [r for r in recs if r["kind"] == "call"]
                self.assertEqual(len(calls), 6)
                self.assertEqual([r["decision"] for r in calls].count("allow"), 5)
                # Each allowed call's outcome is recorded, linked by call_seq; a halt has none.
                outcomes = [r for r in recs if r["kind"] == "outcome"]
                self.assertEqual(sorted(int(o["call_seq"]) for o in outcomes),
                                 sorted(r["seq"] for r in calls if r["decision"] == "allow"))
                self.assertTrue(all(o["status"] == "200" and o["sent"] == "true" and o["failed"] == "false"
                                    for o in outcomes), outcomes)
                self.assertTrue(all(int(o["call_seq"]) < o["seq"] for o in outcomes))
                halted = [r for r in recs if r["seq"] == seqs["halt"]]
                self.assertEqual(len(halted), 1)
                self.assertEqual(halted[0]["decision"], "halt")
                self.assertEqual(halted[0]["authority"], "blocked.example:80")
                self.assertEqual(recs[-1]["kind"], "checkpoint")  # sealed at shutdown
                self.assertEqual([r["seq"] for r in recs], list(range(1, len(recs) + 1)))
                r = verify(audit_dir)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
                key_id = [r for r in recs if r["kind"] == "checkpoint"][0]["key_id"]
                self.assertEqual(r.stdout, f"ok: {len(recs)} records, 1 checkpoints, 0 after the last checkpoint (unsealed)\n"
                                           f"keys: {key_id} seq 1-\n")
                self.assertEqual(oct(os.stat(os.path.join(audit_dir, "keys", "ed25519.key")).st_mode & 0o777), "0o600")

                # The halt rewritten as an allow: the record is found, with its place.
                seg = sorted(glob.glob(os.path.join(audit_dir, "segment-*.jsonl")))[0]
                with open(seg) as f:
                    original = f.readlines()
                lines = list(original)
                lines[seqs["halt"] - 1] = lines[seqs["halt"] - 1].replace('"decision":"halt"', '"decision":"allow"')
                self.assertNotEqual(lines, original)
                with open(seg, "w") as f:
                    f.writelines(lines)
                r = verify(audit_dir)
                self.assertEqual(r.returncode, 1)
                self.assertIn(f"INVALID segment-000001.jsonl:{seqs['halt'] + 1} (record {seqs['halt'] + 1}): broken link", r.stdout)
                # The intact log against a key that did not sign it.
                with open(seg, "w") as f:
                    f.writelines(original)
                self.assertEqual(verify(audit_dir).returncode, 0)
                other = os.path.join(tg.dir, "other.pub")
                with open(other, "w") as f:
                    f.write("00" * 32 + "\n")
                r = verify(audit_dir, "--pubkey", other)
                self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
                self.assertIn("unknown key", r.stdout)
                self.assertEqual(verify(os.path.join(tg.dir, "nope")).returncode, 2)

    def test_a_restart_continues_the_chain_and_a_torn_record_is_moved_aside(self):
        with HttpOrigin() as origin:
            tg = self.sidecar("audit")
            audit_dir = os.path.join(tg.dir, "audit")
            config = tg.config_path
            with tg:
                curl(origin.url("/hello"), proxy=tg.proxy)
                tg.stop()
                first = records(audit_dir)
                # A write cut short by a crash: half a record at the end of the segment.
                seg = sorted(glob.glob(os.path.join(audit_dir, "segment-*.jsonl")))[-1]
                partial = '{"agent":"agent-1","authority":"127.0.0.1:80","deci'
                with open(seg, "a") as f:
                    f.write(partial)
                again = Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": {"dir": audit_dir}})
                with again:
                    # The last checkpoint is the log's, not 0 until this process writes one.
                    _, text = again.admin("/metrics")
                    gauge = [l for l in text.decode().splitlines()
                             if l.startswith("tollgate_audit_last_checkpoint_seq ")]
                    self.assertEqual(first[-1]["kind"], "checkpoint")
                    self.assertEqual(gauge, [f"tollgate_audit_last_checkpoint_seq {first[-1]['seq']}"])
                    curl(origin.url("/hello"), proxy=again.proxy)
                    self.assertEqual(again.stop(), 0)
                recs = records(audit_dir)
                self.assertEqual(recs[:len(first)], first)  # nothing before the tear is lost
                recovery = recs[len(first)]
                self.assertEqual(recovery["kind"], "recovery")
                self.assertEqual(recovery["torn_bytes"], len(partial))
                torn = glob.glob(os.path.join(audit_dir, "torn-*.bin"))
                self.assertEqual(len(torn), 1)
                with open(torn[0]) as f:
                    self.assertTrue(f.read().startswith('{"agent":"agent-1"'))
                self.assertEqual(recs[-1]["kind"], "checkpoint")
                self.assertEqual(len({r["log_id"] for r in recs}), 1)
                r = verify(audit_dir)
                self.assertEqual(r.returncode, 0, r.stdout)

    def test_a_batch_torn_by_a_crash_is_moved_aside(self):
        """A batch is one write of whole 4 KiB blocks, its first block rewritten with the
        records before it; power lost mid-write can leave a block of it unwritten (still what
        it held: blanks, after earlier records in the first block) with later blocks on disk.
        That write never returned, so no call waited on it: at start the lines from the torn
        block on are moved aside with a recovery record, and the log verifies. A log that
        fails before such a block is still refused, and nothing is moved."""
        import http.client
        import shutil
        with HttpOrigin() as origin:
            tg = self.sidecar("audit")
            audit_dir = os.path.join(tg.dir, "audit")
            with tg:
                conn = http.client.HTTPConnection("127.0.0.1", tg.proxy_port, timeout=10)
                for i in range(40):
                    conn.request("GET", origin.url(f"/hello?i={i}"), headers={"X-Agent-Id": "a"})
                    resp = conn.getresponse()
                    resp.read()
                    self.assertEqual(resp.status, 200)
                conn.close()
                tg.proc.kill()  # unsealed, the blanks written ahead still there
                tg.proc.wait(timeout=10)
                name = os.path.basename(segments(audit_dir)[-1])
                with open(os.path.join(audit_dir, name), "rb") as f:
                    data = f.read()
                end = len(data.rstrip(b" "))
                self.assertGreater(end, 3 * 4096, "the test needs a few blocks of records")
                block = ((end - 1) // 4096 - 1) * 4096  # records before it and after it
                # A block in the middle of the batch lost: the line it falls in and the rest go.
                middle = data[:block] + b" " * 4096 + data[block + 4096:]
                middle_cut = data.rfind(b"\n", 0, block) + 1
                # The batch's first block lost: it still holds the records before the batch,
                # then blanks; the batch's first line and the rest go.
                start = data.find(b"\n", block) + 1
                self.assertLess(start, block + 4096)
                first = data[:start] + b" " * (block + 4096 - start) + data[block + 4096:]

                # Refused when the log fails before the torn block: nothing is moved aside.
                spoiled_dir = os.path.join(tg.dir, "spoiled")
                shutil.copytree(audit_dir, spoiled_dir)
                spoiled = middle.replace(b'"path":"/hello?i=1"', b'"path":"/hello?i=7"', 1)
                self.assertNotEqual(spoiled, middle)
                with open(os.path.join(spoiled_dir, name), "wb") as f:
                    f.write(spoiled)
                bad = Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": {"dir": spoiled_dir}})
                with self.assertRaisesRegex(AssertionError, "does not verify"):
                    with bad:
                        pass
                self.assertEqual(glob.glob(os.path.join(spoiled_dir, "torn-*.bin")), [])
                with open(os.path.join(spoiled_dir, name), "rb") as f:
                    self.assertEqual(f.read().rstrip(b" "), spoiled.rstrip(b" "))

                for shape, torn, cut in (("middle", middle, middle_cut), ("first", first, start)):
                    log = os.path.join(tg.dir, shape)
                    shutil.copytree(audit_dir, log)
                    with open(os.path.join(log, name), "wb") as f:
                        f.write(torn)
                    kept = [json.loads(line) for line in data[:cut].decode().splitlines()]
                    again = Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": {"dir": log}})
                    with again:
                        rc, out, _ = curl("-i", origin.url("/hello?after=1"), proxy=again.proxy)
                        self.assertEqual(parse_response(out)[0], 200)
                        self.assertEqual(again.stop(), 0)
                    recs = records(log)
                    self.assertEqual(recs[:len(kept)], kept, shape)  # nothing before the tear is lost
                    recovery = recs[len(kept)]
                    self.assertEqual(recovery["kind"], "recovery", shape)
                    moved = torn[cut:len(torn.rstrip(b" "))]
                    self.assertEqual(recovery["torn_bytes"], len(moved), shape)
                    aside = glob.glob(os.path.join(log, "torn-*.bin"))
                    self.assertEqual(len(aside), 1, shape)
                    with open(aside[0], "rb") as f:
                        self.assertEqual(f.read(), moved, shape)
                    self.assertIn("/hello?after=1", [r.get("path") for r in recs])
                    r = verify(log)
                    self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_log_id_lost_or_wrong(self):
        with HttpOrigin() as origin:
            tg = self.sidecar("audit")
            audit_dir = os.path.join(tg.dir, "audit")
            with tg:
                curl(origin.url("/hello"), proxy=tg.proxy)
                self.assertEqual(tg.stop(), 0)
                log_id = records(audit_dir)[0]["log_id"]
                # LOG_ID lost: the next sidecar takes the records' id again (a new id would
                # fork the log).
                os.unlink(os.path.join(audit_dir, "LOG_ID"))
                again = Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": {"dir": audit_dir}})
                with again:
                    curl(origin.url("/hello"), proxy=again.proxy)
                    self.assertEqual(again.stop(), 0)
                with open(os.path.join(audit_dir, "LOG_ID")) as f:
                    self.assertEqual(f.read().strip(), log_id)
                self.assertEqual({r["log_id"] for r in records(audit_dir)}, {log_id})
                self.assertEqual(verify(audit_dir).returncode, 0)
                # LOG_ID naming another log: verify says so, and no sidecar writes on it.
                with open(os.path.join(audit_dir, "LOG_ID"), "w") as f:
                    f.write("deadbeef\n")
                r = verify(audit_dir)
                self.assertEqual(r.returncode, 1, r.stdout)
                self.assertIn("LOG_ID names log deadbeef, the records are of log " + log_id, r.stdout)
                third = Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": {"dir": audit_dir}})
                with self.assertRaisesRegex(AssertionError, "LOG_ID names log deadbeef"):
                    third.__enter__()
                third.__exit__(None, None, None)
                # Not a log at all: exit 2 and why, not "ok: 0 records".
                empty = tempfile.mkdtemp(dir=tg.dir)
                for d, why in ((empty, "not an audit log"), (os.path.join(tg.dir, "nowhere"), "not a directory")):
                    r = verify(d)
                    self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
                    self.assertIn(why, r.stderr)

    def test_credentials_in_a_query_are_neither_recorded_nor_logged(self):
        """The log is kept for years, exported and replicated, and the log lines go to
        aggregators: an API key in a query string is forwarded, never written down."""
        secret = "sk-live-5eCr3t"
        with HttpOrigin() as origin:
            tg = Tollgate({"hosts": {"allow": ["127.0.0.1"]},
                           "audit": {"dir": "audit", "redact_query_params": ["Tenant"]}})
            with tg:
                target = f"/hello?q=x&api_key={secret}&tenant=acme&Access_Token={secret}"
                rc, out, err = curl(origin.url(target), proxy=tg.proxy)
                self.assertEqual((rc, out), (0, b"hello"), err)
                self.assertEqual(origin.requests[-1][1], target)  # upstream gets it as sent
                calls = wait_for(lambda: [r for r in records(os.path.join(tg.dir, "audit"))
                                          if r["kind"] == "call" and r.get("path", "").startswith("/hello")],
                                 timeout=5, what="the call's record")
                self.assertEqual(calls[-1]["path"],
                                 "/hello?q=x&api_key=REDACTED&tenant=REDACTED&Access_Token=REDACTED")
                logged = wait_for(lambda: tg.logs("request"), timeout=5, what="the request's log line")
                self.assertEqual(logged[-1]["path"], calls[-1]["path"])
                _, tail = tg.admin("/v1/audit/tail?n=50")
                self.assertNotIn(secret.encode(), tail)
                self.assertNotIn(secret, json.dumps(tg.lines))
                for seg in segments(os.path.join(tg.dir, "audit")):
                    self.assertNotIn(secret, segment_text(seg))
                self.assertEqual(verify(os.path.join(tg.dir, "audit")).returncode, 0)

    def test_a_full_disk_halts_calls_with_audit_unavailable(self):
        mnt = tempfile.mkdtemp(prefix="tollgate-audit-tmpfs-")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", mnt],
                          capture_output=True).returncode != 0:
            skip_unless_required("cannot mount a tmpfs here (needs root): the full-disk test did not run")
        try:
            with HttpOrigin() as origin:
                tg = Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": {"dir": os.path.join(mnt, "audit")},
                               "admin": {"address": "127.0.0.1:0",
                                         "tokens": ["sha256:" + hashlib.sha256(b"t").hexdigest()]}})
                with tg:
                    rc, out, _ = curl("-i", origin.url("/hello"), proxy=tg.proxy)
                    self.assertEqual(parse_response(out)[0], 200)
                    # Fill the disk: the next group of records cannot be written.
                    with open(os.path.join(mnt, "filler"), "wb") as f:
                        try:
                            while True:
                                f.write(b"\0" * 65536)
                                f.flush()
                        except OSError:
                            pass
                    # The blanks written ahead of the records (audit.prefill: up to 1 MiB,
                    # here what the disk had left) still take records; then the write
                    # fails. A call is forwarded only once its record is on disk.
                    import http.client
                    conn = http.client.HTTPConnection("127.0.0.1", tg.proxy_port, timeout=10)
                    statuses = []
                    for i in range(5000):  # bounded: 512k hold ~1000 records
                        conn.request("GET", origin.url(f"/full-{i}"))
                        resp = conn.getresponse()
                        body = resp.read()
                        statuses.append(resp.status)
                        if resp.status == 403:
                            doc = json.loads(body)
                            self.assertEqual(doc["rule"], "audit")
                            self.assertIn("audit_unavailable", doc["reason"])
                            break
                    conn.close()
                    self.assertEqual(statuses[-1], 403, statuses[-5:])
                    forwarded = {t for _, t, _ in list(origin.requests) if t.startswith("/full-")}
                    self.assertEqual(len(forwarded), len(statuses) - 1)
                    recorded = {r["path"] for r in records(os.path.join(mnt, "audit"), torn_ok=True)
                                if r["kind"] == "call"}
                    self.assertTrue(forwarded <= recorded, forwarded - recorded)
                    # Fail closed from then on, and the sidecar stays up.
                    rc, out, _ = curl("-i", origin.url("/hello"), proxy=tg.proxy)
                    self.assertEqual(parse_response(out)[0], 403)
                    self.assertIsNone(tg.proc.poll())
                    self.assertTrue(any(l.get("msg") == "audit stream unwritable" for l in tg.logs()))
                    # One batch failed; what came after it was dropped, not failed again.
                    def metric(name):
                        _, text = tg.admin("/metrics")
                        line = [l for l in text.decode().splitlines() if l.startswith(name + " ")]
                        return float(line[0].split()[1]) if line else None
                    self.assertEqual(metric("tollgate_audit_write_failures_total"), 1.0)
                    self.assertEqual(metric("tollgate_audit_healthy"), 0.0)
                    # Each call counted once, with its final decision: the one whose record
                    # the failed batch held was allowed, then halted; it is a halt only.
                    forwarded_calls = 1 + len(forwarded)  # /hello, then the /full- before the 403
                    self.assertEqual(metric('tollgate_decisions_total{decision="allow",rule="hosts.allow"}'),
                                     forwarded_calls)
                    self.assertEqual(metric('tollgate_decisions_total{decision="halt",rule="audit"}'), 2.0)
                    self.assertEqual(metric('tollgate_halts_total{reason="audit"}'), 2.0)
                    # A sidecar that can only refuse is not ready (the process still lives).
                    status, body = tg.admin("/readyz")
                    self.assertEqual((status, body), (503, b"not ready: audit stream unwritable\n"))
                    self.assertEqual(tg.admin("/healthz")[0], 200)
                    wait_for(lambda: (metric("tollgate_audit_dropped_records_total") or 0) >= 1, timeout=5,
                             what="the halts after the failure counted as dropped")
                    self.assertEqual(metric("tollgate_audit_write_failures_total"), 1.0)
                    # An admin action whose record cannot be made durable is not answered 200.
                    rc, out, _ = curl("-i", "-X", "POST", "-H", "Authorization: Bearer t",
                                      f"http://127.0.0.1:{tg.admin_port}/v1/audit/report?sha256=" + "ab" * 32)
                    status, _, body = parse_response(out)
                    self.assertEqual(status, 503, body)
                    self.assertEqual(json.loads(body)["error"], "audit_unavailable")
        finally:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
            os.rmdir(mnt)

    def test_without_admin_tokens_no_one_writes_into_the_stream_or_rotates_its_key(self):
        """The agents can reach the admin listener: without admin.tokens, a report record or
        a key rotation is refused, not done for whoever asks; a reload still goes."""
        tg = self.sidecar("audit")
        with tg:
            before = len(records(os.path.join(tg.dir, "audit"), torn_ok=True))
            for path in ("/v1/audit/report?sha256=" + "ab" * 32, "/v1/audit/rotate-key"):
                status, body = tg.admin(path, "POST")
                self.assertEqual(status, 403, body)
                self.assertEqual(json.loads(body)["error"], "unauthorized")
                self.assertIn("admin.tokens", json.loads(body)["reason"])
            self.assertEqual(tg.admin("/v1/reload", "POST")[0], 409)  # hosts: lists: nothing to reload
            self.assertEqual(tg.stop(), 0)
            recs = records(os.path.join(tg.dir, "audit"))
            self.assertFalse([r for r in recs if r["kind"] in ("report", "key_rotation")], recs[before:])

    def test_a_segment_that_cannot_be_created_at_rotation_halts_and_shows(self):
        """The file system has no inode left when a full segment is sealed: the next one
        cannot be created, calls are halted, and the metrics and /readyz say so (the gauge
        stayed 1: only a failed batch set it)."""
        mnt = tempfile.mkdtemp(prefix="tollgate-audit-inodes-")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=64", "tmpfs", mnt],
                          capture_output=True).returncode != 0:
            skip_unless_required("cannot mount a tmpfs here (needs root): the rotation test did not run")
        try:
            with HttpOrigin() as origin:
                audit_dir = os.path.join(mnt, "audit")
                tg = Tollgate({"hosts": {"allow": ["127.0.0.1"]},
                               "audit": {"dir": audit_dir, "segment_size": "8k"}})
                with tg:
                    self.assertEqual(tg.admin("/readyz"), (200, b"ready\n"))
                    # Every inode left taken: the next segment cannot be created.
                    n = 0
                    while True:
                        try:
                            open(os.path.join(mnt, f"f{n}"), "w").close()
                        except OSError:
                            break
                        n += 1
                        self.assertLess(n, 100)
                    import http.client
                    conn = http.client.HTTPConnection("127.0.0.1", tg.proxy_port, timeout=10)
                    statuses = []
                    for i in range(200):  # bounded: 8k hold ~20 records
                        conn.request("GET", origin.url(f"/r-{i}"))
                        resp = conn.getresponse()
                        resp.read()
                        statuses.append(resp.status)
                        if resp.status == 403:
                            break
                    conn.close()
                    self.assertEqual(statuses[-1], 403, statuses[-5:])
                    self.assertEqual(len(glob.glob(os.path.join(audit_dir, "segment-*.jsonl"))), 1)
                    self.assertTrue(any(l.get("msg") == "audit stream unwritable" for l in tg.logs()))
                    _, text = tg.admin("/metrics")
                    self.assertIn("\ntollgate_audit_healthy 0\n", text.decode())
                    self.assertEqual(tg.admin("/readyz")[0], 503)
        finally:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
            os.rmdir(mnt)

    def test_a_disk_that_stalls_refuses_calls_after_ten_seconds_and_recovers(self):
        """A file system frozen (fsfreeze: a stalled disk that returns no error) holds the
        audit writer's sync: a call waiting for its record is refused with 403
        audit_unavailable after 10 s, not held for as long as the disk takes; once the disk
        thaws, calls go on."""
        tmp = tempfile.mkdtemp(prefix="tollgate-audit-freeze-")
        image, mnt = os.path.join(tmp, "fs.img"), os.path.join(tmp, "mnt")
        os.makedirs(mnt)
        with open(image, "wb") as f:
            f.truncate(32 << 20)
        ok = (subprocess.run(["mkfs.ext4", "-q", image], capture_output=True).returncode == 0 and
              subprocess.run(["mount", "-o", "loop", image, mnt], capture_output=True).returncode == 0)
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
            skip_unless_required("cannot mount a loop file system here (needs root): the stall test did not run")
        frozen = False
        try:
            with HttpOrigin() as origin:
                tg = Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": {"dir": os.path.join(mnt, "audit")}})
                with tg:
                    rc, out, _ = curl("-i", origin.url("/hello"), proxy=tg.proxy)
                    self.assertEqual(parse_response(out)[0], 200)
                    subprocess.run(["fsfreeze", "-f", mnt], check=True, timeout=30)
                    frozen = True
                    start = time.monotonic()
                    rc, out, _ = curl("-i", "--max-time", "30", origin.url("/hello?stalled"), proxy=tg.proxy)
                    took = time.monotonic() - start
                    status, _, body = parse_response(out)
                    self.assertEqual(status, 403, out)
                    doc = json.loads(body)
                    self.assertEqual(doc["rule"], "audit")
                    self.assertIn("not on disk within 10 s", doc["reason"])
                    self.assertTrue(9 <= took < 20, took)
                    self.assertNotIn("/hello?stalled", [t for _, t, _ in list(origin.requests)])
                    subprocess.run(["fsfreeze", "-u", mnt], check=True, timeout=30)
                    frozen = False
                    rc, out, _ = curl("-i", origin.url("/hello?thawed"), proxy=tg.proxy)
                    self.assertEqual(parse_response(out)[0], 200, out)
                    self.assertEqual(tg.stop(), 0)
                r = verify(os.path.join(mnt, "audit"))
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        finally:
            if frozen:
                subprocess.run(["fsfreeze", "-u", mnt], capture_output=True)
            subprocess.run(["umount", "-l", mnt], capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)

    def test_kill_9_under_load_loses_no_record_of_a_forwarded_call(self):
        """Calls run on 16 keep-alive connections, each to its own path, when the sidecar is
        killed with SIGKILL. A call is forwarded only once its record is fsynced, so every
        call the origin saw has its record in the log; after a restart the log verifies."""
        with HttpOrigin() as origin:
            tg = self.sidecar("audit")
            audit_dir = os.path.join(tg.dir, "audit")
            ok_paths = set()
            lock = threading.Lock()
            stop = threading.Event()

            def client(c):
                import http.client
                conn = http.client.HTTPConnection("127.0.0.1", tg.proxy_port, timeout=5)
                try:
                    for n in range(3000):  # bounded; the kill ends it long before
                        if stop.is_set():
                            return
                        path = f"/hello?c={c}&n={n}"
                        conn.request("GET", origin.url(path), headers={"X-Agent-Id": f"a{c}"})
                        resp = conn.getresponse()
                        resp.read()
                        if resp.status == 200:
                            with lock:
                                ok_paths.add(path)
                except (OSError, http.client.HTTPException):
                    return

            with tg:
                threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
                for t in threads:
                    t.start()
                wait_for(lambda: len(origin.requests) >= 400, timeout=30, what="400 calls at the origin")
                tg.proc.kill()
                tg.proc.wait(timeout=10)
                stop.set()
                for t in threads:
                    t.join(timeout=10)
                seen = {target for _, target, _ in list(origin.requests)}
                self.assertTrue(ok_paths <= seen)
                self.assertGreaterEqual(len(seen), 400)

                # Restart on the same log: it verifies at start (a torn tail moved aside), seals.
                again = Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": {"dir": audit_dir}})
                with again:
                    self.assertEqual(again.stop(), 0)
                r = verify(audit_dir)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
                recorded = {rec["path"] for rec in records(audit_dir)
                            if rec["kind"] == "call" and rec["decision"] == "allow"}
                missing = seen - recorded
                self.assertEqual(missing, set(), f"{len(missing)} forwarded calls have no record")

    def test_a_second_writer_is_refused(self):
        first = self.sidecar("audit")
        audit_dir = os.path.join(first.dir, "audit")
        with first:
            second = Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": {"dir": audit_dir}})
            with self.assertRaisesRegex(AssertionError, "in use by another process"):
                with second:
                    pass
            # A conflict with another process, like a taken port: exit 1, not a bad config's 2.
            self.assertEqual(second.proc.wait(timeout=10), 1)


if __name__ == "__main__":
    unittest.main()
