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


def test_real_shapes_benchmark_quick_run_measures_the_shipped_components(tmp_path, base_model_dir, data_dir):
    """bench_real_shapes.py on scaled-down shapes: the figures it reports are there and add up."""
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "benchmarks" / "bench_real_shapes.py"), "--quick", "--repeats", "1",
         "--steps", "1", "--tokenizer-from", str(base_model_dir), "--out", str(tmp_path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads((tmp_path / "real_shapes.json").read_text())
    assert list(report["shapes"]) == ["llama-3.2-1b", "llama-3.1-8b"] and report["quick"]
    for shape in report["shapes"].values():
        # r=16 on q/k/v/o of 2 layers 64 wide with 2 of 4 heads for k/v: 2 * 16 * (128 + 96 + 96 + 128)
        assert shape["adapter_parameters"] == 14_336 and shape["adapter_tensors"] == 16
        m = shape["messages"]
        assert m["plaintext_fp32"]["up_bytes"] > 4 * shape["adapter_parameters"]
        assert m["packed_bfv_int8"]["ciphertext_bytes"] < m["packed_bfv_int16"]["ciphertext_bytes"]
        assert shape["load_bf16"]["parameters"] == shape["parameters"] and shape["load_bf16"]["peak_rss_mb"] > 0
    assert report["shapes"]["llama-3.1-8b"]["parameters"] > report["shapes"]["llama-3.2-1b"]["parameters"]  # untied head
    one = report["shapes"]["llama-3.2-1b"]
    assert len(one["throughput"]["executor_tokens_per_s"]) == len(one["throughput"]["plain_loop_tokens_per_s"]) == 1
    assert one["site_round"]["peak_rss_mb"] >= one["site_round"]["peak_rss_mb_after_setup"] > 0
    assert one["site_round"]["up_bytes"] > 0
    assert (tmp_path / "real_shapes.md").read_text().startswith("# The shipped components at real Llama-3.x shapes")


def test_quantization_benchmark_quick_run_reports_every_codec(tmp_path):
    """bench_quantization.py on scaled-down shapes: every mode's bytes and error, NVFlare's beside them."""
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "benchmarks" / "bench_quantization.py"), "--quick", "--repeats", "1", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads((tmp_path / "quantization.json").read_text())
    assert list(report["sets"]) == ["decoder_layers", "lora_adapter"] and report["quick"]
    for s in report["sets"].values():
        rows = s["rows"]
        ratios = {k: round(rows[k]["ratio_to_fp32"], 2) for k in ("ours/fp16", "ours/bf16", "ours/int8", "ours/nf4", "ours/fp4")}
        assert ratios == {"ours/fp16": 0.5, "ours/bf16": 0.5, "ours/int8": 0.27, "ours/nf4": 0.14, "ours/fp4": 0.14}
        assert rows["ours/int8"]["relative_l2_error"] < rows["bitsandbytes/quantize_blockwise"]["relative_l2_error"] < 1e-2
        assert rows["ours/fp16"]["relative_l2_error"] == rows["nvflare/float16"]["relative_l2_error"] < 1e-3
        assert rows["ours/nf4"]["relative_l2_error"] < rows["ours/fp4"]["relative_l2_error"] < 0.14
        for kind in ("blockwise8", "normfloat4", "float4"):  # .cuda() in NVFlare's quantizer
            assert ("error" in rows[f"nvflare/{kind}"]) != report["machine"].endswith("CUDA True"), kind
    assert (tmp_path / "quantization.md").read_text().startswith("# Quantized transport on Llama-3.2-1B shapes")
