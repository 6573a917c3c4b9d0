"""The device check (``make gpu-check``, ``tests/device/gpu_check.py``) cannot rot between device runs: its
smoke form runs every part small on the CPU, and its report has the fields the device run fills."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from device.device_sites import Hardware, site_config, write_site_configs
from device.gpu_check import GPU_JSON, make_plan

from hospital_fedlora.config import load_site_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "device" / "gpu_check.py"
SITES = ("hospital-a", "hospital-b", "hospital-c")


def _gpu_json() -> bytes | None:
    return GPU_JSON.read_bytes() if GPU_JSON.is_file() else None


def test_the_device_plan_builds_the_1b_model_with_the_shapes_command_and_writes_the_committed_report():
    plan = make_plan(smoke=False)
    assert " ".join(plan.build_command) == (
        "-m hospital_fedlora_tools.base_model --shape llama-3.2-1b --out workspace/base_model_llama-3.2-1b"
    )
    assert (plan.device, plan.dtype, plan.smoke) == ("cuda", "bfloat16", False)
    assert make_plan(smoke=True).model == "workspace/base_model"


def test_device_site_configs_change_only_the_hardware_fields(tmp_path):
    hw = Hardware(tmp_path / "model", "cpu", "float32", 2)
    for site in SITES:
        committed = load_site_config(REPO / "site_configs" / f"{site}.yaml").model_dump()
        changed = site_config(site, hw, load_in_4bit=False).model_dump()
        differing = {k for k in committed if committed[k] != changed[k]}
        assert differing <= {"base_model_path", "device", "dtype", "micro_batch_size"}, site
        assert changed["data"] == committed["data"] and changed["base_model_path"] == (tmp_path / "model").resolve()
    written = write_site_configs(tmp_path / "configs", hw)
    assert sorted(p.stem for p in written.glob("*.yaml")) == sorted(SITES)
    reread = load_site_config(written / "hospital-b.yaml", expected_site="hospital-b")
    assert reread == site_config("hospital-b", hw)


def test_a_smoke_run_refuses_to_write_the_device_report():
    before = _gpu_json()
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(GPU_JSON)], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 2 and "does not write docs/benchmarks/gpu.json" in run.stderr
    assert _gpu_json() == before


@pytest.mark.e2e
def test_the_smoke_check_runs_every_part_and_reports_its_fields(tmp_path, base_model_dir, data_dir):
    before = _gpu_json()
    out = tmp_path / "gpu.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--jobs", "fedlora_he"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert _gpu_json() == before  # the device's figures are never overwritten from a CPU run
    r = json.loads(out.read_text())
    assert r["ok"] is True and r["failed_parts"] == []
    assert (r["mode"], r["smoke_reason"]) == ("smoke", "--smoke") and r["device"].startswith("cpu")
    assert set(r["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "nvflare", "cuda"}
    assert r["versions"]["torch"] == torch.__version__
    assert set(r["phase_seconds"]) == {"base_model", "gpu_path_tests", "training", "federation"}
    assert r["wall_s"] >= sum(r["phase_seconds"].values())

    assert r["base_model"]["path"] == "workspace/base_model" and r["base_model"]["parameters"] > 1_000_000
    tests = r["gpu_path_tests"]
    assert tests["ok"] and tests["exit_code"] == 0
    assert {"test_bf16_on_cuda_trains_a_step", "test_4bit_qlora_trains_a_step_and_returns_float32"} <= set(tests["tests"])
    if not torch.cuda.is_available():
        assert tests["skipped"] == len(tests["tests"]) and set(tests["tests"].values()) == {"skipped"}

    bf16, four_bit = r["training"]["bf16"], r["training"]["4bit"]
    assert bf16["placement"] == "float32 on cpu" and bf16["peak_gpu_memory_mib"] is None
    for side in ("executor", "plain_loop"):
        runs = bf16[f"all_{side}_tokens_per_s"]
        assert len(runs) == bf16["repeats"] == 2 and all(x > 0 for x in runs)
        assert min(runs) <= bf16[f"{side}_tokens_per_s"] <= max(runs)
    assert bf16["ratio_min"] <= bf16["ratio_median"] <= bf16["ratio_max"]
    assert "smoke" in four_bit["skipped"] and "CUDA" in four_bit["skipped"]

    fed = r["federation"]
    assert fed["ok"] and fed["site_settings"]["device"] == "cpu" and fed["local_steps"] == 2
    assert list(fed["jobs"]) == ["fedlora_he"]  # the plaintext job takes the same code path; the device runs both
    for name, job in fed["jobs"].items():
        assert job["status"] == "FINISHED:COMPLETED", name
        assert len(job["round_wall_s"]) == 1 and 0 < job["round_wall_s"][0] < job["job_wall_s"], name
        assert sorted(job["sites"]) == list(SITES), name
        assert all(s["train_tokens"] > 0 and s["train_tokens_per_s"] > 0 for s in job["sites"].values()), name
