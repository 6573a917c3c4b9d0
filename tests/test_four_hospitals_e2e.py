"""A fourth hospital joins with no job edit: both committed jobs run on four provisioned kits.

The committed project gets ``hospital-d`` (as docs/admin.md "Add or remove a hospital" says: one more
client in project.yml, one more site config), every kit starts on loopback, and ``jobs/fedlora_he`` and
``jobs/fedlora_plain`` run shortened only in rounds, steps and evaluation examples: ``min_clients``, the
wait after it and everything else about the sites stay as committed. Every round must aggregate all four
hospitals, and all four must hold the same final adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from hospital_fedlora.audit.chain import AUDIT_DIR, AUDIT_FILE
from hospital_fedlora.he.log_persistor import LOG_DIR, LOG_INDEX
from hospital_fedlora.protocol import Meta
from hospital_fedlora.server.round_metrics_log import ROUND_METRICS_FILE
from hospital_fedlora_tools.local_federation import LocalFederation

from deployment_helpers import REPO, SITES, free_port, provision_into, write_site_configs

pytestmark = pytest.mark.e2e

NEW = "hospital-d"
HOSPITALS = sorted((*SITES, NEW))
JOBS = ("fedlora_he", "fedlora_plain")
ROUNDS, STEPS, EVAL_EXAMPLES = 2, 2, 8
NEW_TRAIN = 100  # hospital-d's training records: a count no other hospital has, so its weight shows


def shortened(name: str, dest: Path) -> Path:
    """The committed job with fewer rounds, steps and evaluation examples, as ``small_job`` shortens it."""
    job = dest / name
    shutil.copytree(REPO / "jobs" / name, job)
    server = job / "app" / "config" / "config_fed_server.json"
    cfg = json.loads(server.read_text())
    next(w for w in cfg["workflows"] if w["id"] == "scatter_and_gather")["args"]["num_rounds"] = ROUNDS
    server.write_text(json.dumps(cfg, indent=2))
    client = job / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(client.read_text())
    cfg["executors"][0]["executor"]["args"]["recipe"].update(local_steps=STEPS, max_eval_examples=EVAL_EXAMPLES)
    client.write_text(json.dumps(cfg, indent=2))
    return job


def fourth_hospital_data(folder: Path, data_dir: Path) -> Path:
    """hospital-d's data: the first records of hospital-c's splits (the generator makes three hospitals)."""
    site = folder / NEW
    site.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        lines = (data_dir / "hospital-c" / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (site / f"{split}.jsonl").write_text("".join(lines[:NEW_TRAIN] if split == "train" else lines))
    return folder


def train_counts(data_dir: Path) -> dict[str, int]:
    counts = {s: sum(1 for _ in open(data_dir / s / "train.jsonl")) for s in SITES}
    return {**counts, NEW: NEW_TRAIN}


@pytest.fixture(scope="module")
def four(tmp_path_factory, base_model_dir, data_dir):
    """Four hospitals' kits, both jobs run on them, the federation stopped: job ids, metas, results."""
    root = tmp_path_factory.mktemp("four_hospitals")
    opted_out = {"require_encryption": False}  # they run jobs/fedlora_plain too (synthetic data)
    configs = write_site_configs(root / "site_configs", Path(base_model_dir), Path(data_dir), privacy=opted_out)
    write_site_configs(
        root / "site_configs", Path(base_model_dir), fourth_hospital_data(root / "data", Path(data_dir)), sites=(NEW,), privacy=opted_out
    )
    kits = provision_into(root / "provisioning", free_port(), configs, extra_clients=(NEW,))
    assert sorted(kits.clients) == HOSPITALS
    runs = {}
    with LocalFederation(kits, echo=lambda s: None) as fed:
        for name in JOBS:
            job_id = fed.submit(shortened(name, root / "jobs"))
            meta = fed.wait(job_id, on_progress=None, timeout=600)
            result = fed.download(job_id, root / "results" / name)
            runs[name] = {"job_id": job_id, "meta": meta, "run": result / "workspace"}
    assert not fed.processes(), "processes left after the federation stopped"
    return {"kits": kits, "runs": runs}


def test_the_jobs_ran_as_committed_apart_from_their_length(tmp_path):
    for name in JOBS:
        job = shortened(name, tmp_path)
        assert json.loads((job / "meta.json").read_text()) == json.loads((REPO / "jobs" / name / "meta.json").read_text())
        server = json.loads((job / "app/config/config_fed_server.json").read_text())
        committed = json.loads((REPO / "jobs" / name / "app/config/config_fed_server.json").read_text())
        next(w for w in server["workflows"] if w["id"] == "scatter_and_gather")["args"]["num_rounds"] = "any"
        next(w for w in committed["workflows"] if w["id"] == "scatter_and_gather")["args"]["num_rounds"] = "any"
        assert server == committed, name


@pytest.mark.parametrize("job", JOBS)
def test_both_jobs_complete_with_every_round_aggregating_all_four(four, data_dir, job):
    run = four["runs"][job]
    assert run["meta"]["status"] == "FINISHED:COMPLETED"
    rounds = [json.loads(line) for line in (run["run"] / ROUND_METRICS_FILE).read_text().splitlines()]
    assert [r[Meta.ROUND] for r in rounds] == list(range(ROUNDS))
    for r in rounds:
        assert r[Meta.EXAMPLE_COUNTS] == train_counts(Path(data_dir)), r[Meta.ROUND]
        assert sorted(r[Meta.SITE_METRICS]) == HOSPITALS, r[Meta.ROUND]
    # The audit log's record of each round: who answered, who did not, whose contributions were summed.
    audit = [json.loads(line) for line in (run["run"] / AUDIT_DIR / AUDIT_FILE).read_text().splitlines()]
    assert next(e for e in audit if e["event"] == "run_started")["sites"] == HOSPITALS
    gathered = [e for e in audit if e["event"] == "gathered"]
    assert [(e["round"], e["answered"], e["silent"]) for e in gathered] == [(r, HOSPITALS, []) for r in range(ROUNDS)]
    aggregates = [e for e in audit if e["event"] == "aggregate"]
    assert [(e["round"], e["participants"]) for e in aggregates] == [(r, HOSPITALS) for r in range(ROUNDS)]
    assert not [e for e in audit if e["event"] == "contribution" and not e["accepted"]]
    log = (run["run"] / "log.txt").read_text()
    assert "closes without" not in log and "rejected contribution" not in log


def test_the_encrypted_log_sums_all_four_every_round(four, data_dir):
    log = four["runs"]["fedlora_he"]["run"] / LOG_DIR / LOG_INDEX
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e[Meta.ROUND] for e in entries] == list(range(ROUNDS))
    for e in entries:
        assert e[Meta.N_SITES] == 4 and e[Meta.EXAMPLE_COUNTS] == train_counts(Path(data_dir)), e[Meta.ROUND]


@pytest.mark.parametrize("job", JOBS)
def test_all_four_hospitals_hold_the_same_final_adapter(four, job):
    job_id = four["runs"][job]["job_id"]
    weights = {
        s: load_file(str(four["kits"].clients[s] / job_id / "global_adapter" / "adapter_model.safetensors")) for s in HOSPITALS
    }
    first = weights[HOSPITALS[0]]
    assert any("lora_B" in k and np.abs(v).max() > 0 for k, v in first.items())  # trained: LoRA B starts at 0
    for s in HOSPITALS[1:]:
        assert weights[s].keys() == first.keys(), s
        for k in first:
            np.testing.assert_array_equal(weights[s][k], first[k], err_msg=f"{job} {s} {k}")
