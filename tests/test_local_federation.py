"""End to end on real processes: provisioned kits started with their own start.sh on loopback, the job
submitted through the FLARE API, followed round by round, downloaded; nothing left running afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from hospital_fedlora_tools.local_federation import LocalFederation
from hospital_fedlora_tools.process_table import FederationError, find_marked_processes

from deployment_helpers import REPO, SITES, free_port, provision_into, wait_until

pytest_plugins = ["federation_fixtures"]

pytestmark = pytest.mark.e2e


def test_all_hospitals_connect(federation):
    assert federation.connected_clients() == set(SITES)
    server = federation.session.check_status("server")
    assert server["server_status"] in ("stopped", "started")  # "stopped" = no job running


def test_job_completes_and_progress_is_reported_per_round(completed_job):
    assert completed_job["meta"]["status"] == "FINISHED:COMPLETED"
    assert completed_job["signed_in_place"] == []  # FLARE signed a copy; the submitted folder is untouched
    events = completed_job["events"]
    started = [e.round for e in events if e.event == "round_started"]
    finished = [e.round for e in events if e.event == "round_finished"]
    assert started == [0, 1] and finished == [0, 1]
    assert all(e.num_rounds == 2 for e in events)
    statuses = [e.status for e in events if e.event == "status"]
    assert statuses[-1] == "FINISHED:COMPLETED" and "RUNNING" in statuses


def test_downloaded_result_holds_a_peft_adapter(completed_job, base_model_dir):
    run = completed_job["result"] / "workspace"
    adapter = run / "global_adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert sorted(p.name for p in (run / "adapter_rounds").glob("round_*.safetensors")) == [
        "round_000.safetensors",
        "round_001.safetensors",
    ]
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in k and abs(v).max() > 0 for k, v in saved.items())  # LoRA B starts at zero
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), adapter)
    assert any("lora_" in k for k in model.state_dict())


def test_each_hospital_used_the_site_config_in_its_kit(completed_job, deployed_kits):
    job_id = completed_job["job_id"]
    for site, kit in deployed_kits.clients.items():
        log = (kit / job_id / "log.txt").read_text()
        assert f"config {kit / 'local' / 'site_config.yaml'}" in log, site


# ------------------------------------------------------------------------------------- cleanup paths
@pytest.fixture(scope="module")
def spare_kits(tmp_path_factory):
    """Kits of their own (own port), for runs that end badly."""
    return provision_into(tmp_path_factory.mktemp("spare"), free_port(), REPO / "site_configs")


def test_an_error_inside_the_federation_still_stops_everything(spare_kits):
    with pytest.raises(RuntimeError, match="operator error"):
        with LocalFederation(spare_kits, clients=["hospital-a"], echo=lambda s: None) as fed:
            assert fed.connected_clients() == {"hospital-a"}
            assert len(fed.processes()) >= 4  # two watchdog shells, server and client
            raise RuntimeError("operator error")
    assert find_marked_processes(fed.token) == []


def test_a_kit_that_cannot_start_is_reported_and_cleaned_up(spare_kits, tmp_path):
    # Someone edited the signed kit: FLARE refuses to start it, and the watchdog keeps retrying.
    tampered = spare_kits.clients["hospital-b"] / "startup" / "fed_client.json"
    original = tampered.read_text()
    tampered.write_text(original.replace('"fqsn"', '"fqsn_edited"'))
    try:
        fed = LocalFederation(spare_kits, clients=["hospital-b"], echo=lambda s: None)
        with pytest.raises(FederationError, match="hospital-b keeps exiting"):
            with fed:
                pass
        assert find_marked_processes(fed.token) == []
    finally:
        tampered.write_text(original)


def _processes_under(folder) -> list[int]:
    folder = str(folder)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if folder in cmd or cwd.startswith(folder):
            found.append(int(pid))
    return found


def test_sigterm_to_the_runner_stops_every_process(spare_kits, tmp_path):
    cmd = [sys.executable, "-m", "hospital_fedlora_tools.local_federation", "--kits", str(spare_kits.prod_dir),
           "--job", str(REPO / "tests" / "jobs" / "np_rounds"), "--results", str(tmp_path)]  # fmt: skip
    out = tmp_path / "runner.txt"
    with open(out, "w") as sink:
        runner = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "hospitals connected" in out.read_text(), 120, "the runner to start the federation")
        assert _processes_under(spare_kits.prod_dir)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if runner.poll() is None:
            runner.kill()
    assert "federation stopped" in out.read_text()
    assert _processes_under(spare_kits.prod_dir) == []
