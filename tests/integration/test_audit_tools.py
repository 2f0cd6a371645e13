"""`tollgate audit replay` and `tollgate audit report` on a log the real sidecar wrote: a
policy that allows some calls and halts others, a reload to a different policy mid-run
(SIGHUP after rewriting the file), both sets archived by digest, replay with the archived
sets (no difference), with a tampered archive and with a changed --policy (the right seqs
differ), and the compliance report in md, html and json with the counts this test made,
its hash appended to the log as a report record that still verifies."""
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

from audit_log import segment_text, segments
from tollgate_harness import BIN, HttpOrigin, Tollgate, curl, parse_response, wait_for

POLICY_A = """
apiVersion: tollgate/v1
kind: Policy
metadata: {name: tools-a}
tools:
  - {name: notes.read, match: {host: 127.0.0.1, methods: [GET], paths: ["/hello"]}, class: read}
  - {name: notes.other, match: {host: 127.0.0.1, methods: [GET], paths: ["/other"]}, class: read}
rules:
  - {id: allow-reads, effect: allow, match: {class: read}}
  - {id: no-evil, effect: halt, match: {agent: agent-evil}, reason: "agent-evil is banned"}
"""
POLICY_B = POLICY_A + "  - {id: no-other, effect: halt, match: {tool: notes.other}}\n"


def run(*args):
    return subprocess.run([BIN, "audit", *args], capture_output=True, text=True, timeout=60)


def read(path):
    with open(path) as f:
        return f.read()


def records(audit_dir):
    out = []
    for seg in segments(audit_dir):
        out += [json.loads(l) for l in segment_text(seg).splitlines()]
    return out


class AuditToolsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = tempfile.mkdtemp(prefix="tollgate-audit-tools-")
        cls.expected = {"allow": [], "no-evil": [], "default-deny": [], "no-other": []}
        with HttpOrigin() as origin:
            tg = Tollgate({"audit": {"dir": "audit"}})
            cls.policy = os.path.join(tg.dir, "policy.yaml")
            with open(cls.policy, "w") as f:
                f.write(POLICY_A)
            tg.config.pop("hosts")
            tg.config["policies"] = ["policy.yaml"]
            with open(tg.config_path, "w") as f:
                json.dump(tg.config, f)
            cls.audit = os.path.join(tg.dir, "audit")

            def call(agent, path, expect):
                rc, out, err = curl("-i", "-H", f"X-Agent-Id: {agent}", origin.url(path), proxy=tg.proxy)
                status, _, body = parse_response(out)
                assert status == expect, (agent, path, status, body)
                return json.loads(body)["audit_seq"] if status == 403 else None

            with tg:
                first = tg.logs("policies loaded")[0]["digest"]
                for _ in range(3):
                    call("agent-1", "/hello", 200)
                for _ in range(2):
                    cls.expected["no-evil"].append(call("agent-evil", "/hello", 403))
                cls.expected["default-deny"].append(call("agent-1", "/nothing", 403))
                # The running sidecar holds the log: a report cannot append its hash.
                r = run("report", cls.audit, "--format", "json", "--out", os.path.join(cls.work, "live.json"))
                cls.live = r
                # An invalid set: rejected (a reload record says so), policy A stays.
                with open(cls.policy, "w") as f:
                    f.write(POLICY_A.replace("effect: halt", "effect: sometimes"))
                tg.proc.send_signal(signal.SIGHUP)
                wait_for(lambda: tg.logs("reload rejected"), timeout=10, what="the rejected reload")
                with open(cls.policy, "w") as f:
                    f.write(POLICY_B)
                tg.proc.send_signal(signal.SIGHUP)
                wait_for(lambda: any(l.get("digest") not in (None, first) for l in tg.logs("reload")),
                         timeout=10, what="the reload to policy B")
                for _ in range(2):
                    call("agent-2", "/hello", 200)
                for _ in range(2):
                    cls.expected["no-other"].append(call("agent-2", "/other", 403))
                cls.expected["no-evil"].append(call("agent-evil", "/hello", 403))
                assert tg.stop() == 0
                cls.dir = os.path.join(cls.work, "audit")
                shutil.copytree(cls.audit, cls.dir)  # the sidecar's directory goes with it
        cls.first = first
        with open(os.path.join(cls.work, "b.yaml"), "w") as f:
            f.write(POLICY_B)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.work, ignore_errors=True)

    def copy(self, name):
        d = os.path.join(self.work, name)
        shutil.copytree(self.dir, d)
        return d

    def digests(self):
        calls = [r for r in records(self.dir) if r["kind"] == "call"]
        return sorted({r["policy_digest"] for r in calls}, key=lambda d: d != self.first)

    def test_both_policy_sets_are_archived_and_reloads_recorded(self):
        a, b = self.digests()
        self.assertEqual(a, self.first)
        archived = sorted(os.listdir(os.path.join(self.dir, "policies")))
        self.assertEqual(archived, sorted([a[7:] + ".json", b[7:] + ".json"]))
        with open(os.path.join(self.dir, "policies", b[7:] + ".json")) as f:
            doc = json.load(f)
        self.assertEqual(doc["digest"], b)
        self.assertEqual([x["content"] for x in doc["files"]], [POLICY_B])
        recs = records(self.dir)
        reloads = [r for r in recs if r["kind"] == "reload"]
        self.assertEqual((reloads[0]["trigger"], reloads[0]["result"], reloads[0]["digest"],
                          reloads[0]["previous_digest"]), ("startup", "ok", a, ""))
        self.assertTrue(any(r["digest"] == b and r["previous_digest"] == a and r["result"] == "ok"
                            for r in reloads), reloads)
        rejected = [r for r in reloads if r["result"] == "rejected"]
        self.assertTrue(rejected)
        self.assertEqual((rejected[0]["digest"], rejected[0]["previous_digest"]), (a, a))
        self.assertIn("policy.yaml:", rejected[0]["error"])
        # Each set's reload record comes before the first call it decided.
        for d in (a, b):
            first_call = min(r["seq"] for r in recs if r["kind"] == "call" and r["policy_digest"] == d)
            first_reload = min(r["seq"] for r in reloads if r["digest"] == d)
            self.assertLess(first_reload, first_call)

    def test_replay_with_the_archived_sets_finds_no_difference(self):
        r = run("replay", self.dir)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(r.stdout, "11 calls replayed, 0 differ, 0 not replayable\n")

    def test_replay_with_a_tampered_archive_names_the_seqs_and_fails(self):
        d = self.copy("tampered")
        path = os.path.join(d, "policies", self.first[7:] + ".json")
        with open(path) as f:
            doc = json.load(f)
        doc["files"][0]["content"] = doc["files"][0]["content"].replace("agent: agent-evil", "agent: agent-nobody")
        with open(path, "w") as f:
            json.dump(doc, f)
        r = run("replay", d)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn(f"warning: the archive of {self.first} hashes to", r.stdout)
        differing = [int(s) for s in re.findall(r"^seq (\d+): recorded halt by no-evil, replayed allow by allow-reads",
                                                 r.stdout, re.M)]
        self.assertEqual(differing, self.expected["no-evil"][:2])  # the calls policy A decided
        self.assertIn("11 calls replayed, 2 differ, 0 not replayable", r.stdout)
        # A missing archive: those calls cannot be replayed, and say why.
        os.unlink(path)
        r = run("replay", d)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(f"5 calls replayed, 0 differ, 6 not replayable (6 archive missing for {self.first})", r.stdout)
        # An archive edited into another shape is refused like a missing one, not a crash.
        doc["digest"] = 1
        with open(path, "w") as f:
            json.dump(doc, f)
        r = run("replay", d)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("5 calls replayed, 0 differ, 6 not replayable", r.stdout)

    def test_replay_against_a_new_policy(self):
        changed = os.path.join(self.work, "c.yaml")
        with open(changed, "w") as f:
            f.write(POLICY_B.replace("agent: agent-evil", "agent: agent-nobody"))
        r = run("replay", self.dir, "--policy", changed)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        differing = [int(s) for s in re.findall(r"^seq (\d+): recorded halt by no-evil, replayed allow by allow-reads",
                                                 r.stdout, re.M)]
        self.assertEqual(differing, self.expected["no-evil"])
        # Policy B's no-other rule also halts the /other call policy A never saw: none here.
        self.assertIn("11 calls replayed, 3 differ, 0 not replayable", r.stdout)
        r = run("replay", self.dir, "--policy", os.path.join(self.work, "b.yaml"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(run("replay", os.path.join(self.work, "nope")).returncode, 2)
        self.assertEqual(run("replay", self.dir, "--policy").returncode, 2)

    def test_report_in_every_format_with_its_hash_in_the_log(self):
        d = self.copy("report")
        a, b = self.digests()
        out, digests = {}, {}
        for fmt in ("json", "md", "html"):
            path = os.path.join(self.work, "report." + fmt)
            r = run("report", d, "--format", fmt, "--out", path)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            with open(path, "rb") as f:
                data = f.read()
            out[fmt] = data.decode()
            digest = hashlib.sha256(data).hexdigest()
            digests[fmt] = digest
            self.assertIn(f"report sha256:{digest} appended to the log as record", r.stderr)
            last = [x for x in records(d) if x["kind"] == "report"][-1]
            self.assertEqual((last["sha256"], last["format"]), (digest, fmt))
            v = subprocess.run([BIN, "audit", "verify", d], capture_output=True, text=True, timeout=60)
            self.assertEqual(v.returncode, 0, v.stdout)
        doc = json.loads(out["json"])
        self.assertEqual(doc["decisions"]["calls"], 11)
        self.assertEqual(doc["decisions"]["by_decision"], {"allow": 5, "halt": 6})
        by_rule = {(x["decision"], x["rule"]): x["count"] for x in doc["decisions"]["by_rule"]}
        self.assertEqual(by_rule, {("allow", "allow-reads"): 5, ("halt", "no-evil"): 3,
                                   ("halt", "default-deny"): 1, ("halt", "no-other"): 2})
        halts = sorted(self.expected["no-evil"] + self.expected["default-deny"] + self.expected["no-other"])
        self.assertEqual([x["seq"] for x in doc["risk_events"]], halts)
        self.assertTrue(doc["log"]["verification"]["ok"])
        pub = bytes.fromhex(read(os.path.join(d, "keys", "ed25519.pub")).strip())
        self.assertEqual(doc["log"]["keys"][0]["fingerprint"], "sha256:" + hashlib.sha256(pub).hexdigest())
        self.assertEqual(doc["log"]["log_id"], read(os.path.join(d, "LOG_ID")).strip())
        self.assertTrue(doc["system"]["version"])
        self.assertTrue(any(c["digest"] == b and c["previous_digest"] == a for c in doc["policy_changes"]))
        self.assertEqual(doc["policy_sets"], [{"digest": x, "archived": True} for x in sorted([a, b])])
        self.assertEqual(doc["approvals"], [])
        reqs = " ".join(c["requirement"] for c in doc["compliance"])
        for needle in ("Art. 12", "Art. 19", "A.6.2.8"):
            self.assertIn(needle, reqs)
        md = out["md"]
        for line in ("| allow | 5 |", "| halt | 6 |", "| halt | no-evil | 3 |", "| halt | no-other | 2 |",
                     "| allow | allow-reads | 5 |", "## Risk events (halts)", "## Regulatory mapping",
                     "## Policy changes", "No approval records."):
            self.assertIn(line, md)
        self.assertIn(f"| {b} | True |".replace("True", "true"), md)
        self.assertRegex(md, r"\| EU AI Act \| Art\. 19\(1\) retention")
        html = out["html"]
        for needle in ("<td>no-evil</td><td>3</td>", "<td>allow</td><td>5</td>", "<h2>Regulatory mapping</h2>",
                       "ISO/IEC 42001", "<td>agent-evil is banned</td>"):
            self.assertIn(needle, html)
        # The first report (json) saw no earlier one; the md report lists the json one, the
        # html report the two before it.
        self.assertEqual(doc["earlier_reports"], [])
        self.assertIn("## Earlier reports", md)
        self.assertIn(f"| {digests['json']} | json |", md)
        self.assertNotIn(digests["md"], md)
        self.assertIn(f"<td>{digests['json']}</td><td>json</td>", html)
        self.assertIn(f"<td>{digests['md']}</td><td>md</td>", html)

    def test_report_periods_and_errors(self):
        d = self.copy("periods")
        recs = records(d)
        calls = [r for r in recs if r["kind"] == "call"]
        # From the sixth call on (unix seconds round down: use RFC 3339 with nanoseconds).
        t = calls[5]["ts_ns"]
        frac = f"{t % 1_000_000_000:09d}"
        rfc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t // 1_000_000_000)) + "." + frac + "Z"
        r = run("report", d, "--format", "json", "--from", rfc)
        self.assertEqual(r.returncode, 0, r.stderr)
        doc = json.loads(r.stdout)
        self.assertEqual(doc["decisions"]["calls"], 6)
        r = run("report", d, "--format", "json", "--to", str(calls[0]["ts_ns"] // 1_000_000_000 - 1))
        self.assertEqual(json.loads(r.stdout)["decisions"]["calls"], 0)
        # A one-second gap threshold over a period ending an hour after the log: a gap.
        end = str(recs[-1]["ts_ns"] // 1_000_000_000 + 3600)
        r = run("report", d, "--format", "json", "--from", "0", "--to", end, "--gap", "1s")
        self.assertTrue(json.loads(r.stdout)["gaps"]["silences"])
        self.assertEqual(run("report", d, "--format", "pdf").returncode, 2)
        self.assertEqual(run("report", d, "--from", "yesterday").returncode, 2)
        # Beyond what int64 nanoseconds hold: refused, not wrapped into another century.
        self.assertEqual(run("report", d, "--to", "9999-12-31T23:59:59Z").returncode, 2)
        self.assertEqual(run("report", d, "--gap", "10000000h").returncode, 2)
        self.assertEqual(run("report", os.path.join(self.work, "nope")).returncode, 2)
        # A log that does not verify: the report is still written and says so; exit 1.
        seg = sorted(glob.glob(os.path.join(d, "segment-*.jsonl")))[0]
        with open(seg) as f:
            lines = f.readlines()
        halt = self.expected["no-evil"][0]
        lines[halt - 1] = lines[halt - 1].replace('"decision":"halt"', '"decision":"allow"')
        with open(seg, "w") as f:
            f.writelines(lines)
        r = run("report", d)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("FAILED: INVALID at segment-000001.jsonl record", r.stdout)
        self.assertIn("DOES NOT VERIFY", r.stdout)
        self.assertIn("was not appended", r.stderr)

    def test_report_while_the_sidecar_holds_the_log(self):
        # Written, from the live log (its unfinished last line left out), without its hash.
        self.assertEqual(self.live.returncode, 0, self.live.stdout + self.live.stderr)
        with open(os.path.join(self.work, "live.json")) as f:
            self.assertEqual(json.load(f)["decisions"]["calls"], 6)
        self.assertIn("could not be appended", self.live.stderr)
        self.assertIn("in use by another process", self.live.stderr)

    def test_report_hash_through_the_running_sidecars_admin_api(self):
        token = "report-token"
        with HttpOrigin() as origin:
            tg = Tollgate({"hosts": {"allow": ["127.0.0.1"]}, "audit": {"dir": "audit"},
                           "admin": {"address": "127.0.0.1:0",
                                     "tokens": ["sha256:" + hashlib.sha256(token.encode()).hexdigest()]}})
            audit = os.path.join(tg.dir, "audit")
            out = os.path.join(self.work, "admin-report.md")
            with tg:
                for i in range(2):
                    curl("-s", origin.url(f"/hello?{i}"), proxy=tg.proxy)
                admin = f"127.0.0.1:{tg.admin_port}"
                r = run("report", audit, "--out", out, "--from", "2026-01-01T00:00:00+01:00", "--admin", admin)
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertIn("could not be appended through", r.stderr)  # no token: 401
                r = run("report", audit, "--out", out, "--from", "2026-01-01T00:00:00+01:00", "--admin", admin,
                        "--token", token)
                self.assertEqual(r.returncode, 0, r.stderr)
                with open(out, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                self.assertIn(f"report sha256:{digest} appended to the log as record", r.stderr)
                self.assertEqual(tg.stop(), 0)
                reports = [x for x in records(audit) if x["kind"] == "report"]
                self.assertEqual(len(reports), 1)
                self.assertEqual((reports[0]["sha256"], reports[0]["from"], reports[0]["file"]),
                                 (digest, "2026-01-01T00:00:00+01:00", out))
                v = subprocess.run([BIN, "audit", "verify", audit], capture_output=True, text=True, timeout=60)
                self.assertEqual(v.returncode, 0, v.stdout)


if __name__ == "__main__":
    unittest.main()
