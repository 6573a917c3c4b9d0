"""The plaintext job in the FLARE simulator with one hospital training on two processes (``data_parallel: 2``,
gloo on CPU): the executor starts its worker at set-up, returns one difference per round, stops it at the end."""

import json
import uuid
from pathlib import Path

import pytest
import yaml

from hospital_fedlora.protocol import Meta, Metric
from hospital_fedlora_tools.demo import derive_job, plaintext_demo_configs, run_simulator

REPO = Path(__file__).resolve().parents[1]
SITES = ("hospital-a", "hospital-b")  # the job's min_clients is 2
MARK = "HOSPITAL_FEDLORA_DDP_TEST"


def _marked_processes(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark``: everything this test's simulator started."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{MARK}={mark}".encode() in (proc / "environ").read_bytes():
                state = (proc / "stat").read_text().split(")")[-1].split()[0]
                if state not in ("Z", "X"):
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.e2e
def test_a_two_process_hospital_in_the_simulator(tmp_path, base_model_dir, data_dir, monkeypatch):
    configs = plaintext_demo_configs(REPO / "site_configs", tmp_path / "site_configs", SITES)
    b = configs / "hospital-b.yaml"
    raw = yaml.safe_load(b.read_text())
    b.write_text(yaml.safe_dump({**raw, "data_parallel": 2, "micro_batch_size": 2}, sort_keys=False))
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    job = derive_job(REPO / "jobs" / "fedlora_plain", tmp_path, num_rounds=2, local_steps=4)
    run_dir = run_simulator(job, tmp_path / "ws", configs, sites=SITES, show=lambda s: None)

    log = (tmp_path / "ws.log").read_text()
    assert "2 training processes" in log
    assert "data-parallel workers stopped (exit codes [0])" in log  # asked at END_RUN, not killed
    rows = [json.loads(line) for line in (run_dir / "round_metrics.jsonl").read_text().splitlines()]
    assert [r[Meta.ROUND] for r in rows] == [0, 1]
    for r in rows:
        assert set(r[Meta.SITE_METRICS]) == set(SITES)
        assert r[Meta.SITE_METRICS]["hospital-b"][Metric.TRAIN_TOKENS] > 0
    final = json.loads((run_dir / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(final) == set(SITES)
    assert _marked_processes(mark) == []  # the worker ended with the job
