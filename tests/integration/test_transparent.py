"""Transparent mode for real: network namespaces, a veth pair, iptables REDIRECT.

    agent namespace                                   tools namespace
    curl (uid 1000) --tcp 80/443--> REDIRECT          transparent_tool.py
      -> tollgate (uid 65534) on 127.0.0.1/[::1]:15001   10.203.0.2, 10.203.0.3 (a decoy),
      -> the original destination, over the veth ------> fd00:203::2; tcp 80, 443, 8080,
                                                         udp 443, 5353
deploy/transparent-init.sh sets up the agent namespace as an init container would. The
agent's probes run as uid 1000 without any capability, as an agent container must (root or
CAP_NET_RAW/CAP_NET_ADMIN could go around any rule). The tests prove that an allowed call
reaches the tool through the sidecar, a forbidden one is halted, a Host that does not name
the dialled address is halted, and that no path avoids the sidecar: a direct IP on 80 or
443, another port, UDP (QUIC included), IPv6. Nothing leaves the two namespaces this test
creates. Needs root and `ip netns`; skips with the reason otherwise, unless
TOLLGATE_REQUIRE_NETNS=1 (CI sets it), which turns the skip into a failure.
"""
import atexit
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

from tls_fixtures import TestPki
from tollgate_harness import BIN, HERE, parse_response, skip_unless_required, wait_for

INIT = os.path.join(HERE, "..", "..", "deploy", "transparent-init.sh")
SIDECAR_UID = 65534  # nobody: the sidecar runs unprivileged
AGENT_UID = 1000  # the agent: an ordinary uid without capabilities
PORT = 15001
AGENT_IP, TOOL_IP, DECOY_IP = "10.203.0.1", "10.203.0.2", "10.203.0.3"
AGENT_IP6, TOOL_IP6 = "fd00:203::1", "fd00:203::2"

POLICY = """apiVersion: tollgate/v1
kind: Policy
metadata: {name: transparent-test}
tools:
  - name: tool.allowed
    match: {host: tool.test, methods: [GET], paths: ["/allowed"]}
    class: read
  - name: other.allowed
    match: {host: other.test, methods: [GET], paths: ["/allowed"]}
    class: read
  - name: pinned
    match: {host: pinned.test, methods: [CONNECT]}
    class: read
rules:
  - {id: allow-tool, effect: allow, match: {tool: tool.allowed}}
  - {id: allow-pinned, effect: allow, match: {tool: pinned}}
  - {id: allow-other, effect: allow, match: {tool: other.allowed}}
"""


def sh(*cmd, check=True, timeout=15, **kw):
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout, **kw)


def unprivileged(uid):
    """The command prefix that runs what follows as UID with no capability at all, as an agent
    container with runAsNonRoot, allowPrivilegeEscalation: false and every capability dropped."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs"]


@functools.lru_cache(maxsize=None)
def python_for_any_uid():
    """A python3 that an unprivileged uid can run (this one may live in root's home)."""
    for candidate in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        if candidate and sh(*unprivileged(AGENT_UID), candidate, "-c", "pass", check=False).returncode == 0:
            return candidate
    return None



def why_not_runnable():
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, iptables)"
    for tool in ("ip", "iptables", "ip6tables", "iptables-restore", "ip6tables-restore", "setpriv", "curl"):
        if not shutil.which(tool):
            return f"needs {tool}"
    if not python_for_any_uid():
        return f"needs a python3 that uid {AGENT_UID} can run"
    probe = "tgprobe" + uuid.uuid4().hex[:6]
    try:
        r = sh("ip", "netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"`ip netns add` failed: {r.stderr.strip()}"
        for tool in ("iptables", "ip6tables"):
            r = sh("ip", "netns", "exec", probe, tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
                   "--dport", "80", "-j", "REDIRECT", "--to-ports", "1", check=False)
            if r.returncode != 0:
                return f"{tool} REDIRECT does not work in a namespace: {r.stderr.strip()}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


class Topology:
    """The two namespaces, the veth pair, the tool server and the sidecar; close() undoes it
    all (also at exit, whatever failed half way)."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.agent, self.tools = f"tga{tag}", f"tgt{tag}"
        self.dir = tempfile.mkdtemp(prefix="tollgate-transparent-")
        # What the agent may read (the sidecar's directory is its uid's alone).
        self.agent_dir = tempfile.mkdtemp(prefix="tollgate-transparent-agent-")
        os.chmod(self.agent_dir, 0o755)
        self.etc = f"/etc/netns/{self.agent}"
        self.made_etc_netns = not os.path.exists("/etc/netns")
        self.procs = []
        self.lines = []
        atexit.register(self.close)

    def build(self):
        a, t = self.agent, self.tools
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", t)
        sh("ip", "link", "add", f"v{a}", "type", "veth", "peer", "name", f"v{t}")
        sh("ip", "link", "set", f"v{a}", "netns", a)
        sh("ip", "link", "set", f"v{t}", "netns", t)
        for ns, dev, v4s, v6 in ((a, f"v{a}", [AGENT_IP], AGENT_IP6), (t, f"v{t}", [TOOL_IP, DECOY_IP], TOOL_IP6)):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            for ip in v4s:
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # Names as the agent namespace sees them (`ip netns exec` mounts these over /etc);
        # DNS goes to loopback, where nothing answers: no lookup leaves the namespaces.
        os.makedirs(self.etc, exist_ok=True)
        with open(os.path.join(self.etc, "hosts"), "w") as f:
            f.write(f"127.0.0.1 localhost\n::1 localhost\n{TOOL_IP} tool.test\n{TOOL_IP6} tool.test\n"
                    f"{DECOY_IP} other.test\n{TOOL_IP} pinned.test\n{TOOL_IP} blocked.test\n")
        with open(os.path.join(self.etc, "resolv.conf"), "w") as f:
            f.write("nameserver 127.0.0.1\n")
        r = self.in_agent(INIT, "--uid", str(SIDECAR_UID), "--port", str(PORT), "--dns-servers", "none")
        assert r.returncode == 0, r.stderr

    def start_tool(self):
        self.tool_log = os.path.join(self.dir, "tool.jsonl")
        open(self.tool_log, "w").close()
        # The tool's own certificate (tool.test and its address), from a CA the sidecar trusts
        # for upstreams; the agent trusts only the sidecar's local CA.
        self.pki = TestPki(os.path.join(self.dir, "tool-pki"), name="tool CA")
        self.tool_cert = self.pki.leaf("tool", names=("tool.test",), ips=(TOOL_IP, TOOL_IP6))
        p = subprocess.Popen(["ip", "netns", "exec", self.tools, sys.executable,
                              os.path.join(HERE, "transparent_tool.py"), self.tool_log,
                              *self.tool_cert],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(p)
        assert p.stdout.readline().strip() == b"ready", p.stderr.read(2000)

    def start_sidecar(self):
        # The sidecar's files belong to its uid; the binary is copied where that uid can run it.
        binary = os.path.join(self.dir, "tollgate")
        shutil.copy(os.path.abspath(BIN), binary)
        with open(os.path.join(self.dir, "policy.yaml"), "w") as f:
            f.write(POLICY)
        self.ca = os.path.join(self.dir, "ca")
        r = sh(BIN, "certs", "init", self.ca, timeout=30)
        assert r.returncode == 0, r.stderr
        self.agent_ca = os.path.join(self.agent_dir, "sidecar-ca.crt")
        self.agent_tool_ca = os.path.join(self.agent_dir, "tool-ca.crt")
        shutil.copy(os.path.join(self.ca, "ca.crt"), self.agent_ca)
        shutil.copy(self.pki.ca_cert, self.agent_tool_ca)
        for name in (self.agent_ca, self.agent_tool_ca):
            os.chmod(name, 0o644)
        config = {
            "workers": 1,
            "listeners": [
                {"name": "egress", "kind": "transparent", "address": f"127.0.0.1:{PORT}",
                 "identity": {"header": "X-Agent-Id"}, "intercept_tls": True,
                 "passthrough": ["pinned.test", "blocked.test"]},
                {"name": "egress6", "kind": "transparent", "address": f"[::1]:{PORT}",
                 "identity": {"header": "X-Agent-Id"}, "intercept_tls": True,
                 "passthrough": ["pinned.test", "blocked.test"]},
            ],
            "tls": {"ca_dir": "ca", "upstream_ca_file": self.pki.ca_cert},
            "admin": {"address": "127.0.0.1:15000"},
            "policies": ["policy.yaml"],
            "audit": {"dir": "audit"},
            "timeouts": {"upstream_connect": "3s", "upstream_response": "5s"},
        }
        cfg = os.path.join(self.dir, "tollgate.yaml")
        with open(cfg, "w") as f:
            json.dump(config, f)
        for root, dirs, files in os.walk(self.dir):
            for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                os.chown(name, SIDECAR_UID, SIDECAR_UID)
        p = subprocess.Popen(["ip", "netns", "exec", self.agent, "setpriv", f"--reuid={SIDECAR_UID}",
                              f"--regid={SIDECAR_UID}", "--clear-groups", binary, "run", "-c", cfg],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(p)

        def read():
            for raw in p.stderr:
                try:
                    self.lines.append(json.loads(raw))
                except ValueError:
                    self.lines.append({"raw": raw.decode(errors="replace")})

        threading.Thread(target=read, daemon=True).start()

        def listening():
            if p.poll() is not None:
                raise AssertionError(f"tollgate exited with {p.returncode}: {self.lines}")
            names = {l.get("listener") for l in self.lines if l.get("msg") == "listening"}
            return {"egress", "egress6", "admin"} <= names

        wait_for(listening, timeout=10, what="the sidecar's listeners")

    def in_agent(self, *cmd, timeout=15):
        """CMD in the agent's namespace as root: setting up, not probing."""
        return sh("ip", "netns", "exec", self.agent, *cmd, check=False, timeout=timeout)

    def as_agent(self, *cmd, timeout=15):
        """CMD as the agent: uid AGENT_UID, no capability, no way to gain one."""
        return self.in_agent(*unprivileged(AGENT_UID), *cmd, timeout=timeout)

    def agent_python(self, code, *args):
        return self.as_agent(python_for_any_uid(), "-c", code, *args)

    def in_tools(self, *cmd, timeout=15):
        return sh("ip", "netns", "exec", self.tools, *cmd, check=False, timeout=timeout)

    def curl(self, *args):
        """curl run by the agent (so redirected); returns (exit code, status, headers, body)."""
        r = subprocess.run(["ip", "netns", "exec", self.agent, *unprivileged(AGENT_UID), "curl", "-sS", "-i",
                            "--max-time", "5", "-H", "X-Agent-Id: agent-1", *args], capture_output=True, timeout=20)
        if r.returncode != 0 or not r.stdout:
            return r.returncode, None, {}, r.stderr.decode(errors="replace")
        status, headers, body = parse_response(r.stdout)
        return 0, status, headers, body

    def tool_events(self):
        with open(self.tool_log) as f:
            return [json.loads(l) for l in f if l.strip()]

    def audit_tail(self):
        r = self.as_agent("curl", "-sS", "--max-time", "5", "http://127.0.0.1:15000/v1/audit/tail?n=200")
        assert r.returncode == 0, r.stderr
        return [json.loads(l) for l in r.stdout.splitlines() if l.strip()]

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for pipe in (p.stdin, p.stdout, p.stderr):
                if pipe:
                    pipe.close()
        self.procs = []
        for ns in (self.agent, self.tools):
            sh("ip", "netns", "del", ns, check=False)  # takes the veth pair with it
        shutil.rmtree(self.etc, ignore_errors=True)
        if self.made_etc_netns:
            try:
                os.rmdir("/etc/netns")
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.agent_dir, ignore_errors=True)


class TransparentModeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        reason = why_not_runnable()
        if reason:
            skip_unless_required(f"transparent-mode namespace test skipped: {reason}")
        cls.net = Topology()
        try:
            cls.net.build()
            cls.net.start_tool()
            cls.net.start_sidecar()
        except BaseException:
            cls.net.close()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.net.close()

    def requests_for(self, path):
        return [e for e in self.net.tool_events() if e["event"] == "request" and f" {path} " in e["line"]]

    def test_allowed_call_reaches_the_tool_through_the_sidecar(self):
        rc, status, headers, body = self.net.curl("-4", "http://tool.test/allowed")
        self.assertEqual(rc, 0, body)
        self.assertEqual(status, 200, body)
        doc = json.loads(body)
        self.assertEqual(doc["path"], "/allowed")
        self.assertEqual((doc["local"], doc["port"]), (TOOL_IP, 80))
        self.assertIn("tollgate-", doc["via"])  # the sidecar forwarded it
        self.assertIn("tollgate-", headers["via"][0])

    def test_forbidden_call_is_halted(self):
        rc, status, headers, body = self.net.curl("http://tool.test/forbidden")
        self.assertEqual(rc, 0, body)
        self.assertEqual(status, 403, body)
        self.assertEqual(headers["x-tollgate-decision"], ["halt; rule=default-deny"])
        doc = json.loads(body)
        self.assertEqual((doc["error"], doc["rule"], doc["agent"]), ("halted", "default-deny", "agent-1"))
        self.assertEqual(self.requests_for("/forbidden"), [])

    def test_a_host_that_does_not_name_the_dialled_address_is_halted(self):
        cases = [
            # An allowed name, dialled at another address: the classic spoof.
            ("--resolve", f"tool.test:80:{DECOY_IP}", "http://tool.test/allowed"),
            # The right address, another name in Host.
            ("-H", "Host: other.test", f"http://{TOOL_IP}/allowed"),
            # An IP literal in Host that is not the dialled address.
            ("-H", f"Host: {DECOY_IP}", f"http://{TOOL_IP}/allowed"),
            # The right name and address, another port in Host.
            ("-H", "Host: tool.test:8080", f"http://{TOOL_IP}/allowed"),
            # A name that does not resolve.
            ("-H", "Host: nowhere.test", f"http://{TOOL_IP}/allowed"),
        ]
        for args in cases:
            with self.subTest(args=args):
                rc, status, headers, body = self.net.curl(*args)
                self.assertEqual(rc, 0, body)
                self.assertEqual(status, 403, body)
                self.assertEqual(headers["x-tollgate-decision"], ["halt; rule=transparent.host_mismatch"])
                doc = json.loads(body)
                self.assertEqual(doc["rule"], "transparent.host_mismatch")
                self.assertIn("does not name the address the client dialled", doc["reason"])
        # Nothing reached the decoy, and the tool only ever saw its own name.
        self.assertEqual([e for e in self.net.tool_events() if e["local"] == DECOY_IP], [])
        self.assertEqual([e for e in self.requests_for("/allowed") if e["headers"].get("host") != "tool.test"], [])

    def test_a_direct_ip_on_port_80_goes_through_the_sidecar(self):
        before = len(self.net.tool_events())
        rc, status, headers, body = self.net.curl(f"http://{TOOL_IP}/allowed")
        self.assertEqual(rc, 0, body)
        self.assertEqual(status, 403, body)  # the policy names tool.test, not its address
        self.assertEqual(headers["x-tollgate-decision"], ["halt; rule=default-deny"])
        self.assertEqual(len(self.net.tool_events()), before)

    def test_a_direct_ip_on_port_443_goes_through_the_sidecar(self):
        before = len(self.net.tool_events())
        for address in (TOOL_IP, f"[{TOOL_IP6}]"):
            with self.subTest(address=address):
                # The agent's TLS peer is the sidecar (its certificate, for the address)...
                rc, status, headers, body = self.net.curl("-g", "--cacert", self.net.agent_ca,
                                                          f"https://{address}/allowed")
                self.assertEqual(rc, 0, body)
                self.assertEqual(status, 403, body)  # the policy names tool.test, not its address
                self.assertEqual(headers["x-tollgate-decision"], ["halt; rule=default-deny"])
                # ...never the tool, whose own certificate (it names the address) is not offered.
                rc, _, _, err = self.net.curl("-g", "--cacert", self.net.agent_tool_ca, f"https://{address}/allowed")
                self.assertEqual(rc, 60, err)
        self.assertEqual([e for e in self.net.tool_events()[before:] if e["event"] == "request"], [])

    def test_the_agent_probes_run_unprivileged(self):
        # Everything below would prove little for an agent that can change the rules or go
        # around them.
        r = self.net.as_agent("grep", "-E", "^(Uid|Gid|Groups|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):", "/proc/self/status")
        status = dict(line.split(":", 1) for line in r.stdout.splitlines())
        self.assertEqual(status["Uid"].split(), [str(AGENT_UID)] * 4)
        self.assertEqual(status["Groups"].strip(), "")
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            self.assertEqual(int(status[cap], 16), 0, cap)
        self.assertEqual(status["NoNewPrivs"].strip(), "1")
        r = self.net.agent_python("import socket; socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)")
        self.assertIn("PermissionError", r.stderr)
        r = self.net.as_agent("iptables", "-S")
        self.assertNotEqual(r.returncode, 0)

    def test_tls_on_443_is_intercepted_and_governed_request_by_request(self):
        ca = self.net.agent_ca
        rc, status, headers, body = self.net.curl("-4", "--cacert", ca, "https://tool.test/allowed")
        self.assertEqual(rc, 0, body)
        self.assertEqual(status, 200, body)
        doc = json.loads(body)
        self.assertEqual((doc["path"], doc["local"], doc["port"]), ("/allowed", TOOL_IP, 443))
        self.assertIn("tollgate-", doc["via"])
        before = len(self.net.tool_events())
        rc, status, headers, body = self.net.curl("--cacert", ca, "https://tool.test/forbidden")
        self.assertEqual((rc, status), (0, 403), body)
        self.assertEqual(json.loads(body)["rule"], "default-deny")
        self.assertEqual([e for e in self.net.tool_events()[before:] if e["event"] == "request"], [])
        # IPv6 is intercepted the same way.
        rc, status, _, body = self.net.curl("-6", "--cacert", ca, "https://tool.test/allowed")
        self.assertEqual((rc, status), (0, 200), body)
        records = [r for r in self.net.audit_tail() if r.get("rule") == "tls.intercept"]
        self.assertEqual(records[-1]["authority"], "tool.test:443")
        self.assertEqual(records[-1]["method"], "TLS")

    def test_passthrough_tls_is_decided_by_its_sni_and_relayed_blind(self):
        before = len(self.net.tool_events())
        # pinned.test is allowed at host level: the agent talks TLS with the tool itself
        # (its own certificate, for tool.test: -k), nothing is intercepted (no Via).
        rc, status, _, body = self.net.curl("-4", "-k", "https://pinned.test/allowed")
        self.assertEqual((rc, status), (0, 200), body)
        self.assertEqual(json.loads(body)["via"], "")
        # blocked.test is a passthrough host no rule allows: the connection is closed.
        rc, _, _, err = self.net.curl("-4", "-k", "https://blocked.test/allowed")
        self.assertNotEqual(rc, 0)
        # An allowed SNI sent to another address (the decoy) is not relayed there.
        rc, _, _, err = self.net.curl("-4", "-k", "--resolve", f"pinned.test:443:{DECOY_IP}",
                                      "https://pinned.test/allowed")
        self.assertNotEqual(rc, 0)
        events = self.net.tool_events()[before:]
        self.assertEqual([e["local"] for e in events if e["event"] == "request"], [TOOL_IP])
        self.assertEqual([e for e in events if e["local"] == DECOY_IP], [])
        rules = [(r.get("method"), r.get("authority"), r.get("rule")) for r in self.net.audit_tail()]
        self.assertIn(("CONNECT", "pinned.test:443", "allow-pinned"), rules)
        self.assertIn(("CONNECT", "blocked.test:443", "default-deny"), rules)
        self.assertIn(("CONNECT", "pinned.test:443", "transparent.host_mismatch"), rules)

    def test_tls_naming_another_host_than_the_one_dialled_goes_nowhere(self):
        ca = self.net.agent_ca
        before = len(self.net.tool_events())
        # other.test (allowed) is the decoy's address; the server there has no certificate
        # for that name, so the sidecar cannot verify it and nothing is sent.
        rc, status, _, body = self.net.curl("--cacert", ca, "https://other.test/allowed")
        self.assertEqual((rc, status), (0, 502), body)
        doc = json.loads(body)
        self.assertEqual(doc["error"], "upstream_tls")
        self.assertIn("hostname mismatch", doc["reason"])
        self.assertEqual([e for e in self.net.tool_events()[before:] if e["event"] == "request"], [])
        # An agent that does not trust the sidecar's CA gets nothing at all.
        rc, _, _, err = self.net.curl("https://tool.test/allowed")
        self.assertEqual(rc, 60, err)

    def test_other_ports_and_udp_are_refused_under_lockdown(self):
        # The tool does listen there (seen from its own namespace)...
        r = self.net.in_tools("curl", "-sS", "--max-time", "5", "http://127.0.0.1:8080/control")
        self.assertEqual(r.returncode, 0, r.stderr)
        before = len(self.net.tool_events())
        # ...but the agent cannot reach it, over IPv4 or IPv6, and is told at once.
        for url in (f"http://{TOOL_IP}:8080/bypass", f"http://[{TOOL_IP6}]:8080/bypass"):
            with self.subTest(url=url):
                started = time.monotonic()
                rc, _, _, err = self.net.curl("-g", url)
                self.assertEqual(rc, 7, err)  # connection refused (a reset from the lockdown)
                self.assertLess(time.monotonic() - started, 4)
        self.assertEqual(self.net.tool_events()[before:], [])

    def test_udp_quic_included_is_refused_over_ipv4_and_ipv6(self):
        send = """import errno, socket, sys
address, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ':' in address else socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(sys.argv[3].encode(), (address, port))
    print('sent')
except OSError as e:
    print(errno.errorcode[e.errno])
"""
        targets = [(TOOL_IP, 443), (TOOL_IP6, 443), (TOOL_IP, 5353), (TOOL_IP6, 5353)]
        # The tool does receive datagrams on each (sent from its own namespace)...
        for address, port in targets:
            r = self.net.in_tools(sys.executable, "-c", send, address, str(port), f"control {address} {port}")
            self.assertEqual(r.stdout.strip(), "sent", r.stderr)
        wait_for(lambda: len([e for e in self.net.tool_events() if e.get("data", "").startswith("control ")]) >= 4,
                 timeout=5, what="the tool's own datagrams")
        before = len(self.net.tool_events())
        # ...but none from the agent: QUIC (udp 443) or any other UDP, IPv4 or IPv6.
        for address, port in targets:
            with self.subTest(address=address, port=port):
                r = self.net.agent_python(send, address, str(port), f"bypass {address} {port}")
                self.assertEqual(r.stdout.strip(), "EPERM", r.stderr)
        time.sleep(0.3)
        self.assertEqual(self.net.tool_events()[before:], [])

    def test_ipv6_is_redirected_too(self):
        rc, status, headers, body = self.net.curl("-6", "http://tool.test/allowed")
        self.assertEqual(rc, 0, body)
        self.assertEqual(status, 200, body)
        doc = json.loads(body)
        self.assertEqual((doc["local"], doc["port"]), (TOOL_IP6, 80))
        self.assertIn("tollgate-", doc["via"])
        rc, status, headers, body = self.net.curl("-g", f"http://[{TOOL_IP6}]/allowed")
        self.assertEqual(rc, 0, body)
        self.assertEqual(status, 403, body)
        self.assertEqual(headers["x-tollgate-decision"], ["halt; rule=default-deny"])

    def neighbour_state(self, ns, address):
        out = sh("ip", "-n", ns, "-6", "neigh", "show", address, check=False).stdout.split()
        return out[-1] if out else "NONE"

    def test_neighbour_discovery_still_works_both_ways(self):
        # The lockdown lets through only the ND the kernel sends: check each kind it needs.
        a, t = self.net.agent, self.net.tools
        mac = {ns: json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", f"v{ns}").stdout)[0]["address"]
               for ns in (a, t)}
        sidecar_sends = (*unprivileged(SIDECAR_UID), python_for_any_uid(), "-c",
                         "import socket; socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)"
                         f".sendto(b'nd', ('{TOOL_IP6}', 9))")
        # The agent resolves the tool: NS to the solicited-node group, answered.
        sh("ip", "-n", a, "neigh", "flush", "dev", f"v{a}")
        self.net.in_agent(*sidecar_sends)
        wait_for(lambda: self.neighbour_state(a, TOOL_IP6) == "REACHABLE", timeout=5,
                 what="the agent's multicast NS answered")
        # The agent confirms a stale neighbour (NUD): NS to the tool's unicast address.
        self.net.in_agent("sysctl", "-qw", f"net.ipv6.neigh.v{a}.delay_first_probe_time=0")
        sh("ip", "-n", a, "neigh", "replace", TOOL_IP6, "lladdr", mac[t], "dev", f"v{a}", "nud", "stale")
        self.net.in_agent(*sidecar_sends)
        wait_for(lambda: self.neighbour_state(a, TOOL_IP6) == "REACHABLE", timeout=5,
                 what="the agent's unicast NS answered")
        # The tool resolves the agent: the agent's NA goes to the tool's unicast address.
        sh("ip", "-n", t, "neigh", "flush", "dev", f"v{t}")
        self.net.in_tools(sys.executable, "-c", "import socket; socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)"
                          f".sendto(b'nd', ('{AGENT_IP6}', 9))")
        wait_for(lambda: self.neighbour_state(t, AGENT_IP6) == "REACHABLE", timeout=5,
                 what="the agent's NA to the tool")
        # And a call over IPv6 still goes through.
        rc, status, _, body = self.net.curl("-6", "http://tool.test/allowed")
        self.assertEqual((rc, status), (0, 200), body)

    def test_the_neighbour_discovery_exception_carries_nothing_a_process_sends(self):
        # The agent must not hold CAP_NET_RAW (an AF_PACKET socket passes no netfilter hook at
        # all). Should it have a raw IPv6 socket anyway, ND is no way out: ND crafted by a
        # process (a hop limit router would forward, another destination) is rejected.
        send = """import errno, socket, sys
kind, hops, address = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hops)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, hops)
target = socket.inet_pton(socket.AF_INET6, '%s')
try:
    s.sendto(bytes([kind, 0, 0, 0, 0, 0, 0, 0]) + target + b'tollgate-probe ' + sys.argv[4].encode(),
             (address, 0, 0, socket.if_nametoindex(sys.argv[5])))
    print('sent')
except OSError as e:
    print(errno.errorcode[e.errno])
"""
        # The tool does see such messages (sent from its own namespace)...
        r = self.net.in_tools(sys.executable, "-c", send % TOOL_IP6, "135", "255", TOOL_IP6, "control", "lo")
        self.assertEqual(r.stdout.strip(), "sent", r.stderr)
        wait_for(lambda: any(e.get("data") == "tollgate-probe control" for e in self.net.tool_events()),
                 timeout=5, what="the tool's own ICMPv6 probe")
        before = len(self.net.tool_events())
        # ...but none from the agent, whatever the hop limit or destination.
        cases = [("NS to the tool's address, hop limit 255", 135, 255, TOOL_IP6),
                 ("NA to the tool's address, hop limit 64", 136, 64, TOOL_IP6),
                 ("NS to all nodes, hop limit 255", 135, 255, "ff02::1"),
                 ("RS to all nodes, hop limit 255", 133, 255, "ff02::1")]
        for name, kind, hops, address in cases:
            with self.subTest(name):
                r = self.net.in_agent(sys.executable, "-c", send % TOOL_IP6, str(kind), str(hops), address,
                                      name, f"v{self.net.agent}")
                self.assertEqual(r.stdout.strip(), "EPERM", r.stderr)
        time.sleep(0.3)
        self.assertEqual(self.net.tool_events()[before:], [])

    def test_dialling_the_sidecar_itself_is_refused(self):
        rc, status, headers, body = self.net.curl("-H", "Host: tool.test", f"http://127.0.0.1:{PORT}/allowed")
        self.assertEqual(rc, 0, body)
        self.assertEqual(status, 400, body)
        doc = json.loads(body)
        self.assertEqual(doc["error"], "not_redirected")
        self.assertIn("loop", doc["reason"])

    def test_the_audit_stream_has_the_decisions(self):
        # Only this test's records count (the class's other tests make the same kinds).
        before = max((r["seq"] for r in self.net.audit_tail()), default=0)
        rc, status, _, body = self.net.curl("http://tool.test/allowed")
        self.assertEqual((rc, status), (0, 200), body)
        rc, status, _, body = self.net.curl("--resolve", f"tool.test:80:{DECOY_IP}", "http://tool.test/allowed")
        self.assertEqual((rc, status), (0, 403), body)
        mismatch_seq = json.loads(body)["audit_seq"]
        rc, status, _, body = self.net.curl(f"http://127.0.0.1:{PORT}/")
        self.assertEqual((rc, status), (0, 400), body)
        not_redirected_seq = json.loads(body)["audit_seq"]
        # Something that starts like TLS but is not a ClientHello, on a redirected port.
        send = ("import socket; s = socket.create_connection(('%s', 80), timeout=3)\n"
                "s.sendall(bytes.fromhex('1603010000')); s.recv(100)\n" % TOOL_IP)
        self.net.agent_python(send)
        records = [r for r in self.net.audit_tail() if r["seq"] > before]
        by_seq = {r["seq"]: r for r in records}
        self.assertEqual(by_seq[mismatch_seq]["rule"], "transparent.host_mismatch")
        self.assertEqual(by_seq[not_redirected_seq]["rule"], "transparent.not_redirected")
        rules = [(r.get("decision"), r.get("rule")) for r in records if r["kind"] == "call"]
        self.assertEqual(rules.count(("allow", "allow-tool")), 1, rules)
        self.assertEqual(rules.count(("halt", "transparent.bad_tls")), 1, rules)
        allowed = [r for r in records if r.get("rule") == "allow-tool"]
        self.assertEqual(allowed[0]["authority"], "tool.test:80")
        self.assertEqual(allowed[0]["agent"], "agent-1")
        # Each refusal is counted under its own rule, as a halt and as a decision.
        r = self.net.as_agent("curl", "-sS", "--max-time", "5", "http://127.0.0.1:15000/metrics")
        self.assertEqual(r.returncode, 0, r.stderr)
        for rule in ("transparent.bad_tls", "transparent.not_redirected", "transparent.host_mismatch"):
            self.assertRegex(r.stdout, r'tollgate_halts_total\{reason="%s"\} [1-9]' % re.escape(rule))
            self.assertRegex(r.stdout, r'tollgate_decisions_total\{decision="halt",rule="%s"\} [1-9]'
                             % re.escape(rule))
        self.assertNotIn('tollgate_halts_total{reason="transparent"}', r.stdout)


# A datagram to an address of each family behind a veth pair where no one answers: it leaves
# (sendto succeeds, the neighbour is looked up in the background) unless a rule rejects it.
EGRESS_PROBE = """import errno, socket
for family, address in ((socket.AF_INET, '10.99.0.2'), (socket.AF_INET6, 'fd99::2')):
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.sendto(b'probe', (address, 9))
        print('sent')
    except OSError as e:
        print(errno.errorcode[e.errno])
"""

# The iptables tools the script finds first on its PATH: each logs its arguments, then fails
# as MODE says ("nat": the nat table is missing, as on a kernel without it; "all": the tool
# cannot work at all) or runs the real one.
FAKE_TOOL = """#!/bin/sh
echo "{name} $*" >>{log}
case "{mode}" in all) echo "{name}: cannot work (test)" >&2; exit 1 ;; esac
case "{mode} $*" in "nat "*"-t nat"*) echo "{name}: no table nat (test)" >&2; exit 1 ;; esac
exec {real} "$@"
"""
FAKE_RESTORE = """#!/bin/sh
echo "{name} $*" >>{log}
input=$(cat)
case "{mode}" in all) echo "{name}: cannot work (test)" >&2; exit 1 ;; esac
case "{mode} $input" in "nat "*"*nat"*) echo "{name}: no table nat (test)" >&2; exit 1 ;; esac
printf '%s\\n' "$input" | {real} "$@"
"""


class InitScriptTest(unittest.TestCase):
    """deploy/transparent-init.sh on its own, in a namespace of its own."""

    def setUp(self):
        reason = why_not_runnable()
        if reason:
            skip_unless_required(f"init script namespace test skipped: {reason}")
        self.ns = "tgi" + uuid.uuid4().hex[:6]
        sh("ip", "netns", "add", self.ns)
        self.addCleanup(sh, "ip", "netns", "del", self.ns, check=False)

    def run_in(self, *cmd):
        r = sh("ip", "netns", "exec", self.ns, *cmd, check=False)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout

    def run_init(self, *args, path=None):
        env = ["env", f"PATH={path}:{os.environ['PATH']}"] if path else []
        return sh("ip", "netns", "exec", self.ns, *env, INIT, *args, check=False)

    def rules(self):
        return {(tool, table): self.run_in(tool, "-t", table, "-S")
                for tool in ("iptables", "ip6tables") for table in ("nat", "filter")}

    def fake_tools(self, **modes):
        """A directory of logging iptables tools, failing as MODES say ({"ip6tables": "nat"});
        returns it and the log."""
        path = tempfile.mkdtemp(prefix="tollgate-fake-iptables-")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        log = os.path.join(path, "calls.log")
        for tool in ("iptables", "ip6tables"):
            for name, text in ((tool, FAKE_TOOL), (f"{tool}-restore", FAKE_RESTORE)):
                fake = os.path.join(path, name)
                with open(fake, "w") as f:
                    f.write(text.format(name=name, log=log, mode=modes.get(tool, "log"), real=shutil.which(name)))
                os.chmod(fake, 0o755)
        return path, log

    def egress(self, uid):
        """What a datagram from UID to each family meets: ('sent' or the errno, the same for IPv6)."""
        if not hasattr(self, "link"):
            self.link = True
            self.run_in("ip", "link", "add", "tgp0", "type", "veth", "peer", "name", "tgp1")
            self.run_in("ip", "addr", "add", "10.99.0.1/24", "dev", "tgp0")
            self.run_in("ip", "addr", "add", "fd99::1/64", "dev", "tgp0", "nodad")
            self.run_in("ip", "link", "set", "tgp0", "up")
            self.run_in("ip", "link", "set", "tgp1", "up")
        out = self.run_in(*unprivileged(uid), python_for_any_uid(), "-c", EGRESS_PROBE)
        return tuple(out.split())

    @staticmethod
    def first_output_rules(text, n=1):
        return [line for line in text.splitlines() if line.startswith("-A OUTPUT ")][:n]

    def test_idempotent_and_uninstall_removes_exactly_what_it_added(self):
        # Someone else's rules, which must survive untouched.
        for tool in ("iptables", "ip6tables"):
            self.run_in(tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9999", "-j", "RETURN")
            self.run_in(tool, "-t", "filter", "-A", "OUTPUT", "-p", "udp", "--dport", "9999", "-j", "ACCEPT")
        before = self.rules()
        self.run_in(INIT, "--uid", "1234", "--port", "15006", "--dns-servers", "10.0.0.53,fd00::53")
        once = self.rules()
        self.run_in(INIT, "--uid", "1234", "--port", "15006", "--dns-servers", "10.0.0.53,fd00::53")
        self.assertEqual(self.rules(), once)
        for tool in ("iptables", "ip6tables"):
            nat = once[(tool, "nat")].splitlines()
            # Our chains come first in OUTPUT, before rules that could let traffic skip them
            # (the RETURN and ACCEPT above were there before).
            self.assertEqual(self.first_output_rules(once[(tool, "nat")]), ["-A OUTPUT -j TOLLGATE_OUTPUT"])
            self.assertEqual(self.first_output_rules(once[(tool, "filter")]), ["-A OUTPUT -j TOLLGATE_LOCKDOWN"])
            self.assertIn("-A TOLLGATE_OUTPUT -m owner --uid-owner 1234 -j RETURN", nat)
            self.assertIn("-A TOLLGATE_OUTPUT -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 15006", nat)
        self.assertIn("-d 10.0.0.53/32 -p udp -m udp --dport 53 -j RETURN", once[("iptables", "filter")])
        self.assertNotIn("fd00::53", once[("iptables", "filter")])
        self.assertIn("-d fd00::53/128 -p udp -m udp --dport 53 -j RETURN", once[("ip6tables", "filter")])
        # A rule put before ours meanwhile: a re-run puts our jumps first again, and keeps it.
        for tool in ("iptables", "ip6tables"):
            self.run_in(tool, "-t", "nat", "-I", "OUTPUT", "1", "-p", "tcp", "--dport", "9998", "-j", "RETURN")
            self.run_in(tool, "-t", "filter", "-I", "OUTPUT", "1", "-p", "udp", "--dport", "9998", "-j", "ACCEPT")
        self.run_in(INIT, "--uid", "1234", "--port", "15006", "--dns-servers", "10.0.0.53,fd00::53")
        for (tool, table), text in self.rules().items():
            with self.subTest(tool=tool, table=table):
                self.assertEqual(self.first_output_rules(text, 2)[0], "-A OUTPUT -j " + (
                    "TOLLGATE_OUTPUT" if table == "nat" else "TOLLGATE_LOCKDOWN"))
                self.assertIn("--dport 9998", self.first_output_rules(text, 2)[1])
                self.run_in(tool, "-t", table, "-D", "OUTPUT", "2")
        # Without the lockdown the filter table is back to what it was.
        self.run_in(INIT, "--uid", "1234", "--no-lockdown")
        now = self.rules()
        self.assertEqual(now[("iptables", "filter")], before[("iptables", "filter")])
        self.assertIn("TOLLGATE_OUTPUT", now[("iptables", "nat")])
        self.run_in(INIT, "--uninstall")
        self.assertEqual(self.rules(), before)

    def test_bad_arguments_are_refused_before_anything_is_changed(self):
        before = self.rules()
        cases = ([], ["--uid", "nobody"], ["--uid", "4294967295"], ["--uid", "1", "--port", "0"],
                 ["--uid", "1", "--port", "65536"], ["--uid", "1", "--ports", "80,x"], ["--uid", "1", "--ports", "80,"],
                 # Each of these used to fail in the middle of the IPv4 lockdown chain, which
                 # then held RETURN rules and no REJECT: every port and UDP open.
                 ["--uid", "1", "--dns-servers", "10.0.0.300"], ["--uid", "1", "--dns-servers", "10.0.0.53,fd00::53::1"],
                 ["--uid", "1", "--dns-servers", "10.0.0.0/8"], ["--uid", "1", "--dns-servers", "fe80::1%eth0"])
        for args in cases:
            with self.subTest(args=args):
                r = self.run_init(*args)
                self.assertEqual(self.rules(), before)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertIn("transparent-init", r.stderr)
                if args:
                    self.assertIn(args[-1].split(",")[-1], r.stderr)

    def test_a_failure_half_way_leaves_egress_blocked(self):
        for tool in ("ip6tables", "iptables"):
            with self.subTest(f"{tool} without a nat table"):
                self.run_in(INIT, "--uninstall")
                self.assertEqual(self.egress(AGENT_UID), ("sent", "sent"))  # the probe can tell
                path, _ = self.fake_tools(**{tool: "nat"})
                r = self.run_init("--uid", "1234", "--dns-servers", "none", path=path)
                self.assertEqual(self.egress(AGENT_UID), ("EPERM", "EPERM"))
                self.assertEqual(self.egress(1234), ("sent", "sent"))  # the sidecar still goes out
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn("is rejected instead", r.stderr)
        # A re-run that fails leaves what the last run installed.
        self.run_in(INIT, "--uninstall")
        self.run_in(INIT, "--uid", "1234", "--dns-servers", "none")
        once = self.rules()
        path, _ = self.fake_tools(ip6tables="all")
        r = self.run_init("--uid", "1234", "--dns-servers", "10.0.0.53", path=path)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(self.egress(AGENT_UID), ("EPERM", "EPERM"))
        self.assertEqual(self.rules()[("ip6tables", "filter")], once[("ip6tables", "filter")])
        # A first run where nothing can block IPv6 says so.
        self.run_in(INIT, "--uninstall")
        r = self.run_init("--uid", "1234", "--dns-servers", "none", path=path)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("IPv6 EGRESS IS NOT BLOCKED", r.stderr)

    def test_each_family_is_changed_in_one_transaction(self):
        # Chains emptied and refilled rule by rule leave egress open in between, while the
        # agent runs (a re-run) or for good (a failure half way): every change goes through
        # one iptables-restore per family, which applies all of it or none.
        path, log = self.fake_tools()
        for args in (["--uid", "1234", "--dns-servers", "none"], ["--uid", "1234", "--dns-servers", "10.0.0.53"],
                     ["--uid", "1234", "--no-lockdown"], ["--uninstall"]):
            with self.subTest(args=args):
                open(log, "w").close()
                r = self.run_init(*args, path=path)
                self.assertEqual(r.returncode, 0, r.stderr)
                with open(log) as f:
                    calls = [line.split() for line in f]
                changes = [c for c in calls if not c[0].endswith("-restore")
                           and set(c) & {"-A", "-I", "-D", "-F", "-N", "-X", "-R", "-P", "-Z", "-E"}]
                self.assertEqual(changes, [])
                self.assertEqual(sorted(c[0] for c in calls if c[0].endswith("-restore")),
                                 ["ip6tables-restore", "iptables-restore"])


if __name__ == "__main__":
    unittest.main()
