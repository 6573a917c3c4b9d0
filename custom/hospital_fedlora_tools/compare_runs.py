"""``make compare``'s federated settings and the bytes each setting moves per round.

The plaintext job runs in FLARE's simulator (as ``make demo-sim``); both encrypted settings run on one set
of kits provisioned into the compare workspace, started once on 127.0.0.1, the int16 and the int8 job
submitted together (as ``make demo`` submits one). Jobs are derived copies: the committed ones are never edited. Bytes per round
come from the jobs' own filters on the tiny model's adapter shapes, through the HE benchmark's round
(``tests/benchmarks/bench_he_aggregation.py``: the tools run from a checkout, so ``tests/`` is there).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from hospital_fedlora.adapter_files import GLOBAL_ADAPTER_DIR
from hospital_fedlora.deploy.kits import make_kits
from hospital_fedlora.protocol import Meta, Metric
from hospital_fedlora.server.round_metrics_log import ROUND_METRICS_FILE

from .demo import derive_job, run_simulator
from .local_federation import LocalFederation

REPO = Path(__file__).resolve().parents[2]
HE_BITS = {"federated_he_int16": 16, "federated_he_int8": 8}


@dataclass
class FederatedRun:
    adapters: list[Path]  # the final global adapter(s): the server's (plaintext) or every hospital's (HE)
    rounds: list[dict]  # round_metrics.jsonl rows
    run_dir: Path  # the server's run folder: tb_events/<site>/ (TensorBoard) and metrics.csv, streamed each round


def _derive(jobs: Path, name: str, dst: Path, rounds: int, steps: int) -> Path:
    shutil.rmtree(dst, ignore_errors=True)  # an earlier compare's copy
    return derive_job(jobs / name, dst, rounds, steps)


def _edit_client(job: Path, recipe: Mapping | None = None, packing_bits: int | None = None) -> Path:
    path = job / "app/config/config_fed_client.json"
    cfg = json.loads(path.read_text())
    cfg["executors"][0]["executor"]["args"]["recipe"].update(recipe or {})
    if packing_bits is not None:
        enc = next(c for c in cfg["components"] if c["id"] == "site_encryption")
        enc["args"]["packing"]["bits"] = packing_bits
    path.write_text(json.dumps(cfg, indent=2))
    return job


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def validation_curve(rows: list[dict]) -> dict[str, list[float]]:
    """Each hospital's validation loss of the global adapter it received in rounds 0..R-1 (after 0..R-1
    rounds); the caller appends the final adapter's (after R rounds)."""
    sites = sorted({s for r in rows for s in r[Meta.SITE_METRICS]})
    return {s: [r[Meta.SITE_METRICS].get(s, {}).get(Metric.VAL_LOSS_GLOBAL, float("nan")) for r in rows] for s in sites}


def run_plaintext(jobs: Path, work: Path, site_configs: Path, rounds: int, steps: int, recipe: dict,
                  show: Callable[[str], None] = print) -> FederatedRun:  # fmt: skip
    job = _edit_client(_derive(jobs, "fedlora_plain", work / "jobs_plain", rounds, steps), recipe)
    run_dir = run_simulator(job, work / "simulator", site_configs, show=show, plaintext_demo=True)
    return FederatedRun([run_dir / GLOBAL_ADAPTER_DIR], _rows(run_dir / ROUND_METRICS_FILE), run_dir)


def run_encrypted(jobs: Path, work: Path, project: Path, site_configs: Path, rounds: int, steps: int,
                  recipe: dict, show: Callable[[str], None] = print) -> dict[str, FederatedRun]:  # fmt: skip
    """Both HE settings on one federation of freshly provisioned kits (as ``make kits``), both jobs submitted together."""
    kits = make_kits(project, work / "kits", site_configs)
    out = {}
    with LocalFederation(kits.prod_dir, echo=show) as fed:
        # Both jobs submitted at once: the server runs them side by side, so their start-up overlaps.
        ids = {}
        for name, bits in HE_BITS.items():
            job = _edit_client(_derive(jobs, "fedlora_he", work / f"jobs_{name}", rounds, steps), recipe, bits)
            ids[name] = fed.submit(job)
            show(f"{name}: job {ids[name]} ({bits}-bit packing)")
        for name, job_id in ids.items():
            fed.wait(job_id, on_progress=lambda p: None)
            run_dir = fed.download(job_id, work / f"results_{name}") / "workspace"
            adapters = [kit / job_id / GLOBAL_ADAPTER_DIR for kit in fed.clients.values()]
            out[name] = FederatedRun([a for a in adapters if a.is_dir()], _rows(run_dir / ROUND_METRICS_FILE), run_dir)
    return out


def bytes_per_round(initial: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Upload and download per site per round for each federated setting, through the jobs' filters, on
    the adapter shapes of ``initial`` (differences of the benchmark's typical size; sizes do not depend on
    the values). Local-only and centralized move nothing."""
    bench = REPO / "tests" / "benchmarks"
    for p in (str(bench), str(bench.parent)):
        if p not in sys.path:
            sys.path.insert(0, p)
    from bench_he_aggregation import EXAMPLES, PACKED, SHIPPED, packed_job, plain_job, run_round, site_diffs
    from nvflare.app_common.decomposers import common_decomposers

    from hospital_fedlora.adapter_layout import AdapterLayout
    from hospital_fedlora.he.bfv_context import BFVParams, make_context, serialize_context

    common_decomposers.register()
    shapes = {k: tuple(v.shape) for k, v in initial.items()}
    diffs = site_diffs(shapes, 0)
    layout = AdapterLayout.from_tensors(diffs[0])
    flat = [layout.flatten({k: torch.from_numpy(v) for k, v in d.items()}).double() for d in diffs]
    truth = (sum(c * f for c, f in zip(EXAMPLES, flat)) / sum(EXAMPLES)).numpy()
    made = make_context(BFVParams(), n_threads=1)
    keys = {"client": serialize_context(made, secret=True), "server": serialize_context(made, secret=False)}
    jobs = {"federated": lambda t: plain_job(t, {k: np.zeros(s, np.float32) for k, s in shapes.items()}, transport=True),
            "federated_he_int16": lambda t: packed_job(t, keys, PACKED["packed_bfv_int16"], dict(SHIPPED)),
            "federated_he_int8": lambda t: packed_job(t, keys, PACKED["packed_bfv_int8"], dict(SHIPPED))}  # fmt: skip
    out = {"local_only": {"up_bytes_per_site": 0, "down_bytes_per_site": 0},
           "centralized": {"up_bytes_per_site": 0, "down_bytes_per_site": 0}}  # fmt: skip
    for name, make in jobs.items():
        with tempfile.TemporaryDirectory(prefix="compare_bytes_") as tmp:
            r = run_round(make(Path(tmp)), diffs, layout, truth)
        out[name] = {"up_bytes_per_site": round(r["up_bytes_per_site"]), "down_bytes_per_site": r["down_bytes_per_site"],
                     "up_ciphertext_bytes_per_site": round(r["up_ciphertext_bytes_per_site"]) or None,
                     "relative_l2_error_of_aggregate": r["relative_l2_error"]}  # fmt: skip
    return out
