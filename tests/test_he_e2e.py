"""The encrypted job end to end on real processes (provisioned kits on loopback), against the plaintext job.

Both committed jobs, shortened to the same rounds and steps, run one after the other on the same
federation with the same seeds. The encrypted run must finish, leave only ciphertexts on the server,
give every hospital the same final adapter in PEFT format, and score within 1e-4 (relative) of the
plaintext run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from hospital_fedlora.config import TrainingRecipe
from hospital_fedlora.he.log_persistor import LOG_DIR, LOG_INDEX
from hospital_fedlora.protocol import Meta
from hospital_fedlora_tools.demo import derive_job, final_comparison
from hospital_fedlora_tools.process_table import FederationError

from deployment_helpers import REPO, SITES

pytest_plugins = ["federation_fixtures"]

pytestmark = pytest.mark.e2e

ROUNDS, STEPS = 2, 4


@pytest.fixture(scope="module")
def runs(federation, tmp_path_factory):
    """{job name: {job_id, result (downloaded server workspace)}} for the HE and the plaintext job."""
    jobs = tmp_path_factory.mktemp("he_vs_plain")
    out = {}
    for name in ("fedlora_he", "fedlora_plain"):
        job = derive_job(REPO / "jobs" / name, jobs, num_rounds=ROUNDS, local_steps=STEPS)
        job_id = federation.submit(job)
        meta = federation.wait(job_id, on_progress=None)
        result = federation.download(job_id, tmp_path_factory.mktemp(f"results_{name}"))
        out[name] = {"job_id": job_id, "meta": meta, "run": result / "workspace"}
    return out


def train_counts(data_dir: Path) -> dict[str, int]:
    return {s: sum(1 for _ in open(data_dir / s / "train.jsonl")) for s in SITES}


def test_encrypted_job_completes(runs):
    assert runs["fedlora_he"]["meta"]["status"] == "FINISHED:COMPLETED"


def test_server_result_holds_only_the_encrypted_log(runs, data_dir):
    run = runs["fedlora_he"]["run"]
    log = run / LOG_DIR
    assert sorted(p.name for p in log.iterdir()) == [LOG_INDEX, "round_000.bfv", "round_001.bfv"]
    lines = [json.loads(l) for l in (log / LOG_INDEX).read_text().splitlines()]
    assert [l[Meta.ROUND] for l in lines] == [0, 1]
    for line in lines:
        assert hashlib.sha256((log / line["file"]).read_bytes()).hexdigest() == line["sha256"]
        assert line[Meta.EXAMPLE_COUNTS] == train_counts(data_dir) and line[Meta.N_SITES] == 3
    assert not (run / "global_adapter").exists()
    assert not list(run.rglob("*.safetensors"))
    rounds = [json.loads(l) for l in (run / "round_metrics.jsonl").read_text().splitlines()]
    assert [r[Meta.ROUND] for r in rounds] == [0, 1] and all(set(r[Meta.SITE_METRICS]) == set(SITES) for r in rounds)


def test_server_never_had_a_secret_key_and_accepted_every_contribution(runs):
    log = (runs["fedlora_he"]["run"] / "log.txt").read_text()
    assert "server_bfv_context.tenseal, kit signature verified (no secret key: this server can add ciphertexts, not read them)" in log
    assert log.count("accepted contribution from hospital-") == 3 * ROUNDS
    assert "rejected contribution" not in log


def test_every_hospital_wrote_the_same_final_adapter_in_peft_format(runs, deployed_kits, base_model_dir):
    job_id = runs["fedlora_he"]["job_id"]
    for site in SITES:
        log = (deployed_kits.clients[site] / job_id / "log.txt").read_text()
        assert "client_bfv_context.tenseal, kit signature verified: int16, 3 lanes" in log, site
    adapters = {s: deployed_kits.clients[s] / job_id / "global_adapter" for s in SITES}
    weights = {s: load_file(str(a / "adapter_model.safetensors")) for s, a in adapters.items()}
    first = weights[SITES[0]]
    assert any("lora_B" in k and np.abs(v).max() > 0 for k, v in first.items())  # trained: LoRA B starts at 0
    for s in SITES[1:]:
        assert weights[s].keys() == first.keys()
        for k in first:
            np.testing.assert_array_equal(weights[s][k], first[k], err_msg=f"{s} {k}")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), adapters[SITES[0]])
    assert any("lora_" in k for k in model.state_dict())


def test_encrypted_run_matches_the_plaintext_run(runs, deployed_kits):
    he = final_comparison(runs["fedlora_he"]["run"])
    plain = final_comparison(runs["fedlora_plain"]["run"])
    assert set(he) == set(plain) == set(SITES)
    for s in SITES:
        assert he[s]["val_loss"] == pytest.approx(plain[s]["val_loss"], rel=1e-4), s
        assert he[s]["val_loss"] < he[s]["base_val_loss"], s
    # The adapters themselves. LoRA B starts at zero, so each B tensor is the change the federation learnt:
    # it agrees to well under 1%. Single entries may differ by up to about one optimizer step (the lr) per round:
    # Adam normalises the gradient, so where it is near zero the int16 rounding can flip the direction of a step.
    he_adapter, plain_adapter = (
        load_file(str(deployed_kits.clients["hospital-a"] / runs[j]["job_id"] / "global_adapter" / "adapter_model.safetensors"))
        for j in ("fedlora_he", "fedlora_plain")
    )
    assert he_adapter.keys() == plain_adapter.keys()
    for k, plain_value in plain_adapter.items():
        assert np.abs(he_adapter[k] - plain_value).max() < ROUNDS * TrainingRecipe().learning_rate, k
        if "lora_B" in k:
            assert np.linalg.norm(he_adapter[k] - plain_value) < 0.01 * np.linalg.norm(plain_value), k


def test_an_overflow_prone_setting_stops_the_job_naming_the_setting(federation, deployed_kits, tmp_path):
    job = derive_job(REPO / "jobs" / "fedlora_he", tmp_path, num_rounds=1, local_steps=1)
    client = job / "app" / "config" / "config_fed_client.json"
    cfg = json.loads(client.read_text())
    next(c for c in cfg["components"] if c["id"] == "site_encryption")["args"]["packing"]["max_sites"] = 64
    client.write_text(json.dumps(cfg))
    job_id = federation.submit(job)
    with pytest.raises(FederationError, match=f"job {job_id} ended"):
        federation.wait(job_id, on_progress=None, timeout=600)
    logs = {site: (deployed_kits.clients[site] / job_id / "log.txt").read_text() for site in SITES}
    assert not any((deployed_kits.clients[site] / job_id / "global_adapter").exists() for site in SITES)
    # The first site to answer its train task with the error ends the job (ignore_result_error: false), so
    # a slower site may be stopped before it gets that far.
    setup_failed = (
        "encryption set-up failed: job config, component hospital_fedlora.he.site_key.SiteEncryption, "
        "args 'packing': max_sites=64 is more than"
    )
    refused = "Processing error from Task Data Filters : RuntimeError: encryption is not set up at this site"
    assert any(setup_failed in log and refused in log for log in logs.values()), logs


@pytest.mark.parametrize("job", ["fedlora_he", "fedlora_plain"])
def test_the_job_result_holds_an_audit_log_that_verifies_with_every_hospitals_receipts(runs, deployed_kits, job):
    run, job_id = runs[job]["run"], runs[job]["job_id"]
    assert (run / "audit" / "audit.jsonl").is_file()
    receipts = [deployed_kits.clients[s] / job_id for s in SITES]  # each hospital's run folder holds audit/receipts.jsonl
    root_ca = deployed_kits.clients[SITES[0]] / "startup" / "rootCA.pem"
    env = dict(os.environ, PYTHONPATH=str(REPO / "custom"))
    done = subprocess.run(
        [sys.executable, "-m", "hospital_fedlora.audit", "verify", str(run), *map(str, receipts), "--root-ca", str(root_ca)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    n = len(SITES) * ROUNDS
    assert f"{ROUNDS} rounds, {n} contributions accepted, 0 rejected, {n} hospital signatures valid (each certificate issued by the given root CA)" in done.stdout
    assert done.stdout.count(f"{ROUNDS} receipts of hospital-") == len(SITES)
