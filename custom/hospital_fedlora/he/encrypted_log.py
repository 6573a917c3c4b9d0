"""The encrypted job's server state: a log of encrypted round sums, as entries on the wire and on disk.

A ``LogEntry`` is one round: the summed ciphertext chunks, how many contributions they sum, the total of
the contributors' weight factors (the hospitals divide by it) and, in the clear, who contributed with how
many examples. Every hospital applies the entries in round order, so all hold the same global adapter.
Its SHA-256 covers the chunks in their file framing (``sha256sum round_NNN.bfv`` checks a stored entry);
it detects corruption, it is not a signature. Pure Python, no FLARE types.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..adapter_layout import AdapterLayout
from ..protocol import Data, Meta

class LogError(ValueError):
    """A log entry that must not be applied (corrupt, truncated, malformed, out of order)."""


_LEN = struct.Struct(">Q")


def frame_chunks(chunks: Sequence[bytes]) -> bytes:
    """The file form of an entry's chunks: each one preceded by its length (8 bytes, big-endian)."""
    return b"".join(_LEN.pack(len(c)) + bytes(c) for c in chunks)


def unframe_chunks(data: bytes, source: str) -> list[bytes]:
    chunks, pos = [], 0
    while pos < len(data):
        if pos + _LEN.size > len(data):
            raise LogError(f"{source}: ends inside a chunk length ({len(data)} bytes); the file is truncated")
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
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
        h.update(_LEN.pack(len(c)))
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


def first_round_needed(contributors: Mapping[int, Iterable[str]], sites: Iterable[str]) -> int:
    """The earliest round of the log that some site has not applied yet.

    ``contributors`` maps each logged round to the sites that contributed to it; ``sites`` names sites
    that may not have contributed yet (they count as having applied nothing). A site that contributed to
    round r had applied every entry before r (its task data carried them), but not entry r itself, which
    only exists after the round.
    """
    if not contributors:
        return 0
    last: dict[str, int] = {}
    for rnd, who in contributors.items():
        for s in who:
            last[s] = max(last.get(s, rnd), rnd)
    first_logged = min(contributors)
    return min(last.get(s, first_logged) for s in set(sites) | set(last))
