"""Faults survived and bad updates refused, by running them: writes ``<out>/reliability.json`` and ``.md``.

- Faults: the end-to-end fault tests (``tests/test_faults_e2e.py``: provisioned kits on loopback, kits
  SIGKILLed or SIGSTOPped, the server restarted and its job resumed) run under pytest; each test that
  passes records its fault with the rounds lost and the recovery time (from the fault, or the thaw, to
  the federation's next completed round with the site back or without it). A fault whose test fails is
  reported as not survived.
- Bad updates: every scenario of ``tests/bad_updates.py`` through the committed jobs' real components.

    python tests/benchmarks/bench_reliability.py --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from bad_updates import SCENARIOS, run  # noqa: E402
from test_faults_e2e import RECORD_ENV  # noqa: E402

FAULT_TESTS = "tests/test_faults_e2e.py"


def run_faults() -> tuple[list[dict], str]:
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "faults.jsonl"
        env = {**os.environ, RECORD_ENV: str(record)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider", FAULT_TESTS]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        rows = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    if done.returncode != 0:
        failed = [line.split("::", 1)[-1] for line in done.stdout.splitlines() if line.startswith("FAILED")]
        rows += [{"name": f"test {name}", "survived": False, "rounds_lost": None, "recovery_s": None} for name in failed]
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = ap.parse_args(argv)
    started = time.time()
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, scenario in enumerate(SCENARIOS):
            outcome = run(scenario, Path(tmp) / str(i))
            bad.append({"name": scenario.name, "rejected": outcome.rejected, "where": outcome.where, "reason": outcome.reason})
    faults, pytest_summary = run_faults()
    result = {
        "faults": faults,
        "bad_inputs": bad,
        "pytest": pytest_summary,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "seconds": round(time.time() - started),
        "command": "python tests/benchmarks/bench_reliability.py --out docs/benchmarks",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "reliability.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(f["survived"] for f in faults) and all(b["rejected"] for b in bad) else 1


def markdown(r: dict) -> str:
    lines = [
        "# Reliability: faults survived, bad updates refused",
        "",
        f"Written by `{r['command']}` ({r['machine']}; {r['seconds']} s). What each fault looks like to the",
        "operator and what to do is in [`../reliability.md`](../reliability.md); where each bad update is refused",
        "and why is in [`../security.md`](../security.md).",
        "",
        f"## Faults (provisioned kits on loopback; pytest: {r['pytest']})",
        "",
        "| fault | survived | completed rounds lost | recovery (s) |",
        "|---|---|---|---|",
    ]
    for f in r["faults"]:
        lines.append(f"| {f['name']} | {'yes' if f['survived'] else 'NO'} | {f['rounds_lost']} | {f['recovery_s']} |")
    lines += [
        "",
        "Recovery: from the fault (or the thaw) to the next round the federation completed, with the site back",
        "(hang) or without it (hospital killed); for the server, to the end of the first round of the resumed job,",
        "restart and resubmission included.",
        "",
        "## Bad updates (the committed jobs' components, one process)",
        "",
        "| bad update | refused | where |",
        "|---|---|---|",
    ]
    for b in r["bad_inputs"]:
        lines.append(f"| {b['name']} | {'yes' if b['rejected'] else 'NO'} | {b['where']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
