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

from tollgate_harness import Tollgate, parse_response

BLACKHOLE = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("ready", flush=True)
while True:
    s.recvfrom(4096)  # and never answer
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
            if os.environ.get("TOLLGATE_REQUIRE_NETNS") == "1":
                raise AssertionError(f"TOLLGATE_REQUIRE_NETNS=1 but the namespace test cannot run: {reason}")
            raise unittest.SkipTest(reason)
        cls.ns = "tgdns" + uuid.uuid4().hex[:6]
        cls.etc = f"/etc/netns/{cls.ns}"
        cls.made_etc_netns = not os.path.exists("/etc/netns")
        sh("ip", "netns", "add", cls.ns)
        sh("ip", "-n", cls.ns, "link", "set", "lo", "up")
        os.makedirs(cls.etc)
        with open(os.path.join(cls.etc, "resolv.conf"), "w") as f:
            f.write("nameserver 127.0.0.1\noptions timeout:10 attempts:1\n")
        with open(os.path.join(cls.etc, "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n")
        cls.server = subprocess.Popen(["ip", "netns", "exec", cls.ns, "python3", "-c", BLACKHOLE],
                                      stdout=subprocess.PIPE, text=True)
        assert cls.server.stdout.readline().strip() == "ready"

    @classmethod
    def tearDownClass(cls):
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


if __name__ == "__main__":
    unittest.main()
