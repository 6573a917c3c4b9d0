"""Encrypt, add and decrypt packed integer vectors: the BFV operations of the encrypted job.

Sites encrypt their quantized, lane-packed integers (``encrypt_ints``) and decrypt the round's sum
(``decrypt_ints``); the server adds contributions (``EncryptedSum``) holding only the key-less context,
after checking each one's clear header. Pure numeric code (TenSEAL + torch), no FLARE types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tenseal as ts
import torch

from .bfv_context import CLIENT_CONTEXT_FILE, BFVContext, MissingSecretKeyError
from .encoding import LanePlan, pack_lanes, unpack_lanes
from .wire_format import (
    CHUNK_MAGIC,
    ChunkInfo,
    CiphertextError,
    check_ciphertext_count,
    chunk_header,
    frame,
    parse_chunks,
)


# Given a contribution's packed slots (int64 in [0, t)), the values of its aggregate MAC tag slots.
Tagger = Callable[[np.ndarray], list[int]]


def encrypt_ints(
    context: BFVContext, ints: torch.Tensor, plan: LanePlan, tag: str = "", mac: tuple[int, Tagger] | None = None
) -> list[bytes]:
    """Pack and encrypt a flat integer vector (values within ``+-qmax``) into serialized chunks.

    With ``mac = (n_slots, tagger)`` the last ``n_slots`` slots carry ``tagger(the slots before them)``
    (``aggregate_mac.RoundMac.tags``), and the chunk headers say ``mac_slots``.
    """
    if not context.has_secret_key:
        raise MissingSecretKeyError(
            "this BFV context holds no secret key, so it cannot encrypt: encrypting is done at the hospitals "
            f"with {CLIENT_CONTEXT_FILE}"
        )
    if ints.numel() == 0:
        raise ValueError("encrypt_ints: nothing to encrypt (empty vector)")
    n_mac = mac[0] if mac else 0
    slots = pack_lanes(ints, plan, reserved=n_mac)
    if mac:
        t = plan.plain_modulus
        tags = mac[1](slots[:-n_mac].numpy())
        # centred, as SEAL's signed batch encoder wants values within +-t/2
        slots[-n_mac:] = torch.tensor([v - t if v > t // 2 else v for v in tags], dtype=torch.int64)
    fields = {**plan.header_fields(), "mac_slots": n_mac}
    n, k = plan.slots_per_ciphertext, plan.ciphertexts_per_chunk
    n_ct = slots.numel() // n
    n_chunks = -(-n_ct // k)
    ctx = context.ts_context
    out = []
    for c in range(n_chunks):
        rows = slots[c * k * n : min((c + 1) * k, n_ct) * n].tolist()
        payload = b"".join(ts.bfv_vector(ctx, rows[i : i + n]).serialize() for i in range(0, len(rows), n))
        n_in = len(rows) // n
        header = chunk_header(context.key_id, c, n_chunks, n_in, ints.numel(), fields, tag, 1, payload)
        out.append(frame(CHUNK_MAGIC, header, payload))
    return out


class EncryptedSum:
    """Server side: adds contributions one at a time, checking each before it touches the sum.

    A contribution that fails any check (framing, digest, key, chunk count, value count, lane plan, tag,
    TenSEAL parsing) raises ``CiphertextError`` naming ``source`` and leaves the running sum untouched.
    """

    def __init__(self, context: BFVContext, expected_tag: str | None = None):
        self.context = context
        self.expected_tag = expected_tag
        self.count = 0
        self._info: ChunkInfo | None = None
        self._acc: list[ts.BFVVector] | None = None

    def add(self, chunks: Sequence[bytes], source: str) -> ChunkInfo:
        info, payloads = parse_chunks(chunks, source)
        self._check_info(info, source)
        check_ciphertext_count(info, self.context.poly_modulus_degree, source)
        vectors = [_load_vector(self.context, p, source, i, info.ciphertexts[i]) for i, p in enumerate(payloads)]
        if self._acc is None:
            self._acc, self._info = vectors, info
        else:
            for acc, v in zip(self._acc, vectors):
                acc.add_(v)
        self.count += info.summed
        return info

    def _check_info(self, info: ChunkInfo, source: str) -> None:
        if info.key_id != self.context.key_id:
            raise CiphertextError(
                f"{source}: encrypted under key {info.key_id}, but this kit holds key {self.context.key_id}: "
                "the site's startup kit comes from another provisioning"
            )
        if self.expected_tag is not None and info.tag != self.expected_tag:
            raise CiphertextError(f"{source}: tagged {info.tag!r}, expected {self.expected_tag!r} (stale or misrouted)")
        ref = self._info
        if ref is not None:
            for field in ("chunks", "values", "bits", "lane_bits", "lanes", "tag", "ciphertexts", "mac_slots"):
                if getattr(info, field) != getattr(ref, field):
                    raise CiphertextError(
                        f"{source}: {field} is {getattr(info, field)!r} but earlier contributions have "
                        f"{getattr(ref, field)!r}; all sites must run the same job settings and adapter layout"
                    )

    def result(self) -> list[bytes]:
        if self._acc is None or self._info is None:
            raise ValueError("EncryptedSum.result: no contribution was added")
        i = self._info
        fields = {"bits": i.bits, "lane_bits": i.lane_bits, "lanes": i.lanes, "mac_slots": i.mac_slots}
        out = []
        for c, v in enumerate(self._acc):
            payload = v.serialize()
            header = chunk_header(i.key_id, c, i.chunks, i.ciphertexts[c], i.values, fields, i.tag, self.count, payload)
            out.append(frame(CHUNK_MAGIC, header, payload))
        return out


def add_encrypted(
    context: BFVContext, contributions: Sequence[Sequence[bytes]], expected_tag: str | None = None
) -> list[bytes]:
    """Sum of several chunk lists (sources named ``contribution 0``, ``contribution 1``, ... in errors)."""
    total = EncryptedSum(context, expected_tag)
    for i, chunks in enumerate(contributions):
        total.add(chunks, f"contribution {i}")
    return total.result()


def decrypt_ints(
    context: BFVContext,
    chunks: Sequence[bytes],
    plan: LanePlan,
    n_values: int,
    n_sites_summed: int,
    expected_tag: str | None = None,
    source: str = "encrypted aggregate",
    verify: Callable[[np.ndarray, list[int]], None] | None = None,
) -> torch.Tensor:
    """``sum_i q_i`` as int64 from (summed) chunks; ``encoding.dequantize`` turns it into the average.

    ``verify(slots, tags)`` (``aggregate_mac.RoundMac.check``) sees the decrypted slots and the MAC tag
    slots before any lane is read; it raises to refuse. Without it the tag slots are ignored.
    """
    if not context.has_secret_key:
        raise MissingSecretKeyError(
            f"{source}: this BFV context holds no secret key, so it cannot decrypt (the server's kit never "
            f"has one); decrypt at a hospital with {CLIENT_CONTEXT_FILE}"
        )
    if not 1 <= int(n_sites_summed) <= plan.max_sites:
        raise ValueError(
            f"{source}: sums {n_sites_summed} contributions, outside 1..max_sites={plan.max_sites}; "
            "the lanes could have overflowed, refusing to decode"
        )
    info, payloads = parse_chunks(chunks, source)
    if info.key_id != context.key_id:
        raise CiphertextError(
            f"{source}: encrypted under key {info.key_id}, this kit holds key {context.key_id} "
            "(startup kits from different provisionings)"
        )
    if info.values != n_values or (info.bits, info.lane_bits, info.lanes) != tuple(plan.header_fields().values()):
        raise CiphertextError(
            f"{source}: holds {info.values} values packed as int{info.bits} x{info.lanes} lanes of {info.lane_bits} "
            f"bits; expected {n_values} values as int{plan.bits} x{plan.lanes_per_slot} of {plan.lane_bits}"
        )
    if expected_tag is not None and info.tag != expected_tag:
        raise CiphertextError(f"{source}: tagged {info.tag!r}, expected {expected_tag!r}")
    if info.summed != n_sites_summed:
        raise CiphertextError(
            f"{source}: its header says it sums {info.summed} contributions, the metadata says {n_sites_summed}"
        )
    check_ciphertext_count(info, context.poly_modulus_degree, source)
    parts = []
    for c, payload in enumerate(payloads):
        vec = _load_vector(context, payload, source, c, info.ciphertexts[c])
        parts.append(torch.tensor(vec.decrypt(), dtype=torch.int64))
    slots = torch.cat(parts) % plan.plain_modulus  # SEAL returns slots centred around 0
    if info.mac_slots:
        slots, tags = slots[: -info.mac_slots], slots[-info.mac_slots :].tolist()
    else:
        tags = []
    if verify is not None:
        verify(slots.numpy(), tags)
    return unpack_lanes(slots, plan, n_values, int(n_sites_summed))


def _load_vector(context: BFVContext, payload: bytes, source: str, chunk: int, expected_ct: int) -> ts.BFVVector:
    try:
        vec = ts.bfv_vector_from(context.ts_context, payload)
    except Exception as err:  # TenSEAL/SEAL raise ValueError or RuntimeError for malformed or foreign data
        raise CiphertextError(f"{source}: chunk {chunk} is not a valid BFV ciphertext for this context ({err})") from None
    if len(vec.ciphertext()) != expected_ct or vec.size() != expected_ct * context.poly_modulus_degree:
        raise CiphertextError(
            f"{source}: chunk {chunk} holds {len(vec.ciphertext())} ciphertexts ({vec.size()} slots), "
            f"its header says {expected_ct}"
        )
    return vec
