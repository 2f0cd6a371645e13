"""Key rotation on a REAL log: the sidecar rotates its checkpoint key through
`POST /v1/audit/rotate-key` while calls flow, then `tollgate audit rotate-key` rotates it
again on the stopped log. `audit verify` from the anchor (the log's first key) passes and
lists the three keys with their windows; `--keyring` pins them; a proof across the rotations
verifies from the anchor. Each tampering with the key chain is caught with its reason: a
forged sig_old or sig_new, a removed rotation record, a checkpoint forged with the stolen
retired key after its window, a rotation to the thief's key (refused by a pinned keyring)."""
import concurrent.futures
import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import unittest

from audit_log import canonical, read_lines, run, segments, write_lines
from tollgate_harness import BIN, HttpOrigin, Tollgate, curl, parse_response, skip_unless_required, wait_for

try:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives import serialization
except ImportError:  # the forgeries that need a signature are skipped
    Ed25519PrivateKey = None

TOKEN = "rotate-secret"


def sha(data):
    return hashlib.sha256(data).hexdigest()


def merkle_root(lines):
    """RFC 6962 Merkle tree hash of the lines (leaf: 0x00 || line; node: 0x01 || l || r)."""
    def mth(hashes):
        if len(hashes) == 1:
            return hashes[0]
        k = 1
        while k * 2 < len(hashes):
            k *= 2
        return hashlib.sha256(b"\x01" + mth(hashes[:k]) + mth(hashes[k:])).digest()
    return mth([hashlib.sha256(b"\x00" + l.encode()).digest() for l in lines]).hex()


def read_key(path):
    with open(path) as f:
        return f.read().strip()


class AuditKeysTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="tollgate-keys-")
        cls.log = os.path.join(cls.tmp, "log")
        cls.origin = HttpOrigin().__enter__()
        tg = Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": {"dir": cls.log},
                       "admin": {"address": "127.0.0.1:0",
                                 "tokens": ["sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()]}})
        statuses = []
        with tg:
            # Kept outside the log: the anchor a verifier pins, and the first private key as a
            # thief would have copied it before the rotation deleted it.
            cls.anchor = os.path.join(cls.tmp, "anchor.pub")
            shutil.copy(os.path.join(cls.log, "keys", "anchor.pub"), cls.anchor)
            cls.stolen = read_key(os.path.join(cls.log, "keys", "ed25519.key"))
            admin = f"http://127.0.0.1:{tg.admin_port}/v1/audit/rotate-key"
            rc, out, _ = curl("-i", "-X", "POST", admin)
            cls.unauthorized = parse_response(out)[0]
            # A second writer is refused while the sidecar holds the log.
            cls.locked = run("rotate-key", cls.log)
            stop = threading.Event()

            def traffic(worker):
                n = 0
                while not stop.is_set() or n < 10:
                    rc, out, _ = curl("-i", cls.origin.url(f"/hello?w={worker}&n={n}"), proxy=tg.proxy)
                    statuses.append(parse_response(out)[0])
                    n += 1

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                workers = [pool.submit(traffic, w) for w in range(4)]
                wait_for(lambda: len(statuses) >= 20, timeout=30, what="calls before the rotation")
                rc, out, _ = curl("-i", "-X", "POST", "-H", f"Authorization: Bearer {TOKEN}", admin)
                status, _, body = parse_response(out)
                cls.admin_rotation = (status, json.loads(body))
                stop.set()
                for w in workers:
                    w.result(timeout=60)
            for n in range(3):  # calls certainly after the rotation
                rc, out, _ = curl("-i", cls.origin.url(f"/hello?after={n}"), proxy=tg.proxy)
                statuses.append(parse_response(out)[0])
            assert tg.stop() == 0
        cls.statuses = statuses
        cls.cli_rotation = run("rotate-key", cls.log)
        cls.lines = read_lines(cls.log)
        cls.records = [json.loads(l) for l in cls.lines]
        cls.rotations = [r for r in cls.records if r["kind"] == "key_rotation"]

    @classmethod
    def tearDownClass(cls):
        cls.origin.__exit__(None, None, None)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def copy(self):
        d = tempfile.mkdtemp(prefix="case-", dir=self.tmp)
        os.rmdir(d)
        shutil.copytree(self.log, d)
        return d

    def assertInvalid(self, d, reason, *extra):
        r = run("verify", d, *(extra or ("--pubkey", self.anchor)))
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertTrue(r.stdout.startswith("INVALID "), r.stdout)
        self.assertIn(reason, r.stdout)
        return r.stdout

    def keyring(self, windows):
        """A keyring file pinning the log's keys with the given (from, to) windows."""
        keys = [self.rotations[0]["old_key_id"]] + [r["new_key_id"] for r in self.rotations]
        publics = [read_key(self.anchor)] + [r["new_public"] for r in self.rotations]
        path = tempfile.mktemp(prefix="keyring-", suffix=".json", dir=self.tmp)
        with open(path, "w") as f:
            json.dump([{"key_id": k, "public": p, "from_seq": w[0], "to_seq": w[1]}
                       for k, p, w in zip(keys, publics, windows)], f)
        return path

    def test_rotations_are_recorded_and_calls_kept_flowing(self):
        self.assertEqual(self.unauthorized, 401)
        self.assertEqual(self.locked.returncode, 1, self.locked.stdout + self.locked.stderr)
        self.assertIn("LOCK", self.locked.stderr)
        self.assertTrue(self.statuses)
        self.assertEqual(set(self.statuses), {200})
        self.assertEqual(len([r for r in self.records if r["kind"] == "call"]), len(self.statuses))
        status, body = self.admin_rotation
        self.assertEqual(status, 200, body)
        self.assertEqual(len(self.rotations), 2)
        first, second = self.rotations
        self.assertEqual(body, {"old_key_id": first["old_key_id"], "new_key_id": first["new_key_id"],
                                "seq": first["seq"]})
        self.assertEqual(self.cli_rotation.returncode, 0, self.cli_rotation.stderr)
        self.assertEqual(self.cli_rotation.stdout,
                         f"rotated at record {second['seq']}: old key {first['new_key_id']}, "
                         f"new key {second['new_key_id']}\n")
        for rot in self.rotations:
            before = self.records[rot["seq"] - 2]  # sealed by the old key right before
            self.assertEqual((before["kind"], before["key_id"]), ("checkpoint", rot["old_key_id"]))
        after = [r for r in self.records if r["kind"] == "checkpoint" and r["seq"] > first["seq"]]
        self.assertEqual(after[0]["key_id"], first["new_key_id"])
        self.assertEqual(self.records[-1]["key_id"], second["new_key_id"])
        # The current key files follow; the anchor stays; the old private keys are gone.
        keys = os.path.join(self.log, "keys")
        self.assertEqual(read_key(os.path.join(keys, "anchor.pub")), read_key(self.anchor))
        self.assertEqual(read_key(os.path.join(keys, "ed25519.pub")), second["new_public"])
        self.assertEqual(sorted(os.listdir(keys)), ["anchor.pub", "ed25519.key", "ed25519.pub"])
        self.assertNotEqual(read_key(os.path.join(keys, "ed25519.key")), self.stolen)
        self.assertEqual(oct(os.stat(os.path.join(keys, "ed25519.key")).st_mode & 0o777), "0o600")

    def test_verify_follows_the_key_chain_from_the_anchor(self):
        first, second = self.rotations
        keys_line = (f"keys: {first['old_key_id']} seq 1-{first['seq']}, "
                     f"{first['new_key_id']} seq {first['seq'] + 1}-{second['seq']}, "
                     f"{second['new_key_id']} seq {second['seq'] + 1}-\n")
        for extra in (("--pubkey", self.anchor), ()):  # pinned, and the log's keys/anchor.pub
            r = run("verify", self.log, *extra)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertTrue(r.stdout.startswith(f"ok: {len(self.lines)} records, "), r.stdout)
            self.assertTrue(r.stdout.endswith(keys_line), r.stdout)
        # The current key is not the anchor: the first checkpoint was signed before it existed.
        self.assertInvalid(self.log, "unknown key", "--pubkey", os.path.join(self.log, "keys", "ed25519.pub"))
        # A state trusted across the rotations.
        state = os.path.join(self.tmp, "state.json")
        r = run("verify", self.log, "--pubkey", self.anchor, "--state", state)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_a_pinned_keyring_checks_each_window(self):
        first, second = self.rotations
        exact = self.keyring([(1, first["seq"]), (first["seq"] + 1, second["seq"]), (second["seq"] + 1, None)])
        r = run("verify", self.log, "--keyring", exact)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        # The second key's window closed early: its first checkpoint falls outside.
        early = self.keyring([(1, first["seq"]), (first["seq"] + 1, first["seq"] + 1), (second["seq"] + 1, None)])
        cp = [r for r in self.records if r["kind"] == "checkpoint" and r["seq"] > first["seq"]][0]
        out = self.assertInvalid(self.log, f"checkpoint signed by key {first['new_key_id']} outside its validity window",
                                 "--keyring", early)
        self.assertIn(f"(record {cp['seq']})", out)
        # The third key not pinned: its rotation is refused.
        two = self.keyring([(1, first["seq"]), (first["seq"] + 1, None)])
        self.assertInvalid(self.log, "which the keyring does not list", "--keyring", two)
        self.assertEqual(run("verify", self.log, "--keyring", exact, "--pubkey", self.anchor).returncode, 2)

    def test_a_forged_sig_old_or_sig_new_is_caught(self):
        rot = self.rotations[0]
        i = rot["seq"] - 1
        for field, reason in (("sig_old", "key rotation not signed by the active key"),
                              ("sig_new", "key rotation not signed by the new key")):
            d = self.copy()
            lines = list(self.lines)
            r = json.loads(lines[i])
            r[field] = r["sig_new" if field == "sig_old" else "sig_old"]  # a signature, not this one
            lines[i] = canonical(r)
            write_lines(d, lines)
            out = self.assertInvalid(d, reason)
            self.assertIn(f"(record {rot['seq']})", out)

    def test_a_removed_rotation_record_is_caught(self):
        rot = self.rotations[0]
        d = self.copy()
        lines = list(self.lines)
        del lines[rot["seq"] - 1]
        write_lines(d, lines)
        self.assertIn(f"(record {rot['seq']}): sequence broken", self.assertInvalid(d, "records missing"))

    def forge_checkpoint(self, lines, key_hex, ts=None):
        """A correct checkpoint over `lines` signed with the raw private key `key_hex`."""
        priv = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key_hex))
        pub = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        last = json.loads(lines[-1])
        cps = [l for l in lines if json.loads(l)["kind"] == "checkpoint"]
        body = {"v": 1, "log_id": last["log_id"], "seq": last["seq"] + 1, "ts_ns": ts or last["ts_ns"],
                "prev": sha(lines[-1].encode()), "kind": "checkpoint", "tree_size": len(lines),
                "root": merkle_root(lines),
                "prev_checkpoint": sha(cps[-1].encode()) if cps else "0" * 64,
                "key_id": sha(pub)[:32]}
        body["sig"] = priv.sign(canonical(body).encode()).hex()
        return canonical(body)

    def test_the_stolen_retired_key_cannot_sign_after_its_window(self):
        if Ed25519PrivateKey is None:
            skip_unless_required("python3-cryptography is needed to forge a signature")
        # The forger's checkpoint is right in every other way: the same code re-signing with
        # the current key would pass (checked first, so the test shows the window is the cause).
        rot = self.rotations[0]
        n = rot["seq"] + 3
        first_real = [r for r in self.records if r["kind"] == "checkpoint"][0]
        lines = list(self.lines[: first_real["seq"] - 1])
        self.assertEqual(self.forge_checkpoint(lines, self.stolen, first_real["ts_ns"]),
                         self.lines[first_real["seq"] - 1])
        d = self.copy()
        lines = list(self.lines[:n]) + [self.forge_checkpoint(self.lines[:n], self.stolen)]
        write_lines(d, lines)
        out = self.assertInvalid(d, f"checkpoint signed by key {rot['old_key_id']} outside its validity "
                                    f"window (retired at seq {rot['seq']})")
        self.assertIn(f"(record {n + 1})", out)

    def test_a_rotation_to_the_thiefs_key_is_refused_by_a_pinned_keyring(self):
        if Ed25519PrivateKey is None:
            skip_unless_required("python3-cryptography is needed to forge a signature")
        # With the stolen first key the thief rewrites history from the first rotation on: a
        # rotation to their own key, signed by both. Only the anchor trusted: that is a valid
        # other log (which --state catches); with the keys pinned it is refused.
        rot = self.rotations[0]
        stolen = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(self.stolen))
        thief = Ed25519PrivateKey.generate()
        thief_pub = thief.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        body = {k: rot[k] for k in ("v", "log_id", "seq", "ts_ns", "prev", "kind")}
        body.update({"old_key_id": rot["old_key_id"], "new_key_id": sha(thief_pub)[:32],
                     "new_public": thief_pub.hex()})
        signed = canonical(body).encode()
        body["sig_old"] = stolen.sign(signed).hex()
        body["sig_new"] = thief.sign(signed).hex()
        lines = list(self.lines[: rot["seq"] - 1]) + [canonical(body)]
        lines.append(self.forge_checkpoint(lines, thief.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()).hex()))
        d = self.copy()
        write_lines(d, lines)
        r = run("verify", d, "--pubkey", self.anchor)
        self.assertEqual(r.returncode, 0, r.stdout)
        first, second = self.rotations
        exact = self.keyring([(1, first["seq"]), (first["seq"] + 1, second["seq"]), (second["seq"] + 1, None)])
        out = self.assertInvalid(d, f"key rotation to key {sha(thief_pub)[:32]}, which the keyring does not list",
                                 "--keyring", exact)
        self.assertIn(f"(record {rot['seq']})", out)

    def test_a_proof_across_the_rotations_verifies_from_the_anchor(self):
        proof_path = os.path.join(self.tmp, "proof.json")
        r = run("prove", self.log, "2")
        self.assertEqual(r.returncode, 0, r.stderr)
        proof = json.loads(r.stdout)
        self.assertEqual([json.loads(l)["seq"] for l in proof["rotations"]], [x["seq"] for x in self.rotations])
        with open(proof_path, "w") as f:
            f.write(r.stdout)
        last = self.rotations[-1]["new_key_id"]
        ok = run("prove", "--verify", proof_path, "--pubkey", self.anchor)
        self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
        self.assertEqual(ok.stdout, f"ok: record 2 is leaf 1 of the tree of size {proof['tree_size']} signed by key {last}\n")
        cases = {
            "no rotations": ({k: v for k, v in proof.items() if k != "rotations"}, "not by the given key"),
            "a rotation left out": (dict(proof, rotations=proof["rotations"][:1]), "not by the key its rotations lead to"),
            "rotations reordered": (dict(proof, rotations=proof["rotations"][::-1]),
                                    "rotation 1: key rotation not signed by the active key"),
            "a rotation repeated": (dict(proof, rotations=proof["rotations"][:1] * 2 + proof["rotations"][1:]),
                                    "rotation 2: seq"),
        }
        for name, (mutated, reason) in cases.items():
            with self.subTest(name):
                with open(proof_path, "w") as f:
                    json.dump(mutated, f)
                bad = run("prove", "--verify", proof_path, "--pubkey", self.anchor)
                self.assertEqual(bad.returncode, 1, bad.stdout + bad.stderr)
                self.assertIn(reason, bad.stdout)
        # Trusting the current key alone does not make the first rotation valid.
        with open(proof_path, "w") as f:
            json.dump(proof, f)
        bad = run("prove", "--verify", proof_path, "--pubkey", os.path.join(self.log, "keys", "ed25519.pub"))
        self.assertEqual(bad.returncode, 1)
        self.assertIn("rotation 1: key rotation not signed by the active key", bad.stdout)


if __name__ == "__main__":
    unittest.main()
