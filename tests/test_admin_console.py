"""The admin console ``startup/fl_admin.sh`` against the running federation, driven by piping lines into
it as a person would type them: what each role may do. ``nvflare job`` and the FLARE API run as the
operator guide writes them in ``test_guides_e2e.py``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hospital_fedlora_tools.local_federation import LocalFederation

from deployment_helpers import REPO, SITES, free_port, provision_into, wait_until

pytest_plugins = ["federation_fixtures"]

pytestmark = pytest.mark.e2e

ADMIN = "admin@consortium.org"
JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # fl_admin.sh runs `python3`
    return env


def console(admin_kit: Path, *commands: str, user: str = ADMIN) -> str:
    """Type the user name, then ``commands``, then ``bye`` into the admin console; return what it printed."""
    typed = "\n".join([user, *commands, "bye"]) + "\n"
    proc = subprocess.run(
        ["bash", str(admin_kit / "startup" / "fl_admin.sh")],
        input=typed, capture_output=True, text=True, env=_env(), timeout=120,
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


# ------------------------------------------------------------------- a hospital's own admin (org_admin)
@pytest.fixture(scope="module")
def two_hospitals(tmp_path_factory):
    kits = provision_into(tmp_path_factory.mktemp("org_admin"), free_port(), REPO / "site_configs")
    with LocalFederation(kits, clients=["hospital-a", "hospital-b"], echo=lambda s: None) as fed:
        yield fed
    assert not fed.processes()


def test_org_admin_operates_only_its_own_site(two_hospitals, small_job):
    fed = two_hospitals
    kit = fed.kits.admins["admin@hospital-a.org"]
    as_org_admin = dict(user="admin@hospital-a.org")

    out = console(kit, "check_status client", **as_org_admin)
    assert "hospital-a" in out and "hospital-b" in out  # may look at everyone

    out = console(kit, f"submit_job {small_job}", **as_org_admin)
    assert "Submitted job" not in out and "not authorized" in out.lower(), out

    # shutdown asks the operator to confirm by typing their user name again
    out = console(kit, "shutdown client hospital-b", "admin@hospital-a.org", **as_org_admin)
    assert "not authorized" in out.lower(), out
    assert "hospital-b" in fed.connected_clients()

    out = console(kit, "shutdown client hospital-a", "admin@hospital-a.org", **as_org_admin)
    hospital_a = fed.kits.clients["hospital-a"]
    wait_until(lambda: not [p for p in fed.processes() if str(hospital_a) in _cmdline(p)], 60,
               "hospital-a's processes (client and watchdog) to exit")  # fmt: skip
    watchdog = (hospital_a / "console.txt").read_text()
    assert "Gracefully shutdown." in watchdog or "About to shutdown." in watchdog  # asked to stop, not killed
    wait_until(lambda: fed.connected_clients() == {"hospital-b"}, 60, "the server to drop hospital-a")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
