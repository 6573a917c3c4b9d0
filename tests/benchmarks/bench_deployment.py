"""The real deployment path, measured: kits to first round, idle memory, and round overhead vs the simulator.

In one run on one machine:

1. ``python -m hospital_fedlora.deploy.kits`` (what ``make kits`` runs) into a temporary workspace, with a free port;
2. server and three hospitals started from their kits (``LocalFederation``); idle RSS of every FLARE
   process once all hospitals are connected and no job runs;
3. the plaintext job (shortened) submitted through the FLARE API; time to the server's "Round 0 started";
   peak RSS of the job processes; per-round overhead (round wall time minus the slowest site's whole train
   task, as ``bench_round_overhead.py`` defines it);
4. the same job in the FLARE simulator, for the same overhead figure.

Writes ``<out>/deployment.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hospital_fedlora.deploy.kits import latest_prod_dir  # noqa: E402
from hospital_fedlora_tools.demo import derive_job, run_simulator  # noqa: E402
from hospital_fedlora_tools.local_federation import LocalFederation  # noqa: E402

from bench_round_overhead import round_overheads, summarize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deployment_helpers import free_port, project_with_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]




def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


_ROLES = {
    "nvflare.private.fed.app.server.server_train": "server",
    "nvflare.private.fed.app.client.client_train": "client",
    "nvflare.private.fed.app.server.runner_process": "server_job",
    "nvflare.private.fed.app.client.worker_process": "client_job",
}


def _role(pid: int) -> str | None:
    """Which FLARE process ``pid`` is, from its command line."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return next((role for module, role in _ROLES.items() if module in args), None)


def _rss_by_role(fed: LocalFederation) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for pid in fed.processes():
        role = _role(pid)
        if role:
            out.setdefault(role, []).append(round(_rss_mb(pid), 1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)

    (REPO / "workspace").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "workspace", prefix="bench-deploy-") as tmp:
        tmp = Path(tmp)
        project = project_with_port(free_port())
        (tmp / "project.yml").write_text(yaml.safe_dump(project, sort_keys=False))
        job = derive_job(REPO / "jobs" / "fedlora_plain", tmp, args.rounds, args.steps)

        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "hospital_fedlora.deploy.kits", "--project", str(tmp / "project.yml"),
             "--workspace", str(tmp / "kits"), "--site-configs", str(REPO / "site_configs"), "--plaintext-demo"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        kits_s = time.monotonic() - t0

        first_round_at = None
        peak: dict[str, float] = {}

        def on_progress(ev):
            nonlocal first_round_at
            if ev.event == "round_started" and first_round_at is None:
                first_round_at = time.monotonic()
            for role, values in _rss_by_role(fed).items():
                peak[role] = max(peak.get(role, 0.0), *values)

        fed = LocalFederation(latest_prod_dir(tmp / "kits"), echo=lambda s: None)
        with fed:
            connected_s = time.monotonic() - t0
            time.sleep(10)  # let start-up work settle before calling it idle
            idle = _rss_by_role(fed)
            submitted = time.monotonic()
            job_id = fed.submit(job)
            fed.wait(job_id, on_progress=on_progress, poll_interval=0.5)
            result = fed.download(job_id, tmp / "results")
            job_log = (result / "workspace" / "log.txt").read_text()  # the server's job log
        deployed = summarize(round_overheads(job_log, result / "workspace" / "round_metrics.jsonl"))

        sim_dir = run_simulator(job, tmp / "sim", REPO / "site_configs", show=lambda s: None, plaintext_demo=True)
        simulated = summarize(round_overheads((tmp / "sim.log").read_text(), sim_dir / "round_metrics.jsonl"))

    report = {
        "job": f"jobs/fedlora_plain, {args.rounds} rounds of {args.steps} local steps, 3 hospitals",
        "kits_s": round(kits_s, 1),
        "kits_to_all_connected_s": round(connected_s, 1),
        "submit_to_first_round_s": round(first_round_at - submitted, 1),
        "kits_to_first_round_s": round(first_round_at - t0 - 10, 1),  # less the idle-memory pause
        "idle_rss_mb": idle,
        "peak_rss_mb_during_job": {k: round(v, 1) for k, v in peak.items()},
        "deployed": deployed,
        "simulator": simulated,
        "median_overhead_deployed_minus_simulator_s": round(
            deployed["median_overhead_s"] - simulated["median_overhead_s"], 3
        ),
        "cpu_count": os.cpu_count(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deployment.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "deployment.md", report)
    print(json.dumps(report, indent=2))
    return 0


def write_markdown(path: Path, r: dict) -> None:
    dep, sim = r["deployed"], r["simulator"]
    rows = "\n".join(
        f"| {a['round'] + 1} | {a['wall_s']:.2f} | {a['overhead_s']:.2f} | {b['wall_s']:.2f} | {b['overhead_s']:.2f} |"
        for a, b in zip(dep["rounds"], sim["rounds"])
    )
    overlap = dep["min_overhead_s"] <= sim["max_overhead_s"] and sim["min_overhead_s"] <= dep["max_overhead_s"]
    verdict = "inside the run-to-run spread of either side" if overlap else "outside the run-to-run spread"
    peak = r["peak_rss_mb_during_job"]
    clients = r["idle_rss_mb"]["client"]
    text = f"""# The real deployment path: start-up, memory, round overhead

Written by `tests/benchmarks/bench_deployment.py` with [`deployment.json`](deployment.json). One run on
one machine ({r['cpu_count']} cores), in this order:

1. `python -m hospital_fedlora.deploy.kits` (what `make kits` runs) into a temporary workspace, on a free port;
2. the server and three hospitals started from their kits with their own `startup/start.sh`
   (`LocalFederation`), as separate processes on 127.0.0.1 with mutual TLS;
3. {r['job']}, submitted as `admin@consortium.org` through the FLARE API, followed to
   `FINISHED:COMPLETED`, downloaded;
4. the same job in the FLARE simulator (`nvflare simulator`, 3 sites, 3 threads).

## From `make kits` to the first round

| step | seconds |
|---|---|
| provision + prepare every kit (`nvflare provision`, `local/` files, site configs) | {r['kits_s']:.1f} |
| start server and hospitals until the server lists all three as connected | {r['kits_to_all_connected_s'] - r['kits_s']:.1f} |
| submit until the server logs `Round 0 started` | {r['submit_to_first_round_s']:.1f} |
| **`make kits` to the first round starting** | **{r['kits_to_first_round_s']:.1f}** |

Most of the start-up is FLARE's own: `sub_start.sh` waits 5 s before it first launches the FLARE process,
and the clients then register. From submission to the first round the job is deployed to every site, each
site starts its job process, loads the base model and answers the initial `get_weights` task.

## Memory (RSS)

| process | idle (all connected, no job) | peak during the job |
|---|---|---|
| server (`server_train`) | {max(r['idle_rss_mb']['server']):.0f} MB | {peak.get('server', 0):.0f} MB |
| each hospital (`client_train`) | {min(clients):.0f}-{max(clients):.0f} MB | {peak.get('client', 0):.0f} MB |
| the server's job process (`runner_process`) | - | {peak.get('server_job', 0):.0f} MB |
| a hospital's job process (`worker_process`: base model, LoRA, optimizer) | - | {peak.get('client_job', 0):.0f} MB |

## Round overhead: deployed vs simulator, same job, same run

Overhead = round wall time (server's `Round N started` -> `Round N finished`) minus the slowest site's whole
train task, as defined in `bench_round_overhead.py`: messaging, (de)serialisation, aggregation,
persistence.

| round | deployed wall s | deployed overhead s | simulator wall s | simulator overhead s |
|---|---|---|---|---|
{rows}
| median | {dep['median_wall_s']:.2f} | **{dep['median_overhead_s']:.2f}** | {sim['median_wall_s']:.2f} | **{sim['median_overhead_s']:.2f}** |

The difference of the medians, {r['median_overhead_deployed_minus_simulator_s']:+.2f} s per round, is {verdict}
(deployed {dep['min_overhead_s']:.2f}-{dep['max_overhead_s']:.2f} s, simulator
{sim['min_overhead_s']:.2f}-{sim['max_overhead_s']:.2f} s). Both jobs set the server's
`task_request_interval` to 0.5 s, so sites poll for the next task every half second instead of FLARE's
default 2 s.

Provisioned kits get `local/comm_config.json` with FLARE's streaming settings sized for multi-GB payloads
(see `hospital_fedlora.deploy.kits.COMM_CONFIG`); the adapter in this benchmark is small, so they are not
exercised here. The encrypted adapter's sizes are in [`he_aggregation.md`](he_aggregation.md).
"""
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
