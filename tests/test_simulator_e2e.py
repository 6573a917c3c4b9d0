"""The plaintext job, end to end, in the real FLARE simulator with three hospitals."""

import json
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from hospital_fedlora.protocol import Meta
from hospital_fedlora.server.round_metrics_log import ROUND_METRICS_FILE
from hospital_fedlora_tools.demo import derive_job, final_comparison, round_table, run_simulator

REPO = Path(__file__).resolve().parents[1]
SITES = ("hospital-a", "hospital-b", "hospital-c")


def shrink_job(tmp_path: Path, rounds: int, steps: int) -> Path:
    return derive_job(REPO / "jobs" / "fedlora_plain", tmp_path, num_rounds=rounds, local_steps=steps)


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory, base_model_dir, data_dir):
    tmp = tmp_path_factory.mktemp("sim")
    job = shrink_job(tmp, rounds=2, steps=8)
    run_dir = run_simulator(job, tmp / "ws", REPO / "site_configs", show=lambda s: None, plaintext_demo=True)
    return run_dir


@pytest.mark.e2e
def test_every_round_recorded_with_example_count_weights(sim_run, data_dir):
    rows = [json.loads(l) for l in (sim_run / "round_metrics.jsonl").read_text().splitlines()]
    assert [r[Meta.ROUND] for r in rows] == [0, 1]
    counts = {s: sum(1 for _ in open(data_dir / s / "train.jsonl")) for s in SITES}
    for r in rows:
        assert r[Meta.EXAMPLE_COUNTS] == counts
        assert set(r[Meta.SITE_METRICS]) == set(SITES)
    assert "hospital-c" in round_table(sim_run)


@pytest.mark.e2e
def test_validation_loss_fell_at_every_site(sim_run):
    rows = [json.loads(l) for l in (sim_run / "round_metrics.jsonl").read_text().splitlines()]
    final = final_comparison(sim_run)
    assert set(final) == set(SITES)
    for site in SITES:
        first_global = rows[0][Meta.SITE_METRICS][site]["val_loss_global"]
        assert final[site]["val_loss"] < final[site]["base_val_loss"], site
        assert final[site]["val_loss"] < first_global, site
        # round 0's global adapter is the untrained LoRA (B = 0): it scores exactly like the base model
        assert first_global == pytest.approx(final[site]["base_val_loss"], rel=1e-4)


@pytest.mark.e2e
def test_global_adapter_changed_and_loads_with_peft(sim_run, base_model_dir):
    saved = load_file(str(sim_run / "global_adapter" / "adapter_model.safetensors"))
    rounds = sorted((sim_run / "adapter_rounds").glob("round_*.safetensors"))
    assert [p.name for p in rounds] == ["round_000.safetensors", "round_001.safetensors"]
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(np.abs(v).max() > 0 for v in lora_b)  # LoRA B starts at zero
    r0 = load_file(str(rounds[0]))
    assert any(not np.array_equal(r0[k], saved[k]) for k in saved)

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, local_files_only=True)
    model = PeftModel.from_pretrained(base, sim_run / "global_adapter")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    key = next(k for k in saved if "lora_B" in k)
    match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
    np.testing.assert_array_equal(match[0].numpy(), saved[key])


@pytest.mark.e2e
def test_each_site_kept_the_final_adapter(sim_run):
    ws = sim_run.parents[1]
    for site in SITES:
        assert (ws / site / "simulate_job" / "global_adapter" / "adapter_model.safetensors").is_file(), site


def site_configs_with(tmp_path: Path, site: str, old: str, new: str) -> Path:
    """The committed site configs opted out of encryption (the plaintext job), with one edit in ``site``'s."""
    configs = tmp_path / "site_configs"
    configs.mkdir()
    for s in SITES:
        text = (REPO / "site_configs" / f"{s}.yaml").read_text().replace("../workspace", str(REPO / "workspace"))
        text = text.replace("require_encryption: true", "require_encryption: false")
        (configs / f"{s}.yaml").write_text(text.replace(old, new) if s == site else text)
    return configs


@pytest.mark.e2e
@pytest.mark.parametrize(
    "edit, expected",
    [
        (("hospital-c/train.jsonl", "hospital-c/missing.jsonl"), "missing.jsonl"),
        (("require_encryption: false", "require_encryption: true"), "field 'privacy.require_encryption' is true"),
    ],
    ids=["missing-data-file", "site-requires-encryption"],
)
def test_a_failing_site_is_left_out_and_named(tmp_path, monkeypatch, base_model_dir, data_dir, edit, expected):
    """A site that cannot take part is named with its cause; the job goes on with the job's minimum (2)."""
    monkeypatch.setenv("HOSPITAL_FEDLORA_SITE_CONFIGS", str(site_configs_with(tmp_path, "hospital-c", *edit)))
    run = run_simulator(shrink_job(tmp_path, rounds=1, steps=1), tmp_path / "ws", REPO / "site_configs", show=lambda s: None)
    log = (tmp_path / "ws.log").read_text()
    assert expected in log and "hospital-c" in log
    rows = [json.loads(line) for line in (run / ROUND_METRICS_FILE).read_text().splitlines() if line.strip()]
    assert rows and all(set(r[Meta.SITE_METRICS]) == {"hospital-a", "hospital-b"} for r in rows)


@pytest.mark.e2e
def test_every_sites_metrics_are_streamed_to_tensorboard_and_csv(sim_run):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hospital_fedlora.protocol import Metric
    from hospital_fedlora.server.metrics_csv import METRICS_CSV

    rows = list(csv.DictReader((sim_run / METRICS_CSV).open()))
    by_key = {(r["site"], int(r["round"]), r["metric"]): float(r["value"]) for r in rows}
    logged = [json.loads(line) for line in (sim_run / "round_metrics.jsonl").read_text().splitlines()]
    for record in logged:
        for site in SITES:
            for metric in (Metric.TRAIN_LOSS, Metric.VAL_LOSS_GLOBAL, Metric.VAL_LOSS_LOCAL):
                # the same number the train result carried, streamed separately
                assert by_key[(site, record[Meta.ROUND], metric)] == pytest.approx(record[Meta.SITE_METRICS][site][metric])
    final = final_comparison(sim_run)
    for site in SITES:
        assert by_key[(site, 2, Metric.VAL_LOSS)] == pytest.approx(final[site][Metric.VAL_LOSS])
        # the test split: every round with the adapter received, and at the end beside the base model
        for step in (0, 1, 2):
            assert 0 < by_key[(site, step, "test_loss")] < 20 and 0 <= by_key[(site, step, "test_token_accuracy")] <= 1
            assert by_key[(site, step, "test_examples")] == 16
        assert 0 <= by_key[(site, 2, "test_rouge_l")] <= 1 and 0 <= by_key[(site, 2, "base_test_rouge_l")] <= 1
        assert by_key[(site, 2, "test_loss")] < by_key[(site, 2, "base_test_loss")]
        events = EventAccumulator(str(sim_run / "tb_events" / site))
        events.Reload()
        steps = [e.step for e in events.Scalars(Metric.VAL_LOSS_GLOBAL)]
        assert steps == [0, 1], site
