"""What the encrypted job puts on the wire and on disk: ciphertext chunks and encrypted-log entries.

A chunk is ``MAGIC, 4-byte header length, JSON header, payload``: the payload is up to
``ciphertexts_per_chunk`` serialized BFV ciphertexts, the clear header names the key id, chunk index and
count, value count, lane plan, round tag, how many contributions it sums, and the payload's SHA-256. A
``LogEntry`` is one round of the server's encrypted log: the summed chunks with, in the clear, who
contributed with how many examples and the total weight. Digests detect corruption and truncation; they
are not signatures. Anyone can read the clear parts, no key needed. Pure Python, no FLARE, no TenSEAL.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..adapter_layout import AdapterLayout
from ..protocol import Data, Meta

CHUNK_MAGIC = b"HFLENC01"
_LEN = struct.Struct(">I")
_MAX_HEADER = 64 * 1024
_HEADER_FIELDS = ("key_id", "chunks", "values", "bits", "lane_bits", "lanes", "tag", "summed", "mac_slots")


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
    mac_slots: int = 0  # aggregate MAC tag slots at the end of the last ciphertext (``aggregate_mac``)


def read_chunk_info(chunks: Sequence[bytes], source: str = "encrypted data") -> ChunkInfo:
    """Headers of all chunks checked for framing, digest and consistency; no key needed."""
    return parse_chunks(chunks, source)[0]


def check_ciphertext_count(info: ChunkInfo, poly_modulus_degree: int, source: str) -> None:
    expected = -(-(-(-info.values // info.lanes) + info.mac_slots) // poly_modulus_degree)
    if sum(info.ciphertexts) != expected:
        raise CiphertextError(
            f"{source}: {sum(info.ciphertexts)} ciphertexts for {info.values} values in {info.lanes} lanes "
            f"and {info.mac_slots} MAC slots, "
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
            mac_slots=int(first.get("mac_slots", 0)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CiphertextError(f"{source}: chunk header lacks or garbles {err}") from None
    if min(info.ciphertexts) < 1 or info.mac_slots < 0:
        raise CiphertextError(f"{source}: a chunk header announces no ciphertexts; the data is corrupted")
    if info.chunks != len(chunks):
        raise CiphertextError(f"{source}: {len(chunks)} chunks received, the headers announce {info.chunks}")
    for i, h in enumerate(headers):
        if h.get("chunk") != i:
            raise CiphertextError(f"{source}: chunk {i} says it is chunk {h.get('chunk')}; chunks are missing or reordered")
        for name in _HEADER_FIELDS:
            if h.get(name) != first.get(name):
                raise CiphertextError(f"{source}: chunk {i} disagrees with chunk 0 on {name}; chunks were mixed up")
    return info, payloads


# ---------------------------------------------------------------------------------- encrypted log
class LogError(ValueError):
    """A log entry that must not be applied (corrupt, truncated, malformed, out of order)."""


_FILE_LEN = struct.Struct(">Q")


def frame_chunks(chunks: Sequence[bytes]) -> bytes:
    """The file form of an entry's chunks: each one preceded by its length (8 bytes, big-endian)."""
    return b"".join(_FILE_LEN.pack(len(c)) + bytes(c) for c in chunks)


def unframe_chunks(data: bytes, source: str) -> list[bytes]:
    chunks, pos = [], 0
    while pos < len(data):
        if pos + _FILE_LEN.size > len(data):
            raise LogError(f"{source}: ends inside a chunk length ({len(data)} bytes); the file is truncated")
        (n,) = _FILE_LEN.unpack_from(data, pos)
        pos += _FILE_LEN.size
        if pos + n > len(data):
            raise LogError(f"{source}: chunk {len(chunks)} announces {n} bytes, {len(data) - pos} left; truncated")
        chunks.append(data[pos : pos + n])
        pos += n
    if not chunks:
        raise LogError(f"{source}: holds no chunks")
    return chunks


def chunks_digest(chunks: Sequence[bytes]) -> str:
    """SHA-256 (hex) of ``frame_chunks(chunks)``, computed without building the framed copy."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(_FILE_LEN.pack(len(c)))
        h.update(c)
    return h.hexdigest()


@dataclass(frozen=True)
class LogEntry:
    round: int
    chunks: tuple[bytes, ...]
    sha256: str
    n_sites: int  # contributions summed
    total_weight: float  # sum of the contributors' weight factors: the hospitals divide by it
    n_values: int
    layout: tuple[dict, ...]  # AdapterLayout manifest (public: it is the LoRA configuration)
    example_counts: dict[str, int] = field(default_factory=dict)
    weight_factors: dict[str, float] = field(default_factory=dict)
    job: str = ""  # the job (run) whose round this is: hospitals bind it into the aggregate MAC

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def sites(self) -> list[str]:
        return sorted(self.example_counts)

    def verify(self, source: str | None = None) -> None:
        """Raise ``LogError`` unless the chunks still hash to ``sha256``."""
        if chunks_digest(self.chunks) != self.sha256:
            raise LogError(
                f"{source or f'log entry for round {self.round}'}: its {len(self.chunks)} chunks ({self.nbytes} bytes) "
                f"do not match the recorded SHA-256 {self.sha256[:16]}...; the entry was altered or truncated"
            )

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d[Data.CHUNKS] = list(self.chunks)
        return d

    def summary(self) -> dict[str, Any]:
        """Everything but the ciphertexts: one line of ``log.jsonl``."""
        return {
            Meta.ROUND: self.round,
            "sha256": self.sha256,
            "bytes": self.nbytes,
            Meta.N_SITES: self.n_sites,
            Meta.TOTAL_WEIGHT: self.total_weight,
            Meta.EXAMPLE_COUNTS: dict(self.example_counts),
            Meta.WEIGHT_FACTORS: dict(self.weight_factors),
            Meta.N_VALUES: self.n_values,
            Meta.LAYOUT: [dict(m) for m in self.layout],
            Meta.JOB: self.job,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "log entry", chunks: Sequence[bytes] | None = None) -> "LogEntry":
        """Parse and check an entry (``chunks`` given separately when read from files)."""
        if not isinstance(d, Mapping):
            raise LogError(f"{source}: expected a mapping, got {type(d).__name__}")
        try:
            rnd = _int(d[Meta.ROUND], Meta.ROUND, 0)
            raw_chunks = d[Data.CHUNKS] if chunks is None else chunks
            if isinstance(raw_chunks, (bytes, bytearray)) or not isinstance(raw_chunks, Sequence) or not raw_chunks:
                raise LogError("field 'chunks' must be a non-empty list of bytes")
            if not all(isinstance(c, (bytes, bytearray)) for c in raw_chunks):
                raise LogError("field 'chunks' must hold bytes only")
            entry = cls(
                round=rnd,
                chunks=tuple(bytes(c) for c in raw_chunks),
                sha256=_str(d["sha256"], "sha256"),
                n_sites=_int(d[Meta.N_SITES], Meta.N_SITES, 1),
                total_weight=_positive(d[Meta.TOTAL_WEIGHT], Meta.TOTAL_WEIGHT),
                n_values=_int(d[Meta.N_VALUES], Meta.N_VALUES, 1),
                layout=tuple(dict(m) for m in d[Meta.LAYOUT]),
                example_counts={
                    str(k): _int(v, f"{Meta.EXAMPLE_COUNTS}[{k!r}]", 0)
                    for k, v in dict(d.get(Meta.EXAMPLE_COUNTS) or {}).items()
                },
                weight_factors={
                    str(k): _positive(v, f"{Meta.WEIGHT_FACTORS}[{k!r}]")
                    for k, v in dict(d.get(Meta.WEIGHT_FACTORS) or {}).items()
                },
                job=str(d.get(Meta.JOB) or ""),
            )
        except KeyError as err:
            raise LogError(f"{source}: field {err} is missing") from None
        except LogError as err:
            raise LogError(f"{source}: {err}") from None
        except (TypeError, ValueError) as err:
            raise LogError(f"{source}: malformed ({err})") from None
        layout = AdapterLayout.from_manifest(list(entry.layout), source=f"{source}, field 'layout'")
        if layout.n_values != entry.n_values:
            raise LogError(f"{source}: n_values {entry.n_values} but its layout holds {layout.n_values} values")
        return entry


def _int(v: Any, name: str, least: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise LogError(f"field '{name}' must be an integer >= {least}, got {v!r}")
    return v


def _positive(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise LogError(f"field '{name}' must be a positive number, got {v!r}")
    return float(v)


def _str(v: Any, name: str) -> str:
    if not isinstance(v, str) or not v:
        raise LogError(f"field '{name}' must be a non-empty string, got {v!r}")
    return v


def first_round_needed(
    contributors: Mapping[int, Iterable[str]], sites: Iterable[str], first_logged: int | None = None
) -> int:
    """The earliest round of the log that some site has not applied yet.

    ``contributors`` maps logged rounds to the sites that contributed to them; ``sites`` names sites that
    may not have contributed yet. A site that contributed to round r had applied every entry before r (its
    task data carried them), but not entry r itself, which only exists after the round. A site that
    contributed to none of them lacks everything from ``first_logged`` (default: the first round given).
    """
    if first_logged is None:
        first_logged = min(contributors, default=0)
    last: dict[str, int] = {}
    for rnd, who in contributors.items():
        for s in who:
            last[s] = max(last.get(s, rnd), rnd)
    return min((last.get(s, first_logged) for s in set(sites) | set(last)), default=first_logged)
