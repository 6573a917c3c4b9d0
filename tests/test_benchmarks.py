"""The HE benchmark runs the jobs' own components; its quick form checks the figures it reports hold up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_he_benchmark_quick_run_reports_every_mode_within_its_error_bounds(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "benchmarks" / "bench_he_aggregation.py"), "--quick", "--repeats", "1", "--mac-repeats", "1",
         "--out", str(tmp_path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads((tmp_path / "he_aggregation.json").read_text())
    modes = report["modes"]
    packed = [m for m in modes if m.startswith("packed_bfv")]
    assert sorted(packed) == ["packed_bfv_int16/fitted", "packed_bfv_int16/shipped", "packed_bfv_int8/fitted",
                              "packed_bfv_int8/shipped"]  # fmt: skip
    ckks = modes["nvflare_ckks_stock"]
    for name in packed:
        m = modes[name]
        assert m["up_bytes_per_site"]["max"] < ckks["up_bytes_per_site"]["min"] / 10, name
        assert m["up_ciphertext_bytes_per_site"]["max"] < ckks["up_ciphertext_bytes_per_site"]["min"], name
        assert m["max_abs_error"]["max"] <= report["error_bound_abs"][name], name
    assert modes["plaintext_fp32"]["relative_l2_error"]["max"] < 1e-6
    assert (tmp_path / "he_aggregation.md").read_text().startswith("# Encrypted aggregation")
    # the aggregate MAC, measured beside the packed core without it: its tag slots cost at most 2% more bytes
    for name in ("packed_bfv_int16", "packed_bfv_int8"):
        assert report["mac_overhead"][name]["with_over_without"]["up_bytes_per_site"]["max"] <= 1.02, name
    assert "## The aggregate MAC's cost" in (tmp_path / "he_aggregation.md").read_text()
