"""What the operator reads when hospitals fail: one plaintext job on the session's federation, hospital-b
refusing it for privacy and hospital-c with a malformed data file, seen by site and cause through the FLARE
API, the admin console's ``list_jobs -d`` and ``nvflare job meta --format json``, after the job ended."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hospital_fedlora.server.job_report import REPORT_META_KEY
from hospital_fedlora_tools.process_table import FederationError

pytest_plugins = ["federation_fixtures"]

pytestmark = pytest.mark.e2e

ADMIN = "admin@consortium.org"


def operator_command(*cmd: str, typed: str | None = None) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(cmd, input=typed, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_operator_reads_each_failed_hospital_and_its_cause(federation, small_job, deployed_kits, tmp_path):
    job = tmp_path / "fedlora_plain"
    shutil.copytree(small_job, job)
    server = job / "app" / "config" / "config_fed_server.json"
    cfg = json.loads(server.read_text())
    next(w for w in cfg["workflows"] if w["id"] == "scatter_and_gather")["args"]["num_rounds"] = 1
    server.write_text(json.dumps(cfg, indent=2))

    b_config = deployed_kits.clients["hospital-b"] / "local" / "site_config.yaml"
    c_config = deployed_kits.clients["hospital-c"] / "local" / "site_config.yaml"
    originals = {b_config: b_config.read_text(), c_config: c_config.read_text()}
    bad_train = tmp_path / "hospital-c-train.jsonl"
    bad_train.write_text('{"instruction": "a", "input": "b", "response": "c"}\nthis line is not JSON\n')
    try:
        b = yaml.safe_load(originals[b_config])
        b["privacy"] = {"require_encryption": True}
        b_config.write_text(yaml.safe_dump(b))
        c = yaml.safe_load(originals[c_config])
        c["data"]["train"] = str(bad_train)
        c_config.write_text(yaml.safe_dump(c))
        job_id = federation.submit(job)
        with pytest.raises(FederationError, match="FINISHED:EXECUTION_EXCEPTION"):
            federation.wait(job_id, on_progress=None, timeout=120, poll_interval=0.5)
    finally:
        for path, text in originals.items():
            path.write_text(text)

    meta = federation.session.get_job_meta(job_id)
    assert meta["status"] == "FINISHED:EXECUTION_EXCEPTION"
    report = meta[REPORT_META_KEY]
    assert report["state"] == "ended" and report["num_rounds"] == 1
    causes = {site: " ".join(f["cause"] for f in failures) for site, failures in report["failures"].items()}
    assert sorted(causes) == ["hospital-b", "hospital-c"], report
    assert "privacy.require_encryption" in causes["hospital-b"]
    assert str(bad_train) in causes["hospital-c"] and "not valid JSON" in causes["hospital-c"]
    assert "hospital-b" in report["job_error"] and "hospital-c" in report["job_error"]

    admin_kit = deployed_kits.admins[ADMIN]
    console = operator_command("bash", str(admin_kit / "startup" / "fl_admin.sh"), typed=f"{ADMIN}\nlist_jobs -d {job_id}\nbye\n")
    cli = operator_command("nvflare", "job", "meta", job_id, "--format", "json", "--startup-kit", str(admin_kit))
    for shown in (console, cli):
        assert REPORT_META_KEY in shown and "FINISHED:EXECUTION_EXCEPTION" in shown
        assert "privacy.require_encryption" in shown and str(bad_train) in shown
    print(console, cli)  # the samples docs/operator.md shows
