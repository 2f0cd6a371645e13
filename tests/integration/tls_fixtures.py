"""TLS fixtures for the integration tests: a throw-away PKI for the ORIGINS (distinct from
Tollgate's local CA), an HTTPS origin that serves what HttpOrigin serves, and a plain TLS
echo server for passthrough tests. Everything listens on 127.0.0.1 port 0; every server is
a context manager that stops its threads.

    pki = TestPki(tmpdir)
    leaf = pki.valid("tool.test")            # Leaf(cert, key): DNS tool.test + IP 127.0.0.1
    with HttpsOrigin(leaf.cert, leaf.key) as origin:
        curl("--cacert", pki.ca_cert, origin.url("/hello"))
        origin.snis, origin.requests         # what it saw
"""
import collections
import datetime
import ipaddress
import os
import socket
import socketserver
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tollgate_harness import HttpOrigin, Serving, _ThreadingServer

Leaf = collections.namedtuple("Leaf", "cert key")  # file paths (PEM); cert holds the leaf only

_DAY = datetime.timedelta(days=1)


def _write(path, data, mode=0o644):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestPki:
    """A CA for test origins and the leaves it signs, written to DIR as LABEL.crt / LABEL.key.

    ca_cert / ca_key: the CA's files (ca_cert is what clients pass as --cacert). Leaves are
    ECDSA P-256, EKU serverAuth (clientAuth for client()), SANs = the DNS names and IPs given.
    """

    __test__ = False  # not a test case, whatever a runner guesses from the name

    def __init__(self, directory, name="tollgate test origin CA"):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.utcnow()
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                  key_encipherment=False, data_encipherment=False,
                                                  key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                                    critical=False)
                     .sign(self.key, hashes.SHA256()))
        self.ca_cert = _write(os.path.join(directory, "ca.crt"),
                              self.cert.public_bytes(serialization.Encoding.PEM))
        self.ca_key = _write(os.path.join(directory, "ca.key"), _key_pem(self.key), 0o600)

    def leaf(self, label, names=("localhost",), ips=("127.0.0.1",), not_before=-_DAY,
             not_after=30 * _DAY, self_signed=False, client=False, cn=None, uris=()):
        """Writes LABEL.crt and LABEL.key; returns Leaf(cert, key). not_before / not_after are
        timedeltas from now; cn defaults to the first name."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or (names or ips)[0])])
        now = datetime.datetime.utcnow()
        sans = ([x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips] +
                [x509.UniformResourceIdentifier(u) for u in uris])
        eku = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(subject if self_signed else self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now + not_before).not_valid_after(now + not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([eku]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(key if self_signed else self.key, hashes.SHA256())
        return Leaf(_write(os.path.join(self.dir, label + ".crt"), cert.public_bytes(serialization.Encoding.PEM)),
                    _write(os.path.join(self.dir, label + ".key"), _key_pem(key), 0o600))

    def valid(self, name="localhost", ips=("127.0.0.1",)):
        return self.leaf(f"valid-{name}", names=(name,), ips=ips)

    def expired(self, name="localhost", ips=("127.0.0.1",)):
        return self.leaf(f"expired-{name}", names=(name,), ips=ips, not_before=-10 * _DAY, not_after=-_DAY)

    def not_yet_valid(self, name="localhost", ips=("127.0.0.1",)):
        return self.leaf(f"future-{name}", names=(name,), ips=ips, not_before=_DAY, not_after=10 * _DAY)

    def wrong_name(self, name="wrong.test"):
        """A leaf for NAME only (no IP SAN): presented for any other host, it must be refused."""
        return self.leaf(f"wrong-{name}", names=(name,), ips=())

    def self_signed(self, name="localhost", ips=("127.0.0.1",)):
        return self.leaf(f"selfsigned-{name}", names=(name,), ips=ips, self_signed=True)

    def client(self, cn, uris=()):
        """A client certificate (EKU clientAuth) for mTLS, subject CN=cn, optional URI SANs."""
        return self.leaf(f"client-{cn}", names=(), ips=(), client=True, cn=cn, uris=uris)


def server_context(cert, key, client_ca=None):
    """A server SSLContext for CERT/KEY, TLS 1.2+, ALPN http/1.1; with CLIENT_CA a client
    certificate signed by it is required (mTLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


class _TlsServerMixin:
    """Shared by the TLS servers: SNI and client-subject recording, a bounded handshake."""

    def _init_tls(self, cert, key, client_ca, handshake_timeout):
        self.snis = []             # the server name of each ClientHello (None: no SNI sent)
        self.client_subjects = []  # per verified client certificate: {"commonName": ..., ...}
        self.handshake_errors = []  # str(exception) of failed handshakes
        self.lock = threading.Lock()
        self.handshake_timeout = handshake_timeout
        self.context = server_context(cert, key, client_ca)
        server = self

        def on_sni(_sslobj, name, _ctx):
            with server.lock:
                server.snis.append(name)
        self.context.sni_callback = on_sni

    def _accept_tls(self, raw):
        """The TLS socket over RAW after a handshake, or None if it failed (recorded)."""
        raw.settimeout(self.handshake_timeout)
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as e:
            with self.lock:
                self.handshake_errors.append(str(e))
            return None
        peer = tls.getpeercert()
        if peer:
            subject = {k: v for rdn in peer.get("subject", ()) for (k, v) in rdn}
            with self.lock:
                self.client_subjects.append(subject)
        tls.settimeout(None)
        return tls


def HttpsOrigin(cert, key, client_ca=None):
    """HttpOrigin over TLS: the same paths, keep-alive, .requests / .connections, plus .snis,
    .client_subjects and .handshake_errors. client_ca: a client certificate signed by it is
    required (mTLS)."""
    return HttpOrigin(tls=server_context(cert, key, client_ca))


class TlsEchoServer(_TlsServerMixin, Serving):
    """A plain TLS server that echoes every byte back (no HTTP): for passthrough tunnels.
    .snis / .client_subjects / .handshake_errors as HttpsOrigin; .received counts bytes."""

    def __init__(self, cert, key, client_ca=None, handshake_timeout=10.0):
        self._init_tls(cert, key, client_ca, handshake_timeout)
        self.received = 0
        echo = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                tls = echo._accept_tls(self.request)
                if tls is None:
                    return
                try:
                    while True:
                        chunk = tls.recv(65536)
                        if not chunk:
                            return
                        with echo.lock:
                            echo.received += len(chunk)
                        tls.sendall(chunk)
                except (ConnectionError, OSError):
                    pass
                finally:
                    tls.close()

        self.server = _ThreadingServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]


def tls_client(port, cafile, server_hostname="localhost", cert=None, key=None, timeout=5.0):
    """A verified TLS client socket to 127.0.0.1:PORT (SNI and hostname check =
    server_hostname); with CERT/KEY it presents a client certificate."""
    ctx = ssl.create_default_context(cafile=cafile)
    if cert:
        ctx.load_cert_chain(cert, key)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise
