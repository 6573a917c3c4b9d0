"""Packed BFV: many quantized integers per encrypted slot, exact sums, a server that holds no secret key.

Pure numeric code (TenSEAL + torch, no FLARE types); the FLARE filters and aggregator are thin adapters.

Scheme and keys
    BFV (exact integer arithmetic) through TenSEAL, ``poly_modulus_degree`` 4096 (default) or 8192, with
    SEAL's default coefficient modulus for that degree, which is SEAL's 128-bit-security choice
    (4096: 36+36+37 bits, 72 of them carry data; 8192: 218 bits, 174 carry data). Encryption is
    *symmetric*: every hospital holds the one secret key anyway, and symmetric encryption is faster and
    starts with less noise. Adding ciphertexts needs no key at all, so the server's context holds only
    the public parameters (91 bytes); it can neither encrypt nor decrypt.

Plain modulus
    A batching prime ``t = 1 (mod 2n)`` just below ``2**plain_modulus_bits`` (deterministic: the largest
    such prime). Every slot of a ciphertext holds one integer mod ``t``. Bigger ``t`` packs more per
    ciphertext at the same ciphertext size, but eats the noise budget: measured on this stack (n=4096,
    symmetric), a ciphertext survives ``67 - plain_modulus_bits`` doublings, i.e. that many bits of
    worst-case noise growth. Summing S contributions costs at most ``log2(S)`` bits, so ``plan_lanes``
    demands ``plain_modulus_bits + ceil(log2(max_sites)) + 9 <= data modulus bits`` (72 at 4096), which
    keeps 3 bits beyond the worst case measured (and covers asymmetric encryption too). Default 58 bits:
    57 usable bits per slot, room for up to 32 sites; with ``max_sites`` 8 that is 3 int16 lanes of 19
    bits or 5 int8 lanes of 11 bits per slot. (DESIGN.md's first measurement used a 40-bit prime: 2 int16
    or 3-4 int8 per slot.)

Lanes
    A slot holds ``lanes_per_slot`` lanes of ``lane_bits`` bits each: ``slot = sum_j u_j << (j*lane_bits)``.
    Sums of slots add lane by lane as long as no lane overflows into the next and the slot value never
    reaches ``t``. Each site stores ``u = q + qmax`` for its quantized integer ``q`` in ``[-qmax, qmax]``:
    the bias makes every lane non-negative, so no borrow can cross lanes. A lane's sum over at most
    ``max_sites`` contributions is at most ``2 * qmax * max_sites < 2**bits * max_sites``, so
    ``lane_bits = bits + ceil(log2(max_sites)) + guard_bits`` can never overflow (the bound is exact;
    ``guard_bits`` defaults to 0). Sites subtract ``qmax * n_sites_summed`` after decrypting.

Weighted averaging: pre-weighting, not integer weights in the lanes
    Each site scales its clipped values by its weight factor ``a = min(count, full_weight) / full_weight``
    before rounding (``quantize.contribution_weight``, ``quantize(..., weight=a)``); the server only adds
    ciphertexts; ``a`` travels in clear metadata, the server adds those up too, and the sites divide the
    decrypted sum by ``sum(a)``. The alternative, multiplying the integers by an integer weight inside
    the lanes, costs ``log2(max_sites * max_weight)`` bits in every lane: with 16-bit integers that
    means 2 lanes per slot instead of 3, 1.5x the upload, and only coarse weights. Pre-weighting costs
    precision only when sites' counts are far below ``full_weight`` (error bound ``step * n / sum(a)``
    instead of ``step``). What the server learns: each site's weight factor (the example count FLARE
    reports in the clear anyway), the number of contributions and sizes; never a value.

Wire format
    An encrypted vector is a list of chunks; each chunk holds up to ``ciphertexts_per_chunk`` ciphertexts
    (64 by default: about 5.7 MB at n=4096), far below protobuf's 2 GB limit and small enough to stream.
    A chunk is ``MAGIC, 4-byte header length, JSON header, payload``; the payload is TenSEAL's BFVVector
    protobuf (concatenated single-ciphertext vectors, which protobuf merges into one multi-ciphertext
    vector, so TenSEAL's "does not fit in a single ciphertext" warning never reaches stdout). The header
    names the key (``key_id``, set at provisioning), chunk index and count, value count, lane plan, an
    optional tag (e.g. the round) and the payload's SHA-256. The digest detects truncation and
    corruption in transit or storage; it is not authentication (FLARE's mutual TLS is).

Contexts
    ``serialize_context`` wraps TenSEAL's context bytes the same way, with the key id and parameters in
    the header, so a file from another provisioning or a CKKS context is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tenseal as ts
import torch
from pydantic import BaseModel, ConfigDict, Field

from .quantize import qmax as _qmax

SERVER_CONTEXT_FILE = "server_bfv_context.tenseal"
CLIENT_CONTEXT_FILE = "client_bfv_context.tenseal"

# Bits of noise budget spent before any addition (fresh encryption, measured: 5 symmetric, 7 asymmetric
# at n=4096) plus a margin; see the module docstring.
NOISE_RESERVE_BITS = 9

_CONTEXT_MAGIC = b"HFLCTX01"
_CHUNK_MAGIC = b"HFLENC01"
_LEN = struct.Struct(">I")
_MAX_HEADER = 64 * 1024


class CiphertextError(ValueError):
    """An encrypted contribution or aggregate that must not be used (corrupt, foreign, mismatched)."""


class MissingSecretKeyError(ValueError):
    """Decryption or encryption attempted with a context that holds no secret key (the server's)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BFVParams(_Strict):
    """Fixed at provisioning (written into every kit): the encryption parameters."""

    poly_modulus_degree: Literal[4096, 8192] = Field(
        4096, description="ring dimension: slots per ciphertext; 4096 gives the smallest ciphertexts"
    )
    plain_modulus_bits: int = Field(
        58, ge=20, le=60, description="size of the batching prime; more bits pack more, but leave less noise room"
    )


class PackingSettings(_Strict):
    """Chosen by the job (the same at every site): how integers are quantized and packed."""

    bits: Literal[8, 16] = Field(16, description="quantization: 16 is accurate, 8 is small")
    max_sites: int = Field(8, ge=1, le=4096, description="most contributions ever summed in one round")
    guard_bits: int = Field(0, ge=0, le=16, description="extra bits per lane beyond the exact overflow bound")
    min_lanes_per_slot: int = Field(
        1, ge=1, le=16, description="refuse settings that pack fewer integers per slot (guards the upload size)"
    )
    ciphertexts_per_chunk: int = Field(64, ge=1, le=4096, description="ciphertexts per serialized chunk")


# ------------------------------------------------------------------------------------------- contexts
@dataclass(frozen=True)
class BFVContext:
    ts_context: ts.Context
    key_id: str  # names the key material of one provisioning; public

    @property
    def _data(self) -> Any:
        return self.ts_context.seal_context().data.first_context_data()

    @property
    def poly_modulus_degree(self) -> int:
        return int(self._data.parms().poly_modulus_degree())

    @property
    def plain_modulus(self) -> int:
        # SEAL exposes (t + 1) / 2 but not t itself through TenSEAL's bindings.
        return 2 * int(self._data.plain_upper_half_threshold()) - 1

    @property
    def data_modulus_bits(self) -> int:
        return int(self._data.total_coeff_modulus_bit_count())

    @property
    def has_secret_key(self) -> bool:
        return bool(self.ts_context.has_secret_key())


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
    return BFVContext(ctx, key_id=secrets.token_hex(8))


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
    return _frame(_CONTEXT_MAGIC, header, payload)


def load_context(data: bytes, source: str = "BFV context", n_threads: int | None = None) -> BFVContext:
    """Parse ``serialize_context`` bytes; ``source`` (e.g. the file path) names the culprit in errors."""
    if data[: len(_CONTEXT_MAGIC)] != _CONTEXT_MAGIC:
        hint = ""
        if data[:4] != _CHUNK_MAGIC[:4]:
            hint = (
                " (a raw TenSEAL context, e.g. NVFlare HEBuilder's server_context.tenseal / client_context.tenseal"
                " for CKKS, is not accepted here: provision with hospital_fedlora.bfv_builder.BFVContextBuilder)"
            )
        raise ValueError(f"{source}: not a hospital_fedlora BFV context file{hint}")
    header, payload = _unframe(data, _CONTEXT_MAGIC, source, ValueError)
    try:
        ctx = ts.context_from(payload, n_threads=n_threads)
    except Exception as err:  # TenSEAL raises bare ValueError/RuntimeError for any parse problem
        raise ValueError(f"{source}: TenSEAL cannot parse the context ({err}); the file is damaged, re-provision") from None
    context = BFVContext(ctx, key_id=str(header.get("key_id", "")))
    facts = {
        "scheme": "BFV" if "BFV" in str(context._data.parms().scheme()) else "CKKS",
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


# ---------------------------------------------------------------------------------------------- lanes
@dataclass(frozen=True)
class LanePlan:
    bits: int
    qmax: int
    lane_bits: int
    lanes_per_slot: int
    slots_per_ciphertext: int
    ciphertexts_per_chunk: int
    plain_modulus: int
    max_sites: int

    @property
    def values_per_ciphertext(self) -> int:
        return self.lanes_per_slot * self.slots_per_ciphertext

    def n_ciphertexts(self, n_values: int) -> int:
        return -(-n_values // self.values_per_ciphertext)

    def n_chunks(self, n_values: int) -> int:
        return -(-self.n_ciphertexts(n_values) // self.ciphertexts_per_chunk)

    def header_fields(self) -> dict[str, int]:
        return {"bits": self.bits, "lane_bits": self.lane_bits, "lanes": self.lanes_per_slot}


def plan_lanes(settings: PackingSettings, context: BFVContext) -> LanePlan:
    """Lane layout for ``settings`` under ``context``; a ValueError naming the setting if it cannot be safe.

    Call it when the job starts (server and sites alike) so a bad combination stops the job before any
    training happens.
    """
    t = context.plain_modulus
    usable = t.bit_length() - 1  # 2**usable < t, so a full slot never wraps
    site_bits = math.ceil(math.log2(settings.max_sites))
    lane_bits = settings.bits + site_bits + settings.guard_bits
    lanes = usable // lane_bits
    if lanes < settings.min_lanes_per_slot:
        want = settings.min_lanes_per_slot
        room = f"{want} lanes of at most {usable // want} bits" if want > 1 else f"{usable} bits"
        raise ValueError(
            f"int{settings.bits} with max_sites={settings.max_sites} and guard_bits={settings.guard_bits} needs "
            f"{lane_bits} bits per lane, but the plain modulus has {usable} usable bits per slot "
            f"(plain_modulus_bits={t.bit_length()}), room for {room} (min_lanes_per_slot={want}); lower "
            f"max_sites or guard_bits, lower min_lanes_per_slot, use bits=8, or re-provision with more "
            f"plain_modulus_bits"
        )
    room = context.data_modulus_bits - t.bit_length() - NOISE_RESERVE_BITS
    if site_bits > room:
        most = 2**room if room >= 0 else 0
        raise ValueError(
            f"max_sites={settings.max_sites} is more than poly_modulus_degree={context.poly_modulus_degree} with "
            f"plain_modulus_bits={t.bit_length()} can sum without noise corrupting the result (at most {most}); "
            f"lower max_sites or re-provision with plain_modulus_bits <= "
            f"{context.data_modulus_bits - NOISE_RESERVE_BITS - site_bits} (or poly_modulus_degree 8192)"
        )
    return LanePlan(
        bits=settings.bits,
        qmax=_qmax(settings.bits),
        lane_bits=lane_bits,
        lanes_per_slot=lanes,
        slots_per_ciphertext=context.poly_modulus_degree,
        ciphertexts_per_chunk=settings.ciphertexts_per_chunk,
        plain_modulus=t,
        max_sites=settings.max_sites,
    )


def pack_lanes(ints: torch.Tensor, plan: LanePlan) -> torch.Tensor:
    """Biased, packed slots (int64), zero-padded to whole ciphertexts."""
    if ints.dim() != 1 or ints.is_floating_point() or ints.is_complex():
        raise TypeError(f"pack_lanes: expected a 1-D integer tensor, got {tuple(ints.shape)} {ints.dtype}")
    x = ints.to(torch.int64)
    if x.numel() and int(x.abs().max()) > plan.qmax:
        raise ValueError(f"pack_lanes: values exceed the int{plan.bits} range +-{plan.qmax}; quantize first")
    n_slots = plan.n_ciphertexts(x.numel()) * plan.slots_per_ciphertext
    padded = torch.zeros(n_slots * plan.lanes_per_slot, dtype=torch.int64)
    padded[: x.numel()] = x
    u = padded.add_(plan.qmax).view(n_slots, plan.lanes_per_slot)
    shifts = torch.arange(plan.lanes_per_slot, dtype=torch.int64) * plan.lane_bits
    return (u << shifts).sum(dim=1)


def unpack_lanes(slots: torch.Tensor, plan: LanePlan, n_values: int, n_sites_summed: int) -> torch.Tensor:
    """``sum_i q_i`` (int64) from decrypted slots; refuses lanes no honest sum can produce."""
    mask = (1 << plan.lane_bits) - 1
    shifts = torch.arange(plan.lanes_per_slot, dtype=torch.int64) * plan.lane_bits
    if bool((slots >> (plan.lanes_per_slot * plan.lane_bits)).any()) or bool((slots < 0).any()):
        raise CiphertextError(_garbage_msg("bits above the last lane are set"))
    lanes = (slots.unsqueeze(1) >> shifts) & mask
    if bool((lanes > 2 * plan.qmax * n_sites_summed).any()):
        raise CiphertextError(_garbage_msg(f"a lane exceeds the largest sum of {n_sites_summed} contributions"))
    return lanes.reshape(-1)[:n_values] - plan.qmax * n_sites_summed


def _garbage_msg(why: str) -> str:
    return (
        f"decrypted values are impossible ({why}): the aggregate was encrypted under another key (a kit from "
        "another provisioning), corrupted, or the number of contributions it sums is wrong"
    )


# --------------------------------------------------------------------------------------------- chunks
@dataclass(frozen=True)
class ChunkInfo:
    """The clear header of a chunk list: what the server may check and log."""

    key_id: str
    chunks: int
    values: int
    bits: int
    lane_bits: int
    lanes: int
    tag: str
    summed: int  # contributions added into it (1 for a site's own upload)
    ciphertexts: tuple[int, ...]  # per chunk
    nbytes: int


def encrypt_ints(context: BFVContext, ints: torch.Tensor, plan: LanePlan, tag: str = "") -> list[bytes]:
    """Pack and encrypt a flat integer vector (values within ``+-qmax``) into serialized chunks."""
    if not context.has_secret_key:
        raise MissingSecretKeyError(
            "this BFV context holds no secret key, so it cannot encrypt: encrypting is done at the hospitals "
            f"with {CLIENT_CONTEXT_FILE}"
        )
    if ints.numel() == 0:
        raise ValueError("encrypt_ints: nothing to encrypt (empty vector)")
    slots = pack_lanes(ints, plan)
    n, k = plan.slots_per_ciphertext, plan.ciphertexts_per_chunk
    n_ct = slots.numel() // n
    n_chunks = -(-n_ct // k)
    ctx = context.ts_context
    out = []
    for c in range(n_chunks):
        rows = slots[c * k * n : min((c + 1) * k, n_ct) * n].tolist()
        payload = b"".join(ts.bfv_vector(ctx, rows[i : i + n]).serialize() for i in range(0, len(rows), n))
        n_in = len(rows) // n
        header = _chunk_header(context.key_id, c, n_chunks, n_in, ints.numel(), plan.header_fields(), tag, 1, payload)
        out.append(_frame(_CHUNK_MAGIC, header, payload))
    return out


def read_chunk_info(chunks: Sequence[bytes], source: str = "encrypted data") -> ChunkInfo:
    """Headers of all chunks checked for framing, digest and consistency; no key needed."""
    return _parse_chunks(chunks, source)[0]


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
        info, payloads = _parse_chunks(chunks, source)
        self._check_info(info, source)
        _check_ciphertext_count(info, self.context.poly_modulus_degree, source)
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
            for field in ("chunks", "values", "bits", "lane_bits", "lanes", "tag", "ciphertexts"):
                if getattr(info, field) != getattr(ref, field):
                    raise CiphertextError(
                        f"{source}: {field} is {getattr(info, field)!r} but earlier contributions have "
                        f"{getattr(ref, field)!r}; all sites must run the same job settings and adapter layout"
                    )

    def result(self) -> list[bytes]:
        if self._acc is None or self._info is None:
            raise ValueError("EncryptedSum.result: no contribution was added")
        i = self._info
        fields = {"bits": i.bits, "lane_bits": i.lane_bits, "lanes": i.lanes}
        out = []
        for c, v in enumerate(self._acc):
            payload = v.serialize()
            header = _chunk_header(i.key_id, c, i.chunks, i.ciphertexts[c], i.values, fields, i.tag, self.count, payload)
            out.append(_frame(_CHUNK_MAGIC, header, payload))
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
) -> torch.Tensor:
    """``sum_i q_i`` as int64 from (summed) chunks; ``quantize.dequantize`` turns it into the average."""
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
    info, payloads = _parse_chunks(chunks, source)
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
    _check_ciphertext_count(info, context.poly_modulus_degree, source)
    parts = []
    for c, payload in enumerate(payloads):
        vec = _load_vector(context, payload, source, c, info.ciphertexts[c])
        parts.append(torch.tensor(vec.decrypt(), dtype=torch.int64))
    slots = torch.cat(parts) % plan.plain_modulus  # SEAL returns slots centred around 0
    return unpack_lanes(slots, plan, n_values, int(n_sites_summed))


def _check_ciphertext_count(info: ChunkInfo, poly_modulus_degree: int, source: str) -> None:
    expected = -(-info.values // (info.lanes * poly_modulus_degree))
    if sum(info.ciphertexts) != expected:
        raise CiphertextError(
            f"{source}: {sum(info.ciphertexts)} ciphertexts for {info.values} values in {info.lanes} lanes, "
            f"expected {expected} at poly_modulus_degree {poly_modulus_degree}; sender and receiver disagree on settings"
        )


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


# ---------------------------------------------------------------------------------------------- frames
def _chunk_header(
    key_id: str, index: int, count: int, n_ct: int, values: int, fields: dict, tag: str, summed: int, payload: bytes
) -> dict:
    return {
        "key_id": key_id,
        "chunk": index,
        "chunks": count,
        "ciphertexts": n_ct,
        "values": values,
        **fields,
        "tag": tag,
        "summed": summed,
        "sha256": hashlib.sha256(payload).hexdigest(),
    }


def _frame(magic: bytes, header: dict, payload: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return b"".join((magic, _LEN.pack(len(head)), head, payload))


def _unframe(blob: bytes, magic: bytes, source: str, error: type[ValueError]) -> tuple[dict, bytes]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise error(f"{source}: expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    start = len(magic) + _LEN.size
    if len(blob) < start or blob[: len(magic)] != magic:
        raise error(f"{source}: not hospital_fedlora encrypted data (bad or missing header); truncated or foreign")
    (n,) = _LEN.unpack_from(blob, len(magic))
    if n > _MAX_HEADER or len(blob) < start + n:
        raise error(f"{source}: header is cut off ({len(blob)} bytes); the data was truncated")
    try:
        header = json.loads(blob[start : start + n])
    except ValueError:
        raise error(f"{source}: header is not valid JSON; the data is corrupted") from None
    if not isinstance(header, dict):
        raise error(f"{source}: header is not a JSON object; the data is corrupted")
    return header, blob[start + n :]


def _parse_chunks(chunks: Sequence[bytes], source: str) -> tuple[ChunkInfo, list[bytes]]:
    if isinstance(chunks, (bytes, bytearray)) or not isinstance(chunks, Sequence) or not chunks:
        raise CiphertextError(f"{source}: expected a non-empty list of encrypted chunks")
    headers, payloads = [], []
    for i, blob in enumerate(chunks):
        header, payload = _unframe(blob, _CHUNK_MAGIC, f"{source}, chunk {i}", CiphertextError)
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise CiphertextError(
                f"{source}, chunk {i}: payload does not match its SHA-256 ({len(payload)} bytes); "
                "the ciphertext was truncated or altered in transit"
            )
        headers.append(header)
        payloads.append(payload)
    first = headers[0]
    try:
        info = ChunkInfo(
            key_id=str(first["key_id"]),
            chunks=int(first["chunks"]),
            values=int(first["values"]),
            bits=int(first["bits"]),
            lane_bits=int(first["lane_bits"]),
            lanes=int(first["lanes"]),
            tag=str(first["tag"]),
            summed=int(first["summed"]),
            ciphertexts=tuple(int(h["ciphertexts"]) for h in headers),
            nbytes=sum(len(b) for b in chunks),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CiphertextError(f"{source}: chunk header lacks or garbles {err}") from None
    if min(info.ciphertexts) < 1:
        raise CiphertextError(f"{source}: a chunk header announces no ciphertexts; the data is corrupted")
    if info.chunks != len(chunks):
        raise CiphertextError(f"{source}: {len(chunks)} chunks received, the headers announce {info.chunks}")
    for i, h in enumerate(headers):
        if h.get("chunk") != i:
            raise CiphertextError(f"{source}: chunk {i} says it is chunk {h.get('chunk')}; chunks are missing or reordered")
        for field in ("key_id", "chunks", "values", "bits", "lane_bits", "lanes", "tag", "summed"):
            if h.get(field) != first.get(field):
                raise CiphertextError(f"{source}: chunk {i} disagrees with chunk 0 on {field}; chunks were mixed up")
    return info, payloads
