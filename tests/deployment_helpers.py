"""Provisioning into a temporary folder and waiting on real processes, shared by the deployment tests."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable

import yaml

from hospital_fedlora.deploy.kits import Kits, prepare_kits, provision

REPO = Path(__file__).resolve().parents[1]
PROJECT_YML = REPO / "provisioning" / "project.yml"
SITES = ("hospital-a", "hospital-b", "hospital-c")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_with_port(port: int, extra_clients: tuple[str, ...] = ()) -> dict:
    """The committed project.yml, listening on ``port``, optionally with more hospitals."""
    project = yaml.safe_load(PROJECT_YML.read_text())
    for p in project["participants"]:
        if p["type"] == "server":
            p["fed_learn_port"] = p["admin_port"] = port
    for name in extra_clients:
        project["participants"].append({"name": name, "type": "client", "org": name.replace("-", "_")})
    return project


def provision_into(folder: Path, port: int, site_configs: Path | None, extra_clients: tuple[str, ...] = ()) -> Kits:
    """Provision the project (ports rewritten) into ``folder`` and prepare every kit, as ``make kits`` does."""
    folder.mkdir(parents=True, exist_ok=True)
    project = project_with_port(port, extra_clients)
    project_file = folder / "project.yml"
    project_file.write_text(yaml.safe_dump(project, sort_keys=False))
    prod_dir = provision(project_file, folder / "workspace")
    return prepare_kits(prod_dir, site_configs, project)


def write_site_configs(folder: Path, base_model: Path, data: Path, sites=SITES, **fields) -> Path:
    """Site configs like the committed ones, pointing at ``base_model`` and ``data``, with ``fields`` set."""
    folder.mkdir(parents=True, exist_ok=True)
    for site in sites:
        raw = yaml.safe_load((REPO / "site_configs" / "hospital-a.yaml").read_text())
        raw.update(fields)
        raw["site"] = site
        raw["base_model_path"] = str(base_model)
        for split in ("train", "validation", "test"):
            raw["data"][split] = str(data / site / f"{split}.jsonl")
        (folder / f"{site}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; fail the test naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
