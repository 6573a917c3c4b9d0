"""A kit started before the server logs progress, not a page of retries or errors.

The record texts below are FLARE 2.9's own, copied from a hospital kit's log.txt.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from deployment_helpers import free_port, provision_into
from hospital_fedlora.deploy.kit_logging import RETRY_LOGGERS, ServerWaitFilter, log_config, write_log_config
from hospital_fedlora_tools.process_table import MARKER_VAR, find_marked_processes, terminate

CONN = "nvflare.fuel.f3.sfm.conn_manager"
CELL = "nvflare.fuel.f3.cellnet.core_cell.CoreCell"
AUTH = "nvflare.private.fed.authenticator.Authenticator"
HEARTBEAT = "[ME=:pital-a O=:pital-a D=server F=:pital-a T=server CH=task TP=heart_beat SCH=? STP=? SEQ=?] "


def record(logger: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(logger, level, __file__, 1, msg, None, None)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def passed(wait: ServerWaitFilter, rec: logging.LogRecord) -> str | None:
    """The record's level and text as the handlers would see it, or None where the filter drops it."""
    return f"{rec.levelname} {rec.getMessage()}" if wait.filter(rec) else None


def test_retries_become_one_progress_line_per_interval():
    clock = Clock()
    wait = ServerWaitFilter(every_s=30, clock=clock)
    assert passed(wait, record(CELL, logging.INFO, "hospital-a: created backbone external connector to grpc://localhost:8002"))
    attempt = [
        record(CONN, logging.INFO, "Connection [CN00002 N/A => localhost:8002] is created: PID: 1"),
        record(CONN, logging.INFO, "Connection [CN00002 Not Connected] is closed PID: 1"),
    ]
    assert all(passed(wait, r) for r in attempt)  # the first try shows as FLARE logs it
    assert passed(wait, record(AUTH, logging.INFO, "re-challenge after 2.0 seconds")) == (
        "INFO waiting for the server at localhost:8002 (attempt 1, next in 2 s)"
    )
    for second in range(2, 30, 2):
        clock.now = second
        assert passed(wait, record(AUTH, logging.INFO, "re-challenge after 2.0 seconds")) is None
        assert passed(wait, record(CONN, logging.INFO, "Connection [CN00003 N/A => localhost:8002] is created: PID: 1")) is None
        assert passed(wait, record(CONN, logging.INFO, "Connection [CN00003 Not Connected] is closed PID: 1")) is None
    clock.now = 31
    assert passed(wait, record(CONN, logging.INFO, "Retrying [CH00001 ACTIVE grpc://localhost:8002] in 10 seconds")) == (
        "INFO waiting for the server at localhost:8002 (attempt 15, next in 10 s)"
    )
    assert passed(wait, record(AUTH, logging.INFO, "verified server identity 'localhost'"))
    assert passed(wait, record(CONN, logging.INFO, "Connection [CN00009 N/A => localhost:8002] is created: PID: 1"))


def test_heartbeat_errors_while_the_server_restarts_read_as_progress():
    clock = Clock()
    wait = ServerWaitFilter(every_s=30, clock=clock)
    warning = record(CELL, logging.WARNING, HEARTBEAT.replace("O=:pital-a", "O=?") + "no connection to server")
    assert passed(wait, warning) == "INFO waiting for the server (attempt 1)"
    clock.now = 0.1
    assert passed(wait, record(CELL, logging.ERROR, HEARTBEAT + "cannot send to 'server': target_unreachable")) is None


def test_other_errors_pass_untouched():
    wait = ServerWaitFilter(every_s=30, clock=Clock())
    wait.filter(record(AUTH, logging.INFO, "re-challenge after 2.0 seconds"))
    stream = "[ME=:pital-c O=:pital-c.:a8abb53 D=server CH=sm__STREAM TP=sm__DATA SCH=aux_communication] cannot forward req: no path"
    submit = HEARTBEAT.replace("TP=heart_beat", "TP=submit_update") + "cannot send to 'server': target_unreachable"
    for text in (stream, submit, "Connector [CH00001] failed with exception ValueError: bad"):
        assert passed(wait, record(CELL, logging.ERROR, text)) == f"ERROR {text}"


def test_a_job_process_losing_its_kit_is_not_waiting_for_the_server():
    """Job processes connect to their kit's own process, not to the server: those retries stay as FLARE logs them."""
    wait = ServerWaitFilter(every_s=30, clock=Clock())
    for text in (
        "Connection [CN00002 N/A => localhost:10034] is created: PID: 2",
        "Connection [CN00002 Not Connected] is closed PID: 2",
        "Retrying [CH00001 ACTIVE tcp://localhost:10034] in 8 seconds",
    ):
        assert passed(wait, record(CONN, logging.INFO, text)) == f"INFO {text}"
    assert wait.attempts == 0 and not wait.waiting


def test_log_config_attaches_the_filter_to_the_retry_loggers(tmp_path):
    (tmp_path / "local").mkdir()
    default = {"version": 1, "handlers": {}, "loggers": {"root": {"level": "INFO", "handlers": []}}}
    (tmp_path / "local" / "log_config.json.default").write_text(json.dumps(default))
    config = log_config(tmp_path)
    assert config["filters"]["serverWait"]["()"] == "hospital_fedlora.deploy.kit_logging.ServerWaitFilter"
    assert all(config["loggers"][name]["filters"] == ["serverWait"] for name in RETRY_LOGGERS)
    assert config["loggers"]["root"] == default["loggers"]["root"]
    assert json.loads(write_log_config(tmp_path).read_text()) == config


def test_a_job_process_reads_the_kits_log_config(tmp_path):
    """FLARE's job processes configure logging with configure_logging(workspace, job_id), from local/, and
    then import our components (and so peft and bitsandbytes)."""
    kits = provision_into(tmp_path, free_port(), None)
    kit = kits.clients["hospital-a"]
    write_log_config(kit)
    (kit / "job1").mkdir()  # FLARE makes the job's run folder before it starts the job process
    script = (
        "import logging\n"
        "from nvflare.apis.workspace import Workspace\n"
        "from nvflare.fuel.utils.log_utils import configure_logging\n"
        "configure_logging(Workspace(root_dir='.', site_name='hospital-a'), 'job1')\n"
        f"cell = logging.getLogger({CELL!r})\n"
        f"cell.error({HEARTBEAT + 'cannot send to ' + repr('server') + ': target_unreachable'!r})\n"
        "cell.error('an unrelated error')\n"
        "import hospital_fedlora.site.model_loading\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=kit, check=True, timeout=120)
    log = (kit / "job1" / "log.txt").read_text()
    assert "CoreCell - INFO - waiting for the server (attempt 1)" in log
    assert "target_unreachable" not in log
    assert "CoreCell - ERROR - an unrelated error" in log
    assert "pip install kernels" not in log


@pytest.mark.e2e
def test_a_hospital_started_before_the_server_logs_progress(tmp_path):
    kits = provision_into(tmp_path, free_port(), None)
    kit = kits.clients["hospital-a"]
    write_log_config(kit)
    token = uuid.uuid4().hex
    env = {**os.environ, MARKER_VAR: token, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(kit / "console.txt", "ab") as console:
        start = subprocess.Popen(
            ["bash", str(kit / "startup" / "start.sh")], cwd=kit, env=env, stdin=subprocess.DEVNULL,
            stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        start.wait(timeout=30)  # start.sh backgrounds the watchdog and returns
        time.sleep(20)
    finally:
        terminate(token, [start.pid])
        assert find_marked_processes(token) == []
    log = (kit / "log.txt").read_text()
    progress = [line for line in log.splitlines() if "waiting for the server at localhost:" in line]
    assert progress and all(" - INFO - " in line for line in progress), log
    assert len(progress) <= 2, progress  # at most one per 30 s
    assert "re-challenge" not in log
    assert " - ERROR - " not in log and " - WARNING - " not in log and "Traceback" not in log, log
    assert (kit / "error_log.txt").read_text() == ""
