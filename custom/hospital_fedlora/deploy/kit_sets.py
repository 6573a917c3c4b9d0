"""A provisioning run's set of kits: ``nvflare provision`` into a workspace, which ``prod_NN`` is complete
and current, and which kit in it belongs to whom (``deploy/kits.py`` prepares them)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .kit_identity import kit_name

# Written into prod_NN after its last kit is prepared: a set without it was left by a run that failed or was
# killed, and is never taken for the current one.
COMPLETE_MARKER = ".kits_complete"


class KitError(RuntimeError):
    """Provisioning or kit preparation failed; the message says what to fix."""


@dataclass(frozen=True)
class Kits:
    """Where one provisioning run put its kits."""

    prod_dir: Path
    server: Path
    clients: dict[str, Path] = field(default_factory=dict)
    admins: dict[str, Path] = field(default_factory=dict)


def read_project(project_file: str | Path) -> dict[str, Any]:
    path = Path(project_file)
    try:
        project = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise KitError(f"{path}: cannot read the project file: {err}") from None
    if not isinstance(project, dict) or not project.get("name") or not isinstance(project.get("participants"), list):
        raise KitError(f"{path}: expected a project with 'name' and a 'participants' list (see docs/admin.md)")
    return project


def provision(project_file: str | Path, workspace: str | Path) -> Path:
    """Run ``nvflare provision``; return the new ``prod_NN`` folder holding every kit.

    Provisioning again into the same workspace keeps its root CA and the hospitals' BFV keys (both kept in
    ``<workspace>/<project>/state``), so earlier kits stay valid; a fresh workspace means fresh ones.
    """
    project_file = Path(project_file).resolve()
    workspace = Path(workspace).resolve()
    name = read_project(project_file)["name"]
    before = set(_prod_dirs(workspace, name))
    nvflare = Path(sys.executable).with_name("nvflare")
    cmd = [str(nvflare) if nvflare.exists() else "nvflare", "provision", "-p", str(project_file), "-w", str(workspace)]
    # --force: re-provisioning into an existing workspace is how kits are added and rotated.
    proc = subprocess.run(cmd + ["--force"], capture_output=True, text=True, cwd=project_file.parent)
    new = sorted(set(_prod_dirs(workspace, name)) - before, key=_prod_number)
    if proc.returncode != 0:
        for partial in new:
            shutil.rmtree(partial, ignore_errors=True)
        raise KitError(f"nvflare provision -p {project_file} failed:\n{proc.stdout}{proc.stderr}".rstrip())
    if not new:
        raise KitError(f"nvflare provision succeeded but wrote no new prod_NN folder under {workspace / name}")
    return new[-1]


def _prod_dirs(workspace: Path, project_name: str) -> list[Path]:
    root = workspace / project_name
    return [p for p in root.glob("prod_*") if p.is_dir() and re.fullmatch(r"prod_\d+", p.name)]


def _prod_number(p: Path) -> int:
    return int(p.name.split("_")[1])


def latest_prod_dir(workspace: str | Path, project_name: str = "hospital-fedlora") -> Path:
    """The most recent complete ``prod_NN`` folder, i.e. the kits ``make kits`` finished last."""
    dirs = sorted(_prod_dirs(Path(workspace), project_name), key=_prod_number)
    complete = [d for d in dirs if (d / COMPLETE_MARKER).is_file()]
    if not complete:
        unfinished = f" ({', '.join(d.name for d in dirs)}: unfinished, no {COMPLETE_MARKER})" if dirs else ""
        raise KitError(f"no complete kits under {Path(workspace) / project_name}{unfinished}; run `make kits`")
    return complete[-1]


def find_kits(prod_dir: str | Path, project: dict[str, Any] | None = None, complete: bool = True) -> Kits:
    """Sort the kits of ``prod_dir`` by role, hospitals and admins by their certificates' names; check them
    against ``project`` if given. ``complete``: refuse a set whose provisioning run did not finish."""
    prod_dir = Path(prod_dir).resolve()
    if complete and not (prod_dir / COMPLETE_MARKER).is_file():
        raise KitError(
            f"{prod_dir}: no {COMPLETE_MARKER}, so the run that wrote it did not finish and its kits may be "
            "incomplete; delete the folder and run `make kits` again"
        )
    server, clients, admins = None, {}, {}
    for kit in sorted(p for p in prod_dir.iterdir() if (p / "startup").is_dir()):
        startup = kit / "startup"
        if (startup / "fed_server.json").is_file():
            server = kit
        elif (startup / "fed_client.json").is_file():
            clients[kit_name(kit)] = kit
        elif (startup / "fed_admin.json").is_file():
            admins[kit_name(kit)] = kit
    if server is None:
        raise KitError(f"{prod_dir}: no server kit (startup/fed_server.json) found; is this a prod_NN folder?")
    if project is not None:
        expected = {p["name"] for p in project["participants"] if p.get("type") == "client"}
        missing = expected - set(clients)
        if missing:
            raise KitError(f"{prod_dir}: no kit for client(s) {sorted(missing)} named in the project file")
    return Kits(prod_dir=prod_dir, server=server, clients=clients, admins=admins)

