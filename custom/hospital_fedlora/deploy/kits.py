"""Provision the consortium and make every startup kit ready to run (``make kits``; ``docs/admin.md``).

Per kit, in ``local/`` (never ``startup/``, whose signatures FLARE checks at every start): a
``resources.json`` that keeps job storage inside the kit and allows our package, a ``comm_config.json``
for multi-GB messages and, in hospital kits, the validated site config with absolute paths.

    python -m hospital_fedlora.deploy.kits --project provisioning/project.yml --workspace workspace/kits \\
        --site-configs site_configs
    python -m hospital_fedlora.deploy.kits --kit <kit folder> --site-config <the hospital's site config>
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, load_site_config

# Every FLARE class our jobs name lives under this prefix; the package is installed at every participant.
PACKAGE_ALLOW_PREFIX = "hospital_fedlora."
SITE_CONFIG_NAME = "site_config.yaml"
# Where a server keeps its state, as FLARE 2.9's resources.json names it: (path of keys, folder in the kit).
# FLARE's defaults point outside the kit, at a shared system folder.
SERVER_STORAGE = (
    (("snapshot_persistor", "args", "storage", "args", "root_dir"), "snapshot-storage"),
    (("components", "job_manager", "args", "uri_root"), "jobs-storage"),
)

# Defaults in FLARE 2.9 (fuel/f3): 1 MiB chunks, 4 GiB largest blob, 300 s between chunks, 30 s socket
# send. A multi-GB encrypted adapter over a hospital's uplink needs longer waits and a larger blob ceiling;
# the frame limit (2 GiB) is fixed, so large payloads must go through streaming, which these settings govern.
COMM_CONFIG: dict[str, Any] = {
    "streaming_chunk_size": 4 * 1024 * 1024,
    "streaming_window_size": 128 * 1024 * 1024,
    "streaming_max_blob_size": 16 * 1024**3,
    "streaming_read_timeout": 1800,
    "streaming_ack_wait": 1800,
    "streaming_send_timeout": 300,
    "streaming_ack_progress_timeout": 600,
    "sfm_send_stall_timeout": 600,
    "heartbeat_interval": 30,
}


class KitError(RuntimeError):
    """Provisioning or kit preparation failed; the message says what to fix."""


@dataclass(frozen=True)
class Kits:
    """Where one provisioning run put its kits."""

    prod_dir: Path
    server: Path
    clients: dict[str, Path] = field(default_factory=dict)
    admins: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ provisioning
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
    if proc.returncode != 0:
        raise KitError(f"nvflare provision -p {project_file} failed:\n{proc.stdout}{proc.stderr}".rstrip())
    new = sorted(set(_prod_dirs(workspace, name)) - before, key=_prod_number)
    if not new:
        raise KitError(f"nvflare provision succeeded but wrote no new prod_NN folder under {workspace / name}")
    return new[-1]


def _prod_dirs(workspace: Path, project_name: str) -> list[Path]:
    root = workspace / project_name
    return [p for p in root.glob("prod_*") if p.is_dir() and re.fullmatch(r"prod_\d+", p.name)]


def _prod_number(p: Path) -> int:
    return int(p.name.split("_")[1])


def latest_prod_dir(workspace: str | Path, project_name: str = "hospital-fedlora") -> Path:
    """The most recent ``prod_NN`` folder, i.e. the kits ``make kits`` produced last."""
    dirs = sorted(_prod_dirs(Path(workspace), project_name), key=_prod_number)
    if not dirs:
        raise KitError(f"no kits under {Path(workspace) / project_name}; run `make kits` first")
    return dirs[-1]


def find_kits(prod_dir: str | Path, project: dict[str, Any] | None = None) -> Kits:
    """Sort the kits of ``prod_dir`` by role, from each kit's own startup files (or ``project`` if given)."""
    prod_dir = Path(prod_dir).resolve()
    server, clients, admins = None, {}, {}
    for kit in sorted(p for p in prod_dir.iterdir() if (p / "startup").is_dir()):
        startup = kit / "startup"
        if (startup / "fed_server.json").is_file():
            server = kit
        elif (startup / "fed_client.json").is_file():
            clients[kit.name] = kit
        elif (startup / "fed_admin.json").is_file():
            admins[kit.name] = kit
    if server is None:
        raise KitError(f"{prod_dir}: no server kit (startup/fed_server.json) found; is this a prod_NN folder?")
    if project is not None:
        expected = {p["name"] for p in project["participants"] if p.get("type") == "client"}
        missing = expected - set(clients)
        if missing:
            raise KitError(f"{prod_dir}: no kit for client(s) {sorted(missing)} named in the project file")
    return Kits(prod_dir=prod_dir, server=server, clients=clients, admins=admins)


# ------------------------------------------------------------------------------------- kit preparation
# FLARE's parent processes live for months and relay every message: they release freed memory regularly.
MEMORY_KEEPER = {"id": "memory_keeper", "path": "hospital_fedlora.deploy.memory_keeper.MemoryKeeper", "args": {}}
# A job a crashed server left RUNNING is marked finished when the server starts again, so it can be resumed.
INTERRUPTED_JOBS = {"id": "interrupted_jobs", "path": "hospital_fedlora.deploy.interrupted_jobs.InterruptedJobs", "args": {}}


def local_resources(kit: Path) -> dict[str, Any]:
    """``resources.json`` for ``kit``: FLARE's default, storage inside the kit, our package allowed, the
    parent process's memory released regularly (``deploy/memory_keeper.py``) and, at the server, jobs a
    crash left running marked finished (``deploy/interrupted_jobs.py``)."""
    default = kit / "local" / "resources.json.default"
    try:
        resources = json.loads(default.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise KitError(f"{default}: cannot read the provisioned resources: {err}") from None
    server = (kit / "startup" / "fed_server.json").is_file()
    if server:
        for keys, folder in SERVER_STORAGE:
            _set(resources, keys, str((kit / "storage" / folder).resolve()), default)
    components = resources.setdefault("components", [])
    for added in [MEMORY_KEEPER, INTERRUPTED_JOBS] if server else [MEMORY_KEEPER]:
        if not any(c.get("id") == added["id"] for c in components if isinstance(c, dict)):
            components.append(dict(added))
    allow = resources.get("class_allow_list")
    if isinstance(allow, list) and "*" not in allow and PACKAGE_ALLOW_PREFIX not in allow:
        allow.append(PACKAGE_ALLOW_PREFIX)
    return resources


def _set(node: Any, keys: tuple[str, ...], value: str, source: Path) -> None:
    """Set ``node[k1][k2]...[last]`` to ``value``; within a list, a key names a component's ``id``."""
    *path, last = keys
    for key in path:
        if isinstance(node, list):
            node = next((c for c in node if isinstance(c, dict) and c.get("id") == key), None)
        else:
            node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        node[last] = value
        return
    raise KitError(
        f"{source}: has no {'.'.join(keys)}, where this FLARE version's server keeps its state; the kit's "
        "storage cannot be placed inside the kit. Check the installed nvflare version against pyproject.toml"
    )


def comm_config(kit: Path) -> dict[str, Any]:
    """``comm_config.json`` for ``kit``: what provisioning wrote there, plus the large-message settings."""
    existing = kit / "local" / "comm_config.json"
    config = json.loads(existing.read_text()) if existing.is_file() else {}
    config.update(COMM_CONFIG)
    return config


def install_site_config(kit: str | Path, site_config: str | Path) -> Path:
    """Validate ``site_config`` for the kit's site and write it, paths absolute, to ``<kit>/local``."""
    kit = Path(kit)
    cfg = load_site_config(site_config, expected_site=kit.name)
    absent = [label for label, path in (("data.train", cfg.data.train), ("data.validation", cfg.data.validation),
                                         ("base_model_path", cfg.base_model_path)) if not path.exists()]  # fmt: skip
    if absent:
        print(f"  note: {kit.name}: {', '.join(absent)} not there yet; the site needs them before training")
    dest = kit / "local" / SITE_CONFIG_NAME
    header = f"# {kit.name}'s site configuration, from {Path(site_config).resolve()} (paths resolved).\n"
    dest.write_text(header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return dest


def prepare_kit(kit: str | Path, site_config: str | Path | None = None) -> None:
    """Write ``resources.json``, ``comm_config.json`` and (hospital kits) ``site_config.yaml`` into ``local/``."""
    kit = Path(kit).resolve()
    local = kit / "local"
    if not (local / "resources.json.default").is_file():
        raise KitError(f"{kit}: not a provisioned startup kit (local/resources.json.default is missing)")
    is_client = (kit / "startup" / "fed_client.json").is_file()
    if site_config is not None and not is_client:
        raise KitError(f"{kit}: only a hospital's kit takes a site config (this one has no startup/fed_client.json)")
    _write_json(local / "resources.json", local_resources(kit))
    if (kit / "startup" / "fed_admin.json").is_file():
        return  # admin consoles use neither FLARE's comm settings nor a site config
    _write_json(local / "comm_config.json", comm_config(kit))
    (kit / "storage").mkdir(exist_ok=True)
    if site_config is not None:
        install_site_config(kit, site_config)


def prepare_kits(prod_dir: str | Path, site_configs: str | Path | None, project: dict | None = None) -> Kits:
    """Prepare every kit of one provisioning run; each hospital needs ``<site_configs>/<site>.yaml``."""
    kits = find_kits(prod_dir, project)
    missing = [name for name in kits.clients if site_configs and not (Path(site_configs) / f"{name}.yaml").is_file()]
    if missing:
        raise KitError(
            f"no site config for {missing} in {site_configs}: add site_configs/<site>.yaml for every hospital "
            "in project.yml (copy site_configs/hospital-a.yaml and edit it)"
        )
    prepare_kit(kits.server)
    for name, kit in kits.clients.items():
        prepare_kit(kit, Path(site_configs) / f"{name}.yaml" if site_configs else None)
    for kit in kits.admins.values():
        prepare_kit(kit)
    return kits


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


# -------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hospital_fedlora.deploy.kits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", default="provisioning/project.yml", help="project.yml for nvflare provision")
    parser.add_argument("--workspace", default="workspace/kits", help="provisioning workspace (git-ignored)")
    parser.add_argument("--site-configs", default="site_configs", help="folder with one <site>.yaml per hospital")
    parser.add_argument("--no-site-configs", action="store_true",
                        help="leave local/site_config.yaml to each hospital's IT")  # fmt: skip
    parser.add_argument("--kit", metavar="DIR",
                        help="no provisioning: prepare this one kit in place, where it was unpacked")  # fmt: skip
    parser.add_argument("--site-config", metavar="FILE", help="with --kit: the hospital's own site config to place")
    args = parser.parse_args(argv)

    try:
        if args.kit:
            prepare_kit(args.kit, args.site_config)
            print(f"prepared {Path(args.kit).resolve()}")
            return 0
        site_configs = None if args.no_site_configs else Path(args.site_configs)
        project = read_project(args.project)
        kits = prepare_kits(provision(args.project, args.workspace), site_configs, project)
    except (KitError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"kits for project '{project['name']}' in {kits.prod_dir}")
    print(f"  server   {kits.server}")
    for name, kit in kits.clients.items():
        site = kit / "local" / SITE_CONFIG_NAME
        print(f"  hospital {kit}" + (f"   (site config: {site})" if site.is_file() else "   (no site config yet)"))
    for name, kit in kits.admins.items():
        print(f"  admin    {kit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
