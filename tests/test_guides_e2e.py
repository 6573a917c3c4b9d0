"""The guides, run as written: every command block of README.md and docs/*.md, in a sandboxed checkout.

One walkthrough, in the order a consortium lives it: the README's `make demo`, the admin provisioning and
rotating kits, hospital IT placing a site config and starting its site, the server operator starting the
server, the operator driving jobs through the console, `nvflare job` and the FLARE API, loading the adapter,
checking the audit trail, and everyone stopping. Each step runs a guide's block through ``guide_blocks``,
so a guide that drifts from the code fails here. What this sandbox changes, and why:

- the project's port is a free one (the guides say 8002; the test must not collide with anything);
- the jobs are the committed ones shortened to one round of one local step (what the commands do with a
  job does not depend on its length);
- placeholders a reader fills in (``<kits>``, ``<id>``, ``/opt/fl/hospital-a``) get this sandbox's values;
- the site configs hospital IT places by hand (the guides' ``/etc/fl/<site>.yaml``) opt out of
  ``privacy.require_encryption``: the operator guide's commands then submit the plaintext job to them, on
  synthetic data. The committed ones, which ``make demo`` places, keep the gate on.

``ELSEWHERE`` lists the few blocks another test or CI runs, with what ties them together; ``test_guides.py``
checks (without running anything) that every block is named here or there.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import uuid
from pathlib import Path

import pytest
import yaml

import hospital_fedlora
from hospital_fedlora.deploy.kits import find_kits, latest_prod_dir
from hospital_fedlora_tools.process_table import MARKER_VAR, find_marked_processes, terminate

from deployment_helpers import REPO, free_port, project_with_port, wait_until
from guide_blocks import Block, Sandbox, fill, find

pytestmark = pytest.mark.e2e

ADMIN = "admin@consortium.org"
PROJECT = "hospital-fedlora"
JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# (guide, a piece of the block's text) for every block the walkthrough runs, in order.
WALKTHROUGH = [
    ("README.md", "make demo"),
    ("docs/operator.md", "python -m hospital_fedlora.audit verify"),
    ("docs/operator.md", "make demo-real"),
    ("docs/admin.md", "make kits"),
    ("docs/admin.md", "python -m hospital_fedlora.deploy.kits --project provisioning/project.yml --workspace workspace/kits"),
    ("docs/hospital-it.md", "source .venv/bin/activate"),
    ("docs/hospital-it.md", "--kit /opt/fl/hospital-a --site-config"),
    ("docs/server.md", "--kit /opt/fl/server"),
    ("docs/server.md", "bash startup/start.sh"),
    ("docs/hospital-it.md", "bash startup/start.sh"),
    ("docs/operator.md", "printf 'admin@consortium.org\\ncheck_status client"),
    ("docs/operator.md", "bash startup/fl_admin.sh"),
    ("docs/operator.md", "nvflare job submit"),
    ("docs/operator.md", "nvflare job abort"),
    ("docs/operator.md", "new_secure_session("),
    ("docs/operator.md", "PeftModel.from_pretrained"),
    ("docs/hospital-it.md", "shutdown client hospital-a"),
    ("docs/server.md", "shutdown all"),
    ("docs/server.md", "tar -czf"),
    ("docs/server.md", "hospital_fedlora.__version__"),
    ("docs/server.md", "git pull"),
    ("docs/admin.md", "rm workspace/kits/hospital-fedlora/state/bfv_context.tenseal"),
    ("docs/admin.md", "--workspace workspace/kits-2"),
    ("docs/admin.md", "--storage-from"),
    ("docs/server.md", "bash startup/stop_fl.sh"),
]

# Blocks run by another test or by CI: (guide, piece) -> (file that runs it, texts that file must contain).
_RESUME = ("tests/test_faults_e2e.py", ['"-m", "hospital_fedlora.deploy.resume_job", "--admin-kit"', '"--job"', '"--from"'])
ELSEWHERE = {
    ("docs/operator.md", "python -m hospital_fedlora_tools.local_federation"): (
        "Makefile",
        [
            "$(PY) -m hospital_fedlora.deploy.kits --project provisioning/project.yml --workspace $(WORK)/kits-plaintext --site-configs site_configs --plaintext-demo",
            "$(PY) -m hospital_fedlora_tools.local_federation --kits $(WORK)/kits-plaintext --job jobs/fedlora_plain --results $(WORK)/results",
        ],
    ),
    ("docs/operator.md", "python -m hospital_fedlora.deploy.resume_job"): _RESUME,
    ("docs/server.md", "python -m hospital_fedlora.deploy.resume_job"): _RESUME,
    ("docs/operator.md", "python -m hospital_fedlora.inference.generate"): (
        "tests/test_inference.py",
        ['"-m", "hospital_fedlora.inference.generate", "--base-model"', '"--adapter"', '"--prompts"', '"--out"'],
    ),
    ("docs/operator.md", "python -m hospital_fedlora.inference.merge"): (
        "tests/test_inference.py",
        ["from hospital_fedlora.inference.merge import main as merge_main", '"--base-model"', '"--out"'],
    ),
}
# Lines of walkthrough blocks that are not run here, and why.
SKIPPED_LINES = {
    "make test": "the suite this test belongs to: .ci/run runs it on every change",
    "git pull": "the sandbox is not a clone of a remote; the upgrade's `make setup` runs",
}


def _block(guide: str, piece: str) -> Block:
    return find(guide, piece)


# --------------------------------------------------------------------------------------------- sandbox
def _shorten_job(job: Path) -> None:
    server = job / "app" / "config" / "config_fed_server.json"
    cfg = json.loads(server.read_text())
    next(w for w in cfg["workflows"] if "num_rounds" in w["args"])["args"]["num_rounds"] = 1
    server.write_text(json.dumps(cfg, indent=2))
    client = job / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(client.read_text())
    cfg["executors"][0]["executor"]["args"]["recipe"].update(local_steps=1, max_eval_examples=4)
    client.write_text(json.dumps(cfg, indent=2))


def _checkout(root: Path, base_model: Path, data: Path, port: int) -> None:
    """A folder that looks like this repository after `make setup`, `make base-model` and `make data`."""
    root.mkdir(parents=True)
    for name in ("custom", "Makefile", "pyproject.toml"):
        (root / name).symlink_to(REPO / name)
    # The repository's environment, seen as ./.venv; its own .installed so make never reinstalls into it.
    venv = root / ".venv"
    venv.mkdir()
    for entry in (REPO / ".venv").iterdir():
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry)
    (venv / ".installed").touch()
    shutil.copytree(REPO / "site_configs", root / "site_configs")
    (root / "etc").mkdir()  # same depth as site_configs/: their relative paths hold
    for config in (REPO / "site_configs").glob("*.yaml"):
        text = config.read_text()
        assert "  require_encryption: true" in text, config
        opted_out = "  require_encryption: false  # the operator walkthrough runs jobs/fedlora_plain on synthetic data"
        (root / "etc" / config.name).write_text(text.replace("  require_encryption: true", opted_out))
    (root / "provisioning").mkdir()
    (root / "provisioning" / "project.yml").write_text(yaml.safe_dump(project_with_port(port), sort_keys=False))
    shutil.copytree(REPO / "jobs", root / "jobs")
    for job in ("fedlora_he", "fedlora_plain"):
        _shorten_job(root / "jobs" / job)
    (root / "workspace").mkdir()
    (root / "workspace" / "base_model").symlink_to(base_model)
    (root / "workspace" / "data").symlink_to(data)


@pytest.fixture
def sandbox(tmp_path, base_model_dir, data_dir):
    root = tmp_path / "checkout"
    _checkout(root, Path(base_model_dir), Path(data_dir), free_port())
    token = uuid.uuid4().hex
    box = Sandbox.create(root, (MARKER_VAR, token))
    yield box
    left = find_marked_processes(token)
    terminate(token, [])
    assert not left, f"processes the guides' commands started were still running at the end: {left}"


def _session(admin_kit: Path):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    return wait_until(lambda: _try_session(admin_kit, new_secure_session), 120, "the admin's FLARE API session")


def _try_session(admin_kit, new_secure_session):
    try:
        return new_secure_session(ADMIN, str(admin_kit), timeout=5.0)
    except Exception:
        return None


# ----------------------------------------------------------------------------------------- walkthrough
def _run_lines(box: Sandbox, block: Block, values: dict[str, str] | None = None, **kw) -> str:
    """Run ``block`` without its SKIPPED_LINES; return its output."""
    kept = [line for line in block.text.splitlines() if not any(line.strip().startswith(s) for s in SKIPPED_LINES)]
    return box.run_text(block, fill("\n".join(kept), values or {}, block), **kw).stdout


def _unpack(kit: Path, where: Path) -> Path:
    """A kit as its owner unpacks it, at a place of their own."""
    shutil.copytree(kit, where)
    return where


def _wait_gone(box: Sandbox, what: str) -> None:
    wait_until(lambda: not find_marked_processes(box.env[MARKER_VAR]), 120, what)


def test_every_guide_command_runs_as_written(sandbox: Sandbox):
    box = sandbox
    kits_ws = box.root / "workspace" / "kits"
    opt = box.root / "opt" / "fl"  # the guides' /opt/fl: where owners unpack their kits

    # README: the main job on the built-in default (the encrypted job on kits on loopback), then the audit.
    out = _run_lines(box, _block("README.md", "make demo"), timeout=600)
    assert "Federation stopped; no FLARE process is left." in out
    demo_job = JOB_ID.search(out.split("as the admin through the FLARE API: job ")[1]).group(0)
    assert latest_prod_dir(kits_ws, PROJECT).name == "prod_00"
    verify = _block("docs/operator.md", "python -m hospital_fedlora.audit verify")
    out = box.run(verify, {JOB_ID.search(verify.text).group(0): demo_job}).stdout
    assert f"verified: job {demo_job}" in out
    out = box.run(_block("docs/operator.md", "make demo-real"), timeout=600).stdout
    assert "FINISHED:COMPLETED" in out and "federation stopped; no processes left" in out
    _wait_gone(box, "the one-machine demos to stop")

    # Admin: provisions (as `make kits`, then by hand without any hospital's data paths) and hands out kits.
    box.run(_block("docs/admin.md", "make kits"))
    box.run(_block("docs/admin.md", "python -m hospital_fedlora.deploy.kits --project provisioning/project.yml --workspace workspace/kits"))
    handed_out = find_kits(latest_prod_dir(kits_ws, PROJECT))
    assert not (handed_out.clients["hospital-a"] / "local" / "site_config.yaml").exists()

    # Hospital IT at each hospital: install, unpack the kit, place the site config.
    _run_lines(box, _block("docs/hospital-it.md", "source .venv/bin/activate"))
    sites = {}
    for site, kit in handed_out.clients.items():
        sites[site] = _unpack(kit, opt / site)
        box.run(
            _block("docs/hospital-it.md", "--kit /opt/fl/hospital-a --site-config"),
            {"/opt/fl/hospital-a": str(sites[site]), "/etc/fl/hospital-a.yaml": str(box.root / "etc" / f"{site}.yaml")},
        )
        assert (sites[site] / "local" / "site_config.yaml").is_file()

    # The server operator: unpack, prepare, start. Then every hospital starts its site.
    server = _unpack(handed_out.server, opt / "server")
    _run_lines(box, _block("docs/server.md", "--kit /opt/fl/server"), {"/opt/fl/server": str(server)})
    box.run(_block("docs/server.md", "bash startup/start.sh"), {"/opt/fl/server": str(server)})
    for kit in sites.values():
        box.run(_block("docs/hospital-it.md", "bash startup/start.sh"), {"/opt/fl/hospital-a": str(kit)})
    admin_kit = handed_out.admins[ADMIN]
    session = _session(admin_kit)
    try:
        wait_until(lambda: {c.name for c in session.get_connected_client_list()} >= set(sites), 180, "all sites")
    finally:
        session.close()

    # Operator: the console, scripted and interactive; `nvflare job` line by line (later lines need the
    # id the first prints); the FLARE API; the adapter loaded with peft.
    out = box.run(_block("docs/operator.md", "printf 'admin@consortium.org\\ncheck_status client"), cwd=admin_kit).stdout
    assert all(site in out for site in sites), out
    box.run(_block("docs/operator.md", "bash startup/fl_admin.sh"), cwd=admin_kit, stdin=f"{ADMIN}\nbye\n")
    job_cli = _block("docs/operator.md", "nvflare job submit")
    values = {"<kits>": str(handed_out.prod_dir)}
    lines = [line for line in job_cli.text.splitlines() if line.strip()]
    out = box.run_text(job_cli, fill(lines[0], values, job_cli)).stdout
    values["<id>"] = JOB_ID.search(out).group(0)
    for line in lines[1:]:
        box.run_text(job_cli, fill(line, values, job_cli))
    box.run(_block("docs/operator.md", "PeftModel.from_pretrained"), {"<id>": values["<id>"]})
    out = box.run_text(job_cli, fill(lines[0], values, job_cli)).stdout  # a second job, to be stopped
    stopped = JOB_ID.search(out).group(0)
    box.run(_block("docs/operator.md", "nvflare job abort"), {**values, "<id>": stopped})
    wait_until(lambda: _status(admin_kit, stopped) == "FINISHED:ABORTED", 120, f"job {stopped} to be aborted")
    api = box.run(_block("docs/operator.md", "new_secure_session("), values, timeout=600).stdout
    downloaded = Path(api.strip().splitlines()[-1])
    api_job = downloaded.name
    assert (downloaded / "workspace" / "global_adapter" / "adapter_model.safetensors").is_file()

    # Stopping: a hospital's org admin stops its site, the server operator the rest; then backup, versions
    # and the upgrade's set-up, with everything stopped.
    box.run(_block("docs/hospital-it.md", "shutdown client hospital-a"), cwd=handed_out.admins["admin@hospital-a.org"])
    wait_until(lambda: _session_clients(admin_kit) == {"hospital-b", "hospital-c"}, 120, "hospital-a to leave")
    box.run(_block("docs/server.md", "shutdown all"), cwd=admin_kit)
    _wait_gone(box, "shutdown all to stop the server and every hospital")
    backups = box.root / "backups"
    backups.mkdir()
    box.run(_block("docs/server.md", "tar -czf"), {"/opt/fl/server": str(server), "/var/backups": str(backups)})
    with tarfile.open(next(backups.glob("fl-server-*.tar.gz"))) as tar:
        assert f"storage/jobs-storage/{api_job}/meta" in tar.getnames()
    out = box.run(_block("docs/server.md", "hospital_fedlora.__version__")).stdout
    assert out.split()[0] == hospital_fedlora.__version__
    _run_lines(box, _block("docs/server.md", "git pull"))

    # Admin: new encryption keys, then everything rotated; the new server kit takes the old one's history.
    old_key = (kits_ws / PROJECT / "state" / "bfv_context.tenseal").read_bytes()
    box.run(_block("docs/admin.md", "rm workspace/kits/hospital-fedlora/state/bfv_context.tenseal"))
    assert (kits_ws / PROJECT / "state" / "bfv_context.tenseal").read_bytes() != old_key
    box.run(_block("docs/admin.md", "--workspace workspace/kits-2"))
    assert latest_prod_dir(box.root / "workspace" / "kits-2", PROJECT).name == "prod_00"
    new_server = _unpack(find_kits(latest_prod_dir(kits_ws, PROJECT)).server, opt / "server-new")
    box.run(_block("docs/admin.md", "--storage-from"), {"/opt/fl/server-new": str(new_server), "/opt/fl/server": str(server)})
    box.run(_block("docs/server.md", "bash startup/start.sh"), {"/opt/fl/server": str(new_server)})
    new_admin = find_kits(latest_prod_dir(kits_ws, PROJECT)).admins[ADMIN]
    session = _session(new_admin)
    try:
        assert api_job in {j["job_id"] for j in session.list_jobs()}
    finally:
        session.close()
    box.run(_block("docs/server.md", "bash startup/stop_fl.sh"), {"/opt/fl/server": str(new_server)}, stdin="y")
    _wait_gone(box, "stop_fl.sh to stop the server")
    not_run = [str(b) for b in (find(g, p) for g, p in WALKTHROUGH) if b not in box.ran]
    assert not not_run, f"walkthrough blocks this test did not run: {not_run}"


def _status(admin_kit: Path, job_id: str) -> str:
    session = _session(admin_kit)
    try:
        return session.get_job_meta(job_id)["status"]
    finally:
        session.close()


def _session_clients(admin_kit: Path) -> set[str]:
    session = _session(admin_kit)
    try:
        return {c.name for c in session.get_connected_client_list()}
    finally:
        session.close()
