"""``python -m hospital_fedlora.audit verify <job result> [receipts ...]``: check a job's audit trail.

Exit status 0 when everything checks out, 1 with one line naming the file, the line and the entry that
fails and why, 2 for a usage error. See ``docs/operator.md`` ("Audit trail").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .chain import AuditError
from .receipts import load_root_ca
from .verify import verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hospital_fedlora.audit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check the audit log's chain and the hospitals' receipts against it")
    check.add_argument("result", type=Path, help="the downloaded job result, the server's run folder, or audit.jsonl")
    check.add_argument(
        "receipts", type=Path, nargs="*",
        help="a hospital's receipts.jsonl, or its run folder <kit>/<job id> (audit/receipts.jsonl inside)",
    )  # fmt: skip
    check.add_argument("--root-ca", type=Path, help="the provisioning's rootCA.pem: every certificate must be issued by it")
    check.add_argument("--allow-unsigned", action="store_true", help="accept contributions without a hospital signature")
    args = parser.parse_args(argv)
    try:
        root_ca = load_root_ca(args.root_ca) if args.root_ca else None
        report = verify(args.result, tuple(args.receipts), root_ca=root_ca, allow_unsigned=args.allow_unsigned)
    except AuditError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    for line in report.checked:
        print(f"ok: {line}")
    for line in report.notes:
        print(f"note: {line}")
    print(f"verified: job {report.job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
