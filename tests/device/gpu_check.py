"""The device check (``make gpu-check``): the bundle's GPU paths on one CUDA GPU, measured, into one JSON.

1. the Llama-3.2-1B-shaped base model, built offline (skipped when the folder holds a complete model);
2. ``tests/test_gpu_paths.py``, run with pytest, pass/fail recorded;
3. executor-path training against the plain peft + transformers loop, bf16 and 4-bit QLoRA
   (``throughput_check.py``): tokens/s both sides, their ratio, peak GPU memory;
4. one round of ``jobs/fedlora_plain`` and of ``jobs/fedlora_he`` on provisioned kits on loopback with the
   hospitals on the GPU (``federation_check.py``): round wall time per job.

Writes ``docs/benchmarks/gpu.json`` after every part, so a run cut short keeps what it measured. With
``--smoke``, or when no CUDA device is visible, the same parts run small on the CPU with the tiny model,
4-bit skipped, into ``--out`` (never ``docs/benchmarks/gpu.json``). Needs no network.

    python tests/device/gpu_check.py [--smoke] [--out FILE] [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

STARTED = time.perf_counter()
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

GPU_JSON = REPO / "docs" / "benchmarks" / "gpu.json"
GPU_MODEL = "workspace/base_model_llama-3.2-1b"
TINY_MODEL = "workspace/base_model"
JOBS = ["fedlora_plain", "fedlora_he"]
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "nvflare", "tenseal")  # versions in the report
REQUIRED = (*PACKAGES, "pydantic", "pyyaml", "safetensors", "tokenizers", "pytest")


def _installed(package: str) -> bool:
    try:
        version(package)
        return True
    except PackageNotFoundError:
        return False


@dataclass(frozen=True)
class Plan:
    """What one run does; the GPU plan is sized to finish in under 8 minutes on one H100."""

    smoke: bool
    model: str  # relative to the repository
    build_command: tuple[str, ...]
    device: str
    dtype: str
    micro_batch_size: int
    steps: int  # optimizer steps per timed training run (the shipped recipe's local_steps)
    repeats: int
    # A round's local steps. 5, not the recipe's 15: on the 1B adapter (852k values) 15 steps of Adam at
    # lr 1e-3 would move it by a norm of about 8.6 (extrapolated from the tiny model's 0.0093 per value),
    # over the plaintext job's max_update_norm of 5.0; 5 steps, about 2.9.
    local_steps: int
    job_timeout_s: float


def make_plan(smoke: bool) -> Plan:
    if smoke:
        build = ("-m", "hospital_fedlora_tools.base_model", "--out", TINY_MODEL)
        return Plan(True, TINY_MODEL, build, "cpu", "float32", 4, 2, 2, 2, 150.0)
    build = ("-m", "hospital_fedlora_tools.base_model", "--shape", "llama-3.2-1b", "--out", GPU_MODEL)
    return Plan(False, GPU_MODEL, build, "cuda", "bfloat16", 8, 15, 5, 5, 300.0)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- parts
def base_model(plan: Plan) -> dict:
    from hospital_fedlora_tools.base_model import is_complete_model

    path = REPO / plan.model
    out = {"path": plan.model, "command": " ".join(["python", *plan.build_command]), "built": False}
    if not is_complete_model(path):
        log(f"building the base model: {out['command']}")
        started = time.perf_counter()
        subprocess.run([sys.executable, *plan.build_command], cwd=REPO, check=True)
        out.update(built=True, build_s=round(time.perf_counter() - started, 1))
    config = json.loads((path / "config.json").read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    out["config"] = {k: config.get(k) for k in keys}
    out["parameters"] = count_parameters(path)
    log(f"base model {plan.model}: {out['parameters']:,} parameters")
    return out


def count_parameters(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                n = 1
                for dim in f.get_slice(name).get_shape():
                    n *= dim
                total += n
    return total


def gpu_path_tests(plan: Plan, work: Path) -> dict:
    junit = work / "test_gpu_paths.xml"
    junit.unlink(missing_ok=True)  # an earlier run's
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_paths.py", f"--junitxml={junit}"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase") if junit.is_file() else []:
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(
            kinds[0] if kinds else "", "passed")  # fmt: skip
    tally = list(outcomes.values())
    counts = {"passed": tally.count("passed"), "failed": tally.count("failed"), "errors": tally.count("error"),
              "skipped": tally.count("skipped")}  # fmt: skip
    # On the device every test must run and pass; without CUDA they must skip cleanly.
    ok = run.returncode == 0 and bool(outcomes) and (plan.smoke or counts["passed"] == len(outcomes))
    out = {"command": "pytest tests/test_gpu_paths.py", "exit_code": run.returncode, "ok": ok, **counts, "tests": outcomes}
    if not ok:
        out["output_tail"] = (run.stdout + run.stderr)[-4000:]
    log(f"tests/test_gpu_paths.py: {counts} (exit {run.returncode})")
    return out


def training(plan: Plan) -> dict:
    from device_sites import Hardware, site_config
    from throughput_check import compare

    from hospital_fedlora.config import parse_recipe

    job = json.loads((REPO / "jobs/fedlora_plain/app/config/config_fed_client.json").read_text())
    recipe = parse_recipe(job["executors"][0]["executor"]["args"]["recipe"])
    hw = Hardware(REPO / plan.model, plan.device, plan.dtype, plan.micro_batch_size)
    out = {"site": "hospital-a", "bf16": compare(site_config("hospital-a", hw), recipe, plan.steps, plan.repeats, log)}
    if plan.smoke:
        out["4bit"] = {"skipped": "smoke mode: bitsandbytes 4-bit needs CUDA; runs on the device only"}
    else:
        out["4bit"] = compare(site_config("hospital-a", hw, load_in_4bit=True), recipe, plan.steps, plan.repeats, log)
    return out


def federation(plan: Plan, work: Path, jobs: list[str]) -> dict:
    from device_sites import Hardware, write_site_configs
    from federation_check import run_rounds

    hw = Hardware(REPO / plan.model, plan.device, plan.dtype, plan.micro_batch_size)
    configs = write_site_configs(work / "site_configs", hw)
    out = {"site_settings": {k: str(v) for k, v in hw.changes().items()}}
    out.update(run_rounds(work, configs, jobs, plan.local_steps, plan.job_timeout_s, not plan.smoke, log))
    return out


# ------------------------------------------------------------------------------------------------ run
def environment(smoke: bool, reason: str | None) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    out = {
        "mode": "smoke" if smoke else "gpu",
        "smoke_reason": reason,
        "device": torch.cuda.get_device_name(0) if cuda and not smoke else f"cpu ({os.cpu_count()} cores)",
        "gpu_memory_total_mib": round(torch.cuda.get_device_properties(0).total_memory / 2**20) if cuda else None,
        "versions": {"python": platform.python_version(), **{p: version(p) for p in PACKAGES}, "cuda": torch.version.cuda},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return out


def run(plan: Plan, out: Path, work: Path, reason: str | None, jobs: list[str] = JOBS) -> int:
    for leftover in ("site_configs", "kits", "jobs", "results"):  # an earlier run's, in the check's own folder
        shutil.rmtree(work / leftover, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    report = environment(plan.smoke, reason)
    report["phase_seconds"] = {}
    log(f"device check ({report['mode']}) on {report['device']} -> {out}")
    parts = [
        ("base_model", lambda: base_model(plan)),
        ("gpu_path_tests", lambda: gpu_path_tests(plan, work)),
        ("training", lambda: training(plan)),
        ("federation", lambda: federation(plan, work, jobs)),
    ]
    failed = []
    for name, part in parts:
        if name != "gpu_path_tests" and "base_model" in failed:
            report[name] = {"skipped": "the base model could not be built"}
            continue
        log(f"-- {name}")
        started = time.perf_counter()
        try:
            report[name] = part()
        except Exception as err:  # recorded; the other parts still run and the exit code says it failed
            report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            log(f"{name} failed: {type(err).__name__}: {err}")
        if isinstance(report[name].get("error"), str) or report[name].get("ok") is False:
            failed.append(name)
        report["phase_seconds"][name] = round(time.perf_counter() - started, 1)
        report["wall_s"] = round(time.perf_counter() - STARTED, 1)
        write(out, report)
    report["failed_parts"] = failed
    report["ok"] = not failed
    write(out, report)
    log(f"done in {report['wall_s']} s: {'ok' if not failed else 'FAILED: ' + ', '.join(failed)} -> {out}")
    return 0 if not failed else 1


def write(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/device/gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 4-bit skipped (also without CUDA)")
    parser.add_argument("--out", type=Path, help=f"the JSON report (default {GPU_JSON.relative_to(REPO)} on a GPU)")
    parser.add_argument("--work", type=Path, help="kits, job copies, results (default workspace/gpu_check[_smoke])")
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"the jobs given one round (default {','.join(JOBS)})")
    args = parser.parse_args(argv)
    # The package from this checkout (here and in the kits' processes), the test helpers, the plain loop.
    for extra in (HERE, REPO / "tests" / "benchmarks", REPO / "tests", REPO / "custom"):
        if str(extra) not in sys.path:
            sys.path.insert(0, str(extra))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "custom"), *filter(None, [os.environ.get("PYTHONPATH")])])

    missing = [p for p in REQUIRED if not _installed(p)]
    if missing:
        print(f"error: this Python ({sys.executable}) lacks {', '.join(missing)}; the check needs the bundle's "
              "dependencies (pyproject.toml). On a bare device machine, install them from carried wheels "
              "(docs/benchmarks/README.md)", file=sys.stderr)  # fmt: skip
        return 3
    import torch

    if not args.smoke and torch.version.cuda is None and (shutil.which("nvidia-smi") or Path("/dev/nvidiactl").exists()):
        print(f"error: this machine has an NVIDIA GPU but this Python's torch ({torch.__version__}) is a CPU build; "
              "run the check with a CUDA build of torch (on the device machine, its python3), or pass --smoke",
              file=sys.stderr)  # fmt: skip
        return 3
    reason = "--smoke" if args.smoke else None if torch.cuda.is_available() else "no CUDA device visible"
    plan = make_plan(smoke=reason is not None)
    work = (args.work or REPO / ("workspace/gpu_check_smoke" if plan.smoke else "workspace/gpu_check")).resolve()
    out = (args.out or (work / "gpu.json" if plan.smoke else GPU_JSON)).resolve()
    if plan.smoke and out == GPU_JSON.resolve():
        print(f"error: a smoke run ({reason}) does not write {GPU_JSON.relative_to(REPO)}, which holds the "
              "device's figures; pass another --out", file=sys.stderr)  # fmt: skip
        return 2
    jobs = [j for j in args.jobs.split(",") if j]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        print(f"error: --jobs names {unknown}; the check runs {JOBS}", file=sys.stderr)
        return 2
    return run(plan, out, work, reason, jobs)


if __name__ == "__main__":
    raise SystemExit(main())
