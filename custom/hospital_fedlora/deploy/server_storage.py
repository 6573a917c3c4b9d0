"""Carry a server's job history from its old kit into a re-provisioned one (``docs/admin.md``).

A server kit keeps FLARE's job store and snapshots in ``<kit>/storage/`` (``kits.SERVER_STORAGE``), so a new
kit starts with none and ``list_jobs`` forgets every earlier job. The store holds no path of the kit it
lives in (FLARE's job manager keys it by job id under ``uri_root``, which ``resources.json`` sets for the
kit that runs), so moving the folder is enough. It is moved, not copied: a job store can hold many GB.

    python -m hospital_fedlora.deploy.kits --kit <new server kit> --storage-from <old server kit>
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# What FLARE's start scripts (sub_start.sh) write into the kit while it runs: the watchdog's and the server's pid.
PID_FILES = ("daemon_pid.fl", "pid.fl")


class StorageError(RuntimeError):
    """The storage cannot be carried over; the message says why and what to do."""


def running_pid(kit: Path) -> tuple[Path, int] | None:
    """The pid file of ``kit`` that names a live process, if any (a kit stopped by SIGKILL leaves stale ones)."""
    for name in PID_FILES:
        pid_file = kit / name
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue  # no file, no number in it, or no such process
        return pid_file, pid
    return None


def stored_files(storage: Path) -> list[Path]:
    return [p for p in storage.rglob("*") if p.is_file()] if storage.is_dir() else []


def carry_storage_over(new_kit: str | Path, old_kit: str | Path) -> list[str]:
    """Move ``old_kit/storage`` into ``new_kit``; return the ids of the jobs carried over.

    Also moves the run folder a crashed server left for a job (``<old kit>/<job id>/``), which
    ``deploy/resume_job.py`` needs to continue that job from the new kit.
    """
    new_kit, old_kit = Path(new_kit).resolve(), Path(old_kit).resolve()
    for kit in (new_kit, old_kit):
        if not (kit / "startup" / "fed_server.json").is_file():
            raise StorageError(f"{kit}: not a server kit (no startup/fed_server.json); --kit and --storage-from "
                               "both name server kits")  # fmt: skip
        running = running_pid(kit)
        if running:
            raise StorageError(
                f"{running[0]}: the server of {kit} is running (pid {running[1]}); stop it first "
                "(`shutdown all` in the admin console, docs/server.md), or remove the file if you are sure it is not running"
            )
    if new_kit == old_kit:
        raise StorageError(f"{new_kit}: --kit and --storage-from are the same kit")
    old_storage, new_storage = old_kit / "storage", new_kit / "storage"
    if not stored_files(old_storage):
        raise StorageError(f"{old_storage}: holds no jobs (carried over already?); nothing to carry over")
    if stored_files(new_storage):
        raise StorageError(
            f"{new_storage}: already holds jobs of the new server; carry the history over before its first job. "
            "To merge two histories, keep the old kit and its storage/ as an archive instead"
        )
    jobs_store = old_storage / "jobs-storage"
    job_ids = sorted(p.name for p in jobs_store.iterdir() if p.is_dir()) if jobs_store.is_dir() else []
    shutil.rmtree(new_storage, ignore_errors=True)  # only empty folders: checked above
    # A rename on the same file system; shutil.move copies and deletes only across file systems.
    shutil.move(str(old_storage), str(new_storage))
    for job_id in job_ids:
        run_dir = old_kit / job_id
        if run_dir.is_dir() and not (new_kit / job_id).exists():
            shutil.move(str(run_dir), str(new_kit / job_id))
    return job_ids
