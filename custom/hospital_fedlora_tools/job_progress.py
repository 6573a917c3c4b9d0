"""Following a job on a local federation: its rounds from the server's job log, its status from FLARE."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

TERMINAL_STATUSES = ("FINISHED", "FAILED", "ABORTED", "ABANDONED")  # prefixes of FLARE's RunStatus values
_ROUND_LINE = re.compile(r"Round (\d+) (started|finished)")


@dataclass(frozen=True)
class Progress:
    """One step of a job as the server reports it."""

    job_id: str
    event: str  # "submitted", "status", "round_started", "round_finished" or "done"
    status: str
    elapsed_s: float
    round: int | None = None  # 0-based, as FLARE's workflows count
    num_rounds: int | None = None
    round_s: float | None = None  # wall time of a finished round


def print_progress(p: Progress) -> None:
    """A one-line-per-step display: round starts and ends, status changes."""
    total = f"/{p.num_rounds}" if p.num_rounds else ""
    if p.event in ("submitted", "done"):
        return  # the status lines already say so
    if p.event == "round_started":
        line = f"round {p.round + 1}{total} started"
    elif p.event == "round_finished":
        line = f"round {p.round + 1}{total} finished in {p.round_s:.1f} s"
    else:
        line = f"job {p.status}"
    print(f"[{p.elapsed_s:7.1f} s] {p.job_id[:8]}  {line}", flush=True)


class LogFollower:
    """Reads new complete lines of a log file that may not exist yet.

    The file stays open once found: the server removes a job's run folder when the job ends, and an open
    file can still be read to its last line after that.
    """

    def __init__(self, path: Path):
        self.path = path
        self.file = None
        self.partial = b""

    def rounds(self) -> list[tuple[int, str]]:
        if self.file is None:
            try:
                self.file = open(self.path, "rb")
            except OSError:
                return []
        lines = (self.partial + self.file.read()).split(b"\n")
        self.partial = lines.pop()
        events = []
        for line in lines:
            m = _ROUND_LINE.search(line.decode(errors="replace"))
            if m:
                events.append((int(m.group(1)), m.group(2)))
        return events

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def num_rounds(job_dir: Path) -> int | None:
    """``num_rounds`` of the job's server workflow, if its config is plain JSON and names one."""
    for config in job_dir.glob("*/config/config_fed_server.json"):
        try:
            workflows = json.loads(config.read_text()).get("workflows", [])
        except (OSError, json.JSONDecodeError):
            continue
        for wf in workflows:
            rounds = wf.get("args", {}).get("num_rounds")
            if isinstance(rounds, int):
                return rounds
    return None
