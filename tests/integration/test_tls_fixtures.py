"""The TLS fixtures themselves (tls_fixtures.py): curl trusting only the test CA reaches
HttpsOrigin, refuses each bad leaf for the reason it is bad, openssl s_client sends the SNI
the origin records, mTLS records the client subject, the echo server echoes."""
import json
import shutil
import subprocess
import tempfile
import unittest

from tls_fixtures import HttpsOrigin, TestPki, TlsEchoServer, tls_client
from tollgate_harness import curl


class TlsFixturesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="tollgate-tlsfix-")
        cls.pki = TestPki(cls.tmp)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_curl_trusting_the_test_ca_reaches_the_origin_by_name_and_by_ip(self):
        leaf = self.pki.valid("tool.test")
        with HttpsOrigin(leaf.cert, leaf.key) as origin:
            code, out, err = curl("--cacert", self.pki.ca_cert, "--resolve", f"tool.test:{origin.port}:127.0.0.1",
                                  "-H", "X-Agent-Id: a1", origin.url("/headers", host="tool.test"), timeout=10)
            self.assertEqual(code, 0, err)
            self.assertEqual(json.loads(out)["x-agent-id"], ["a1"])
            code, out, err = curl("--cacert", self.pki.ca_cert, origin.url("/hello"), timeout=10)
            self.assertEqual((code, out), (0, b"hello"), err)
            self.assertEqual([r[1] for r in origin.requests], ["/headers", "/hello"])
            self.assertEqual(origin.snis, ["tool.test", None])  # no SNI for an IP literal

    def test_curl_refuses_each_bad_leaf(self):
        cases = [(self.pki.expired(), "expired"),
                 (self.pki.not_yet_valid(), "not yet valid"),
                 (self.pki.wrong_name(), "subject name"),
                 (self.pki.self_signed(), "self-signed")]
        for leaf, reason in cases:
            with self.subTest(reason=reason), HttpsOrigin(leaf.cert, leaf.key) as origin:
                code, out, err = curl("--cacert", self.pki.ca_cert, origin.url("/hello", host="localhost"), timeout=10)
                self.assertNotEqual(code, 0)
                self.assertIn(reason, err.lower())
                self.assertEqual(origin.requests, [])

    def test_curl_refuses_the_origin_without_the_test_ca(self):
        leaf = self.pki.valid()
        other = TestPki(tempfile.mkdtemp(dir=self.tmp), name="another CA")
        with HttpsOrigin(leaf.cert, leaf.key) as origin:
            code, _, err = curl("--cacert", other.ca_cert, origin.url("/hello"), timeout=10)
            self.assertEqual(code, 60, err)

    def test_openssl_s_client_sni_is_recorded(self):
        leaf = self.pki.valid("tool.test")
        with HttpsOrigin(leaf.cert, leaf.key) as origin:
            r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{origin.port}",
                                "-servername", "tool.test", "-CAfile", self.pki.ca_cert,
                                "-verify_hostname", "tool.test", "-verify_return_error"],
                               input=b"", capture_output=True, timeout=15)  # stdin's EOF ends it
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn(b"Verify return code: 0 (ok)", r.stdout)
            self.assertEqual(origin.snis, ["tool.test"])

    def test_mtls_requires_a_client_certificate_and_records_its_subject(self):
        leaf = self.pki.valid()
        client = self.pki.client("agent-7")
        with HttpsOrigin(leaf.cert, leaf.key, client_ca=self.pki.ca_cert) as origin:
            code, out, err = curl("--cacert", self.pki.ca_cert, "--cert", client.cert, "--key", client.key,
                                  origin.url("/hello", host="localhost"), timeout=10)
            self.assertEqual((code, out), (0, b"hello"), err)
            self.assertEqual(origin.client_subjects, [{"commonName": "agent-7"}])
            code, _, _ = curl("--cacert", self.pki.ca_cert, origin.url("/hello", host="localhost"), timeout=10)
            self.assertNotEqual(code, 0)
            self.assertEqual(len(origin.requests), 1)

    def test_echo_server_echoes_over_verified_tls(self):
        leaf = self.pki.valid()
        with TlsEchoServer(leaf.cert, leaf.key) as echo:
            with tls_client(echo.port, self.pki.ca_cert) as s:
                s.sendall(b"ping")
                self.assertEqual(s.recv(16), b"ping")
            self.assertEqual(echo.snis, ["localhost"])
            self.assertEqual(echo.received, 4)


if __name__ == "__main__":
    unittest.main()
