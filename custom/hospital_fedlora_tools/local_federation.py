"""Run provisioned startup kits as a real federation on this machine (loopback), and always clean up.

Each kit is started the way its owner would start it, with its own ``startup/start.sh``, as a separate
process tree. The admin drives the federation through the FLARE API (``new_secure_session``). Nothing here
knows what the job trains.

    with LocalFederation(kits) as fed:            # starts server and hospitals, waits for all to connect
        job_id = fed.submit("jobs/fedlora_plain")
        fed.wait(job_id, on_progress=print_progress)
        result = fed.download(job_id, "workspace/results")
    # every process is gone here, on success, error, Ctrl-C or SIGTERM

Command line (what ``make demo-real`` runs)::

    python -m hospital_fedlora_tools.local_federation --kits workspace/kits --job jobs/fedlora_plain \\
        --results workspace/results
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from hospital_fedlora.deploy.kits import KitError, Kits, find_kits, latest_prod_dir

from .job_progress import (
    REPORT_META_KEY,
    TERMINAL_STATUSES,
    LogFollower,
    Progress,
    ReportFollower,
    num_rounds,
    print_progress,
)
from .process_table import (
    MARKER_VAR,
    FederationError,
    belongs_to,
    clear_stale_pid_files,
    find_marked_processes,
    log_tails,
    terminate,
)

DEFAULT_ADMIN = "admin@consortium.org"


class LocalFederation:
    """Server and hospital kits of one provisioning run as processes on 127.0.0.1."""

    def __init__(
        self,
        kits: str | Path | Kits,
        *,
        admin: str = DEFAULT_ADMIN,
        clients: list[str] | None = None,
        startup_timeout: float = 180.0,
        shutdown_timeout: float = 30.0,
        echo: Callable[[str], None] = print,
    ):
        """``kits``: a ``prod_NN`` folder (or ``Kits``); ``clients``: which hospitals to start (default all)."""
        self.kits = kits if isinstance(kits, Kits) else find_kits(kits)
        if admin not in self.kits.admins:
            raise FederationError(f"no admin kit '{admin}' in {self.kits.prod_dir}; have {sorted(self.kits.admins)}")
        self.admin = admin
        self.admin_kit = self.kits.admins[admin]
        names = list(self.kits.clients) if clients is None else clients
        unknown = set(names) - set(self.kits.clients)
        if unknown:
            raise FederationError(f"no client kit for {sorted(unknown)} in {self.kits.prod_dir}")
        self.clients = {n: self.kits.clients[n] for n in names}
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.echo = echo
        self.token = uuid.uuid4().hex
        self.session = None
        self._pgids: list[int] = []
        self._console_offsets: dict[Path, int] = {}
        self._down: set[Path] = set()  # kits stopped on purpose (fault tests): not an error while a job runs
        self._num_rounds: dict[str, int | None] = {}
        self._old_handlers: dict = {}
        self._deferring = False
        self._pending_signal: int | None = None
        self._started = False

    # ------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.stop(strict=False)
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        # With an exception already on its way out, leftovers are reported, not raised over it.
        self.stop(strict=exc_type is None)

    def start(self) -> "LocalFederation":
        """Start the server and every hospital with their ``start.sh``; return once all are connected."""
        if self._started:
            return self
        self._started = True
        self._install_signal_handler()
        atexit.register(self.stop, strict=False)
        self.start_kit(self.kits.server)
        for kit in self.clients.values():
            self.start_kit(kit)
        self.session = self.connect(self.admin_kit, self.admin, timeout=self.startup_timeout)
        self.wait_for_clients(list(self.clients), timeout=self.startup_timeout)
        return self

    def start_kit(self, kit: Path) -> None:
        """Start one more kit (e.g. a hospital joining late) with its own ``startup/start.sh``."""
        kit = Path(kit)
        self._down.discard(kit)
        clear_stale_pid_files(kit)
        env = dict(os.environ)
        env[MARKER_VAR] = self.token
        # start.sh runs `python3` from PATH: the interpreter running this code has the package installed.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        console_file = kit / "console.txt"
        self._console_offsets[kit] = console_file.stat().st_size if console_file.exists() else 0
        with open(console_file, "ab") as console:
            proc = subprocess.Popen(
                ["bash", str(kit / "startup" / "start.sh")],
                cwd=kit,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._pgids.append(proc.pid)
        proc.wait()  # start.sh only backgrounds sub_start.sh and returns
        # While the watchdog execs, /proc briefly shows it without its environment, so it looks unmarked;
        # without this wait, a check right after a start (no hospitals to start in between) saw a dead kit.
        # 30 s: on a machine short of memory (a 16 GB model loading beside the suite) 10 s was not enough.
        deadline = time.monotonic() + 30.0
        while not self.kit_processes(kit) and time.monotonic() < deadline:
            time.sleep(0.1)

    def reconnect(self, timeout: float = 120.0) -> None:
        """A new admin session (after the server restarted); the old one is closed first, or its threads
        would keep this interpreter from exiting."""
        self._close_session()
        self.session = self.connect(self.admin_kit, self.admin, timeout=timeout)

    def kill_kit(self, kit: Path, timeout: float = 30.0) -> list[int]:
        """A power loss: SIGKILL to every process of ``kit`` (watchdog, FLARE, job processes) at once.
        ``start_kit`` brings it back."""
        kit = Path(kit)
        self._down.add(kit)
        pids = self.signal_kit(kit, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.kit_processes(kit):
            if time.monotonic() > deadline:
                raise FederationError(f"{kit.name}: processes {self.kit_processes(kit)} survived SIGKILL")
            time.sleep(0.2)
        return pids

    def signal_kit(self, kit: Path, sig: int) -> list[int]:
        """Send ``sig`` to every process of ``kit`` (SIGSTOP/SIGCONT freeze and thaw it: a hang)."""
        pids = self.kit_processes(kit)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def kit_processes(self, kit: Path) -> list[int]:
        return [pid for pid in self.processes() if belongs_to(pid, Path(kit))]

    def connect(self, admin_kit: Path, username: str, timeout: float = 60.0):
        """A FLARE API session for ``username``, retried until the server answers or ``timeout`` passes."""
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            self._check_alive(self.kits.server)
            try:
                # A half-made session keeps non-daemon threads that would hang this interpreter at exit,
                # and only new_secure_session itself can close it: let it finish before acting on a signal.
                with self._signals_deferred():
                    return new_secure_session(username, str(admin_kit), timeout=min(5.0, deadline - time.monotonic()))
            except Exception as err:  # the server is still starting: FLARE raises several types here
                last_error = err
                time.sleep(1.0)
        raise FederationError(f"admin {username} could not connect within {timeout:.0f} s: {last_error}")

    def wait_for_clients(self, names: list[str], timeout: float = 120.0) -> None:
        """Block until the server lists every client in ``names`` as connected."""
        deadline = time.monotonic() + timeout
        while True:
            connected = self.connected_clients()
            if set(names) <= connected:
                return
            for name in set(names) - connected:
                self._check_alive(self.clients.get(name) or self.kits.clients[name])
            if time.monotonic() > deadline:
                raise FederationError(
                    f"clients {sorted(set(names) - connected)} did not connect within {timeout:.0f} s; "
                    f"see their log.txt under {self.kits.prod_dir}"
                )
            time.sleep(1.0)

    def connected_clients(self) -> set[str]:
        return {c.name for c in self.session.get_connected_client_list()}

    # ------------------------------------------------------------------------------------------ jobs
    def submit(self, job_dir: str | Path) -> str:
        """Submit a FLARE job folder as the admin; return its job id."""
        job_dir = Path(job_dir).resolve()
        if not (job_dir / "meta.json").is_file() and not (job_dir / "meta.conf").is_file():
            raise FederationError(f"{job_dir}: not a FLARE job folder (no meta.json)")
        # FLARE signs the submitted folder in place (.__nvfl_sig.json in every folder): submit a copy, so
        # the job in the repository stays as committed.
        with tempfile.TemporaryDirectory(prefix="job-") as tmp:
            copy = Path(tmp) / job_dir.name
            shutil.copytree(job_dir, copy, ignore=shutil.ignore_patterns(".__nvfl_*"))
            job_id = self.session.submit_job(str(copy))
        self._num_rounds[job_id] = num_rounds(job_dir)
        return job_id

    def wait(
        self,
        job_id: str,
        on_progress: Callable[[Progress], None] | None = print_progress,
        timeout: float = 0.0,
        poll_interval: float = 1.0,
    ) -> dict:
        """Follow ``job_id`` until it ends; report status changes and rounds; return FLARE's job meta.

        Status and rounds come from the job meta: rounds from the job report our jobs keep there
        (``server/job_report.py``), or, for a job without one, from the server job's log (FLARE's workflows
        log "Round N started/finished"). Raises ``FederationError`` if the job does not end FINISHED:COMPLETED.
        """
        report = on_progress or (lambda p: None)
        start = time.monotonic()
        total_rounds = self._num_rounds.get(job_id)
        log = LogFollower(self.kits.server / job_id / "log.txt")
        job_report = ReportFollower()
        round_start: dict[int, float] = {}
        seen: set[tuple[int, str]] = set()
        last_status = None
        report(Progress(job_id, "submitted", "SUBMITTED", 0.0, num_rounds=total_rounds))
        try:
            while True:
                meta = self.session.get_job_meta(job_id)
                status = meta.get("status", "")
                # the log serves until the report is in the meta (FLARE may still be dispatching the job)
                for number, what in job_report.rounds(meta) if REPORT_META_KEY in meta else log.rounds():
                    if (number, what) in seen:
                        continue
                    seen.add((number, what))
                    now = time.monotonic()
                    if what == "started":
                        round_start[number] = now
                        report(Progress(job_id, "round_started", status, now - start, number, total_rounds))
                    else:
                        took = now - round_start.get(number, now)
                        report(Progress(job_id, "round_finished", status, now - start, number, total_rounds, took))
                if status != last_status:
                    last_status = status
                    report(Progress(job_id, "status", status, time.monotonic() - start, num_rounds=total_rounds))
                if status.startswith(TERMINAL_STATUSES):
                    break
                if timeout and time.monotonic() - start > timeout:
                    raise FederationError(f"job {job_id} still {status} after {timeout:.0f} s")
                for kit in [self.kits.server, *self.clients.values()]:
                    if kit not in self._down:
                        self._check_alive(kit)
                time.sleep(poll_interval)
        finally:
            log.close()
        report(Progress(job_id, "done", status, time.monotonic() - start, num_rounds=total_rounds))
        if status != "FINISHED:COMPLETED":
            raise FederationError(
                f"job {job_id} ended {status}; its server log is in the downloaded result (workspace/log.txt), "
                f"each hospital's in <hospital kit>/{job_id}/log.txt"
            )
        return meta

    def download(self, job_id: str, dest: str | Path) -> Path:
        """Download the job's result (server and hospital workspaces) into ``dest``; return its folder."""
        dest = Path(dest).resolve()
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / job_id
        if target.exists():
            raise FederationError(f"{target} already exists; choose another destination")
        return Path(self.session.download_job_result(job_id, destination=str(dest)))

    # ---------------------------------------------------------------------------------------- stopping
    def stop(self, strict: bool = True) -> None:
        """Shut everything down: politely through the admin API, then by signal; verify nothing is left.

        ``strict``: raise ``FederationError`` if a process survives (otherwise only report it).
        """
        if not self._started:
            return
        self._started = False
        self._deferring = True  # a second Ctrl-C must not cut the clean-up short; it is bounded in time
        try:
            if self.session is not None and self.processes():
                self._shutdown_through_api()
        finally:
            self._close_session()
            self._kill_remaining()
            self._restore_signal_handler()
            self._deferring, self._pending_signal = False, None
            atexit.unregister(self.stop)
        left = self.processes()
        if left:
            message = f"processes still running after stop: {left}"
            if strict:
                raise FederationError(message)
            self.echo(message)

    def _shutdown_through_api(self) -> None:
        try:
            for job in self.session.list_jobs():
                if str(job.get("status", "")).startswith(("RUNNING", "SUBMITTED", "DISPATCHED")):
                    try:
                        self.session.abort_job(job["job_id"])
                    except Exception as err:  # e.g. a job recorded as running by an earlier, killed server
                        self.echo(f"could not abort job {job['job_id']}: {err}")
            self.session.shutdown("all", wait=False)
        except Exception as err:  # a half-dead server: the signals below finish the job
            self.echo(f"admin shutdown failed ({err}); stopping processes by signal")
            return
        deadline = time.monotonic() + self.shutdown_timeout
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.5)

    def _close_session(self) -> None:
        if self.session is not None:
            try:
                self.session.close()
            except Exception:
                pass
            self.session = None

    def _kill_remaining(self) -> None:
        terminate(self.token, self._pgids)
        if not self.processes():
            for kit in [self.kits.server, *self.clients.values()]:
                clear_stale_pid_files(kit)

    def processes(self) -> list[int]:
        """Live processes started by this federation (kits, their watchdogs, and FLARE's job processes)."""
        return find_marked_processes(self.token)

    # ------------------------------------------------------------------------------------------ helpers
    def _check_alive(self, kit: Path) -> None:
        """Fail fast, with its logs, when a kit's processes have exited or its watchdog keeps restarting it."""
        alive = [pid for pid in self.processes() if belongs_to(pid, kit)]
        if not alive:
            raise FederationError(f"{kit.name} is not running any more; last lines of its logs:\n{log_tails(kit)}")
        # sub_start.sh prints "new pid N" for every (re)start of the FLARE process; a second one while
        # starting up means FLARE exited, e.g. on a tampered kit or a port in use.
        console = kit / "console.txt"
        if console.is_file():
            with open(console, "rb") as f:
                f.seek(self._console_offsets.get(kit, 0))
                starts = f.read().count(b"new pid ")
            if starts >= 2:
                raise FederationError(
                    f"{kit.name} keeps exiting after start; last lines of its logs:\n{log_tails(kit)}"
                )

    def _install_signal_handler(self) -> None:
        """SIGTERM and Ctrl-C unwind through ``__exit__``/``finally``, which call ``stop()``."""
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum, frame):
            if self._deferring:
                self._pending_signal = signum
                return
            _raise_for(signum)

        self._old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, on_signal)

    def _restore_signal_handler(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
        self._old_handlers = {}

    @contextmanager
    def _signals_deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            pending, self._pending_signal = self._pending_signal, None
            if pending is not None:
                _raise_for(pending)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


# -------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hospital_fedlora_tools.local_federation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--kits", default="workspace/kits", help="a prod_NN folder, or the provisioning workspace (latest kits)"
    )
    parser.add_argument("--job", required=True, help="FLARE job folder to submit")
    parser.add_argument("--results", default="workspace/results", help="where the job's result is downloaded")
    parser.add_argument("--admin", default=DEFAULT_ADMIN)
    parser.add_argument("--project-name", default="hospital-fedlora")
    args = parser.parse_args(argv)

    kits = Path(args.kits)
    try:
        prod_dir = kits if (kits.name.startswith("prod_")) else latest_prod_dir(kits, args.project_name)
        t0 = time.monotonic()
        print(f"starting server and hospitals from {prod_dir} ...", flush=True)
        with LocalFederation(prod_dir, admin=args.admin) as fed:
            print(f"all {len(fed.clients)} hospitals connected after {time.monotonic() - t0:.1f} s", flush=True)
            job_id = fed.submit(args.job)
            print(f"submitted {args.job} as job {job_id}", flush=True)
            fed.wait(job_id)
            result = fed.download(job_id, args.results)
            print(f"result of job {job_id}: {result}", flush=True)
        print("federation stopped; no processes left", flush=True)
    except (FederationError, KitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; federation stopped", file=sys.stderr)
        return 130
    except SystemExit as stop:  # SIGTERM, turned into SystemExit while the federation ran
        print("terminated; federation stopped", file=sys.stderr)
        return stop.code if isinstance(stop.code, int) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
