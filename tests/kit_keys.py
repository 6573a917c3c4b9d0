"""Kit keys as provisioning makes them, without provisioning: a root CA and, per participant, an RSA key
and a certificate with the participant's name, written into ``startup/`` as ``client.key``,
``client.crt`` and ``rootCA.pem``. Fast enough for unit tests; the provisioned kits are in the e2e tests.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


class TestCA:
    """A root CA that issues participants' kit keys."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "test-project"):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cert = self._certificate(name, self.key.public_key(), name, ca=True)

    def _certificate(self, name: str, public_key, issuer: str, ca: bool = False) -> x509.Certificate:
        now = datetime.now(timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_kit(self, startup: Path, name: str) -> Path:
        """``startup/client.key``, ``client.crt`` and ``rootCA.pem`` for participant ``name``."""
        startup.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = self._certificate(name, key.public_key(), self.cert.subject.rfc4514_string().removeprefix("CN="))
        (startup / "client.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
        )
        (startup / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (startup / "rootCA.pem").write_bytes(self.pem)
        return startup
