"""Aggregate MAC: a linear tag in reserved encrypted slots, so a hospital can tell an honest sum from a forgery.

Each hospital appends ``k`` tag slots ``tau_j = <alpha_j, m> + beta_j(site) mod t`` to the slots ``m`` it
encrypts; ciphertext sums add the tags. After decrypting, a hospital recomputes ``<alpha_j, M> + sum of
beta_j(s)`` over the listed contributors and refuses the aggregate on any difference. ``alpha`` and
``beta`` come from a MAC key that only the holders of the BFV secret key can derive (HKDF of the secret
key), bound to the job, round, key, adapter layout and lane plan; ``beta`` also to the site and its
example count. Why this is enough, and what it does not cover: ``docs/security.md``. Pure numeric code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .bfv_context import MissingSecretKeyError

SECURITY_BITS = 40  # forgery probability per attempt at most 2**-SECURITY_BITS
_SALT = b"hospital_fedlora aggregate MAC v1"
_LIMB = 20  # alpha and slots split in 20-bit limbs: a limb product < 2**40, 2**14 of them sum below 2**54
_BLOCK = 1 << 14  # slots per block: its limbs stay in cache (measured fastest of 2**14..2**18)


class AggregateRefused(ValueError):
    """A hospital refuses an aggregate: it is not what the listed hospitals sent (MAC), or too few sent it."""


def mac_slots(plain_modulus: int) -> int:
    """Tag slots needed: each one lets a forgery through with probability at most ``2**-(bits(t) - 1)``."""
    return math.ceil(SECURITY_BITS / (plain_modulus.bit_length() - 1))


def _hkdf(ikm: bytes, info: bytes, length: int, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


@dataclass(frozen=True)
class MacKey:
    """The hospitals' MAC key: derived from the BFV secret key, which the server's kit never holds."""

    key: bytes = field(repr=False)
    plain_modulus: int
    n_slots: int

    @classmethod
    def from_context(cls, context) -> "MacKey":
        """From a ``bfv_context.BFVContext`` holding the secret key (a hospital's)."""
        if not context.has_secret_key:
            raise MissingSecretKeyError("the aggregate MAC key derives from the BFV secret key; this context has none")
        secret = context.ts_context.serialize(
            save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )
        key = _hkdf(secret, b"aggregate MAC key " + context.key_id.encode(), 32, salt=_SALT)
        return cls(key, context.plain_modulus, mac_slots(context.plain_modulus))

    def for_round(self, job: str, rnd: int, binding: Mapping[str, object]) -> "RoundMac":
        """The MAC of one job's round; ``binding`` holds what the receiver uses to read the aggregate
        (layout fingerprint, value count, lane plan): change any of it and the tags no longer match."""
        text = json.dumps({"job": str(job), "round": int(rnd), **binding}, sort_keys=True, separators=(",", ":"))
        return RoundMac(self, text.encode())


def binding(key_id: str, layout_fingerprint: str, n_values: int, lane_fields: Mapping[str, int], n_slots: int) -> dict:
    """What a hospital uses to read an aggregate besides the job and round: all of it is bound into the MAC."""
    return {"key_id": key_id, "layout": layout_fingerprint, "values": int(n_values), **lane_fields, "mac_slots": n_slots}


class RoundMac:
    """Tags and checks for one round. ``alpha`` is never held whole: it is streamed block by block beside
    the slots (AES-256-CTR, one keystream per tag slot), so memory stays small and in cache."""

    def __init__(self, key: MacKey, binding: bytes):
        self.key, self.binding = key, binding

    @property
    def n_slots(self) -> int:
        return self.key.n_slots

    def nonce(self, site: str, example_count: int) -> list[int]:
        """``beta(job, round, site, example count)``, one value mod t per tag slot."""
        t, k = self.key.plain_modulus, self.key.n_slots
        info = b"beta " + self.binding + b" " + json.dumps([str(site), int(example_count)]).encode()
        raw = _hkdf(self.key.key, info, 16 * k)
        return [int.from_bytes(raw[16 * j : 16 * (j + 1)], "big") % t for j in range(k)]

    def dot(self, slots: np.ndarray) -> list[int]:
        """``<alpha_j, slots> mod t`` for every tag slot, exactly (slots: int64 values in ``[0, t)``).

        ``alpha`` is drawn as its three 20-bit limbs (three 4-byte keystream words per slot, masked; the top
        limb to ``bits(t) - 41`` bits): uniform below ``2**(bits(t) - 1) < t``, so each alpha takes any one
        value with probability ``2**-(bits(t) - 1)``. Limb products are below 2**40; a block's sum of them
        stays below 2**60 in int64.
        """
        s = np.ascontiguousarray(slots, dtype=np.int64)
        t, k = self.key.plain_modulus, self.key.n_slots
        top = t.bit_length() - 1 - 2 * _LIMB
        masks = np.array([(1 << _LIMB) - 1, (1 << _LIMB) - 1, (1 << top) - 1], dtype=np.uint32).reshape(3, 1)
        streams = [
            Cipher(algorithms.AES(_hkdf(self.key.key, f"alpha {j} ".encode() + self.binding, 32)), modes.CTR(b"\0" * 16)).encryptor()
            for j in range(k)
        ]
        totals = [0] * k
        for lo in range(0, s.size, _BLOCK):
            block = s[lo : lo + _BLOCK]
            s_limbs = [(block >> (_LIMB * b)) & ((1 << _LIMB) - 1) for b in range(3)]
            for j, stream in enumerate(streams):
                words = np.frombuffer(stream.update(bytes(12 * block.size)), dtype=np.uint32).reshape(3, block.size)
                a_limbs = (words & masks).astype(np.int64)
                for a in range(3):
                    for b in range(3):
                        totals[j] += int(np.dot(a_limbs[a], s_limbs[b])) << (_LIMB * (a + b))
        return [x % t for x in totals]

    def tags(self, slots: np.ndarray, site: str, example_count: int) -> list[int]:
        """The tag slots a site appends to its contribution ``slots``."""
        t = self.key.plain_modulus
        return [(d + b) % t for d, b in zip(self.dot(slots), self.nonce(site, example_count))]

    def check(self, slots: np.ndarray, tags: list[int], example_counts: Mapping[str, int], source: str) -> None:
        """Raise ``AggregateRefused`` unless ``tags`` are those of the exact sum of the listed sites' contributions."""
        t = self.key.plain_modulus
        nonces = [self.nonce(s, c) for s, c in example_counts.items()]
        expected = [(d + sum(b[j] for b in nonces)) % t for j, d in enumerate(self.dot(slots))]
        if [int(x) % t for x in tags] != expected:
            raise AggregateRefused(
                f"{source}: fails the aggregate MAC check (privacy: verify the sum): it is not exactly the sum of "
                f"the contributions of {sorted(example_counts)} for this job and round, each counted once. The server "
                "altered, scaled, relabelled, replayed or mixed contributions; nothing was applied"
            )
