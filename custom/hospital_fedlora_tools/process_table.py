"""The processes of a local federation: found by a marker in their environment, stopped, cleaned up after.

``start.sh`` backgrounds a watchdog loop (``sub_start.sh``) that restarts the FLARE process if it dies, and
FLARE starts every job in a new session (``setsid``), so neither a PID nor a process group covers
everything a kit runs. Every process started for a federation therefore carries ``MARKER_VAR`` in its
environment (FLARE copies the environment into job processes) and is found by it in ``/proc``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

MARKER_VAR = "HOSPITAL_FEDLORA_FEDERATION"


class FederationError(RuntimeError):
    """The federation could not be started, did not finish a job, or left something behind."""


def find_marked_processes(token: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose environment carries ``MARKER_VAR=token``."""
    needle = f"{MARKER_VAR}={token}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # gone, or not ours
            continue
        if state not in (b"Z", b"X"):
            found.append(pid)
    return found


def log_tails(kit: Path, lines: int = 12) -> str:
    tail = []
    for log in (kit / "console.txt", kit / "log.txt"):
        if log.is_file():
            tail += [f"  {log.name}: {line}" for line in log.read_text(errors="replace").splitlines()[-lines:]]
    return "\n".join(tail)


def clear_stale_pid_files(kit: Path) -> None:
    """Remove the watchdog's pid files when no process of ``kit`` is running.

    ``sub_start.sh`` refuses to start while ``daemon_pid.fl`` names a live PID; after a forced stop the file
    stays behind, and once the PID is reused by anything else the kit would never start again.
    """
    daemon = kit / "daemon_pid.fl"
    if daemon.is_file():
        try:
            pid = int(daemon.read_text().strip())
        except ValueError:
            pid = None
        if pid and "sub_start.sh" in cmdline(pid) and belongs_to(pid, kit):
            raise FederationError(f"{kit.name} is already running (watchdog pid {pid}); stop it first")
    for name in ("daemon_pid.fl", "pid.fl", "shutdown.fl", "restart.fl"):
        (kit / name).unlink(missing_ok=True)


def belongs_to(pid: int, kit: Path) -> bool:
    root = str(kit)
    return _cwd(pid) == root or any(a == root or a.startswith(root + "/") for a in cmdline(pid).split())


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def send_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(token: str, group_ids: list[int]) -> None:
    """Stop every process marked with ``token``: watchdogs first, then the start groups, TERM, then KILL."""
    # Watchdog shells first, so nothing is restarted while the FLARE processes are being stopped.
    for pid in find_marked_processes(token):
        if cmdline(pid).endswith("sub_start.sh"):
            send_signal(pid, signal.SIGKILL)
    # The groups of our start.sh shells: only those that still hold a process of ours.
    live_groups = {pgid(pid) for pid in find_marked_processes(token)}
    for group in set(group_ids) & live_groups:
        try:
            os.killpg(group, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in find_marked_processes(token):
            send_signal(pid, sig)
        deadline = time.monotonic() + wait
        while find_marked_processes(token) and time.monotonic() < deadline:
            time.sleep(0.2)
