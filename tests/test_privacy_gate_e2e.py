"""The privacy gate on provisioned kits: every hospital requires encryption; the encrypted job runs, and a
plaintext job, a ``get_weights`` task and a job-supplied key are each refused at every site, naming the
site config and the setting in the job report. The admin console cannot ``cat`` a hospital's key file.

On the session's federation (``federation_fixtures``), whose hospitals opt out for the plaintext tests:
here each kit's ``local/site_config.yaml`` requires encryption for the module's jobs (read when a job
starts), and is restored afterwards. Jobs are the committed ones shortened to 1 round of 1 local step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hospital_fedlora.server.job_report import REPORT_META_KEY
from hospital_fedlora_tools.process_table import FederationError

from deployment_helpers import REPO

pytest_plugins = ["federation_fixtures"]

pytestmark = pytest.mark.e2e

ADMIN = "admin@consortium.org"
SETTING = "field 'privacy.require_encryption' is true"


def shortened(name: str, dst: Path, edit_server=None, edit_client=None) -> Path:
    """``jobs/<name>`` with 1 round of 1 local step and few evaluation examples, then the edits."""
    job = dst / name
    shutil.copytree(REPO / "jobs" / name, job)
    for file, edit in (("config_fed_server.json", edit_server), ("config_fed_client.json", edit_client)):
        path = job / "app" / "config" / file
        cfg = json.loads(path.read_text())
        if file == "config_fed_server.json":
            next(w for w in cfg["workflows"] if "num_rounds" in w["args"])["args"]["num_rounds"] = 1
        else:
            cfg["executors"][0]["executor"]["args"]["recipe"].update(local_steps=1, max_eval_examples=4)
        if edit:
            edit(cfg)
        path.write_text(json.dumps(cfg, indent=2))
    return job


@pytest.fixture(scope="module")
def gated(deployed_kits, federation):
    """Every hospital's site config requires encryption while this module's jobs run."""
    configs = {site: kit / "local" / "site_config.yaml" for site, kit in deployed_kits.clients.items()}
    originals = {site: path.read_text() for site, path in configs.items()}
    try:
        for path in configs.values():
            raw = yaml.safe_load(path.read_text())
            raw["privacy"] = {"require_encryption": True}
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
        yield configs
    finally:
        for site, path in configs.items():
            path.write_text(originals[site])


def ask_for_weights(cfg):
    """Server: FLARE's initial-weights step (ours names a failing site) asks every site for get_weights."""
    init = {"id": "init_adapter", "path": "hospital_fedlora.server.initial_adapter.InitialAdapter",
            "args": {"task_name": "get_weights"}}  # fmt: skip
    cfg["workflows"].insert(0, init)


def map_get_weights(cfg):
    cfg["executors"][0]["tasks"].append("get_weights")


def own_key(cfg):
    """A key file the job names (FLARE fills in the variables: a file the job itself could carry)."""
    enc = next(c for c in cfg["components"] if c["id"] == "site_encryption")
    enc["args"]["context_file"] = "{WORKSPACE}/{JOB_ID}/app_server/config/submitters_key.tenseal"


@pytest.fixture(scope="module")
def outcomes(federation, gated, tmp_path_factory):
    """The four jobs, submitted together (FLARE runs up to 4 at once): {name: (status, job report)}."""
    jobs = {
        "encrypted": shortened("fedlora_he", tmp_path_factory.mktemp("he")),
        "plaintext": shortened("fedlora_plain", tmp_path_factory.mktemp("plain")),
        "get_weights": shortened("fedlora_he", tmp_path_factory.mktemp("gw"), ask_for_weights, map_get_weights),
        "own_key": shortened("fedlora_he", tmp_path_factory.mktemp("key"), edit_client=own_key),
    }
    ids = {name: federation.submit(job) for name, job in jobs.items()}
    out = {}
    for name, job_id in ids.items():
        try:
            status = federation.wait(job_id, on_progress=None, timeout=240, poll_interval=0.5)["status"]
        except FederationError as err:
            status = str(err)
        out[name] = (status, federation.session.get_job_meta(job_id)[REPORT_META_KEY])
    return out


def assert_refused(outcome, configs: dict[str, Path], *expected: str) -> dict:
    """The job failed at the sites, and every site that answered (the job stops once fewer than its minimum
    of 2 can still succeed) named its site config, the setting and ``expected``."""
    status, report = outcome
    assert "FINISHED:EXECUTION_EXCEPTION" in status, status
    assert len(report["failures"]) >= 2 and set(report["failures"]) <= set(configs), report
    for site, failures in report["failures"].items():
        cause = " ".join(f["cause"] for f in failures)
        assert f"{configs[site]}: {SETTING}" in cause, (site, cause)
        for text in expected:
            assert text in cause, (site, text, cause)
    return report


def test_the_encrypted_job_passes_the_gate(outcomes):
    status, report = outcomes["encrypted"]
    assert status == "FINISHED:COMPLETED" and not report["failures"], (status, report)


def test_the_plaintext_job_is_refused_at_every_site(outcomes, gated):
    assert_refused(outcomes["plaintext"], gated, "adapter updates unencrypted")


def test_a_get_weights_task_is_refused_even_in_the_encrypted_job(outcomes, gated):
    """Our encrypt filter encrypts the train task's difference only: get_weights would return WEIGHTS in the clear."""
    report = assert_refused(outcomes["get_weights"], gated, "'get_weights' task would send the site's adapter (WEIGHTS)")
    assert all(f["task"] == "get_weights" for fs in report["failures"].values() for f in fs)


def test_a_job_supplied_key_is_refused_at_every_site(outcomes, gated):
    assert_refused(outcomes["own_key"], gated, "args 'context_file'", "key in its own kit")


def test_the_admin_console_runs_no_shell_command_at_a_hospital(federation, deployed_kits):
    """The project admin (FLARE's default: "any") can neither list nor read a hospital's startup/. (FLARE's
    server already refuses `cat` of a file that is not text, such as the .tenseal key files; the hospital's
    own policy refuses every shell command.)"""
    admin_kit = deployed_kits.admins[ADMIN]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    typed = f"{ADMIN}\nls hospital-a startup\ncat hospital-a startup/fed_client.json\nbye\n"
    proc = subprocess.run(["bash", str(admin_kit / "startup" / "fl_admin.sh")], input=typed, capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert f"user '{ADMIN}' is not authorized for 'ls'" in out, out
    assert f"user '{ADMIN}' is not authorized for 'cat'" in out, out
    assert "client_bfv_context" not in out and "fed_learn_port" not in out and '"servers"' not in out
