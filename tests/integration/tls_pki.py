"""A throw-away PKI for the TLS tests: a CA and the leaves it signs (servers and clients),
made with python3-cryptography, written to files and handed out as ssl contexts."""
import datetime
import ipaddress
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class Pki:
    """A throw-away CA for the ORIGINS (not Tollgate's) and leaves it signs."""

    def __init__(self, d, name="origin test CA"):
        self.dir = d
        self.files = {}  # label -> (pem, key)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.utcnow()
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = os.path.join(d, name.replace(" ", "-") + ".crt")
        with open(self.ca_file, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, label, names=("localhost",), ips=("127.0.0.1",), days=(-1, 30), self_signed=False,
             client=False, cn=None, uris=()):
        """Writes LABEL.pem (leaf + chain) and LABEL.key; returns a server SSLContext (for a
        client certificate, client=True: EKU clientAuth, CN and URI SANs; returns None)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or names[0])])
        now = datetime.datetime.utcnow()
        sans = ([x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips] +
                [x509.UniformResourceIdentifier(u) for u in uris])
        eku = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (x509.CertificateBuilder().subject_name(subject)
                .issuer_name(subject if self_signed else self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now + datetime.timedelta(days=days[0]))
                .not_valid_after(now + datetime.timedelta(days=days[1]))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .sign(key if self_signed else self.key, hashes.SHA256()))
        pem = os.path.join(self.dir, label + ".pem")
        key_file = os.path.join(self.dir, label + ".key")
        with open(pem, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
            if not self_signed:
                f.write(self.cert.public_bytes(serialization.Encoding.PEM))
        with open(key_file, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        self.files[label] = (pem, key_file)
        if client:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pem, key_file)
        return ctx
