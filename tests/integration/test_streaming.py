"""Bodies stream through the proxy in both directions with bounded memory, and a response
the upstream cuts short reaches the agent cut short."""
import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time
import unittest

from audit_log import read_lines
from tollgate_harness import SANITIZED, CloseDelimitedOrigin, HttpOrigin, Tollgate, curl, pattern, wait_for

SIZE = 100 << 20  # 100 MiB
RSS_GROWTH_LIMIT_KB = 64 << 10


class RssSampler:
    def __init__(self, tg):
        self.tg = tg
        self.base = tg.rss_kb()
        self.peak = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(0.1):
            self.peak = max(self.peak, self.tg.rss_kb())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=2)


class StreamingTest(unittest.TestCase):
    def test_a_close_delimited_response_is_whole_only_when_the_upstream_ended_it_in_order(self):
        with CloseDelimitedOrigin() as origin, Tollgate() as tg:
            rc, out, err = curl(origin.url("/whole?bytes=300000"), proxy=tg.proxy)
            self.assertEqual(rc, 0, err)
            self.assertEqual(out, pattern(300000, seed=5))
            # A reset after some of the body: the agent's response ends without its last
            # chunk (curl exits 18 or 56), never as a complete one.
            rc, out, err = curl(origin.url("/cut?bytes=300000"), proxy=tg.proxy)
            self.assertIn(rc, (18, 56), err)
            self.assertLessEqual(len(out), 300000)
            audit_dir = os.path.join(tg.dir, "var", "audit")

            def outcomes():
                found = [json.loads(l) for l in read_lines(audit_dir)]
                found = [r for r in found if r.get("kind") == "outcome"]
                return found if len(found) == 2 else None
            whole, cut = wait_for(outcomes, timeout=5, what="two outcome records")
            self.assertEqual((whole["status"], whole["failed"]), ("200", "false"))
            self.assertEqual((cut["status"], cut["failed"]), ("200", "true"))
            self.assertIn("ended the response early", cut["error"])

    def test_chunked_upload_of_100_mib(self):
        block = pattern(1 << 20, seed=9)
        expected = hashlib.sha256()
        for _ in range(SIZE // len(block)):
            expected.update(block)
        with HttpOrigin() as origin, Tollgate() as tg:
            with RssSampler(tg) as rss:
                # curl reads the body from a pipe, so it must send it chunked.
                proc = subprocess.Popen(["curl", "-sS", "--max-time", "120", "--proxy", tg.proxy, "-T", "-",
                                         "-H", "Transfer-Encoding: chunked", origin.url("/sink")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in range(SIZE // len(block)):
                    proc.stdin.write(block)
                proc.stdin.close()
                out = proc.stdout.read()
                err = proc.stderr.read()
                proc.wait(timeout=120)
            self.assertEqual(proc.returncode, 0, err)
            doc = json.loads(out)
            self.assertEqual(doc["bytes"], SIZE)
            self.assertEqual(doc["sha256"], expected.hexdigest())
            self.assertEqual(origin.requests[-1][2]["transfer-encoding"], ["chunked"])
            self.assertLess(rss.peak - rss.base, RSS_GROWTH_LIMIT_KB, f"RSS grew from {rss.base} to {rss.peak} kB")

    def test_chunked_download_of_100_mib(self):
        with HttpOrigin() as origin, Tollgate() as tg:
            with RssSampler(tg) as rss:
                proc = subprocess.Popen(["curl", "-sS", "--max-time", "120", "--proxy", tg.proxy,
                                         origin.url(f"/stream?bytes={SIZE}")],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                digest = hashlib.sha256()
                n = 0
                while True:
                    chunk = proc.stdout.read(1 << 20)
                    if not chunk:
                        break
                    n += len(chunk)
                    digest.update(chunk)
                proc.wait(timeout=120)
            self.assertEqual(proc.returncode, 0, proc.stderr.read())
            self.assertEqual(n, SIZE)
            self.assertEqual(digest.hexdigest(), hashlib.sha256(pattern(SIZE, seed=1)).hexdigest())
            self.assertLess(rss.peak - rss.base, RSS_GROWTH_LIMIT_KB, f"RSS grew from {rss.base} to {rss.peak} kB")

    def test_slow_reader_does_not_grow_memory(self):
        """Backpressure: a client that does not read makes the proxy stop reading upstream."""
        with HttpOrigin() as origin, Tollgate({"limits": {"write_watermark": "64k"}}) as tg:
            base = tg.rss_kb()
            s = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            s.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (origin.url(f"/stream?bytes={SIZE}").encode(), origin.port))
            time.sleep(1.5)  # the origin would have sent everything by now without backpressure
            grown = tg.rss_kb() - base
            # The whole body arrives in the end, every chunk and the last one.
            f = s.makefile("rb")
            self.assertTrue(f.readline().startswith(b"HTTP/1.1 200"))
            while f.readline() not in (b"\r\n", b""):
                pass
            got, digest = 0, hashlib.sha256()
            while True:
                size = int(f.readline().split(b";")[0], 16)
                if size == 0:
                    self.assertEqual(f.readline(), b"\r\n")
                    break
                data = f.read(size)
                self.assertEqual(len(data), size)
                got += size
                digest.update(data)
                self.assertEqual(f.read(2), b"\r\n")
            f.close()
            s.close()
            self.assertEqual(got, SIZE)
            self.assertEqual(digest.hexdigest(), hashlib.sha256(pattern(SIZE, seed=1)).hexdigest())
            self.assertLess(grown, 16 << 10, f"RSS grew {grown} kB while the client did not read")

    def test_pipelined_refusals_an_agent_never_reads_do_not_grow_memory(self):
        """Requests refused locally (a denied host) need nothing from anyone: an agent that
        pipelines them and never reads the 403s grew the proxy's write queue without end
        (~10 bytes of reply per byte sent). Its requests now wait until it reads."""
        n = 200_000
        with Tollgate({"hosts": {"allow": ["127.0.0.1"], "deny": ["evil.example"]},
                       "limits": {"write_watermark": "64k"}}) as tg:
            base = tg.rss_kb()
            s = socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            data = b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n\r\n" * n
            s.settimeout(0.5)
            sent, deadline = 0, time.monotonic() + 4
            while sent < len(data) and time.monotonic() < deadline:  # bounded: 4 s at most
                try:
                    sent += s.send(data[sent:sent + (1 << 20)])
                except socket.timeout:
                    pass  # the proxy stopped reading: the kernel's buffers are full
            time.sleep(1)
            grown = tg.rss_kb() - base
            _, metrics = tg.admin("/metrics")
            answered = int(float(re.search(rb'tollgate_requests_total\{listener="egress",status="403"\} (\S+)',
                                           metrics).group(1)))
            s.close()
            # (AddressSanitizer keeps freed memory in its quarantine, so RSS grows with the
            # allocations made, not only with what is kept: the count is what tells there.)
            if not SANITIZED:
                self.assertLess(grown, 24 << 10, f"RSS grew {grown} kB while the agent did not read")
            self.assertLess(answered, n // 2, "requests went on being answered into an unread queue")
            self.assertIsNone(tg.proc.poll())


if __name__ == "__main__":
    unittest.main()
