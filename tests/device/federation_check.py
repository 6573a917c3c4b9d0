"""One round of each committed job on provisioned kits on loopback, the hospitals on the device.

The kits are provisioned with a free port, as the deployment tests do, from the site configs the check
wrote (``device_sites.py``); ``--plaintext-demo`` opts the hospitals out of ``privacy.require_encryption``
so the same running federation serves the plaintext job too (as in ``tests/test_he_e2e.py``). Each job is
a copy with one round (``demo.derive_job``), submitted as the admin, followed through the job report, and
its result downloaded for the round's per-site figures.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import yaml

from hospital_fedlora.deploy.kits import make_kits
from hospital_fedlora.protocol import Meta, Metric
from hospital_fedlora.server.job_report import REPORT_META_KEY
from hospital_fedlora.server.round_metrics_log import ROUND_METRICS_FILE
from hospital_fedlora_tools.demo import derive_job
from hospital_fedlora_tools.job_progress import Progress
from hospital_fedlora_tools.local_federation import LocalFederation
from hospital_fedlora_tools.process_table import FederationError

from deployment_helpers import free_port, project_with_port

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


class DeviceMemorySampler:
    """The device's used memory (every process on it: the hospitals' job processes) sampled in a thread."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_mib = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak_mib = max(self.peak_mib or 0.0, (total - free) / MIB)
            self._stop.wait(self.interval)

    def __enter__(self) -> "DeviceMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_rounds(
    work: Path, site_configs: Path, jobs: list[str], local_steps: int, job_timeout: float, cuda: bool,
    log: Callable[[str], None] = print,
) -> dict:  # fmt: skip
    project_file = work / "project.yml"
    project_file.write_text(yaml.safe_dump(project_with_port(free_port()), sort_keys=False))
    started = time.perf_counter()
    kits = make_kits(project_file, work / "kits", site_configs, plaintext_demo=True)
    provision_s = time.perf_counter() - started
    log(f"  kits provisioned in {provision_s:.1f} s: {kits.prod_dir}")
    out: dict = {"provision_s": round(provision_s, 1), "local_steps": local_steps, "jobs": {}}
    memory = DeviceMemorySampler() if cuda else nullcontext()
    started = time.perf_counter()
    with LocalFederation(kits, echo=log) as fed:
        out["startup_s"] = round(time.perf_counter() - started, 1)
        log(f"  server and {len(fed.clients)} hospitals connected after {out['startup_s']} s")
        with memory:
            for name in jobs:
                out["jobs"][name] = one_round(fed, name, work, local_steps, job_timeout, log)
    out["federation_wall_s"] = round(time.perf_counter() - started, 1)  # start, jobs and the stop
    out["gpu_memory_used_peak_mib"] = round(memory.peak_mib, 1) if cuda and memory.peak_mib else None
    out["ok"] = all(j.get("status") == "FINISHED:COMPLETED" and "error" not in j for j in out["jobs"].values())
    return out


def one_round(fed: LocalFederation, name: str, work: Path, local_steps: int, timeout: float, log) -> dict:
    job = derive_job(REPO / "jobs" / name, work / "jobs", num_rounds=1, local_steps=local_steps)
    events: list[Progress] = []

    def progress(p: Progress) -> None:
        events.append(p)
        if p.event == "round_finished":
            log(f"  {name}: round {p.round} finished in {p.round_s:.1f} s")
        elif p.event == "status":
            log(f"  {name}: {p.status} after {p.elapsed_s:.0f} s")

    started = time.perf_counter()
    job_id = fed.submit(job)
    out: dict = {"job_id": job_id}
    try:
        meta = fed.wait(job_id, on_progress=progress, timeout=timeout, poll_interval=0.5)
    except FederationError as err:
        out["error"] = str(err)
        meta = fed.session.get_job_meta(job_id)
        out["job_report"] = meta.get(REPORT_META_KEY)
    out["job_wall_s"] = round(time.perf_counter() - started, 1)
    out["status"] = meta.get("status")
    out["round_wall_s"] = [round(p.round_s, 2) for p in events if p.event == "round_finished"]
    if "error" not in out:
        result = fed.download(job_id, work / "results" / name)
        out["sites"] = site_figures(result / "workspace" / ROUND_METRICS_FILE)
    return out


def site_figures(round_metrics: Path) -> dict:
    """Each hospital's training in the round, as its train result reported it."""
    last = json.loads(round_metrics.read_text().splitlines()[-1])
    figures = {}
    for site, m in sorted(last[Meta.SITE_METRICS].items()):
        figures[site] = {
            "train_tokens": m[Metric.TRAIN_TOKENS],
            "train_s": round(m[Metric.TRAIN_SECONDS], 2),
            "train_tokens_per_s": round(m[Metric.TRAIN_TOKENS] / m[Metric.TRAIN_SECONDS], 1),
            "task_s": round(m[Metric.TASK_SECONDS], 2),
        }
    return figures
