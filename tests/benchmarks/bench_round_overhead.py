"""FLARE's per-round overhead: round wall time minus the slowest site's whole train task.

Runs the plaintext job in the simulator and writes ``<out>/round_overhead_simulator.json``. The parsing
functions also serve the deployment benchmark (same server log lines, same ``round_metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

from hospital_fedlora.protocol import Meta, Metric
from hospital_fedlora_tools.demo import derive_job, run_simulator

REPO = Path(__file__).resolve().parents[2]
_ROUND = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Round (\d+) (started|finished)\.")


def round_walls(log_text: str) -> dict[int, float]:
    """Seconds between FLARE's 'Round N started.' and 'Round N finished.' lines."""
    marks: dict[tuple[int, str], datetime] = {}
    for line in log_text.splitlines():
        m = _ROUND.search(line)
        if m:
            marks.setdefault((int(m.group(2)), m.group(3)), datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"))
    return {
        r: (marks[(r, "finished")] - marks[(r, "started")]).total_seconds()
        for (r, kind) in marks
        if kind == "started" and (r, "finished") in marks
    }


def round_overheads(log_text: str, round_metrics: Path) -> list[dict]:
    walls = round_walls(log_text)
    rows = []
    for line in round_metrics.read_text().splitlines():
        rec = json.loads(line)
        slowest = max(m[Metric.TASK_SECONDS] for m in rec[Meta.SITE_METRICS].values())
        slowest_train = max(m[Metric.TRAIN_SECONDS] for m in rec[Meta.SITE_METRICS].values())
        wall = walls[rec[Meta.ROUND]]
        rows.append({"round": rec[Meta.ROUND], "wall_s": round(wall, 3), "slowest_site_task_s": round(slowest, 3),
                     "slowest_site_train_s": round(slowest_train, 3), "overhead_s": round(wall - slowest, 3)})
    return rows


def summarize(rows: list[dict]) -> dict:
    return {
        "rounds": rows,
        "median_overhead_s": round(statistics.median(r["overhead_s"] for r in rows), 3),
        "min_overhead_s": min(r["overhead_s"] for r in rows),
        "max_overhead_s": max(r["overhead_s"] for r in rows),
        "median_wall_s": round(statistics.median(r["wall_s"] for r in rows), 3),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=REPO / "workspace") as tmp:
        tmp = Path(tmp)
        run_dir = run_simulator(derive_job(REPO / "jobs" / "fedlora_plain", tmp, args.rounds, args.steps), tmp / "ws", REPO / "site_configs", show=lambda s: None, plaintext_demo=True)
        result = summarize(round_overheads((tmp / "ws.log").read_text(), run_dir / "round_metrics.jsonl"))
    result.update({"mode": "simulator", "sites": 3, "local_steps": args.steps})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "round_overhead_simulator.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
