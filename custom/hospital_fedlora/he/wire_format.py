"""The clear framing of encrypted vectors: chunks of ciphertexts with a JSON header each.

A chunk is ``MAGIC, 4-byte header length, JSON header, payload``. The payload is TenSEAL's serialized
BFV vector of up to ``ciphertexts_per_chunk`` ciphertexts (64 by default, about 5.7 MB at n=4096: far
below protobuf's 2 GB and small enough to stream). The header names the key id, chunk index and count,
value count, lane plan, tag (the round), how many contributions the chunk sums, and the payload's
SHA-256. The digest detects truncation and corruption; it is not authentication. Anyone can read a
header: no key needed, so the server checks contributions with it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

CHUNK_MAGIC = b"HFLENC01"
_LEN = struct.Struct(">I")
_MAX_HEADER = 64 * 1024
_HEADER_FIELDS = ("key_id", "chunks", "values", "bits", "lane_bits", "lanes", "tag", "summed")


class CiphertextError(ValueError):
    """An encrypted contribution or aggregate that must not be used (corrupt, foreign, mismatched)."""


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


def read_chunk_info(chunks: Sequence[bytes], source: str = "encrypted data") -> ChunkInfo:
    """Headers of all chunks checked for framing, digest and consistency; no key needed."""
    return parse_chunks(chunks, source)[0]


def check_ciphertext_count(info: ChunkInfo, poly_modulus_degree: int, source: str) -> None:
    expected = -(-info.values // (info.lanes * poly_modulus_degree))
    if sum(info.ciphertexts) != expected:
        raise CiphertextError(
            f"{source}: {sum(info.ciphertexts)} ciphertexts for {info.values} values in {info.lanes} lanes, "
            f"expected {expected} at poly_modulus_degree {poly_modulus_degree}; sender and receiver disagree on settings"
        )


def chunk_header(
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


def frame(magic: bytes, header: dict, payload: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return b"".join((magic, _LEN.pack(len(head)), head, payload))


def unframe(blob: bytes, magic: bytes, source: str, error: type[ValueError]) -> tuple[dict, bytes]:
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


def parse_chunks(chunks: Sequence[bytes], source: str) -> tuple[ChunkInfo, list[bytes]]:
    if isinstance(chunks, (bytes, bytearray)) or not isinstance(chunks, Sequence) or not chunks:
        raise CiphertextError(f"{source}: expected a non-empty list of encrypted chunks")
    headers, payloads = [], []
    for i, blob in enumerate(chunks):
        header, payload = unframe(blob, CHUNK_MAGIC, f"{source}, chunk {i}", CiphertextError)
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
        for field in _HEADER_FIELDS:
            if h.get(field) != first.get(field):
                raise CiphertextError(f"{source}: chunk {i} disagrees with chunk 0 on {field}; chunks were mixed up")
    return info, payloads
