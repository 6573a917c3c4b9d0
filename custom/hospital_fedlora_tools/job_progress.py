"""Following a job on a local federation: its rounds from the job report in its meta (or, for a job without
one, the server's job log), its status from FLARE."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from hospital_fedlora.server.job_report import REPORT_META_KEY, rounds_text

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
    """A one-line-per-step display: round starts and ends (``rounds_text``: "round 0 of 0..2"), status changes."""
    if p.event in ("submitted", "done"):
        return  # the status lines already say so
    if p.event == "round_started":
        line = f"{rounds_text(p.round, p.num_rounds)} started"
    elif p.event == "round_finished":
        line = f"{rounds_text(p.round, p.num_rounds)} finished in {p.round_s:.1f} s"
    else:
        line = f"job {p.status}"
    print(f"[{p.elapsed_s:7.1f} s] {p.job_id[:8]}  {line}", flush=True)


class ReportFollower:
    """Round events from successive readings of the job report (``REPORT_META_KEY`` of the job's meta)."""

    def __init__(self):
        self.first: int | None = None  # the first round reported (a resumed job starts after 0)
        self.started: int | None = None  # the last round reported started
        self.finished: int | None = None  # the last round reported finished (aggregated)

    def rounds(self, meta: dict) -> list[tuple[int, str]]:
        report = meta.get(REPORT_META_KEY) or {}
        rnd, done = report.get("round"), report.get("losses_round")
        started = list(range(rnd if self.started is None else self.started + 1, rnd + 1)) if isinstance(rnd, int) else []
        finished = []
        if self.first is None and (started or isinstance(done, int)):
            self.first = min(started + ([done] if isinstance(done, int) else []))
        if isinstance(done, int):
            finished = list(range(self.finished + 1 if self.finished is not None else self.first, done + 1))
        events = []
        for r in sorted(set(started) | set(finished)):  # rounds that passed between two readings included
            events += [(r, "started")] * (r in started) + [(r, "finished")] * (r in finished)
        self.started = started[-1] if started else self.started
        self.finished = finished[-1] if finished else self.finished
        return events


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
