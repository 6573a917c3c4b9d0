"""``make demo`` and ``make demo-sim``: run a job for three hospitals and report what was learnt.

``--mode real`` (``make demo``, the encrypted job by default): the server and three hospitals start from
their provisioned startup kits as separate processes on 127.0.0.1, the admin submits the job through the
FLARE API, follows it round by round, downloads the result, and everything is stopped.
``--mode simulator`` (``make demo-sim``, the plaintext job by default): the same job code in FLARE's
simulator.

Both print progress live, then a per-round table (each site's train and validation loss), and end with
base model versus federated adapter validation loss for every hospital, as each hospital measured it on
its own validation split.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from .kits import PACKAGE_ALLOW_PREFIX, KitError, latest_prod_dir
from .local_federation import FederationError, LocalFederation, Progress, print_progress
from .lora_executor import SITE_CONFIGS_ENV
from .round_metrics_log import ROUND_METRICS_FILE

# The demo runs from a checkout (installed editable from custom/), so the repo is two folders up.
REPO_ROOT = Path(__file__).resolve().parents[2]
SITES = ("hospital-a", "hospital-b", "hospital-c")
# FLARE log lines worth showing live: round boundaries and our executors' progress.
_LIVE = re.compile(r"Round \d+ started|Round \d+ finished|step \d+/\d+|done: train loss|final validation loss|rejected|ERROR")


def derive_job(job_dir: Path, dst: Path, num_rounds: int | None = None, local_steps: int | None = None) -> Path:
    """A copy of ``job_dir`` under ``dst`` with fewer rounds or steps (tests, benchmarks, quick looks)."""
    job = dst / job_dir.name
    shutil.copytree(job_dir, job)
    server = job / "app/config/config_fed_server.json"
    cfg = json.loads(server.read_text())
    if num_rounds is not None:
        next(w for w in cfg["workflows"] if "num_rounds" in w["args"])["args"]["num_rounds"] = num_rounds
    server.write_text(json.dumps(cfg, indent=2))
    client = job / "app/config/config_fed_client.json"
    cfg = json.loads(client.read_text())
    if local_steps is not None:
        cfg["executors"][0]["executor"]["args"]["recipe"]["local_steps"] = local_steps
    client.write_text(json.dumps(cfg, indent=2))
    return job


def run_simulator(job_dir: Path, workspace: Path, sites=SITES, show=print) -> Path:
    """Run ``job_dir`` in the simulator; return the server's run folder."""
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    # The simulator copies <workspace>/local into every site; FLARE 2.9 builds only allow-listed classes.
    (workspace / "local").mkdir()
    allow = list(DEFAULT_CLASS_ALLOW_LIST) + [PACKAGE_ALLOW_PREFIX]
    (workspace / "local" / "resources.json").write_text(json.dumps({"format_version": 2, "class_allow_list": allow}))
    env = dict(os.environ)
    env.setdefault(SITE_CONFIGS_ENV, str(REPO_ROOT / "site_configs"))
    cmd = [
        sys.executable, "-m", "nvflare.cli", "simulator", str(job_dir),
        "-w", str(workspace), "-c", ",".join(sites), "-t", str(len(sites)),
    ]
    log_path = workspace.parent / f"{workspace.name}.log"
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            if _LIVE.search(line):
                show("  " + _shorten(line))
        rc = proc.wait()
    server_run = workspace / "server" / "simulate_job"
    if rc != 0 or not (server_run / "global_adapter").is_dir():
        raise RuntimeError(f"simulator run failed (exit {rc}); full log: {log_path}")
    return server_run


def _shorten(line: str) -> str:
    # FLARE prefixes every line with time, logger and context; keep the site and the message.
    msg = line.rstrip().split(" - ")[-1]
    return msg if msg.startswith("hospital") else f"server: {msg}"


def round_table(run_dir: Path) -> str:
    rows = [json.loads(l) for l in (run_dir / ROUND_METRICS_FILE).read_text().splitlines() if l.strip()]
    sites = sorted({s for r in rows for s in r["site_metrics"]})
    head = f"{'round':>5}  " + "  ".join(f"{s:^27}" for s in sites)
    sub = f"{'':>5}  " + "  ".join(f"{'train':>8} {'val in':>8} {'val out':>8}" for _ in sites)
    lines = [head, sub]
    for r in rows:
        cells = []
        for s in sites:
            m = r["site_metrics"].get(s, {})
            cells.append(f"{m.get('train_loss', float('nan')):8.4f} {m.get('val_loss_global', float('nan')):8.4f} "
                         f"{m.get('val_loss_local', float('nan')):8.4f}")
        lines.append(f"{r['round'] + 1:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def final_comparison(run_dir: Path) -> dict[str, dict]:
    """Each site's own measurement of the final global adapter against the base model."""
    results = json.loads((run_dir / "cross_site_val" / "cross_val_results.json").read_text())
    return {site: models["SRV_global_adapter"] for site, models in results.items()}


def comparison_table(final: dict[str, dict]) -> str:
    lines = [f"{'hospital':<12} {'base model':>10} {'federated':>10} {'change':>8}"]
    for site, m in sorted(final.items()):
        change = (m["val_loss"] - m["base_val_loss"]) / m["base_val_loss"]
        lines.append(f"{site:<12} {m['base_val_loss']:10.4f} {m['val_loss']:10.4f} {change:8.1%}")
    return "\n".join(lines)


def run_real(job_dir: Path, kits_workspace: Path, results: Path, show=print) -> tuple[Path, list[Path]]:
    """Run ``job_dir`` on the latest provisioned kits; return the downloaded server run folder and the
    final adapters (the server's for the plaintext job, each hospital's own for the encrypted one)."""
    prod = latest_prod_dir(kits_workspace)
    show(f"Starting the server and {', '.join(SITES)} from their startup kits in {prod} ...")
    with LocalFederation(prod) as fed:
        job_id = fed.submit(job_dir)
        show(f"Submitted {job_dir.name} as the admin through the FLARE API: job {job_id}")
        metrics_file = fed.kits.server / job_id / ROUND_METRICS_FILE

        def progress(p: Progress) -> None:
            print_progress(p)
            if p.event == "round_finished" and metrics_file.is_file():
                last = json.loads(metrics_file.read_text().splitlines()[-1])
                for site, m in sorted(last["site_metrics"].items()):
                    show(f"           {site}: train loss {m['train_loss']:.4f}, validation loss "
                         f"{m['val_loss_global']:.4f} -> {m['val_loss_local']:.4f}")

        fed.wait(job_id, on_progress=progress)
        run_dir = fed.download(job_id, results) / "workspace"
        adapters = [fed.kits.server / job_id / "global_adapter"] + [
            kit / job_id / "global_adapter" for kit in fed.clients.values()
        ]
    show("Federation stopped; no FLARE process is left.")
    return run_dir, [a for a in adapters if a.is_dir()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("real", "simulator"), default="real")
    p.add_argument("--workspace", type=Path, default=REPO_ROOT / "workspace")
    p.add_argument("--job", type=Path, help="default: jobs/fedlora_he (real), jobs/fedlora_plain (simulator)")
    args = p.parse_args(argv)
    job = args.job or REPO_ROOT / "jobs" / ("fedlora_he" if args.mode == "real" else "fedlora_plain")
    if args.mode == "simulator":
        sim_ws = args.workspace / "simulator" / job.name
        print(f"Running {job.name} in the FLARE simulator with {', '.join(SITES)} (workspace {sim_ws})")
        run_dir = run_simulator(job, sim_ws)
        adapters = [run_dir / "global_adapter"]
    else:
        try:
            run_dir, adapters = run_real(job, args.workspace / "kits", args.workspace / "results")
        except (FederationError, KitError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    print("\nPer round (validation loss of the received global adapter, then after local training):")
    print(round_table(run_dir))
    print("\nFinal global adapter, validation loss measured at each hospital:")
    print(comparison_table(final_comparison(run_dir)))
    print(f"\nServer's job result: {run_dir}")
    print("Final adapter (PEFT format):" + "".join(f"\n  {a}" for a in adapters))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
