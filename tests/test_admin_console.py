"""The operator's tools against the running federation: the interactive console ``startup/fl_admin.sh``
(driven by piping lines into it, as a person would type them) and ``nvflare job``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deployment_helpers import SITES, wait_until

pytest_plugins = ["federation_fixtures"]

pytestmark = pytest.mark.e2e

ADMIN = "admin@consortium.org"
JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # fl_admin.sh runs `python3`
    return env


def console(admin_kit: Path, *commands: str) -> str:
    """Type the user name, then ``commands``, then ``bye`` into the admin console; return what it printed."""
    typed = "\n".join([ADMIN, *commands, "bye"]) + "\n"
    proc = subprocess.run(
        ["bash", str(admin_kit / "startup" / "fl_admin.sh")],
        input=typed, capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def nvflare_job(admin_kit: Path, *args: str) -> str:
    proc = subprocess.run(
        ["nvflare", "job", *args, "--startup-kit", str(admin_kit)],
        capture_output=True, text=True, env=_env(), timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def admin_kit(deployed_kits) -> Path:
    return deployed_kits.admins[ADMIN]


def _status_of(federation, job_id: str) -> str:
    return federation.session.get_job_meta(job_id)["status"]


def test_console_reports_server_and_every_hospital(federation, admin_kit):
    out = console(admin_kit, "check_status server", "check_status client")
    assert "Engine status:" in out
    assert f"Registered clients: {len(SITES)}" in out
    for site in SITES:
        assert re.search(rf"\|\s*{site}\s*\|", out), site


def test_console_downloads_a_finished_jobs_result(federation, completed_job, admin_kit):
    job_id = completed_job["job_id"]
    out = console(admin_kit, "list_jobs", f"download_job {job_id}")
    assert re.search(rf"{job_id}\s*\|\s*\S+\s*\|\s*FINISHED:COMPLETED", out)
    adapter = admin_kit / "transfer" / job_id / "workspace" / "global_adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()


def test_console_submits_lists_and_aborts_a_job(federation, completed_job, small_job, admin_kit):
    out = console(admin_kit, f"submit_job {small_job}")
    submitted = re.search(rf"Submitted job: ({JOB_ID.pattern})", out)
    assert submitted, out
    job_id = submitted.group(1)
    listed = console(admin_kit, "list_jobs")
    assert job_id in listed
    out = console(admin_kit, f"abort_job {job_id}", "y")  # the console asks for confirmation
    assert "Abort signal has been sent to the server app." in out or f"Aborted the job {job_id}" in out, out
    wait_until(lambda: _status_of(federation, job_id) == "FINISHED:ABORTED", 120, f"job {job_id} to be aborted")
    assert re.search(rf"{job_id}\s*\|\s*\S+\s*\|\s*FINISHED:ABORTED", console(admin_kit, "list_jobs"))


def test_nvflare_job_cli_submits_lists_aborts_and_downloads(federation, completed_job, small_job, admin_kit, tmp_path):
    out = nvflare_job(admin_kit, "submit", "-j", str(small_job))
    job_id = JOB_ID.search(out).group(0)
    assert job_id in nvflare_job(admin_kit, "list")
    nvflare_job(admin_kit, "abort", job_id, "--force")
    wait_until(lambda: _status_of(federation, job_id) == "FINISHED:ABORTED", 120, f"job {job_id} to be aborted")
    assert "FINISHED:ABORTED" in nvflare_job(admin_kit, "meta", job_id)

    done = completed_job["job_id"]
    nvflare_job(admin_kit, "download", done, "-o", str(tmp_path / "result"))
    assert list((tmp_path / "result").rglob("global_adapter/adapter_model.safetensors"))
