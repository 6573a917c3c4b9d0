"""``make compare``: the one evaluation on fixed inputs with known values, and the whole command on a tiny
budget (every setting, row, field and plot; the encrypted federation agrees with the plaintext one)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from hospital_fedlora_tools.compare_eval import score_split

from deployment_helpers import free_port, project_with_port

REPO = Path(__file__).resolve().parents[1]
SITES = ("hospital-a", "hospital-b", "hospital-c")
SETTINGS = ("base", "local_only", "centralized", "federated", "federated_he_int16", "federated_he_int8")
METRICS = ("loss", "perplexity", "token_accuracy", "exact_match", "rouge_l")


class FixedLogits(torch.nn.Module):
    """Predicts token ``(t + 1) % 4`` after token ``t`` with logit 2 against 0 for the other three."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, 4)
        logits.scatter_(-1, ((input_ids + 1) % 4).unsqueeze(-1), 2.0)
        return SimpleNamespace(logits=logits)


def test_score_split_known_values():
    # site x: tokens 0 1 2 0, answer = last two -> targets 2 (predicted) and 0 (predicted 3: wrong)
    # site y: tokens 1 2, answer = last one -> target 2 (predicted)
    x = {"input_ids": [0, 1, 2, 0], "labels": [-100, -100, 2, 0]}
    y = {"input_ids": [1, 2], "labels": [-100, 2]}
    out = score_split(FixedLogits(), {"x": [x], "y": [y]}, pad_id=0, micro=1)
    right = -math.log(math.exp(2) / (math.exp(2) + 3))  # loss when the target has the high logit
    wrong = -math.log(1 / (math.exp(2) + 3))
    assert out["per_hospital"]["x"]["loss"] == pytest.approx((right + wrong) / 2)
    assert out["per_hospital"]["x"]["token_accuracy"] == 0.5
    assert out["per_hospital"]["y"]["token_accuracy"] == 1.0
    pooled = out["pooled"]
    assert pooled["tokens"] == 3 and pooled["examples"] == 2
    assert pooled["loss"] == pytest.approx((2 * right + wrong) / 3)  # token-weighted, not a mean of sites
    assert pooled["perplexity"] == pytest.approx(math.exp(pooled["loss"]))
    assert pooled["token_accuracy"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, base_model_dir, data_dir):
    out = tmp_path_factory.mktemp("compare")
    # A free port, as every kit test has: the committed project's ports may be held by another federation.
    project = out / "project.yml"
    project.write_text(yaml.safe_dump(project_with_port(free_port()), sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(REPO / "custom"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "hospital_fedlora_tools.compare", "--budget", "quick", "--project", str(project),
           "--out", str(out / "docs"), "--workspace", str(out / "ws")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "docs"


def _pooled_and_sites(field: dict) -> None:
    assert set(field) == {"pooled", "per_hospital"}
    assert set(field["per_hospital"]) == set(SITES)
    assert all(math.isfinite(v) for v in [field["pooled"], *field["per_hospital"].values()])


@pytest.mark.e2e
def test_quality_json_has_every_setting_and_metric(quick):
    q = json.loads((quick / "benchmarks" / "quality.json").read_text())
    for metric in METRICS:
        for setting in SETTINGS:
            field = q[f"{setting}_test_{metric}"]
            if setting == "local_only":  # hospital -> that hospital's model on every split
                assert set(field) == set(SITES)
                for per_model in field.values():
                    _pooled_and_sites(per_model)
            else:
                _pooled_and_sites(field)
    loss, ppl = q["federated_test_loss"], q["federated_test_perplexity"]
    assert ppl["pooled"] == pytest.approx(math.exp(loss["pooled"]))
    # training moved every adapter away from the base model
    assert all(q[f"{s}_test_loss"]["pooled"] < q["base_test_loss"]["pooled"] for s in SETTINGS[2:])
    # the encrypted federation trains the same model as the plaintext one (int16: quantization only)
    fed = q["federated_test_loss"]["pooled"]
    assert q["federated_he_int16_test_loss"]["pooled"] == pytest.approx(fed, rel=1e-3)
    assert q["federated_he_int8_test_loss"]["pooled"] == pytest.approx(fed, rel=1e-2)
    assert all(q["final_adapter_identical_at_every_holder"].values())
    assert q["every_hospital_in_every_round"] == {s: True for s in SETTINGS[3:]}
    assert q["budget"] == {"name": "quick", "rounds": 1, "local_steps": 2, "eval_examples": 6, "test_examples": 6}
    assert q["recipe"]["seed"] == q["seeds"]["lora_init"]
    # the answers, scored as the hospitals score theirs; the names for the diagnosis-group exact match
    assert q["federated_exact_match"] == q["federated_test_exact_match"] and q["base_exact_match"] == q["base_test_exact_match"]
    for setting in ("base", "centralized", *SETTINGS[3:]):
        assert 0 <= q[f"{setting}_test_rouge_l"]["pooled"] <= 1
    assert q["federated_test_exact_match_examples"] >= 0
    assert {t["target"][:20] for t in q["targets"]} and len(q["targets"]) == 4


@pytest.mark.e2e
def test_bytes_and_validation_curves(quick):
    q = json.loads((quick / "benchmarks" / "quality.json").read_text())
    b = q["bytes_per_round"]
    assert set(b) == set(SETTINGS) - {"base"}
    assert b["local_only"]["up_bytes_per_site"] == b["centralized"]["down_bytes_per_site"] == 0
    # ciphertext costs more than the plaintext job's fp16; a slot packs 5 int8 values where it packs 3 int16
    # ones, so 8-bit takes about 3/5 of 16-bit's bytes (plus fixed parts: the tag slot, headers)
    assert b["federated_he_int16"]["up_bytes_per_site"] > b["federated"]["up_bytes_per_site"] > 0
    assert b["federated_he_int8"]["up_bytes_per_site"] < 0.65 * b["federated_he_int16"]["up_bytes_per_site"]
    curves = q["validation_loss_per_round"]
    assert set(curves) == set(SETTINGS) - {"base"}
    for setting, per_site in curves.items():
        assert set(per_site) == set(SITES) and all(len(v) == 2 for v in per_site.values()), setting
    # every setting starts from the same seeded adapter, measured the same way (site or compare)
    starts = {round(per_site["hospital-a"][0], 4) for per_site in curves.values()}
    assert len(starts) == 1


@pytest.mark.e2e
def test_every_federated_run_streamed_tensorboard_and_csv(quick):
    q = json.loads((quick / "benchmarks" / "quality.json").read_text())
    assert set(q["server_run_folders"]) == set(SETTINGS[3:])
    for setting, folder in q["server_run_folders"].items():
        for site in SITES:
            assert list((Path(folder) / "tb_events" / site).glob("events.out.tfevents.*")), (setting, site)
        assert (Path(folder) / "metrics.csv").read_text().strip(), setting


@pytest.mark.e2e
def test_markdown_rows_and_plots(quick):
    md = (quick / "results.md").read_text()
    rows = ["base", *(f"local_only ({s})" for s in SITES), "centralized", "federated", "federated_he_int16", "federated_he_int8"]
    for row in rows:
        assert f"| {row} |" in md, row
    pngs = sorted((quick / "results").glob("*.png"))
    assert [p.name for p in pngs] == ["bytes_per_round.png", "test_metrics.png", "validation_loss_per_round.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](results/{p.name})" in md
