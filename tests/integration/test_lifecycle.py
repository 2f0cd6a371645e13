"""The CLI, config errors, SIGTERM draining and SIGHUP."""
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest

import yaml

from tollgate_harness import BIN, HttpOrigin, Tollgate, curl, wait_for


def run(*args, timeout=10):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout)


class CliTest(unittest.TestCase):
    def test_version_and_help(self):
        r = run("--version")
        self.assertEqual(r.returncode, 0)
        self.assertRegex(r.stdout, r"^tollgate \d+\.\d+\.\d+\n$")
        r = run("help")
        self.assertEqual(r.returncode, 0)
        self.assertIn("tollgate run -c FILE", r.stdout)

    def test_usage_errors_exit_2(self):
        self.assertEqual(run().returncode, 2)
        self.assertEqual(run("frobnicate").returncode, 2)
        self.assertEqual(run("run").returncode, 2)
        r = run("run", "-c", "/nonexistent/tollgate.yaml")
        self.assertEqual(r.returncode, 2)
        self.assertIn("/nonexistent/tollgate.yaml", r.stderr)

    def check_bad_config(self, text, expected):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(text)
        try:
            r = run("run", "-c", f.name)
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn(f.name + ":" + expected, r.stderr)
        finally:
            os.unlink(f.name)

    def test_invalid_configs_name_file_line_and_key(self):
        ok = "listeners: [{name: e, address: '127.0.0.1:0'}]\n"
        self.check_bad_config("workers: 1\nlistners: []\n", "2:1: listners: unknown key")
        self.check_bad_config(ok + "timeouts:\n  header_read: 10parsecs\n", "3:16: timeouts.header_read: expected a duration")
        self.check_bad_config("listeners:\n  - {name: e, address: nowhere}\n", "2:24: listeners[0].address: expected HOST:PORT")
        self.check_bad_config(ok + "workers: [1]\n", "2:10: workers: expected a non-negative integer")
        self.check_bad_config(ok + "limits: {max_body_bytes: lots}\n", "2:26: limits.max_body_bytes: expected a size")
        self.check_bad_config(ok + "egress: {deny_addresses: [10.0.0.0/33]}\n",
                              "2:26: egress.deny_addresses: '10.0.0.0/33': expected an IPv4 or IPv6 address")

    def test_a_second_sidecar_on_a_taken_port_stops_instead_of_sharing_it(self):
        # The workers' sockets share their port (SO_REUSEPORT); a second process started on
        # the same address must not join them and take a share of the agents' connections.
        with Tollgate() as first:
            second = Tollgate(listener={"address": f"127.0.0.1:{first.proxy_port}"})
            with self.assertRaises(AssertionError) as caught:
                second.__enter__()
            second.__exit__(None, None, None)
            self.assertIn("Address already in use", str(caught.exception))
            self.assertEqual(second.proc.returncode, 1)

    def test_the_quickstart_config_is_valid(self):
        # `./dev run`'s config, as it is but for its fixed ports and its audit directory
        # (both moved so that the test runs beside anything): it starts, and its policy
        # halts an agent's call to a host no tool names.
        quickstart = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "quickstart")
        with open(os.path.join(quickstart, "tollgate.yaml")) as f:
            config = yaml.safe_load(f)
        self.assertEqual(len(config["listeners"]), 1)
        tg = Tollgate()
        config["listeners"][0]["address"] = "127.0.0.1:0"
        config["admin"]["address"] = "127.0.0.1:0"
        config["audit"]["dir"] = os.path.join(tg.dir, "audit")
        config["policies"] = [os.path.join(quickstart, p) for p in config["policies"]]
        with open(tg.config_path, "w") as f:
            json.dump(config, f)
        with tg:
            self.assertIn("egress", [l.get("listener") for l in tg.lines if l.get("msg") == "listening"])
            rc, out, err = curl("-i", "-H", "X-Agent-Id: agent-7", "http://evil.example/", proxy=tg.proxy)
            self.assertEqual(rc, 0, err)
            self.assertIn(b"403 Forbidden", out.split(b"\r\n", 1)[0])
            self.assertIn(b"X-Tollgate-Decision: halt; rule=default-deny", out)
            self.assertTrue(os.listdir(os.path.join(tg.dir, "audit")))


class ThreadNameTest(unittest.TestCase):
    def test_threads_are_named_for_top_and_perf(self):
        with HttpOrigin() as origin, Tollgate() as tg:
            rc, out, _ = curl(origin.url("/hello"), proxy=tg.proxy)
            self.assertEqual(out, b"hello")
            task = f"/proc/{tg.proc.pid}/task"
            names = sorted(open(os.path.join(task, t, "comm")).read().strip() for t in os.listdir(task))
            self.assertEqual([n for n in names if n.startswith("tg-")],
                             ["tg-audit", "tg-worker-0", "tg-worker-1"], names)


class SignalTest(unittest.TestCase):
    def test_sigterm_drains_in_flight_requests(self):
        with HttpOrigin() as origin, Tollgate({"timeouts": {"shutdown": "10s"}}) as tg:
            result = {}

            def slow():
                result["r"] = curl(origin.url("/delay?ms=1500"), proxy=tg.proxy)

            t = threading.Thread(target=slow)
            t.start()
            wait_for(lambda: len(origin.requests) == 1, timeout=5, what="the slow request at the origin")
            tg.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: tg.logs("shutting down"), timeout=5, what="shutdown log line")
            def refused():  # no longer accepting (each worker closes its listener on its loop)
                try:
                    socket.create_connection(("127.0.0.1", tg.proxy_port), timeout=2).close()
                    return False
                except OSError:
                    return True
            wait_for(refused, timeout=5, what="the listener to close")
            # The admin listener stays: the load balancer's readiness probe sees 503.
            self.assertEqual(tg.admin("/readyz")[0], 503)
            t.join(timeout=10)
            rc, out, err = result["r"]
            self.assertEqual((rc, out), (0, b"late"), err)
            self.assertEqual(tg.proc.wait(timeout=10), 0)

    def test_signals_during_the_drain_do_not_cut_it_short(self):
        # A second SIGTERM (an impatient operator, `timeout` signalling the process group)
        # or a SIGHUP during the drain: the drain goes on, and the log is sealed at the end.
        with HttpOrigin() as origin, Tollgate({"timeouts": {"shutdown": "10s"}}) as tg:
            result = {}
            t = threading.Thread(target=lambda: result.update(r=curl(origin.url("/delay?ms=1500"),
                                                                     proxy=tg.proxy)))
            t.start()
            wait_for(lambda: len(origin.requests) == 1, timeout=5, what="the slow request at the origin")
            tg.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: tg.logs("shutting down"), timeout=5, what="shutdown log line")
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                tg.proc.send_signal(sig)
            t.join(timeout=10)
            self.assertEqual(result["r"][:2], (0, b"late"), result["r"][2])
            self.assertEqual(tg.proc.wait(timeout=10), 0)
            r = subprocess.run([BIN, "audit", "verify", os.path.join(tg.dir, "var", "audit")],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn(" 0 after the last checkpoint", r.stdout)  # the shutdown checkpoint

    def test_sigterm_deadline_closes_what_is_left(self):
        with HttpOrigin() as origin, Tollgate({"timeouts": {"shutdown": "500ms"}}) as tg:
            t = threading.Thread(target=lambda: curl(origin.url("/delay?ms=4000"), proxy=tg.proxy))
            t.start()
            wait_for(lambda: len(origin.requests) == 1, timeout=5, what="the slow request at the origin")
            start = time.monotonic()
            self.assertEqual(tg.stop(timeout=5), 0)
            self.assertLess(time.monotonic() - start, 3)
            t.join(timeout=10)

    def test_sighup_calls_the_reload_hook(self):
        # On hosts: lists (the harness's default) there is nothing to reload: the sidecar
        # says so and keeps serving.
        with HttpOrigin() as origin, Tollgate() as tg:
            tg.proc.send_signal(signal.SIGHUP)
            lines = wait_for(lambda: tg.logs("reload: nothing to reload"), timeout=5,
                             what="reload log line")
            self.assertEqual(lines[0]["trigger"], "sighup")
            self.assertIn("restart", lines[0]["reason"])
            self.assertEqual(tg.logs("reload"), [])
            self.assertIsNone(tg.proc.poll())
            rc, out, _ = curl(origin.url("/hello"), proxy=tg.proxy)
            self.assertEqual(out, b"hello")
            self.assertEqual(tg.stop(), 0)


if __name__ == "__main__":
    unittest.main()
