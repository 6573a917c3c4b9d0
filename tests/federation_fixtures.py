"""One real federation for the whole test session (pytest plugin: ``pytest_plugins = ["federation_fixtures"]``).

Provisioned into a temporary folder with a free port, started from the kits' own ``start.sh`` on loopback,
shared by the API, console and ``nvflare job`` tests, and always shut down at the end of the session.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hospital_fedlora_tools.local_federation import LocalFederation

from deployment_helpers import REPO, free_port, provision_into, write_site_configs

ADMIN = "admin@consortium.org"


@pytest.fixture(scope="session")
def base_model_dir():
    """The base model `make test` builds first (a conftest may provide its own)."""
    path = REPO / "workspace" / "base_model"
    if not (path / "config.json").is_file():
        pytest.skip("no base model: run `make base-model` (make test does)")
    return path


@pytest.fixture(scope="session")
def data_dir():
    """The hospitals' data `make test` builds first (a conftest may provide its own)."""
    path = REPO / "workspace" / "data"
    if not (path / "hospital-a" / "train.jsonl").is_file():
        pytest.skip("no hospital data: run `make data` (make test does)")
    return path


@pytest.fixture(scope="session")
def deployed_kits(tmp_path_factory, base_model_dir, data_dir):
    root = tmp_path_factory.mktemp("deployment")
    # they run jobs/fedlora_plain: the hospitals opt out of encryption (synthetic data)
    configs = write_site_configs(root / "site_configs", Path(base_model_dir), Path(data_dir), privacy={"require_encryption": False})
    return provision_into(root / "provisioning", free_port(), configs)


@pytest.fixture(scope="session")
def federation(deployed_kits):
    with LocalFederation(deployed_kits, echo=lambda s: None) as fed:
        yield fed
    assert not fed.processes(), "processes left after the federation stopped"


@pytest.fixture(scope="session")
def small_job(tmp_path_factory) -> Path:
    """The committed plaintext job, shortened: 2 rounds of 2 local steps, few evaluation examples."""
    job = tmp_path_factory.mktemp("jobs") / "fedlora_plain"
    shutil.copytree(REPO / "jobs" / "fedlora_plain", job)
    server = job / "app" / "config" / "config_fed_server.json"
    cfg = json.loads(server.read_text())
    next(w for w in cfg["workflows"] if w["id"] == "scatter_and_gather")["args"]["num_rounds"] = 2
    server.write_text(json.dumps(cfg, indent=2))
    client = job / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(client.read_text())
    recipe = cfg["executors"][0]["executor"]["args"]["recipe"]
    recipe.update(local_steps=2, max_eval_examples=8)
    client.write_text(json.dumps(cfg, indent=2))
    return job


@pytest.fixture(scope="session")
def completed_job(federation, small_job, tmp_path_factory):
    """The small job, submitted as the admin through the FLARE API and followed to the end."""
    events = []
    job_id = federation.submit(small_job)
    signed_in_place = sorted(small_job.rglob(".__nvfl_*"))
    meta = federation.wait(job_id, on_progress=events.append, poll_interval=1.0)
    result = federation.download(job_id, tmp_path_factory.mktemp("results"))
    return {"job_id": job_id, "meta": meta, "events": events, "result": result, "signed_in_place": signed_in_place}
