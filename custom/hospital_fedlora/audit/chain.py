"""The audit log's format: JSON lines, each entry chained to the one before by its SHA-256.

An entry is a JSON object with ``seq`` (0, 1, 2, ...), ``prev`` (the previous entry's ``hash``; 64 zeros
for the first), ``time`` (UTC, ISO 8601), ``event`` and the event's fields, and ``hash``: the SHA-256 of
the entry's canonical JSON without ``hash``. Editing, removing or reordering an entry breaks the chain at
that entry. Pure Python, no FLARE.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
AUDIT_DIR = "audit"
AUDIT_FILE = "audit.jsonl"  # in the server's run folder
RECEIPTS_FILE = "receipts.jsonl"  # in a hospital's run folder


class AuditError(ValueError):
    """The audit log or a receipt does not check out; the message names the file, the line and why."""


def canonical(value: Any) -> bytes:
    """The one byte form that is hashed and signed: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def describe(entry: dict) -> str:
    """A short name for an entry in messages: ``entry 7 (contribution, round 1, hospital-b)``."""
    what = [str(entry.get("event"))]
    if "round" in entry:
        what.append(f"round {entry['round']}")
    if "site" in entry:
        what.append(str(entry["site"]))
    return f"entry {entry.get('seq')} ({', '.join(what)})"


class AuditChain:
    """Appends entries to one audit file; continues the chain of an existing file (a resumed job).

    Every append is flushed and fsynced before it returns, so an entry that was announced is on disk.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()  # results of several sites may be processed on different threads
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = read_chain(self.path) if self.path.is_file() and self.path.stat().st_size else []
        self.seq = len(entries)
        self.head = entries[-1]["hash"] if entries else GENESIS

    def append(self, event: str, **fields: Any) -> dict:
        with self._lock:
            entry = {"seq": self.seq, "prev": self.head, "time": utc_now(), "event": event, **fields}
            entry["hash"] = entry_hash(entry)
            with open(self.path, "ab") as f:
                f.write(canonical(entry) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            self.seq, self.head = self.seq + 1, entry["hash"]
            return entry

    def head_ref(self) -> dict:
        """What a hospital signs to anchor the log as it stood: the last entry's ``seq`` and ``hash``."""
        with self._lock:
            return {"seq": self.seq - 1, "hash": self.head}


def read_chain(path: Path) -> list[dict]:
    """Every entry of ``path``, each checked against its hash and its predecessor; ``AuditError`` names the
    first line that fails and why."""
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise AuditError(f"{path}: cannot read the audit log ({err.strerror})") from None
    if lines and lines[-1] == b"":
        lines.pop()
    parsed: list[dict] = []
    for n, raw in enumerate(lines, 1):
        try:
            entry = json.loads(raw)
        except ValueError as err:
            raise AuditError(f"{path}, line {n}: not JSON ({err}); the line was edited or the file cut off") from None
        if not isinstance(entry, dict) or not {"seq", "prev", "hash", "event"} <= entry.keys():
            raise AuditError(f"{path}, line {n}: not an audit entry (needs seq, prev, hash, event)")
        if not isinstance(entry["seq"], int) or isinstance(entry["seq"], bool):
            raise AuditError(f"{path}, line {n}: field 'seq' must be an integer, got {entry['seq']!r}")
        parsed.append(entry)
    head = GENESIS
    for n, entry in enumerate(parsed, 1):
        where, expected, seq = f"{path}, line {n}", n - 1, entry["seq"]
        if seq != expected:
            later = [m for m, e in enumerate(parsed[n:], n + 1) if e["seq"] == expected]
            if later:
                raise AuditError(
                    f"{where}: {describe(entry)} appears where entry {expected} belongs (entry {expected} is at "
                    f"line {later[0]}); entries were reordered"
                )
            if seq > expected:
                missing = f"entry {expected} is" if seq == expected + 1 else f"entries {expected} to {seq - 1} are"
                raise AuditError(f"{where}: {describe(entry)} follows entry {expected - 1}; {missing} missing (removed)")
            raise AuditError(f"{where}: {describe(entry)} appears again where entry {expected} belongs; entries were repeated")
        if entry_hash(entry) != entry["hash"]:
            raise AuditError(f"{where}: {describe(entry)} does not match its hash; the entry was edited after it was written")
        if entry["prev"] != head and expected == 0:
            raise AuditError(f"{where}: {describe(entry)} is the first entry but its 'prev' is not {GENESIS[:16]}...; the log was cut at its start")
        if entry["prev"] != head:
            raise AuditError(
                f"{where}: {describe(entry)} does not follow entry {expected - 1} (line {n - 1}) in the chain: its "
                f"'prev' is {str(entry['prev'])[:16]}..., entry {expected - 1} hashes to {head[:16]}...; entry "
                f"{expected - 1} was edited and re-hashed, or replaced"
            )
        head = entry["hash"]
    entries = parsed
    if not entries:
        raise AuditError(f"{path}: the audit log is empty")
    return entries


def find_audit_log(path: Path) -> Path:
    """The audit file given itself, a server run folder, or a downloaded job result (``workspace/`` inside)."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / AUDIT_DIR / AUDIT_FILE, path / "workspace" / AUDIT_DIR / AUDIT_FILE):
        if candidate.is_file():
            return candidate
    raise AuditError(
        f"{path}: no audit log here. Give the job result the admin downloaded (it holds "
        f"workspace/{AUDIT_DIR}/{AUDIT_FILE}), the server's run folder, or the {AUDIT_FILE} file itself"
    )
