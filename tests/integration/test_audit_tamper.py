"""Adversarial tests of the audit stream: a REAL log written by the REAL sidecar (three runs
of calls through it, a halted one among them, each sealed at shutdown), copied and tampered
with case by case. Each tampering must make `tollgate audit verify` exit 1 with its reason;
truncation, rollback and forks that leave a log consistent in itself are caught through
`--state`. A torn last write is cut at every byte offset of the final record and the sidecar
restarted on it; every bit of a small log is flipped. `audit prove` output verifies, and
every change to a proof is rejected. (One writer per log is in test_audit.py.)"""
import concurrent.futures
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

from audit_log import canonical, read_lines, run, segments, write_lines
from tollgate_harness import BIN, SANITIZED, HttpOrigin, Tollgate, curl, parse_response, wait_for


def sha(line):
    return hashlib.sha256(line.encode()).hexdigest()


def sidecar(audit_dir):
    return Tollgate({"hosts": {"allow": ["127.0.0.1"], "deny": ["blocked.example"]},
                     "audit": {"dir": audit_dir}})


def calls(tg, origin, tags):
    """One allowed call per tag, each to its own URL (/hello?c=TAG)."""
    for t in tags:
        p = f"/hello?c={t}"
        rc, out, _ = curl("-i", origin.url(p), proxy=tg.proxy)
        assert parse_response(out)[0] == 200, out


class AuditTamperTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="tollgate-tamper-")
        cls.base = os.path.join(cls.tmp, "base")
        cls.foreign = os.path.join(cls.tmp, "foreign")
        cls.small = os.path.join(cls.tmp, "small")
        cls.origin = HttpOrigin().__enter__()
        # Three runs of a dozen calls each on one log: three checkpoints, one per shutdown.
        for run_no in range(3):
            with sidecar(cls.base) as tg:
                calls(tg, cls.origin, [f"run{run_no}-{i}" for i in range(12)])
                if run_no == 0:
                    rc, out, _ = curl("-i", "http://blocked.example/secret", proxy=tg.proxy)
                    status, _, body = parse_response(out)
                    assert status == 403, out
                    cls.halt_seq = json.loads(body)["audit_seq"]
                assert tg.stop() == 0
        with sidecar(cls.foreign) as tg:  # another log, another key
            calls(tg, cls.origin, [f"foreign-{i}" for i in range(5)])
            assert tg.stop() == 0
        with sidecar(cls.small) as tg:  # the smallest real log: one call and its checkpoint
            calls(tg, cls.origin, ["s"])
            assert tg.stop() == 0
        # The verifier's trusted key lives outside the log (an attacker can rewrite keys/).
        cls.pub = os.path.join(cls.tmp, "base.pub")
        shutil.copy(os.path.join(cls.base, "keys", "ed25519.pub"), cls.pub)
        cls.foreign_pub = os.path.join(cls.tmp, "foreign.pub")
        shutil.copy(os.path.join(cls.foreign, "keys", "ed25519.pub"), cls.foreign_pub)
        cls.lines = read_lines(cls.base)
        cls.records = [json.loads(l) for l in cls.lines]
        cls.checkpoints = [r["seq"] for r in cls.records if r["kind"] == "checkpoint"]

    @classmethod
    def tearDownClass(cls):
        cls.origin.__exit__(None, None, None)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def copy(self, src=None):
        d = tempfile.mkdtemp(prefix="case-", dir=self.tmp)
        os.rmdir(d)
        shutil.copytree(src or self.base, d)
        return d

    def state(self):
        """A fresh state trusting the clean base log's last checkpoint."""
        path = tempfile.mktemp(prefix="state-", suffix=".json", dir=self.tmp)
        r = run("verify", self.base, "--pubkey", self.pub, "--state", path)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("created", r.stdout)
        return path

    def assertInvalid(self, d, reason, *extra, pub=None):
        r = run("verify", d, "--pubkey", pub or self.pub, *extra)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertTrue(r.stdout.startswith("INVALID "), r.stdout)
        self.assertIn(reason, r.stdout)
        return r.stdout

    def assertValid(self, d, *extra, pub=None):
        r = run("verify", d, "--pubkey", pub or self.pub, *extra)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertTrue(r.stdout.startswith("ok: "), r.stdout)
        return r.stdout

    # --- the log as written -----------------------------------------------------------------

    def test_the_log_is_real_and_a_clean_log_always_passes(self):
        kinds = [r["kind"] for r in self.records]
        self.assertEqual(kinds.count("call"), 37)
        self.assertEqual(len(self.checkpoints), 3)
        self.assertEqual(self.records[-1]["kind"], "checkpoint")
        self.assertEqual(self.records[self.halt_seq - 1]["decision"], "halt")
        for line in self.lines:  # the forger's canonical form is the writer's
            self.assertEqual(canonical(json.loads(line)), line)
        out = self.assertValid(self.base)
        self.assertEqual(out, f"ok: {len(self.lines)} records, 3 checkpoints, 0 after the last checkpoint (unsealed)\n"
                              f"keys: {self.records[-1]['key_id']} seq 1-\n")
        state = self.state()
        for _ in range(2):
            out = self.assertValid(self.base, "--state", state)
            self.assertIn(f"trusts checkpoint seq {len(self.lines)} (tree size {len(self.lines) - 1}), unchanged", out)
        self.assertValid(self.foreign, pub=self.foreign_pub)
        self.assertValid(self.small, pub=os.path.join(self.small, "keys", "ed25519.pub"))

    # --- removal ----------------------------------------------------------------------------

    def test_tail_truncation_is_caught_through_the_state(self):
        state = self.state()
        with open(state) as f:
            before = f.read()
        for cut in (1, 5, len(self.lines) - self.checkpoints[1]):  # the last 5, back to checkpoint 2
            d = self.copy()
            write_lines(d, self.lines[:-cut])
            self.assertValid(d)  # consistent in itself: only the state can tell
            self.assertInvalid(d, f"INVALID {d}: truncated: the log has {len(self.lines) - cut} records, fewer than "
                                  f"the trusted checkpoint (seq {len(self.lines)}", "--state", state)
            with open(state) as f:
                self.assertEqual(f.read(), before)  # not advanced by an invalid log
        d = self.copy()
        write_lines(d, [])
        self.assertInvalid(d, "truncated: the log is empty", "--state", state)

    def split_into_segments(self, d):
        """Rotation's layout: a segment per run, each ending with its checkpoint. (The real
        binary rotates at 64 MiB, not configurable: the split is done here, at checkpoints.)"""
        for seg in segments(d):
            os.remove(seg)
        start = 0
        for n, cp in enumerate(self.checkpoints, 1):
            with open(os.path.join(d, f"segment-{n:06d}.jsonl"), "w") as f:
                f.write("".join(l + "\n" for l in self.lines[start:cp]))
            start = cp

    def test_whole_segment_deletion(self):
        d = self.copy()
        self.split_into_segments(d)
        self.assertEqual(len(segments(d)), 3)
        self.assertValid(d)
        state = self.state()
        self.assertValid(d, "--state", state)
        middle = self.copy(d)
        os.remove(os.path.join(middle, "segment-000002.jsonl"))
        self.assertInvalid(middle, f"INVALID segment-000003.jsonl:1 (record {self.checkpoints[0] + 1}): sequence broken: "
                                   f"expected seq {self.checkpoints[0] + 1}, found {self.checkpoints[1] + 1} (records missing)")
        first = self.copy(d)
        os.remove(os.path.join(first, "segment-000001.jsonl"))
        self.assertInvalid(first, "INVALID segment-000002.jsonl:1 (record 1): sequence broken: expected seq 1")
        last = self.copy(d)
        os.remove(os.path.join(last, "segment-000003.jsonl"))
        self.assertValid(last)  # ends on a checkpoint: only the state can tell
        self.assertInvalid(last, "truncated", "--state", state)

    def test_a_record_deleted_mid_log(self):
        d = self.copy()
        write_lines(d, self.lines[:9] + self.lines[10:])
        self.assertInvalid(d, "INVALID segment-000001.jsonl:10 (record 10): sequence broken: expected seq 10, found 11 (records missing)")
        # Renumbered and relinked after it, the next checkpoint's tree size gives it away.
        d = self.copy()
        forged = self.lines[:9]
        for line in self.lines[10:]:
            r = json.loads(line)
            r["seq"] = len(forged) + 1
            r["prev"] = sha(forged[-1])
            forged.append(canonical(r))
        write_lines(d, forged)
        cp = self.checkpoints[0] - 1
        self.assertInvalid(d, f"INVALID segment-000001.jsonl:{cp} (record {cp}): checkpoint tree_size {cp} is not the {cp - 1} records")

    # --- insertion and order ----------------------------------------------------------------

    def test_a_record_inserted(self):
        fake = dict(self.records[10])
        fake.update(seq=11, prev=sha(self.lines[9]), path="/never-called", decision="allow")
        d = self.copy()
        write_lines(d, self.lines[:10] + [canonical(fake)] + self.lines[10:])
        self.assertInvalid(d, "INVALID segment-000001.jsonl:12 (record 12): sequence broken: expected seq 12, found 11 (records repeated or reordered)")
        d = self.copy()  # a verbatim copy of a record, again
        write_lines(d, self.lines[:11] + [self.lines[10]] + self.lines[11:])
        self.assertInvalid(d, "(record 12): sequence broken: expected seq 12, found 11 (records repeated or reordered)")

    def test_two_records_reordered(self):
        d = self.copy()
        swapped = list(self.lines)
        swapped[4], swapped[5] = swapped[5], swapped[4]
        write_lines(d, swapped)
        self.assertInvalid(d, "INVALID segment-000001.jsonl:5 (record 5): sequence broken: expected seq 5, found 6")
        # With the seqs swapped back, the links break.
        a, b = json.loads(swapped[4]), json.loads(swapped[5])
        a["seq"], b["seq"] = 5, 6
        swapped[4], swapped[5] = canonical(a), canonical(b)
        d = self.copy()
        write_lines(d, swapped)
        self.assertInvalid(d, "INVALID segment-000001.jsonl:5 (record 5): broken link: prev is not the hash of record 4")

    # --- rewriting --------------------------------------------------------------------------

    def test_an_old_record_rewritten_with_the_chain_recomputed(self):
        forged = list(self.lines)
        r = json.loads(forged[self.halt_seq - 1])
        self.assertEqual(r["decision"], "halt")
        r["decision"], r["rule"] = "allow", "hosts.allow"
        forged[self.halt_seq - 1] = canonical(r)
        # Every later link recomputed, checkpoints' links included: only a root can tell.
        prev_cp = "0" * 64
        for i, line in enumerate(forged):
            rec = json.loads(line)
            if i >= self.halt_seq:
                rec["prev"] = sha(forged[i - 1])
                if rec["kind"] == "checkpoint":
                    rec["prev_checkpoint"] = prev_cp
                forged[i] = canonical(rec)
            if rec["kind"] == "checkpoint":
                prev_cp = sha(forged[i])
        d = self.copy()
        write_lines(d, forged)
        cp = next(c for c in self.checkpoints if c > self.halt_seq)
        self.assertInvalid(d, f"INVALID segment-000001.jsonl:{cp} (record {cp}): checkpoint root does not match the records before it (a record was changed)")

    def test_a_foreign_key(self):
        # A log signed with another key, verified with the original public key.
        first_cp = next(i + 1 for i, l in enumerate(read_lines(self.foreign)) if json.loads(l)["kind"] == "checkpoint")
        self.assertInvalid(self.foreign, f"(record {first_cp}): checkpoint signed by an unknown key", pub=self.pub)
        # The original log with its keys/ replaced: the trusted key still decides.
        d = self.copy()
        shutil.copy(self.foreign_pub, os.path.join(d, "keys", "ed25519.pub"))
        self.assertValid(d)
        self.assertInvalid(d, "checkpoint signed by an unknown key", pub=self.foreign_pub)
        # The last checkpoint re-signed by the foreign key: the same tree, another signer.
        fc = json.loads(read_lines(self.foreign)[-1])
        cp = json.loads(self.lines[-1])
        cp.update(key_id=fc["key_id"], sig=fc["sig"])
        d = self.copy()
        write_lines(d, self.lines[:-1] + [canonical(cp)])
        self.assertInvalid(d, f"(record {len(self.lines)}): checkpoint signed by an unknown key {fc['key_id']}")

    def test_a_replayed_old_checkpoint(self):
        old = self.lines[self.checkpoints[0] - 1]
        d = self.copy()  # verbatim, at the end
        write_lines(d, self.lines + [old])
        self.assertInvalid(d, f"(record {len(self.lines) + 1}): sequence broken: expected seq {len(self.lines) + 1}, "
                              f"found {self.checkpoints[0]} (records repeated or reordered)")
        r = json.loads(old)  # restamped to fit at the end
        r.update(seq=len(self.lines) + 1, prev=sha(self.lines[-1]), ts_ns=self.records[-1]["ts_ns"])
        d = self.copy()
        write_lines(d, self.lines + [canonical(r)])
        self.assertInvalid(d, f"(record {len(self.lines) + 1}): checkpoint tree_size {self.checkpoints[0] - 1} is not the "
                              f"{len(self.lines)} records before it (a replayed checkpoint?)")
        r = json.loads(old)  # and instead of the last checkpoint, with the tree size made to fit
        r.update(seq=len(self.lines), prev=sha(self.lines[-2]), tree_size=len(self.lines) - 1,
                 ts_ns=self.records[-1]["ts_ns"])
        d = self.copy()
        write_lines(d, self.lines[:-1] + [canonical(r)])
        self.assertInvalid(d, f"(record {len(self.lines)}): checkpoint root does not match")

    def test_a_fork_of_one_trusted_state(self):
        trusted = self.state()
        n = len(self.lines)
        branches = {}
        for name, paths in (("a", ["a1", "a2", "a3"]), ("b", ["b1", "b2", "b3"]),
                            ("c", [f"c{i}" for i in range(6)])):
            d = self.copy()
            with sidecar(d) as tg:
                calls(tg, self.origin, paths)
                self.assertEqual(tg.stop(), 0)
            branches[name] = d
            fresh = tempfile.mktemp(dir=self.tmp)
            shutil.copy(trusted, fresh)
            self.assertValid(d, "--state", fresh)  # each branch alone continues the trusted log
        state = tempfile.mktemp(dir=self.tmp)
        shutil.copy(trusted, state)
        out = self.assertValid(branches["a"], "--state", state)
        k = len(read_lines(branches["a"])) - n  # each call and its outcome, then a checkpoint
        self.assertEqual(k, 7)
        self.assertIn(f"trusts checkpoint seq {n + k} (tree size {n + k - 1}), advanced", out)
        # Same length, other records: the checkpoint at the trusted size has another root.
        # (Each run of the sidecar begins a segment: the record is line 4 of the branch's own.)
        out = self.assertInvalid(branches["b"], f"(record {n + k}): fork: the checkpoint "
                                                f"at tree size {n + k - 1} has root", "--state", state)
        self.assertRegex(out, rf"^INVALID segment-\d{{6}}\.jsonl:{k} ")
        # Longer: a call where the trusted checkpoint was.
        self.assertInvalid(branches["c"], f"(record {n + k}): the trusted checkpoint (seq {n + k}, tree size {n + k - 1}) "
                                          f"is gone: record {n + k} is not a checkpoint now", "--state", state)
        # Rolled back to before the branch.
        self.assertInvalid(self.base, "truncated", "--state", state)
        # Another log altogether.
        self.assertInvalid(self.foreign, "another log: log id", "--state", state, pub=self.foreign_pub)

    def test_a_corrupt_or_unreadable_state_is_exit_2(self):
        path = os.path.join(self.tmp, "corrupt-state.json")
        for text in ("", "{", '{"v":1}', "[]", "garbage\n"):
            with open(path, "w") as f:
                f.write(text)
            r = run("verify", self.base, "--pubkey", self.pub, "--state", path)
            self.assertEqual(r.returncode, 2, text)
            self.assertIn("is corrupt", r.stderr)
        r = run("verify", self.base, "--pubkey", self.pub, "--state", self.tmp)  # a directory
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        r = run("verify", self.base, "--pubkey", self.pub, "--state", os.path.join(self.tmp, "no", "such", "dir"))
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)  # cannot be created

    # --- torn writes and bit flips ----------------------------------------------------------

    def test_a_torn_last_write_at_sampled_byte_offsets(self):
        """Prefixes of the final record (a crash mid-write): the sidecar started on it moves
        the torn part aside, appends a recovery record, and the log verifies. The real binary
        restarts at a sample of offsets (both ends and spread between: a restart per offset
        of a ~450-byte record took minutes under AddressSanitizer); every offset is covered
        in-process by tests/unit/audit/file_sink_test.cc."""
        lines = read_lines(self.base)
        seg = segments(self.base)[-1]
        with open(seg, "rb") as f:
            data = f.read()
        final = len(lines[-1].encode()) + 1  # with its newline
        start = len(data) - final
        offsets = sorted({1, 2, 3, final // 4, final // 2, 3 * final // 4, final - 3, final - 2, final - 1})
        for k in offsets:  # k bytes of the final record written, never its newline
            d = self.copy()
            with open(segments(d)[-1], "r+b") as f:
                f.truncate(start + k)
            r = run("verify", d, "--pubkey", self.pub)
            # Without its newline a complete line reads as a record; any shorter prefix is not one.
            self.assertEqual(r.returncode, 0 if k == final - 1 else 1, (k, r.stdout))
            with sidecar(d) as tg:
                self.assertEqual(tg.stop(), 0)
            torn = glob.glob(os.path.join(d, "torn-*.bin"))
            self.assertEqual(len(torn), 1, k)
            with open(torn[0], "rb") as f:
                self.assertEqual(f.read(), data[start:start + k])
            recs = [json.loads(l) for l in read_lines(d)]
            self.assertEqual(recs[len(lines) - 1]["kind"], "recovery", k)
            self.assertEqual(recs[len(lines) - 1]["torn_bytes"], k)
            self.assertEqual(recs[-1]["kind"], "checkpoint")
            self.assertValid(d)
            shutil.rmtree(d)

    def test_a_record_being_written_is_not_taken_for_a_torn_one_while_the_log_is_live(self):
        """A sidecar writing the log holds its LOCK; a reader may then see a batch half
        written (an O_DIRECT write is not atomic for it). verify, prove, report and replay
        leave that unfinished last line out while the lock is held, and verify
        judges it as a torn write when no one holds it."""
        import fcntl
        d = self.copy()
        with open(segments(d)[-1], "ab") as f:
            f.write(b'{"agent":"being-written","authority":"127.0.0.1:1')  # no newline
        self.assertInvalid(d, "")
        with open(os.path.join(d, "LOCK"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            out = self.assertValid(d)
            self.assertIn(f"ok: {len(self.lines)} records", out)
            r = run("replay", d)
            self.assertNotIn("not JSON", r.stdout + r.stderr)
            self.assertIn(r.returncode, (0, 1), r.stdout + r.stderr)
            fcntl.flock(lock, fcntl.LOCK_UN)
        self.assertInvalid(d, "")

    def test_a_bit_flip_in_the_final_checkpoint_fails(self):
        """Every byte of the smallest real log's final checkpoint, with the newlines on either
        side (no later record links it: only its signature protects it), each with one bit
        flipped (bit i mod 8 of byte i). A CLI run per bit of the whole log took over a
        minute, and eight per byte minutes under AddressSanitizer; every bit of every line is
        flipped in-process by tests/unit/audit/chain_test.cc
        (EveryBitFlipOfASmallLogIsDetected). A sanitizer build flips every third byte (a
        stride prime to 8, so every bit position is still flipped)."""
        seg = segments(self.small)[0]
        with open(seg, "rb") as f:
            data = f.read()
        first = data.rstrip(b"\n").rfind(b"\n")  # the newline before the final record
        self.assertGreater(first, 0)
        sweep_range = range(first, len(data), 3 if SANITIZED else 1)
        pub = os.path.join(self.small, "keys", "ed25519.pub")
        self.assertValid(self.small, pub=pub)
        dirs = [tempfile.mkdtemp(dir=self.tmp) for _ in range(2)]

        def sweep(worker):
            wrong = []
            path = os.path.join(dirs[worker], "segment-000001.jsonl")
            for i in sweep_range[worker::2]:
                for bit in (i % 8,):
                    flipped = bytearray(data)
                    flipped[i] ^= 1 << bit
                    with open(path, "wb") as f:
                        f.write(flipped)
                    r = subprocess.run([BIN, "audit", "verify", dirs[worker], "--pubkey", pub],
                                       capture_output=True, text=True, errors="replace", timeout=60)
                    if r.returncode != 1 or not r.stdout.startswith("INVALID "):
                        wrong.append((i, bit, r.returncode, r.stdout.strip()))
            return wrong

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            wrong = [w for ws in pool.map(sweep, range(2)) for w in ws]
        self.assertEqual(wrong, [], f"{len(wrong)} of {len(sweep_range)} flips not caught")

    def test_non_canonical_json(self):
        i = 7
        line = self.lines[i - 1]
        cases = {
            "spaces": line.replace(',"', ', "', 1),
            "key order": json.dumps(dict(reversed(list(json.loads(line).items()))), separators=(",", ":")),
            "an escaped slash": line.replace("/", "\\/", 1),
            "a unicode escape": line.replace('"kind"', '"\\u006bind"', 1),
            "trailing whitespace": line + " ",
        }
        for what, forged in cases.items():
            self.assertNotEqual(forged, line)
            d = self.copy()
            write_lines(d, self.lines[:i - 1] + [forged] + self.lines[i:])
            self.assertInvalid(d, f"(record {i}): not canonical JSON (the record was rewritten)")
        r = json.loads(line)
        d = self.copy()
        write_lines(d, self.lines[:i - 1] + [line.replace(f'"ts_ns":{r["ts_ns"]}', f'"ts_ns":{r["ts_ns"]}.0')] + self.lines[i:])
        self.assertInvalid(d, f"(record {i}): not a JSON record: not an integer")
        d = self.copy()
        write_lines(d, self.lines[:i - 1] + [line[:-1] + ',"seq":' + str(i) + "}"] + self.lines[i:])
        self.assertInvalid(d, f"(record {i}): not a JSON record: duplicate key")

    # --- inclusion proofs -------------------------------------------------------------------

    def prove(self, d, seq, pub=None):
        return run("prove", d, str(seq), "--pubkey", pub or self.pub)

    def check_proof(self, proof, pub=None):
        path = tempfile.mktemp(suffix=".json", dir=self.tmp)
        with open(path, "w") as f:
            f.write(proof if isinstance(proof, str) else json.dumps(proof))
        return run("prove", "--verify", path, "--pubkey", pub or self.pub)

    def test_a_proof_verifies_and_every_mutation_is_rejected(self):
        n = len(self.lines)
        for seq in (1, self.halt_seq, self.checkpoints[0], n - 1):
            r = self.prove(self.base, seq)
            self.assertEqual(r.returncode, 0, r.stderr)
            proof = json.loads(r.stdout)
            self.assertEqual(proof["record"], self.lines[seq - 1])
            self.assertEqual(proof["leaf_index"], seq - 1)
            self.assertEqual(proof["tree_size"], n - 1)
            self.assertEqual(proof["checkpoint"], self.lines[-1])
            self.assertEqual(sorted(proof), ["checkpoint", "leaf_index", "path", "record", "tree_size", "v"])
            # Hashes only: no other record's content is in it.
            others = [r["path"] for r in self.records if r["kind"] == "call" and r["seq"] != seq]
            self.assertFalse([p for p in others if '\\"path\\":\\"%s\\"' % p in r.stdout])
            if self.records[seq - 1]["kind"] == "call":
                self.assertIn('\\"path\\":\\"%s\\"' % self.records[seq - 1]["path"], r.stdout)
            ok = self.check_proof(r.stdout)
            self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
            self.assertEqual(ok.stdout, f"ok: record {seq} is leaf {seq - 1} of the tree of size {n - 1} signed by key "
                                        f"{json.loads(self.lines[-1])['key_id']}\n")

        good = json.loads(self.prove(self.base, self.halt_seq).stdout)
        def mutated(**changes):
            p = json.loads(json.dumps(good))
            p.update(changes)
            return p
        def flip(h):
            return h[:10] + ("0" if h[10] != "0" else "1") + h[11:]
        cases = {
            "leaf index + 1": (mutated(leaf_index=good["leaf_index"] + 1), "not the leaf index"),
            "leaf index - 1": (mutated(leaf_index=good["leaf_index"] - 1), "not the leaf index"),
            "tree size + 1": (mutated(tree_size=good["tree_size"] + 1), "is not the checkpoint's"),
            "tree size - 1": (mutated(tree_size=good["tree_size"] - 1), "is not the checkpoint's"),
            "a path element removed": (mutated(path=good["path"][:-1]), "audit path does not lead"),
            "a path element added": (mutated(path=good["path"] + [good["path"][-1]]), "audit path does not lead"),
            "a path element added first": (mutated(path=[good["path"][0]] + good["path"]), "audit path does not lead"),
            "a wrong record": (mutated(record=self.lines[self.halt_seq]), "not the leaf index"),
            "a wrong record at its own index": (mutated(record=self.lines[self.halt_seq], leaf_index=self.halt_seq), "audit path does not lead"),
            "the record rewritten": (mutated(record=good["record"].replace('"decision":"halt"', '"decision":"allow"')), "audit path does not lead"),
            "an older checkpoint": (mutated(checkpoint=self.lines[self.checkpoints[0] - 1]), "is not the checkpoint's"),
            "the checkpoint's root changed": (mutated(checkpoint=good["checkpoint"].replace(json.loads(good["checkpoint"])["root"], flip(json.loads(good["checkpoint"])["root"]))), "signature does not verify"),
        }
        for i, h in enumerate(good["path"]):
            path = list(good["path"])
            path[i] = flip(h)
            cases[f"path hash {i} flipped"] = (mutated(path=path), "audit path does not lead")
        for what, (proof, reason) in cases.items():
            r = self.check_proof(proof)
            self.assertEqual(r.returncode, 1, f"{what}: {r.stdout}{r.stderr}")
            self.assertIn(reason, r.stdout, what)
        r = self.check_proof(good, pub=self.foreign_pub)
        self.assertEqual(r.returncode, 1)
        self.assertIn("not by the given key", r.stdout)
        r = self.check_proof("{not json")
        self.assertEqual(r.returncode, 2)
        r = run("prove", "--verify", os.path.join(self.tmp, "missing.json"), "--pubkey", self.pub)
        self.assertEqual(r.returncode, 2)

    def test_an_unsealed_record_has_no_proof_yet(self):
        d = self.copy()
        tg = sidecar(d)
        with tg:
            calls(tg, self.origin, ["u1", "u2"])
            # Two calls and their outcomes.
            wait_for(lambda: len(read_lines(d)) == len(self.lines) + 4, what="the records on disk")
            tg.stop(sig=signal.SIGKILL)  # a crash: no checkpoint after them
        n = len(self.lines)
        self.assertIn("4 after the last checkpoint (unsealed)", self.assertValid(d))
        for seq in (n + 1, n + 4, n):  # the last checkpoint itself is sealed by none yet
            r = self.prove(d, seq)
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            self.assertIn(f"record {seq} is not yet sealed by a checkpoint", r.stderr)
        r = self.prove(d, n - 1)  # an older record proves against the last checkpoint
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.check_proof(r.stdout).returncode, 0)
        self.assertEqual(self.prove(d, n + 5).returncode, 2)  # no such record
        forged = self.copy()  # and a log that does not verify proves nothing
        write_lines(forged, self.lines[:4] + self.lines[5:])
        r = self.prove(forged, 2)
        self.assertEqual(r.returncode, 1)
        self.assertIn("INVALID", r.stdout)

    def test_every_record_of_a_log_in_segments_proves(self):
        # prove reads the log a segment at a time, twice (scan, then hash up to the tree
        # size): every record on either side of a segment boundary proves, and the proof is
        # the one the single-segment log gives.
        d = self.copy()
        self.split_into_segments(d)
        self.assertGreater(len(segments(d)), 2)
        n = len(self.lines)
        seqs = range(1, n)
        if SANITIZED:  # each segment's first and last records, and every fourth one
            ends = {s for cp in self.checkpoints for s in (cp - 1, cp, cp + 1)}
            seqs = sorted({1, n - 1} | set(range(1, n, 4)) | {s for s in ends if 1 <= s < n})
        for seq in seqs:
            r = self.prove(d, seq)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(self.check_proof(r.stdout).returncode, 0, seq)
            self.assertEqual(r.stdout, self.prove(self.base, seq).stdout, seq)
        broken = self.copy()
        self.split_into_segments(broken)
        second = segments(broken)[1]
        with open(second) as f:
            kept = f.readlines()
        with open(second, "w") as f:
            f.writelines(kept[:1] + kept[2:])
        r = self.prove(broken, 1)
        self.assertEqual(r.returncode, 1)
        self.assertRegex(r.stdout, r"^INVALID segment-000002\.jsonl:2 ")


if __name__ == "__main__":
    unittest.main()
