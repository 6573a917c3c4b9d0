"""``make demo`` and ``make demo-sim``: run a job for three hospitals and report what was learnt.

``--mode real`` (``make demo``, the encrypted job by default): the server and three hospitals start from
their provisioned startup kits as separate processes on 127.0.0.1, the admin submits the job through the
FLARE API, follows it round by round, downloads the result, and everything is stopped.
``--mode simulator`` (``make demo-sim``, the plaintext job by default): the same job code in FLARE's
simulator. ``--plaintext-demo`` (``make demo-sim`` passes it) runs the simulator's hospitals on copies of
the site configs that opt out of ``privacy.require_encryption``, saying why; the committed ones keep it on.

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

from hospital_fedlora.adapter_files import GLOBAL_ADAPTER_DIR
from hospital_fedlora.deploy.kits import PACKAGE_ALLOW_PREFIX, KitError, latest_prod_dir, write_site_config
from hospital_fedlora.protocol import Meta, Metric
from hospital_fedlora.server.round_metrics_log import ROUND_METRICS_FILE
from hospital_fedlora.site.site_settings import SITE_CONFIGS_ENV

from .demo_answers import answers_report
from .job_progress import Progress, print_progress
from .local_federation import LocalFederation
from .process_table import FederationError

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


def plaintext_demo_configs(site_configs: Path, dest: Path, sites=SITES) -> Path:
    """Copies of ``<site_configs>/<site>.yaml`` in ``dest``, paths absolute, opted out of encryption."""
    dest.mkdir(parents=True, exist_ok=True)
    for site in sites:
        source = Path(site_configs) / f"{site}.yaml"
        header = f"# {site}'s site configuration for the simulator, from {source.resolve()} (paths resolved).\n"
        write_site_config(source, dest / f"{site}.yaml", header, plaintext_demo=True)
    return dest


def run_simulator(
    job_dir: Path, workspace: Path, site_configs: Path, sites=SITES, show=print, plaintext_demo: bool = False
) -> Path:
    """Run ``job_dir`` in the simulator with the site configs in ``site_configs`` (opted out of encryption
    with ``plaintext_demo``); return the server's run folder."""
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    if plaintext_demo:  # beside the workspace, as the log: the simulator starts its workspace afresh
        site_configs = plaintext_demo_configs(site_configs, workspace.parent / f"{workspace.name}.site_configs", sites)
    # The simulator copies <workspace>/local into every site; FLARE 2.9 builds only allow-listed classes.
    (workspace / "local").mkdir()
    allow = list(DEFAULT_CLASS_ALLOW_LIST) + [PACKAGE_ALLOW_PREFIX]
    (workspace / "local" / "resources.json").write_text(json.dumps({"format_version": 2, "class_allow_list": allow}))
    env = dict(os.environ)
    env.setdefault(SITE_CONFIGS_ENV, str(Path(site_configs).resolve()))
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
    if rc != 0 or not (server_run / GLOBAL_ADAPTER_DIR).is_dir():
        raise RuntimeError(f"simulator run failed (exit {rc}); full log: {log_path}")
    return server_run


def _shorten(line: str) -> str:
    # FLARE prefixes every line with time, logger and context; keep the site and the message.
    msg = line.rstrip().split(" - ")[-1]
    return msg if msg.startswith("hospital") else f"server: {msg}"


def round_table(run_dir: Path) -> str:
    rows = [json.loads(l) for l in (run_dir / ROUND_METRICS_FILE).read_text().splitlines() if l.strip()]
    sites = sorted({s for r in rows for s in r[Meta.SITE_METRICS]})
    head = f"{'round':>5}  " + "  ".join(f"{s:^27}" for s in sites)
    sub = f"{'':>5}  " + "  ".join(f"{'train':>8} {'val in':>8} {'val out':>8}" for _ in sites)
    lines = [head, sub]
    for r in rows:
        cells = []
        for s in sites:
            m = r[Meta.SITE_METRICS].get(s, {})
            losses = (m.get(k, float("nan")) for k in (Metric.TRAIN_LOSS, Metric.VAL_LOSS_GLOBAL, Metric.VAL_LOSS_LOCAL))
            cells.append(" ".join(f"{v:8.4f}" for v in losses))
        lines.append(f"{r[Meta.ROUND]:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def final_comparison(run_dir: Path) -> dict[str, dict]:
    """Each site's own measurement of the final global adapter against the base model."""
    results = json.loads((run_dir / "cross_site_val" / "cross_val_results.json").read_text())
    return {site: models[f"SRV_{GLOBAL_ADAPTER_DIR}"] for site, models in results.items()}


def comparison_table(final: dict[str, dict]) -> str:
    """Validation loss, then the test split's diagnosis-group exact match and ROUGE-L: base model -> federated."""
    lines = [f"{'hospital':<12} {'base model':>10} {'federated':>10} {'change':>8}   {'exact match':>15}   {'ROUGE-L':>13}"]
    for site, m in sorted(final.items()):
        base, tuned = m[Metric.BASE_VAL_LOSS], m[Metric.VAL_LOSS]
        em = _pair(m, "test_exact_match", "{:.0%}")
        rouge = _pair(m, "test_rouge_l", "{:.2f}")
        lines.append(f"{site:<12} {base:10.4f} {tuned:10.4f} {(tuned - base) / base:8.1%}   {em:>15}   {rouge:>13}")
    return "\n".join(lines)


def _pair(m: dict, key: str, fmt: str) -> str:
    if key not in m or f"base_{key}" not in m:
        return "-"
    return f"{fmt.format(m['base_' + key])} -> {fmt.format(m[key])}"


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
                for site, m in sorted(last[Meta.SITE_METRICS].items()):
                    show(f"           {site}: train loss {m[Metric.TRAIN_LOSS]:.4f}, validation loss "
                         f"{m[Metric.VAL_LOSS_GLOBAL]:.4f} -> {m[Metric.VAL_LOSS_LOCAL]:.4f}")

        fed.wait(job_id, on_progress=progress)
        run_dir = fed.download(job_id, results) / "workspace"
        adapters = [fed.kits.server / job_id / GLOBAL_ADAPTER_DIR] + [
            kit / job_id / GLOBAL_ADAPTER_DIR for kit in fed.clients.values()
        ]
    show("Federation stopped; no FLARE process is left.")
    return run_dir, [a for a in adapters if a.is_dir()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("real", "simulator"), default="real")
    p.add_argument("--workspace", type=Path, default=Path("workspace"), help="runtime state (git-ignored)")
    p.add_argument("--jobs", type=Path, default=Path("jobs"), help="the repository's jobs folder")
    p.add_argument("--site-configs", type=Path, default=Path("site_configs"), help="simulator: one <site>.yaml each")
    p.add_argument("--job", type=Path, help="default: <jobs>/fedlora_he (real), <jobs>/fedlora_plain (simulator)")
    p.add_argument("--plaintext-demo", action="store_true",
                   help="simulator: the hospitals opt out of privacy.require_encryption (synthetic data only)")  # fmt: skip
    args = p.parse_args(argv)
    job = args.job or args.jobs / ("fedlora_he" if args.mode == "real" else "fedlora_plain")
    if args.mode == "simulator":
        sim_ws = args.workspace / "simulator" / job.name
        print(f"Running {job.name} in the FLARE simulator with {', '.join(SITES)} (workspace {sim_ws})")
        run_dir = run_simulator(job, sim_ws, args.site_configs, plaintext_demo=args.plaintext_demo)
        adapters = [run_dir / GLOBAL_ADAPTER_DIR]
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
    if adapters and (args.workspace / "data").is_dir():
        print("\nWhat the federated adapter answers (greedy), beside the gold answer and the base model:")
        print(answers_report(args.workspace / "base_model", adapters[-1], args.workspace / "data", SITES))
    print(f"\nServer's job result: {run_dir}")
    print("Final adapter (PEFT format):" + "".join(f"\n  {a}" for a in adapters))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
