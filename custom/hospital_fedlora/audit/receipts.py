"""A hospital's signed receipt of what it sent, made with its kit's private key, and the check of one.

A signed receipt is ``{"receipt": {...}, "signature": base64, "certificate": PEM}``: the receipt's
canonical JSON (``chain.canonical``) signed with ``startup/client.key`` (RSA-PSS with SHA-256, as FLARE
signs; ECDSA for an EC key), with the kit's ``startup/client.crt`` so anyone can check it, and against
the provisioning's ``rootCA.pem`` that the certificate is the hospital's. The server never holds a
hospital's private key, so it cannot make one. Pure Python over ``cryptography``, no FLARE.
"""

from __future__ import annotations

import base64
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from .chain import AuditError, canonical

KEY_FILE = "client.key"
CERT_FILE = "client.crt"
ROOT_CA_FILE = "rootCA.pem"

# What a receipt states; all signed. ``log_head`` is the server's audit log as the task showed it (or None).
RECEIPT_FIELDS = ("job_id", "site", "round", "task", "data_kind", "digest", "example_count", "signed_at", "log_head")


class KitSigner:
    """Signs receipts with a participant's kit key; its certificate travels with every signature."""

    def __init__(self, key, certificate_pem: bytes, source: str = "the kit"):
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise AuditError(f"{source}: the kit key is {type(key).__name__}; receipts need an RSA or EC key")
        self.key = key
        self.certificate_pem = certificate_pem.decode() if isinstance(certificate_pem, bytes) else certificate_pem
        self.name = _common_name(x509.load_pem_x509_certificate(self.certificate_pem.encode()))

    @classmethod
    def from_kit(cls, startup: Path) -> "KitSigner":
        """The key and certificate FLARE's provisioning put into ``startup/``."""
        key_file, cert_file = Path(startup) / KEY_FILE, Path(startup) / CERT_FILE
        for f in (key_file, cert_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: receipts are signed with the kit's own key; use the kit provisioning made")
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            x509.load_pem_x509_certificate(cert_file.read_bytes())
        except (ValueError, TypeError) as err:
            raise AuditError(f"{key_file} or {cert_file}: not a PEM key and certificate ({err}); restore them from the kit") from None
        return cls(key, cert_file.read_bytes(), source=str(key_file))

    def sign(self, receipt: dict) -> dict:
        missing = [f for f in RECEIPT_FIELDS if f not in receipt]
        if missing:
            raise ValueError(f"receipt lacks {missing}")
        data = canonical(receipt)
        if isinstance(self.key, rsa.RSAPrivateKey):
            signature = self.key.sign(data, _pss(), hashes.SHA256())
        else:
            signature = self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        return {"receipt": receipt, "signature": base64.b64encode(signature).decode(), "certificate": self.certificate_pem}


def load_root_ca(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as err:
        raise AuditError(f"{path}: cannot read the root CA ({err.strerror}); give a kit's startup/{ROOT_CA_FILE}") from None
    except ValueError:
        raise AuditError(f"{path}: not a PEM certificate; give a kit's startup/{ROOT_CA_FILE}") from None


def check_signed_receipt(signed: Any, source: str, root_ca: x509.Certificate | None = None) -> dict:
    """The receipt inside ``signed`` once its signature, its certificate's name (the receipt's site) and,
    with ``root_ca``, the certificate's issuer check out; ``AuditError`` naming ``source`` otherwise."""
    if not isinstance(signed, dict) or not {"receipt", "signature", "certificate"} <= signed.keys():
        raise AuditError(f"{source}: not a signed receipt (needs receipt, signature, certificate)")
    receipt = signed["receipt"]
    if not isinstance(receipt, dict) or set(RECEIPT_FIELDS) - receipt.keys():
        raise AuditError(f"{source}: the receipt lacks fields {sorted(set(RECEIPT_FIELDS) - set(receipt or {}))}")
    try:
        cert = x509.load_pem_x509_certificate(str(signed["certificate"]).encode())
        signature = base64.b64decode(str(signed["signature"]), validate=True)
    except ValueError as err:
        raise AuditError(f"{source}: the certificate or signature is garbled ({err})") from None
    site, holder = receipt["site"], _common_name(cert)
    if holder != site:
        raise AuditError(f"{source}: the receipt is for site {site!r} but is signed with {holder!r}'s certificate")
    try:
        key = cert.public_key()
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, canonical(receipt), _pss(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, canonical(receipt), ec.ECDSA(hashes.SHA256()))
        else:
            raise AuditError(f"{source}: {site}'s certificate holds a {type(key).__name__}; expected RSA or EC")
    except InvalidSignature:
        raise AuditError(f"{source}: {site}'s signature does not match the receipt; the receipt was altered after signing") from None
    if root_ca is not None:
        _check_issued_by(cert, root_ca, receipt, source)
    return receipt


def _check_issued_by(cert: x509.Certificate, root_ca: x509.Certificate, receipt: dict, source: str) -> None:
    site = receipt["site"]
    try:
        cert.verify_directly_issued_by(root_ca)
    except (ValueError, TypeError, InvalidSignature):
        raise AuditError(
            f"{source}: {site}'s certificate was not issued by the given root CA ({_common_name(root_ca)}); "
            "it is not from this provisioning"
        ) from None
    try:
        when = datetime.fromisoformat(str(receipt["signed_at"]))
    except ValueError:
        raise AuditError(f"{source}: field 'signed_at' is not an ISO 8601 time: {receipt['signed_at']!r}") from None
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise AuditError(f"{source}: signed at {when.isoformat()}, outside {site}'s certificate validity")


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
