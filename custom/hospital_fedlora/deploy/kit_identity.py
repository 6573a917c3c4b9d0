"""Who a startup kit belongs to, read from its certificate rather than from the folder it was unpacked into.

FLARE authenticates a participant by the common name (CN) of its kit's certificate, so that is the name
the server knows a hospital by; a kit folder can be renamed (``fl-client/``) without changing who it is.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

# A hospital or admin kit holds client.crt; a server kit holds server.crt (as FLARE's provisioning names them).
CERTIFICATES = ("client.crt", "server.crt")


class KitIdentityError(RuntimeError):
    """A kit's certificate is missing or unreadable; the message names the file and what to do."""


def kit_certificate(kit: str | Path) -> Path:
    """The certificate that identifies ``kit``: ``startup/client.crt`` or, in a server kit, ``startup/server.crt``."""
    startup = Path(kit) / "startup"
    for name in CERTIFICATES:
        if (startup / name).is_file():
            return startup / name
    raise KitIdentityError(
        f"{startup / CERTIFICATES[0]}: not found, so this kit's participant is unknown. Point at the folder "
        "that holds the kit's startup/ folder, or unpack the kit again as the admin sent it"
    )


def kit_name(kit: str | Path) -> str:
    """The participant ``kit`` was provisioned for: the CN of its certificate (e.g. ``hospital-a``)."""
    cert_file = kit_certificate(kit)
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as err:
        raise KitIdentityError(
            f"{cert_file}: cannot read the kit's certificate ({err}); unpack the kit again as the admin sent it"
        ) from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or not str(names[0].value):
        raise KitIdentityError(f"{cert_file}: the certificate has no common name (CN); ask the admin for a new kit")
    return str(names[0].value)
