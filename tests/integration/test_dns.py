"""Name resolution under a name server that never answers, for real: a network namespace
whose resolv.conf names a server on its loopback that takes every query and answers none.
The system resolver would wait for it for seconds (here 10 s) on one of libuv's four
threads; the lookup counts against timeouts.upstream_connect, so the call ends in a 504
within it. Needs root and `ip netns`; skips with the reason otherwise, unless
TOLLGATE_REQUIRE_NETNS=1 (CI sets it), which turns the skip into a failure."""
import json
import os
import shutil
import subprocess
import time
import unittest
import uuid

from tollgate_harness import Tollgate, parse_response, skip_unless_required

BLACKHOLE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("ready", flush=True)
while True:
    q, peer = s.recvfrom(4096)  # and never answer, but for names beginning with nx
    labels, i = [], 12
    while i < len(q) and q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode(errors="replace"))
        i += 1 + q[i]
    if labels and labels[0].startswith("nx"):
        with open(sys.argv[1], "a") as f:
            f.write(".".join(labels) + "\\n")
        # NXDOMAIN: the query's id and question, flags QR RD RA, rcode 3.
        s.sendto(q[:2] + b"\\x81\\x83" + q[4:6] + b"\\x00\\x00\\x00\\x00\\x00\\x00" + q[12:i + 5], peer)
"""


def sh(*cmd, check=True):
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=15)


class SilentNameServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        reason = None
        if os.geteuid() != 0:
            reason = "needs root (network namespaces)"
        elif not shutil.which("ip"):
            reason = "needs ip"
        if reason:
            skip_unless_required(reason)
        cls.ns = "tgdns" + uuid.uuid4().hex[:6]
        cls.etc = f"/etc/netns/{cls.ns}"
        cls.made_etc_netns = not os.path.exists("/etc/netns")
        cls.server = None
        sh("ip", "netns", "add", cls.ns)
        try:
            cls.setUpNamespace()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def setUpNamespace(cls):
        sh("ip", "-n", cls.ns, "link", "set", "lo", "up")
        os.makedirs(cls.etc)
        with open(os.path.join(cls.etc, "resolv.conf"), "w") as f:
            f.write("nameserver 127.0.0.1\noptions timeout:10 attempts:1\n")
        with open(os.path.join(cls.etc, "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n10.99.0.1 dual.test\n10.99.0.2 dual.test\n")
        # dual.test: 10.99.0.1 first (gai.conf ranks it above every other address), whose
        # packets vanish (sent over a veth to a peer with another link address, which drops
        # them), then 10.99.0.2, local.
        with open(os.path.join(cls.etc, "gai.conf"), "w") as f:
            f.write("precedence ::ffff:10.99.0.1/128 100\nprecedence ::ffff:0:0/96 10\nprecedence ::/0 40\n")
        sh("ip", "-n", cls.ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        sh("ip", "-n", cls.ns, "addr", "add", "10.99.0.2/24", "dev", "d0")
        sh("ip", "-n", cls.ns, "link", "set", "d0", "up")
        sh("ip", "-n", cls.ns, "link", "set", "d1", "up")
        sh("ip", "-n", cls.ns, "neigh", "add", "10.99.0.1", "lladdr", "02:00:00:00:00:01", "dev", "d0",
           "nud", "permanent")
        # Counts the SYNs sent to the address that never answers (no target: counts only).
        sh("ip", "netns", "exec", cls.ns, "iptables", "-A", "OUTPUT", "-d", "10.99.0.1", "-p", "tcp", "--syn")
        cls.queries = os.path.join(cls.etc, "nx-queries")
        cls.server = subprocess.Popen(["ip", "netns", "exec", cls.ns, "python3", "-c", BLACKHOLE, cls.queries],
                                      stdout=subprocess.PIPE, text=True)
        assert cls.server.stdout.readline().strip() == "ready"

    @classmethod
    def tearDownClass(cls):
        if cls.server:
            cls.server.kill()
            cls.server.wait(timeout=10)
        shutil.rmtree(cls.etc, ignore_errors=True)
        if cls.made_etc_netns:
            shutil.rmtree("/etc/netns", ignore_errors=True)
        sh("ip", "netns", "del", cls.ns, check=False)

    def test_a_lookup_that_never_answers_is_a_504_within_upstream_connect(self):
        with Tollgate({"timeouts": {"upstream_connect": "500ms"}}, wrap=["ip", "netns", "exec", self.ns]) as tg:
            for name in ("never.test", "never.test", "other.never.test"):
                start = time.monotonic()
                r = subprocess.run(["ip", "netns", "exec", self.ns, "curl", "-s", "-i", "--max-time", "5",
                                    "-x", f"http://127.0.0.1:{tg.proxy_port}", f"http://{name}/x"],
                                   capture_output=True, timeout=20)
                took = time.monotonic() - start
                self.assertEqual(r.returncode, 0, (name, r.stderr))
                status, _, body = parse_response(r.stdout)
                self.assertEqual(status, 504, r.stdout)
                doc = json.loads(body)
                self.assertEqual(doc["error"], "upstream_timeout")
                self.assertIn(f"cannot resolve {name} within 500 ms", doc["reason"])
                self.assertLess(took, 3.0)
            self.assertIsNone(tg.proc.poll())

    def curl(self, tg, name):
        return subprocess.Popen(["ip", "netns", "exec", self.ns, "curl", "-s", "-i", "--max-time", "10",
                                 "-x", f"http://127.0.0.1:{tg.proxy_port}", f"http://{name}/x"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def test_lookups_in_flight_are_capped_so_one_agent_cannot_take_every_thread(self):
        """A lookup holds a pool thread for the resolver's whole 10 s whatever the call's
        deadline: 100 names at once under the silent server would take every thread, and
        every other lookup would wait behind them. Past 32 per worker, a lookup fails at
        once with the reason."""
        with Tollgate({"timeouts": {"upstream_connect": "1s"}}, wrap=["ip", "netns", "exec", self.ns]) as tg:
            procs = [self.curl(tg, f"n{i}.never.test") for i in range(100)]  # bounded: 100, 10 s each
            reasons = []
            for p in procs:
                out, _ = p.communicate(timeout=30)
                status, _, body = parse_response(out)
                reasons.append((status, json.loads(body)["reason"]))
            busy = [r for s, r in reasons if s == 502 and "too many name lookups in flight (32 per worker)" in r]
            waited = [r for s, r in reasons if s == 504 and "within 1000 ms" in r]
            self.assertEqual(len(busy) + len(waited), 100, reasons)
            self.assertGreaterEqual(len(busy), 100 - 2 * 32, reasons)  # two workers
            self.assertLessEqual(len(waited), 2 * 32)
            self.assertIsNone(tg.proc.poll())

    def syns_to_the_silent_address(self):
        out = sh("ip", "netns", "exec", self.ns, "iptables", "-nvxL", "OUTPUT").stdout
        rows = [l.split() for l in out.splitlines() if "10.99.0.1" in l]
        self.assertEqual(len(rows), 1, out)
        return int(rows[0][0])

    def test_an_address_that_never_answers_costs_its_share_and_the_next_one_is_tried(self):
        """A name with two addresses, the first of which swallows the SYN (a blackholed
        IPv6 path in front of a working IPv4 one is the common case): the first has its
        share of upstream_connect (half of 3 s, but at least 2 s: one lost SYN is resent
        after 1 s), then the call goes to the second; it used to wait out the whole deadline
        on the first and fail with 504."""
        origin = subprocess.Popen(["ip", "netns", "exec", self.ns, "python3", "-u", "-m", "http.server",
                                   "--bind", "10.99.0.2", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True)
        try:
            line = origin.stdout.readline()
            port = int(line.split(" port ")[1].split()[0])
            before = self.syns_to_the_silent_address()
            with Tollgate({"timeouts": {"upstream_connect": "3s"}}, wrap=["ip", "netns", "exec", self.ns]) as tg:
                start = time.monotonic()
                out, _ = self.curl(tg, f"dual.test:{port}").communicate(timeout=30)
                took = time.monotonic() - start
                status, _, body = parse_response(out)
                self.assertEqual(status, 404, out)  # http.server's answer for /x: it was reached
                self.assertIn(b"Error response", body)
                self.assertGreaterEqual(self.syns_to_the_silent_address() - before, 1)
                self.assertGreater(took, 1.9)   # the first address had its share (2 s of 3, not 1.5)
                self.assertLess(took, 2.9)      # and not the whole deadline
        finally:
            origin.kill()
            origin.wait(timeout=10)
            origin.stdout.close()

    def test_a_name_that_does_not_exist_is_remembered_briefly(self):
        """NXDOMAIN is cached like an answer (for at most 5 s): a name that does not
        resolve does not take a pool thread again at every call."""
        if os.path.exists(self.queries):
            os.unlink(self.queries)
        with Tollgate(wrap=["ip", "netns", "exec", self.ns]) as tg:
            for _ in range(6):
                out, _ = self.curl(tg, "nx-missing.test").communicate(timeout=30)
                status, _, body = parse_response(out)
                self.assertEqual(status, 502, out)
                self.assertIn("cannot resolve nx-missing.test", json.loads(body)["reason"])
            with open(self.queries) as f:
                asked = [l for l in f.read().split() if l == "nx-missing.test"]
            # A and AAAA, by each of the two workers at most: not one lookup per call.
            self.assertLessEqual(len(asked), 4, asked)
            self.assertGreaterEqual(len(asked), 1)


if __name__ == "__main__":
    unittest.main()
