"""BFV keys through TenSEAL: parameters, the batching prime, and the framed context files in the kits.

Encryption is symmetric (every hospital holds the one secret key; fewer bytes and less noise than
public-key encryption), and adding ciphertexts needs no key, so the server's context carries the
parameters only. Why these parameters: ``docs/he.md``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tenseal as ts
from pydantic import Field

from ..config import StrictModel
from .wire_format import CHUNK_MAGIC, frame, unframe

SERVER_CONTEXT_FILE = "server_bfv_context.tenseal"
CLIENT_CONTEXT_FILE = "client_bfv_context.tenseal"

# Bits of noise budget spent before any addition (fresh encryption, measured: 5 symmetric, 7 asymmetric
# at n=4096) plus a margin; each doubling of the number of summed ciphertexts costs at most one more bit.
NOISE_RESERVE_BITS = 9

_CONTEXT_MAGIC = b"HFLCTX01"


class MissingSecretKeyError(ValueError):
    """Decryption or encryption attempted with a context that holds no secret key (the server's)."""


class BFVParams(StrictModel):
    """Fixed at provisioning (written into every kit): the encryption parameters."""

    poly_modulus_degree: Literal[4096, 8192] = Field(
        4096, description="ring dimension: slots per ciphertext; 4096 gives the smallest ciphertexts"
    )
    plain_modulus_bits: int = Field(
        58, ge=20, le=60, description="size of the batching prime; more bits pack more, but leave less noise room"
    )


@dataclass(frozen=True)
class BFVContext:
    """A TenSEAL BFV context with the facts the packing and the checks need, read once when it is loaded."""

    ts_context: ts.Context
    key_id: str  # names the key material of one provisioning; public
    scheme: str
    poly_modulus_degree: int
    plain_modulus: int
    data_modulus_bits: int
    has_secret_key: bool
    max_sum_bits: int  # log2 of how many fresh ciphertexts can be added before noise could corrupt the sum

    @classmethod
    def of(cls, ts_context: ts.Context, key_id: str) -> "BFVContext":
        data: Any = ts_context.seal_context().data.first_context_data()
        parms = data.parms()
        plain_modulus = 2 * int(data.plain_upper_half_threshold()) - 1  # SEAL exposes (t + 1) / 2, not t
        data_modulus_bits = int(data.total_coeff_modulus_bit_count())
        return cls(
            ts_context=ts_context,
            key_id=key_id,
            scheme="BFV" if "BFV" in str(parms.scheme()) else "CKKS",
            poly_modulus_degree=int(parms.poly_modulus_degree()),
            plain_modulus=plain_modulus,
            data_modulus_bits=data_modulus_bits,
            has_secret_key=bool(ts_context.has_secret_key()),
            max_sum_bits=data_modulus_bits - plain_modulus.bit_length() - NOISE_RESERVE_BITS,
        )


def batching_prime(bits: int, poly_modulus_degree: int) -> int:
    """The largest prime below ``2**bits`` that is 1 mod ``2 * poly_modulus_degree`` (allows batching)."""
    m = 2 * poly_modulus_degree
    k = ((1 << bits) - 2) // m
    while k > 0:
        p = k * m + 1
        if p < 1 << (bits - 1):
            break
        if _is_prime(p):
            return p
        k -= 1
    raise ValueError(f"no {bits}-bit batching prime for poly_modulus_degree {poly_modulus_degree}")


def _is_prime(n: int) -> bool:
    # Deterministic Miller-Rabin for n < 3.3e24 with these bases.
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    if n < 2:
        return False
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def make_context(params: BFVParams, n_threads: int | None = None) -> BFVContext:
    """Fresh keys (secret key included) under ``params``; done once, at provisioning."""
    t = batching_prime(params.plain_modulus_bits, params.poly_modulus_degree)
    ctx = ts.context(
        ts.SCHEME_TYPE.BFV,
        poly_modulus_degree=params.poly_modulus_degree,
        plain_modulus=t,
        coeff_mod_bit_sizes=[],  # SEAL's 128-bit default for this degree
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        n_threads=n_threads,
    )
    return BFVContext.of(ctx, key_id=secrets.token_hex(8))


def serialize_context(context: BFVContext, secret: bool) -> bytes:
    """Bytes for a kit file: with the secret key for hospitals, parameters only for the server."""
    if secret and not context.has_secret_key:
        raise MissingSecretKeyError("serialize_context: this context holds no secret key to save")
    header = {
        "format": "hospital_fedlora BFV context",
        "key_id": context.key_id,
        "scheme": "BFV",
        "poly_modulus_degree": context.poly_modulus_degree,
        "plain_modulus": context.plain_modulus,
        "secret_key": bool(secret),
    }
    payload = context.ts_context.serialize(
        save_public_key=False, save_secret_key=secret, save_galois_keys=False, save_relin_keys=False
    )
    return frame(_CONTEXT_MAGIC, header, payload)


def load_context(data: bytes, source: str = "BFV context", n_threads: int | None = None) -> BFVContext:
    """Parse ``serialize_context`` bytes; ``source`` (e.g. the file path) names the culprit in errors."""
    if data[: len(_CONTEXT_MAGIC)] != _CONTEXT_MAGIC:
        hint = ""
        if data[:4] != CHUNK_MAGIC[:4]:
            hint = (
                " (a raw TenSEAL context, e.g. NVFlare HEBuilder's server_context.tenseal / client_context.tenseal"
                " for CKKS, is not accepted here: provision with hospital_fedlora.deploy.bfv_builder.BFVContextBuilder)"
            )
        raise ValueError(f"{source}: not a hospital_fedlora BFV context file{hint}")
    header, payload = unframe(data, _CONTEXT_MAGIC, source, ValueError)
    try:
        ctx = ts.context_from(payload, n_threads=n_threads)
    except Exception as err:  # TenSEAL raises bare ValueError/RuntimeError for any parse problem
        raise ValueError(f"{source}: TenSEAL cannot parse the context ({err}); the file is damaged, re-provision") from None
    context = BFVContext.of(ctx, key_id=str(header.get("key_id", "")))
    facts = {
        "scheme": context.scheme,
        "poly_modulus_degree": context.poly_modulus_degree,
        "plain_modulus": context.plain_modulus,
        "secret_key": context.has_secret_key,
    }
    wrong = {k: (header.get(k), v) for k, v in facts.items() if header.get(k) != v}
    if wrong or not context.key_id:
        raise ValueError(f"{source}: header disagrees with the TenSEAL context it wraps {wrong}; re-provision")
    return context


def load_context_file(path: str | Path, n_threads: int | None = None) -> BFVContext:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: BFV context file not found; it is written into startup/ by provisioning")
    return load_context(path.read_bytes(), source=str(path), n_threads=n_threads)
