"""Checking a job's audit log and hospitals' receipts against it; the first failure is raised, named.

What is checked is listed in ``docs/security.md`` ("The audit trail"). Pure Python, no FLARE: an auditor
runs it on the downloaded job result and the receipts the hospitals hand over.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from .chain import AUDIT_DIR, RECEIPTS_FILE, AuditError, describe, find_audit_log, read_chain
from .receipts import check_signed_receipt

# The server's encrypted log beside audit/ in the run folder (he/log_persistor.py writes it).
ENCRYPTED_LOG = Path("encrypted_log") / "log.jsonl"


@dataclass
class Report:
    log: Path
    job_id: str
    checked: list[str] = field(default_factory=list)  # one line per thing that checked out
    notes: list[str] = field(default_factory=list)  # what the check could not establish


def verify(result: Path, receipts: tuple[Path, ...] = (), root_ca: x509.Certificate | None = None,
           allow_unsigned: bool = False) -> Report:  # fmt: skip
    """Check the chain, every hospital signature the log carries, each round's aggregate against its
    accepted contributions (and the encrypted log, when present), then each receipts file against the log."""
    path = find_audit_log(Path(result))
    entries = read_chain(path)
    where = {e["seq"]: f"{path}, line {e['seq'] + 1}: {describe(e)}" for e in entries}
    if entries[0]["event"] != "run_started" or not entries[0].get("job_id"):
        raise AuditError(f"{where[0]}: the first entry must be run_started with the job id")
    report = Report(path, str(entries[0]["job_id"]))
    anchor = "each certificate issued by the given root CA" if root_ca else "certificates not checked against a root CA: give --root-ca"
    contributions: dict[tuple[int, str], list[dict]] = defaultdict(list)
    rounds: set[int] = set()
    signed = 0
    for e in entries:
        _check_fields(e, where[e["seq"]])
        if e["event"] == "round_started":
            rounds.add(e["round"])
        if e["event"] != "contribution":
            continue
        contributions[(e["round"], e["site"])].append(e)
        if e.get("signed_receipt") is not None:
            try:
                receipt = check_signed_receipt(e["signed_receipt"], f"{where[e['seq']]}, the hospital's signature", root_ca)
                _match(receipt, e, report.job_id, entries, where[e["seq"]], "the hospital signed")
                signed += 1
            except AuditError as err:
                if e.get("accepted"):
                    raise
                # A rejected contribution counts for nothing; a replayed or garbled one is logged as it came.
                report.notes.append(f"{err} (it was rejected: nothing of it was aggregated)")
        elif e.get("accepted") and not allow_unsigned:
            raise AuditError(
                f"{where[e['seq']]}: an accepted contribution without the hospital's signature; the site ran no "
                "ReceiptFilter or the server dropped it (--allow-unsigned checks the chain alone)"
            )
    accepted = [e for es in contributions.values() for e in es if e.get("accepted")]
    rejected = [e for es in contributions.values() for e in es if not e.get("accepted")]
    report.checked.append(
        f"{path}: {len(entries)} entries, chain intact; job {report.job_id}, {len(rounds)} rounds, {len(accepted)} "
        f"contributions accepted, {len(rejected)} rejected, {signed} hospital signatures valid ({anchor})"
    )
    for e in rejected:
        report.notes.append(f"{where[e['seq']]}: rejected: {e.get('reason')}")
    _check_aggregates(entries, accepted, where, report)
    for receipts_path in receipts:
        _check_receipts(Path(receipts_path), report.job_id, entries, contributions, rounds, root_ca, report)
    if entries[-1]["event"] != "run_ended":
        report.notes.append(
            f"{where[entries[-1]['seq']]} is the last entry, not run_ended: the job did not end cleanly or the log "
            "was cut after it; receipts reveal a cut only for the rounds they cover"
        )
    return report


# Fields an event's entry must hold, with their types; a well-chained entry may still have been forged.
_EVENT_FIELDS = {
    "round_started": {"round": int},
    "contribution": {"round": int, "site": str, "accepted": bool},
    "gathered": {"round": int, "answered": list, "silent": list},
    "aggregate": {"round": int, "participants": list, "example_counts": dict, "digest": str},
}


def _check_fields(entry: dict, source: str) -> None:
    for name, kind in _EVENT_FIELDS.get(entry["event"], {}).items():
        value = entry.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise AuditError(f"{source}: field {name!r} must be {kind.__name__}, got {value!r}")


def _match(receipt: dict, entry: dict, job_id: str, entries: list[dict], source: str, who: str) -> None:
    """A receipt against the contribution entry it is for: same job, site, round, digest, count, anchor."""
    for name, logged in (("job_id", job_id), ("site", entry["site"]), ("round", entry["round"])):
        if receipt[name] != logged:
            raise AuditError(f"{source}: {who} {name} {receipt[name]!r}, the log has {logged!r}")
    if receipt["digest"] != entry.get("digest"):
        raise AuditError(
            f"{source}: the log records digest {str(entry.get('digest'))[:16]}... for this contribution, {who} "
            f"{str(receipt['digest'])[:16]}...; the server logged something other than what the hospital sent"
        )
    if receipt["example_count"] != entry.get("example_count"):
        raise AuditError(f"{source}: the log records {entry.get('example_count')} examples, {who} {receipt['example_count']}")
    head = receipt["log_head"]
    if head is None:
        return
    seq = head.get("seq") if isinstance(head, dict) else None
    if not isinstance(seq, int) or seq >= entry["seq"]:
        raise AuditError(f"{source}: the receipt's log_head {head!r} is not an entry before this one")
    if seq >= 0 and entries[seq]["hash"] != head.get("hash"):
        raise AuditError(
            f"{source}: the hospital saw entry {seq} of the log with hash {str(head.get('hash'))[:16]}..., the log's "
            f"entry {seq} hashes to {entries[seq]['hash'][:16]}...; the log was rewritten up to entry {seq}"
        )


def _check_aggregates(entries: list[dict], accepted: list[dict], where: dict, report: Report) -> None:
    by_round: dict[int, dict[str, int]] = defaultdict(dict)
    for e in accepted:
        by_round[e["round"]][e["site"]] = e.get("example_count")
    encrypted = _encrypted_log_digests(report.log)
    for e in (e for e in entries if e["event"] == "aggregate"):
        rnd, source = e["round"], where[e["seq"]]
        counted = by_round.get(rnd, {})
        if sorted(e.get("participants", [])) != sorted(counted):
            raise AuditError(
                f"{source}: the aggregate lists {sorted(e.get('participants', []))}, the accepted contributions of "
                f"round {rnd} are from {sorted(counted)}"
            )
        if e.get("example_counts") != counted:
            raise AuditError(f"{source}: example counts {e.get('example_counts')} differ from the accepted contributions' {counted}")
        also = ""
        if encrypted is not None:
            if encrypted.get(rnd) != e.get("digest"):
                raise AuditError(
                    f"{source}: the aggregate digest {str(e.get('digest'))[:16]}... differs from round {rnd} of "
                    f"{report.log.parent.parent / ENCRYPTED_LOG} ({str(encrypted.get(rnd))[:16]}...)"
                )
            also = ", the same as the encrypted log's"
        report.checked.append(f"round {rnd}: aggregate of {', '.join(sorted(counted))}, digest {e.get('digest', '')[:16]}...{also}")


def _encrypted_log_digests(log: Path) -> dict[int, str] | None:
    index = log.parent.parent / ENCRYPTED_LOG
    if log.parent.name != AUDIT_DIR or not index.is_file():
        return None
    digests = {}
    for n, line in enumerate(index.read_text().splitlines(), 1):
        try:
            d = json.loads(line)
            digests[int(d["round"])] = str(d["sha256"])
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"{index}, line {n}: not an encrypted log line (round, sha256)") from None
    return digests


def _check_receipts(path: Path, job_id: str, entries: list[dict], contributions: dict, rounds: set[int],
                    root_ca: x509.Certificate | None, report: Report) -> None:  # fmt: skip
    if path.is_dir():
        path = path / AUDIT_DIR / RECEIPTS_FILE
    if not path.is_file():
        raise AuditError(f"{path}: no receipts file; give a hospital's <kit>/<job id>/{AUDIT_DIR}/{RECEIPTS_FILE}")
    sites, matched = set(), []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        source = f"{path}, line {n}"
        try:
            signed = json.loads(line)
        except ValueError as err:
            raise AuditError(f"{source}: not JSON ({err})") from None
        receipt = check_signed_receipt(signed, source, root_ca)
        rnd, site = receipt["round"], receipt["site"]
        if receipt["job_id"] != job_id:
            raise AuditError(f"{source}: a receipt of job {receipt['job_id']}, the log is job {job_id}")
        logged = contributions.get((rnd, site), [])
        if not logged:
            lacks = f"round {rnd}" if rnd not in rounds else f"a contribution from {site} in round {rnd}"
            raise AuditError(f"{source}: {site} sent its round {rnd} result, but the log lacks {lacks}; it was left out of the log")
        entry = next((e for e in logged if e.get("digest") == receipt["digest"]), logged[0])
        _match(receipt, entry, job_id, entries, f"{source} against {describe(entry)}", f"{site} signed")
        sites.add(site)
        matched.append(entry["seq"])
    if not matched:
        raise AuditError(f"{path}: holds no receipts")
    report.checked.append(
        f"{path}: {len(matched)} receipts of {', '.join(sorted(sites))}, each signed and matching the log "
        f"(entries {', '.join(map(str, matched))})"
    )
