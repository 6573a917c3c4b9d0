"""A kit's log while the server is not up: one progress line now and then, not a page of retries.

A hospital kit started before the server (or left running while the server restarts) keeps trying to
reach it. FLARE 2.9 logs every try: four INFO lines per connection attempt (GrpcDriver, conn_manager), an
Authenticator "re-challenge after 2.0 seconds" every 2 s, and, once the site had been connected, a CoreCell
WARNING "no connection to server" plus an ERROR "cannot send to 'server': target_unreachable" for every
heartbeat (every 10 s). ``ServerWaitFilter`` turns those records into one INFO line, at most once per
``every_s`` seconds:

    waiting for the server at localhost:8002 (attempt 5, next in 10 s)

Why 30 s by default: a server down for an hour then costs a kit's log 120 lines instead of about 3,600,
and whoever tails the log still sees within half a minute that the kit is alive and still trying.

Every other record passes untouched, errors included: a task result or stream that cannot reach the server
still logs as ERROR. The first attempt's lines and FLARE's "Successfully registered" still show, so the log
says when the site started trying and when it got through.

``log_config(kit)`` is the kit's FLARE logging config (``local/log_config.json.default``) with the filter on
the loggers that write those records; FLARE's parent process and every job process read
``local/log_config.json`` in preference to the default.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

FILTER_ID = "serverWait"
FILTER_CLASS = f"{__name__}.ServerWaitFilter"
# The loggers FLARE 2.9 writes connection retries to (its get_obj_logger names: module.Class).
RETRY_LOGGERS = (
    "nvflare.fuel.f3.sfm.conn_manager",
    "nvflare.fuel.f3.drivers.grpc_driver.GrpcDriver",
    "nvflare.fuel.f3.cellnet.core_cell.CoreCell",
    "nvflare.private.fed.authenticator.Authenticator",
    "nvflare.private.fed.client.fed_client.FederatedClient",
)

# Where the server is: the kit's one external connector (job processes have none; they reach the server
# through the kit's own process, whose connections they also log: those are not the server's).
_SERVER_CONNECTOR = re.compile(r"created backbone external connector to \w+://(\S+)")
# One connection attempt (conn_manager logs it for every driver).
_ATTEMPT = re.compile(r"Connection \[\S+ N/A => (\S+)\] is created")
# The rest of an attempt's lines: the channel, the failed connection closed.
_ATTEMPT_NOISE = (
    re.compile(r"created secure channel at "),
    re.compile(r"Connection \[\S+ Not Connected\] is closed"),
    re.compile(r"CLIENT: finished connection \[\S+ Not Connected\]"),
)
# The server is not reachable (yet), with the wait before the next try where the record says it.
_RETRY = re.compile(r"Retrying \[\S+ ACTIVE \w+://([^\]\s]+)\] in (\d+(?:\.\d+)?) seconds")
_RECHALLENGE = re.compile(r"re-challenge after (\d+(?:\.\d+)?) seconds")
_HEARTBEAT_UNREACHABLE = re.compile(
    r"CH=task TP=heart_beat .*\] (no connection to server|cannot send to 'server': target_unreachable)"
)
# The site got through.
_CONNECTED = re.compile(r"verified server identity|Successfully registered client|Connected to server")
# While unreachable, FLARE retries at least every 10 s (connector backoff cap, heartbeat): a longer quiet
# spell means the site got through even where FLARE logs nothing that says so.
WAIT_EXPIRES_S = 30.0


class ServerWaitFilter(logging.Filter):
    """Drops FLARE's per-try connection records while the server is unreachable, and rewrites one of them,
    at most every ``every_s`` seconds, into an INFO progress line. Attach it to the loggers in
    ``RETRY_LOGGERS`` (logger filters see each record once, before any handler)."""

    def __init__(self, every_s: float = 30.0, clock=time.monotonic):
        super().__init__()
        self.every_s = float(every_s)
        self.clock = clock
        self.address: str | None = None
        self.attempts = 0
        self.next_in: float | None = None
        self.waiting = False
        self.last_wait: float | None = None
        self.last_progress: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a record that cannot format is not ours to judge
            return True
        now = self.clock()
        if self.waiting and now - self.last_wait > WAIT_EXPIRES_S:
            self.waiting, self.last_progress = False, None
        connector = _SERVER_CONNECTOR.search(text)
        if connector:
            self.address = connector.group(1)
        attempt = _ATTEMPT.search(text)
        if attempt and self.address and attempt.group(1) == self.address:
            self.attempts += 1
            return not self.waiting
        if _CONNECTED.search(text):
            self.waiting = False
            self.last_progress = None
            return True
        retry = _RETRY.search(text)
        if retry and retry.group(1) == self.address:
            self.next_in = float(retry.group(2))  # the connector's backoff: 1, 2, 4, 8, then every 10 s
        elif retry:
            retry = None  # a job process's connection to its kit, not to the server
        rechallenge = _RECHALLENGE.search(text)
        if rechallenge and self.next_in is None:
            self.next_in = float(rechallenge.group(1))
        if retry or rechallenge or _HEARTBEAT_UNREACHABLE.search(text):
            self.waiting, self.last_wait = True, now
            return self._progress(record, now)
        if self.waiting and any(p.search(text) for p in _ATTEMPT_NOISE):
            return False
        return True

    def _progress(self, record: logging.LogRecord, now: float) -> bool:
        if self.last_progress is not None and now - self.last_progress < self.every_s:
            return False
        self.last_progress = now
        record.msg = self.progress_line()
        record.args = None
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        record.exc_info = record.exc_text = record.stack_info = None
        return True

    def progress_line(self) -> str:
        where = f"the server at {self.address}" if self.address else "the server"
        details = [f"attempt {max(self.attempts, 1)}"]
        if self.next_in is not None:
            details.append(f"next in {self.next_in:g} s")
        return f"waiting for {where} ({', '.join(details)})"


def log_config(kit: str | Path, every_s: float = 30.0) -> dict:
    """The kit's FLARE logging config (``local/log_config.json.default``) with ``ServerWaitFilter`` on the
    loggers that write connection retries; to be written to ``local/log_config.json``."""
    default = Path(kit) / "local" / "log_config.json.default"
    config = json.loads(default.read_text())
    config.setdefault("filters", {})[FILTER_ID] = {"()": FILTER_CLASS, "every_s": every_s}
    loggers = config.setdefault("loggers", {})
    for name in RETRY_LOGGERS:
        logger = loggers.setdefault(name, {})
        logger["filters"] = [*[f for f in logger.get("filters", []) if f != FILTER_ID], FILTER_ID]
    return config


def write_log_config(kit: str | Path, every_s: float = 30.0) -> Path:
    """Write ``log_config(kit)`` to the kit's ``local/log_config.json``, which FLARE reads first."""
    path = Path(kit) / "local" / "log_config.json"
    path.write_text(json.dumps(log_config(kit, every_s), indent=2) + "\n")
    return path
