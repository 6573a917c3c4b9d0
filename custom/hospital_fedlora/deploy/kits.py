"""Provision the consortium and make every startup kit ready to run (``make kits``; ``docs/admin.md``).

Per kit, in ``local/`` (never ``startup/``, whose signatures FLARE checks at every start): a
``resources.json`` that keeps job storage inside the kit and allows our package, a ``comm_config.json``
for multi-GB messages and, in hospital kits, a ``log_config.json`` that logs waiting for the server as
progress (``kit_logging.py``), an ``authorization.json`` that keeps admins' shell commands and jobs'
custom code away from the key files in ``startup/`` and the validated site config with absolute paths.
A run either leaves a complete new ``prod_NN`` (marked by ``.kits_complete``, written last) or none.

    python -m hospital_fedlora.deploy.kits --project provisioning/project.yml --workspace workspace/kits \\
        [--site-configs site_configs [--plaintext-demo]]
    python -m hospital_fedlora.deploy.kits --kit <kit folder> --site-config <the hospital's site config>
    python -m hospital_fedlora.deploy.kits --kit <new server kit> --storage-from <old server kit>
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, load_site_config
from .kit_identity import KitIdentityError, kit_certificate, kit_name
from .kit_logging import write_log_config
from .kit_sets import COMPLETE_MARKER, KitError, Kits, find_kits, provision, read_project
from .kit_sets import latest_prod_dir  # noqa: F401  (callers import the kit-set API from here)
from .server_storage import StorageError, carry_storage_over

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


# ------------------------------------------------------------------------------------- kit preparation
# FLARE's parent processes live for months and relay every message: they release freed memory regularly.
MEMORY_KEEPER = {"id": "memory_keeper", "path": "hospital_fedlora.deploy.memory_keeper.MemoryKeeper", "args": {}}
# A job a crashed server left RUNNING is marked finished when the server starts again, so it can be resumed.
INTERRUPTED_JOBS = {"id": "interrupted_jobs", "path": "hospital_fedlora.deploy.interrupted_jobs.InterruptedJobs", "args": {}}
# A hospital runs no shell command sent to it, whatever the server's request says (deploy/no_remote_shell.py).
NO_REMOTE_SHELL = {"id": "no_remote_shell", "path": "hospital_fedlora.deploy.no_remote_shell.NoRemoteShell", "args": {}}


def local_resources(kit: Path) -> dict[str, Any]:
    """``resources.json`` for ``kit``: FLARE's default, storage inside the kit, our package allowed, the
    parent process's memory released regularly (``deploy/memory_keeper.py``), at the server jobs a crash
    left running marked finished (``deploy/interrupted_jobs.py``), at hospitals no shell command run
    (``deploy/no_remote_shell.py``)."""
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
    hospital = (kit / "startup" / "fed_client.json").is_file()
    added_here = [MEMORY_KEEPER, INTERRUPTED_JOBS] if server else [MEMORY_KEEPER, NO_REMOTE_SHELL] if hospital else [MEMORY_KEEPER]
    for added in added_here:
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


# FLARE 2.9's default policy (local/authorization.json.default) lets the project admin ("any") and each
# hospital's lead and org admin run shell commands (ls, cat, head, tail, grep) inside the site's workspace,
# which reach startup/ and the secret key files there, and lets the project admin and leads run jobs with
# their own code (BYOC), which could read them too. At a hospital both are off for every role.
DENIED_AT_HOSPITALS = {"shell_commands": "none", "byoc": "none"}


def hospital_authorization(kit: Path) -> dict[str, Any]:
    """``authorization.json`` for a hospital kit: FLARE's default with ``DENIED_AT_HOSPITALS`` for every role."""
    default = kit / "local" / "authorization.json.default"
    try:
        policy = json.loads(default.read_text())
        permissions = policy["permissions"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise KitError(f"{default}: cannot read the provisioned authorization policy: {err}") from None
    rights = {r for p in permissions.values() if isinstance(p, dict) for r in p} | set(DENIED_AT_HOSPITALS)
    for role, granted in permissions.items():
        # a role granted one condition for everything ("any") gets it right by right, less the denied ones
        granted = {r: granted for r in sorted(rights)} if isinstance(granted, (str, list)) else dict(granted)
        permissions[role] = {**granted, **DENIED_AT_HOSPITALS}
    return policy


# What --plaintext-demo writes at the top of a hospital's site config (the committed ones keep the gate on).
PLAINTEXT_DEMO_NOTE = (
    "# privacy.require_encryption is false: written by --plaintext-demo for the one-machine plaintext demo\n"
    "# (make demo-real, make demo-sim) on synthetic data; the committed site config keeps it true.\n"
)


def write_site_config(site_config: str | Path, dest: Path, header: str, plaintext_demo: bool = False) -> Path:
    """The validated ``site_config``, paths absolute, at ``dest``; with ``plaintext_demo`` opted out of
    ``privacy.require_encryption`` and saying why."""
    cfg = load_site_config(site_config)
    if plaintext_demo:
        cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"require_encryption": False})})
        header += PLAINTEXT_DEMO_NOTE
    dest.write_text(header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return dest


def install_site_config(kit: str | Path, site_config: str | Path, plaintext_demo: bool = False) -> Path:
    """Validate ``site_config`` for the kit's site (its certificate's name, whatever the folder is called) and
    write it, paths absolute, to ``<kit>/local``."""
    kit = Path(kit)
    site = kit_name(kit)
    cfg = load_site_config(site_config)
    if cfg.site != site:
        raise ConfigError(
            f"{site_config}: field 'site' is {cfg.site!r} but this client is {site!r} (the name in "
            f"{kit_certificate(kit)}); use {site}'s own site config, or set `site: {site}` if it is this hospital's"
        )
    absent = [label for label, path in (("data.train", cfg.data.train), ("data.validation", cfg.data.validation),
                                         ("base_model_path", cfg.base_model_path)) if not path.exists()]  # fmt: skip
    if absent:
        print(f"  note: {site}: {', '.join(absent)} not there yet; the site needs them before training")
    header = f"# {site}'s site configuration, from {Path(site_config).resolve()} (paths resolved).\n"
    return write_site_config(site_config, kit / "local" / SITE_CONFIG_NAME, header, plaintext_demo)


def prepare_kit(kit: str | Path, site_config: str | Path | None = None, plaintext_demo: bool = False) -> None:
    """Write ``resources.json``, ``comm_config.json`` and (hospital kits) ``authorization.json`` and
    ``site_config.yaml`` into ``local/``."""
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
    if is_client:  # a hospital waits for the server (start-up, server restarts): progress, not errors
        write_log_config(kit)
        _write_json(local / "authorization.json", hospital_authorization(kit))
    (kit / "storage").mkdir(exist_ok=True)
    if site_config is not None:
        install_site_config(kit, site_config, plaintext_demo)


def site_config_files(sites: list[str], site_configs: str | Path | None) -> dict[str, Path]:
    """The validated ``<site_configs>/<site>.yaml`` of each site in ``sites`` that has one. A hospital without
    one is not an error: its data paths are its IT's to know, and they add the config at the site."""
    found = {site: Path(site_configs) / f"{site}.yaml" for site in sites} if site_configs else {}
    found = {site: path for site, path in found.items() if path.is_file()}
    for site, path in found.items():
        load_site_config(path, expected_site=site)
    return found


def prepare_kits(
    prod_dir: str | Path, site_configs: str | Path | None, project: dict | None = None, plaintext_demo: bool = False
) -> Kits:
    """Prepare every kit of one provisioning run, placing ``<site_configs>/<site>.yaml`` where there is one
    (opted out of encryption with ``plaintext_demo``); mark the set complete last."""
    kits = find_kits(prod_dir, project, complete=False)
    configs = site_config_files(list(kits.clients), site_configs)
    prepare_kit(kits.server)
    for name, kit in kits.clients.items():
        prepare_kit(kit, configs.get(name), plaintext_demo)
    for kit in kits.admins.values():
        prepare_kit(kit)
    (kits.prod_dir / COMPLETE_MARKER).write_text("every kit in this folder is prepared (hospital_fedlora.deploy.kits)\n")
    return kits


def make_kits(
    project_file: str | Path, workspace: str | Path, site_configs: str | Path | None = None, plaintext_demo: bool = False
) -> Kits:
    """Provision and prepare a complete new set of kits, or leave none: what can be checked is checked before
    ``nvflare provision``, and a failure (or Ctrl-C) after it removes the new ``prod_NN`` again."""
    project = read_project(project_file)
    site_config_files([p["name"] for p in project["participants"] if p.get("type") == "client"], site_configs)
    prod_dir = provision(project_file, workspace)
    try:
        return prepare_kits(prod_dir, site_configs, project, plaintext_demo)
    except BaseException:
        shutil.rmtree(prod_dir, ignore_errors=True)
        raise


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


# -------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hospital_fedlora.deploy.kits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", default="provisioning/project.yml", help="project.yml for nvflare provision")
    parser.add_argument("--workspace", default="workspace/kits", help="provisioning workspace (git-ignored)")
    parser.add_argument("--site-configs", metavar="DIR",
                        help="place <DIR>/<site>.yaml in each hospital's kit (the one-machine demo); by default "
                             "each hospital's IT adds its own at the site")  # fmt: skip
    parser.add_argument("--plaintext-demo", action="store_true",
                        help="with --site-configs or --site-config: the placed site configs opt out of "
                             "privacy.require_encryption, so jobs/fedlora_plain runs (make demo-real; synthetic "
                             "data only)")  # fmt: skip
    parser.add_argument("--no-site-configs", action="store_true", help=argparse.SUPPRESS)  # the default now
    parser.add_argument("--kit", metavar="DIR",
                        help="no provisioning: prepare this one kit in place, where it was unpacked")  # fmt: skip
    parser.add_argument("--site-config", metavar="FILE", help="with --kit: the hospital's own site config to place")
    parser.add_argument("--storage-from", metavar="OLD_KIT",
                        help="with --kit <new server kit>: move the old server kit's storage/ (job history) into it")  # fmt: skip
    args = parser.parse_args(argv)

    try:
        if args.storage_from:
            if not args.kit:
                parser.error("--storage-from needs --kit <new server kit>")
            jobs = carry_storage_over(args.kit, args.storage_from)
            prepare_kit(args.kit)  # the new kit's storage paths name where it was unpacked, not the admin's copy
            print(f"moved {Path(args.storage_from).resolve() / 'storage'} ({len(jobs)} jobs) into "
                  f"{Path(args.kit).resolve() / 'storage'}")  # fmt: skip
            return 0
        if args.plaintext_demo and not (args.site_configs or args.site_config):
            parser.error("--plaintext-demo needs --site-configs or --site-config: it opts the placed site configs out")
        if args.kit:
            prepare_kit(args.kit, args.site_config, args.plaintext_demo)
            print(f"prepared {Path(args.kit).resolve()}")
            return 0
        site_configs = None if args.no_site_configs or not args.site_configs else Path(args.site_configs)
        project = read_project(args.project)
        kits = make_kits(args.project, args.workspace, site_configs, args.plaintext_demo)
    except (KitError, ConfigError, KitIdentityError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"kits for project '{project['name']}' in {kits.prod_dir}")
    print(f"  server   {kits.server}")
    for name, kit in kits.clients.items():
        site = kit / "local" / SITE_CONFIG_NAME
        print(f"  hospital {kit}   " + (f"(site config: {site})" if site.is_file() else
              f"(no site config yet; hospital IT adds it: python -m hospital_fedlora.deploy.kits "
              f"--kit <the unpacked {name} kit> --site-config <{name}'s site config>)"))  # fmt: skip
    for kit in kits.admins.values():
        print(f"  admin    {kit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
