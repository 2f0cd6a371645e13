"""`tollgate certs init` and `tollgate certs mint` with the real binary: exit codes, output,
file permissions, refusal to overwrite, the CA and its name constraints as openssl reads
them, leaves that `openssl verify` accepts, and a real TLS handshake (openssl s_server with
a minted leaf, curl trusting only the CA)."""
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

from tollgate_harness import BIN, wait_for


def run(*args, timeout=30):
    return subprocess.run([BIN, "certs", *args], capture_output=True, text=True, timeout=timeout)


def openssl(*args, timeout=30):
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=timeout)


def mode(path):
    return os.stat(path).st_mode & 0o7777


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CertsInitTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="tollgate-certs-")
        self.ca = os.path.join(self.tmp, "ca")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_init_writes_a_constrained_ca_with_safe_permissions_and_says_how_to_trust_it(self):
        old = os.umask(0)  # the modes must not come from the caller's umask
        try:
            r = run("init", self.ca, "--permit", "example.com", "--permit", ".internal")
        finally:
            os.umask(old)
        self.assertEqual(r.returncode, 0, r.stderr)
        crt = os.path.join(self.ca, "ca.crt")
        for text in ["SSL_CERT_FILE=" + crt, "REQUESTS_CA_BUNDLE=" + crt, "NODE_EXTRA_CA_CERTS=" + crt,
                     "/usr/local/share/ca-certificates/", "update-ca-certificates", "SHA256:",
                     "example.com", ".internal"]:
            self.assertIn(text, r.stdout)
        self.assertEqual(mode(self.ca), 0o700)
        self.assertEqual(mode(os.path.join(self.ca, "ca.key")), 0o600)
        self.assertEqual(mode(crt), 0o644)
        self.assertEqual(sorted(os.listdir(self.ca)), ["ca.crt", "ca.key"])

        text = openssl("x509", "-in", crt, "-noout", "-text").stdout
        self.assertRegex(text, r"Basic Constraints: critical\s+CA:TRUE")
        self.assertRegex(text, r"Key Usage: critical\s+Certificate Sign, CRL Sign")
        self.assertIn("Name Constraints: critical", text)
        self.assertRegex(text, r"Permitted:\s+DNS:example.com\s+DNS:.internal")
        self.assertIn("prime256v1", text)
        fingerprint = openssl("x509", "-in", crt, "-noout", "-fingerprint", "-sha256").stdout
        self.assertIn(fingerprint.strip().split("=", 1)[1], r.stdout)

    def test_refuses_to_overwrite_without_force(self):
        self.assertEqual(run("init", self.ca).returncode, 0)
        before = digest(os.path.join(self.ca, "ca.crt")), digest(os.path.join(self.ca, "ca.key"))
        r = run("init", self.ca)
        self.assertEqual(r.returncode, 1)
        self.assertIn("already holds a CA", r.stderr)
        self.assertIn("--force", r.stderr)
        self.assertEqual(before, (digest(os.path.join(self.ca, "ca.crt")),
                                  digest(os.path.join(self.ca, "ca.key"))))
        r = run("init", self.ca, "--force")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotEqual(before[0], digest(os.path.join(self.ca, "ca.crt")))
        self.assertEqual(mode(os.path.join(self.ca, "ca.key")), 0o600)

    def test_existing_directory_is_restricted(self):
        os.mkdir(self.ca, 0o755)
        self.assertEqual(run("init", self.ca).returncode, 0)
        self.assertEqual(mode(self.ca), 0o700)

    def test_usage_errors_exit_2(self):
        for args in [[], ["init"], ["init", self.ca, "--permit"], ["init", self.ca, "--permit", "bad name"],
                     ["init", self.ca, "--permit", "10.0.0.0/33"], ["init", self.ca, "--bogus"],
                     ["init", self.ca, "--name", "x" * 65],
                     ["frobnicate"], ["mint", self.ca], ["mint", self.ca, "bad host!"]]:
            r = run(*args)
            self.assertEqual(r.returncode, 2, (args, r.stdout, r.stderr))
        self.assertFalse(os.path.exists(os.path.join(self.ca, "ca.key")))

    def test_init_fails_when_the_directory_cannot_be_made(self):
        blocker = os.path.join(self.tmp, "file")
        open(blocker, "w").close()
        r = run("init", os.path.join(blocker, "ca"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot create", r.stderr)

    def test_help_documents_the_commands(self):
        r = subprocess.run([BIN, "help"], capture_output=True, text=True, timeout=30)
        self.assertIn("tollgate certs init DIR", r.stdout)
        self.assertIn("tollgate certs mint DIR HOST", r.stdout)


class CertsMintTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="tollgate-mint-")
        cls.ca = os.path.join(cls.tmp, "ca")
        r = run("init", cls.ca, "--permit", "example.com", "--permit", "127.0.0.1")
        assert r.returncode == 0, r.stderr
        cls.ca_crt = os.path.join(cls.ca, "ca.crt")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def mint(self, host, name):
        leaf = os.path.join(self.tmp, name + ".pem")
        key = os.path.join(self.tmp, name + ".key")
        r = run("mint", self.ca, host, "--key-out", key)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.startswith("-----BEGIN CERTIFICATE-----"))
        with open(leaf, "w") as f:
            f.write(r.stdout)
        self.assertEqual(mode(key), 0o600)
        return leaf, key

    def test_leaf_for_a_dns_name_verifies_and_has_the_right_shape(self):
        leaf, key = self.mint("API.example.com", "dns")
        r = openssl("verify", "-CAfile", self.ca_crt, "-purpose", "sslserver",
                    "-verify_hostname", "api.example.com", leaf)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn(": OK", r.stdout)
        r = openssl("verify", "-CAfile", self.ca_crt, "-verify_hostname", "other.example.com", leaf)
        self.assertNotEqual(r.returncode, 0)
        text = openssl("x509", "-in", leaf, "-noout", "-text").stdout
        self.assertIn("DNS:api.example.com", text)
        self.assertIn("TLS Web Server Authentication", text)
        self.assertRegex(text, r"Basic Constraints: critical\s+CA:FALSE")
        # The key written is the leaf's.
        pub_cert = openssl("x509", "-in", leaf, "-noout", "-pubkey").stdout
        pub_key = openssl("pkey", "-in", key, "-pubout").stdout
        self.assertEqual(pub_cert, pub_key)
        # At most a day ahead (openssl: fails if it expires within N seconds).
        self.assertEqual(openssl("x509", "-in", leaf, "-noout", "-checkend", str(23 * 3600)).returncode, 0)
        self.assertNotEqual(openssl("x509", "-in", leaf, "-noout", "-checkend", str(24 * 3600 + 60)).returncode, 0)

    def test_leaf_for_an_ip_literal_verifies(self):
        leaf, _ = self.mint("127.0.0.1", "ip")
        r = openssl("verify", "-CAfile", self.ca_crt, "-verify_ip", "127.0.0.1", leaf)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("IP Address:127.0.0.1", openssl("x509", "-in", leaf, "-noout", "-text").stdout)

    def test_hosts_outside_the_name_constraints_are_refused(self):
        for host in ["evil.com", "10.0.0.1", "notexample.com"]:
            r = run("mint", self.ca, host)
            self.assertEqual(r.returncode, 1, (host, r.stderr))
            self.assertIn("do not permit", r.stderr)
            self.assertEqual(r.stdout, "")

    def test_missing_ca_fails(self):
        r = run("mint", os.path.join(self.tmp, "nope"), "example.com")
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot read", r.stderr)

    def test_curl_trusting_the_ca_completes_a_real_handshake(self):
        leaf, key = self.mint("tools.example.com", "tls")
        server = None
        for _ in range(3):  # the free port can be taken between the check and the bind
            port = free_port()
            server = subprocess.Popen(
                ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", leaf, "-key", key,
                 "-www", "-alpn", "http/1.1"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for(lambda: server.poll() is not None or self._listening(port), timeout=10,
                         what="openssl s_server listening")
            except AssertionError:
                pass
            if server.poll() is None and self._listening(port):
                break
            server.kill()
            server.wait(timeout=10)
            server.stdin.close()
            server = None
        self.assertIsNotNone(server, "openssl s_server did not start")
        try:
            url = f"https://tools.example.com:{port}/"
            resolve = f"tools.example.com:{port}:127.0.0.1"
            r = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", self.ca_crt,
                                "--resolve", resolve, url],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("s_server", r.stdout)
            # A client that does not trust the CA refuses the same server (curl 60).
            other = os.path.join(self.tmp, "other")
            self.assertEqual(run("init", other).returncode, 0)
            r = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert",
                                os.path.join(other, "ca.crt"), "--resolve", resolve, url],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 60, r.stderr)
            # Nor does a client asking for another name on the same address.
            r = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", self.ca_crt,
                                "--resolve", f"www.example.com:{port}:127.0.0.1",
                                f"https://www.example.com:{port}/"],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 60, r.stderr)
        finally:
            server.kill()
            server.wait(timeout=10)
            server.stdin.close()

    @staticmethod
    def _listening(port):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False


if __name__ == "__main__":
    unittest.main()
