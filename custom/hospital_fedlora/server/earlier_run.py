"""Where an earlier run of a job left its state on the server, for a job that resumes it."""

from __future__ import annotations

import re
from pathlib import Path

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def earlier_run_dir(this_run: Path, job_id: str, needed: str) -> Path:
    """The run folder of job ``job_id`` beside this run's, which must hold ``needed``.

    A server killed mid-job leaves its run folder in its workspace (FLARE archives and removes it only
    when a job ends), so a resumed job finds the earlier rounds there.
    """
    if not _JOB_ID.match(job_id):
        raise ValueError(f"resume_from: {job_id!r} is not a job id (letters, digits, '-', '_', '.')")
    folder = this_run.parent / job_id
    if not (folder / needed).exists():
        raise FileNotFoundError(
            f"resume_from: job {job_id} left no {needed} in {folder}. A job can be resumed on the server whose "
            "workspace holds its run folder (a server that crashed mid-job); a job that ended was archived into "
            "the job store: start a new job from its result instead (see docs/reliability.md)"
        )
    return folder
