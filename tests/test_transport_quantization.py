"""Quantized transport of the plaintext job (``hospital_fedlora.transport``): round-trip error bounds per
mode on CPU, unbiased int8 rounding, restored shapes and dtypes, clear errors, the filters over FOBS bytes,
and one simulator run of ``jobs/fedlora_plain`` as committed."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.shareable import Shareable
from nvflare.app_common.decomposers import common_decomposers

from hospital_fedlora.audit.digest import contribution_digest
from hospital_fedlora.config import ConfigError
from hospital_fedlora.protocol import Meta
from hospital_fedlora.transport.dequantize_filter import DequantizeFilter
from hospital_fedlora.transport.quantization import (
    MODES,
    QuantizationError,
    dequantize_tensor,
    dequantize_tensors,
    max_abs_error,
    payload_nbytes,
    quantize_tensor,
    quantize_tensors,
)
from hospital_fedlora.transport.quantize_filter import QuantizeFilter

from flare_harness import fl_ctx
from job_in_process import REPO

# (mode, rounding) -> relative L2 error bound on normal values; measured 2.1e-4, 1.7e-3, 5.9e-3, 8.4e-3,
# 9.2e-2, 1.2e-1 (docs/benchmarks/quantization.md), with margin
BOUNDS = {("fp16", "nearest"): 1e-3, ("bf16", "nearest"): 5e-3, ("int8", "nearest"): 1e-2,
          ("int8", "stochastic"): 1e-2, ("nf4", "nearest"): 0.11, ("fp4", "nearest"): 0.14}  # fmt: skip


def adapter_like(seed: int = 0) -> dict[str, np.ndarray]:
    """LoRA-shaped tensors, one of a size that is not a multiple of the block and odd (4-bit packs pairs)."""
    g = np.random.default_rng(seed)
    shapes = {"a.lora_A.weight": (8, 256), "a.lora_B.weight": (256, 8), "odd": (7, 13)}
    return {k: (g.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("mode,rounding", list(BOUNDS), ids=lambda v: v)
def test_round_trip_error_is_within_the_modes_bounds(mode, rounding):
    x = adapter_like()
    back = dequantize_tensors(quantize_tensors(x, mode, rounding, torch.Generator().manual_seed(0)))
    num = sum(float(np.sum((back[k].astype(np.float64) - v) ** 2)) for k, v in x.items())
    den = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in x.values())
    assert (num / den) ** 0.5 < BOUNDS[mode, rounding]
    for k, v in x.items():  # and no value beyond the per-tensor bound the aggregate tests rely on
        assert np.abs(back[k] - v).max() <= max_abs_error(mode, rounding, float(np.abs(v).max())), (mode, k)


def test_bytes_per_value_are_what_each_mode_promises():
    x = {"t": np.ones((64, 64), np.float32)}  # 4096 values, 64 blocks
    sizes = {m: payload_nbytes(quantize_tensors(x, m)) for m in MODES}
    assert sizes == {"fp16": 8192, "bf16": 8192, "int8": 4096 + 64 * 4, "nf4": 2048 + 64 * 4, "fp4": 2048 + 64 * 4}


def test_stochastic_int8_is_unbiased_where_nearest_is_not():
    # every value 0.3 of a block whose absmax is 1: 38.1 steps, which nearest always rounds to 38
    x = np.full(64 * 50, 0.3, np.float32)
    x[::64] = 1.0
    rest = np.ones(x.size, bool)
    rest[::64] = False
    step = 1.0 / 127
    draws = 400
    errs = np.mean(
        [dequantize_tensor(quantize_tensor(x, "int8", "stochastic", torch.Generator().manual_seed(s))) - x for s in range(draws)],
        axis=0,
    )[rest]
    nearest = (dequantize_tensor(quantize_tensor(x, "int8")) - x)[rest]
    assert np.allclose(nearest, -0.1 * step, atol=1e-6)  # the same error every time: a bias of a tenth of a step
    assert abs(errs.mean()) < 0.005 * step  # stochastic: the mean error over every value and draw is ~0
    # each value's mean over the draws within 5 standard errors (sd of one draw: step * sqrt(0.1 * 0.9))
    assert np.abs(errs).max() < 5 * step * 0.3 / draws**0.5


def test_seeded_rounding_is_reproducible_and_seeds_differ():
    x = adapter_like()["a.lora_A.weight"]
    one = quantize_tensor(x, "int8", "stochastic", torch.Generator().manual_seed(7))["codes"]
    again = quantize_tensor(x, "int8", "stochastic", torch.Generator().manual_seed(7))["codes"]
    other = quantize_tensor(x, "int8", "stochastic", torch.Generator().manual_seed(8))["codes"]
    assert np.array_equal(one, again) and not np.array_equal(one, other)


@pytest.mark.parametrize("mode", MODES)
def test_metadata_restores_exact_shapes_dtypes_and_containers_and_zeros_stay_zero(mode):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": np.zeros((3, 5), np.float32) + np.arange(15, dtype=np.float32).reshape(3, 5) / 15,
        "f16": np.linspace(-1, 1, 130, dtype=np.float16).reshape(10, 13),
        "f64": np.linspace(-1, 1, 9),
        "bf16": torch.randn(4, 33, generator=g).to(torch.bfloat16),
        "torch32": torch.randn(65, generator=g),
        "scalar": np.array(0.5, np.float32),
        "empty": np.zeros((0, 8), np.float32),
        "zeros": np.zeros((2, 100), np.float32),  # zero-padded ranks must stay exactly zero
    }
    payload = quantize_tensors(tensors, mode)
    assert all(isinstance(a, (np.ndarray, str, int, list)) for e in payload.values() for a in e.values())
    back = dequantize_tensors(payload)
    for k, x in tensors.items():
        assert type(back[k]) is type(x) and back[k].dtype == x.dtype and tuple(back[k].shape) == tuple(x.shape), k
    assert not np.any(back["zeros"])


def test_a_bad_mode_names_the_modes():
    with pytest.raises(QuantizationError, match="unknown quantization mode 'int4'; the modes are fp16, bf16, int8, nf4, fp4"):
        quantize_tensors(adapter_like(), "int4")
    with pytest.raises(QuantizationError, match="stochastic rounding is implemented for int8 only"):
        quantize_tensors(adapter_like(), "nf4", "stochastic")


def test_values_without_a_quantized_form_are_refused_by_name():
    with pytest.raises(QuantizationError, match="tensor 'w' holds NaN or infinite values"):
        quantize_tensor(np.array([1.0, np.nan], np.float32), "int8", name="w")
    with pytest.raises(QuantizationError, match="beyond fp16's 65504; use bf16 or int8"):
        quantize_tensor(np.array([1e6], np.float32), "fp16")
    with pytest.raises(QuantizationError, match="int64; only float16, bfloat16, float32, float64"):
        quantize_tensor(np.arange(3), "int8")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda e: e.update(quantized="int3"), "unknown mode 'int3'"),
        (lambda e: e.update(codes=e["codes"][:-1]), "codes holds 2047 values, its shape needs 2048"),
        (lambda e: e.update(codes=e["codes"].astype(np.int16)), "codes must be a 1-D int8 array, got int16"),
        (lambda e: e.pop("absmax"), "absmax must be a 1-D float32 array, got NoneType"),
        (lambda e: e.update(shape=[8, -256]), "shape [8, -256] is not a list of non-negative integers"),
        (lambda e: e.update(block=128), "block 128; this version restores blocks of 64"),
        (lambda e: e.update(dtype="int32"), "unknown source dtype 'int32'"),
    ],
)
def test_a_malformed_payload_fails_naming_the_tensor_and_the_fault(change, message):
    entry = quantize_tensor(adapter_like()["a.lora_A.weight"], "int8")
    change(entry)
    with pytest.raises(QuantizationError, match=re.escape(f"quantized tensor 'a': {message}")):
        dequantize_tensors({"a": entry})


# ------------------------------------------------------------------------------------------- filters
def test_filter_arguments_are_validated_naming_the_filter_and_the_modes():
    with pytest.raises(ConfigError) as err:
        QuantizeFilter(mode="int4")
    text = str(err.value)
    assert "filter hospital_fedlora.transport.quantize_filter.QuantizeFilter" in text
    assert "field 'mode'" in text and "'fp16', 'bf16', 'int8', 'nf4' or 'fp4'" in text
    with pytest.raises(ConfigError, match="rounding 'stochastic' is implemented for mode 'int8' only"):
        QuantizeFilter(mode="fp4", rounding="stochastic")
    with pytest.raises(ConfigError, match="field 'mode'"):
        QuantizeFilter()


def _upload(diff: dict, count: int = 120) -> Shareable:
    meta = {Meta.EXAMPLE_COUNT: count, Meta.METRICS: {"train_loss": 1.0}}
    return DXO(DataKind.WEIGHT_DIFF, data=dict(diff), meta=meta).to_shareable()


def test_filters_round_trip_over_fobs_bytes_and_the_upload_shrinks():
    common_decomposers.register()
    # the offline model's adapter under the shipped recipe: 8 pairs of (8, 256) and (256, 8)
    diff = {f"{i}.{k}": v for i in range(4) for k, v in adapter_like(i).items() if k != "odd"}
    plain = _upload(diff).to_bytes()
    site, server = fl_ctx("hospital-a", 0), fl_ctx("server", 0)
    sent = QuantizeFilter(mode="int8", rounding="stochastic", rounding_seed=1).process(_upload(diff), site).to_bytes()
    # measured 0.337: 1.06 bytes a value, plus FOBS's ~0.7 KB per tensor (array headers, the entries' keys)
    assert len(sent) < 0.35 * len(plain), (len(sent), len(plain))
    wire = from_shareable(Shareable.from_bytes(sent))
    assert wire.get_meta_prop(Meta.QUANTIZATION) == "int8"
    # what the hospital's receipt digests is what the server's audit log digests after its dequantize filter
    site_digest = contribution_digest(dequantize_tensors(wire.data))
    restored = from_shareable(DequantizeFilter().process(Shareable.from_bytes(sent), server))
    assert contribution_digest(restored.data) == site_digest
    assert restored.get_meta_prop(Meta.QUANTIZATION) is None and restored.get_meta_prop(Meta.EXAMPLE_COUNT) == 120
    for k, v in diff.items():
        assert restored.data[k].dtype == np.float32 and restored.data[k].shape == v.shape
        assert np.abs(restored.data[k] - v).max() <= max_abs_error("int8", "stochastic", float(np.abs(v).max()))


def test_a_quantized_broadcast_passes_again_unchanged_and_non_finite_tensors_travel_as_they_are():
    q = QuantizeFilter(mode="int8", rounding="stochastic")  # stochastic applies to WEIGHT_DIFF only
    task = DXO(DataKind.WEIGHTS, data=adapter_like()).to_shareable()
    once = q.process(task, fl_ctx("server", 0))
    first = from_shareable(once).data
    again = from_shareable(q.process(once, fl_ctx("server", 0))).data  # FLARE filters one task per site
    assert all(np.array_equal(first[k]["codes"], again[k]["codes"]) for k in first)
    # the global adapter rounds to nearest, so each filtering of it gives every site the same payload
    other = from_shareable(q.process(DXO(DataKind.WEIGHTS, data=adapter_like()).to_shareable(), fl_ctx("server", 0))).data
    assert all(np.array_equal(first[k]["codes"], other[k]["codes"]) for k in first)
    assert all(np.array_equal(first[k]["codes"], quantize_tensor(v, "int8")["codes"]) for k, v in adapter_like().items())
    diff = adapter_like()
    diff["odd"][0, 0] = np.nan
    out = from_shareable(q.process(_upload(diff), fl_ctx("hospital-c", 0))).data
    assert out["odd"] is diff["odd"] and "codes" in out["a.lora_A.weight"]  # the server's check refuses it


def test_the_plaintext_job_quantizes_both_ways_and_signs_what_the_server_restores():
    client = json.loads((REPO / "jobs/fedlora_plain/app/config/config_fed_client.json").read_text())
    server = json.loads((REPO / "jobs/fedlora_plain/app/config/config_fed_server.json").read_text())
    paths = lambda entries: [f["path"].rsplit(".", 1)[1] for e in entries if "train" in e["tasks"] for f in e["filters"]]  # noqa: E731
    assert paths(client["task_result_filters"]) == ["QuantizeFilter", "ReceiptFilter"]  # the receipt signs last
    assert paths(client["task_data_filters"]) == ["DequantizeFilter"]
    assert paths(server["task_data_filters"]) == ["QuantizeFilter"]
    assert paths(server["task_result_filters"]) == ["DequantizeFilter"]
    # only the train task: the final adapter (validate) reaches the hospitals exactly as the server holds it
    assert all(e["tasks"] == ["train"] for e in server["task_data_filters"] + client["task_data_filters"])


# ------------------------------------------------------------------------------------------- simulator
@pytest.mark.e2e
def test_plaintext_job_in_the_simulator_quantizes_uploads_and_downloads(tmp_path):
    from safetensors.numpy import load_file

    from hospital_fedlora_tools.demo import derive_job, run_simulator

    job = derive_job(REPO / "jobs" / "fedlora_plain", tmp_path, num_rounds=1, local_steps=2)
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    mode = next(f["args"]["mode"] for e in client["task_result_filters"] for f in e["filters"] if "QuantizeFilter" in f["path"])
    sites = ("hospital-a", "hospital-b", "hospital-c")
    run = run_simulator(job, tmp_path / "ws", REPO / "site_configs", show=lambda s: None, plaintext_demo=True)
    log = (tmp_path / "ws.log").read_text()
    sizes = lambda kind: [tuple(int(n.replace(",", "")) for n in m) for m in re.findall(rf"{kind} quantized to {mode}: ([\d,]+) -> ([\d,]+) bytes", log)]  # noqa: E731
    up, down = sizes("WEIGHT_DIFF"), sizes("WEIGHTS")
    assert len(up) == len(sites) and len(down) >= 1, log[-3000:]  # every upload; the round's task
    bytes_per_value = {"fp16": 2, "bf16": 2, "int8": 1 + 4 / 64, "nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64}[mode]
    assert all(after == pytest.approx(before / 4 * bytes_per_value, rel=0.01) for before, after in up + down)
    final_server = load_file(str(run / "adapter_rounds" / "round_000.safetensors"))
    for site in sites:  # the final adapter travels unquantized: every hospital keeps exactly the server's
        final = load_file(str(run.parents[1] / site / "simulate_job" / "global_adapter" / "adapter_model.safetensors"))
        assert sorted(final) == sorted(final_server)
        for k in final:
            np.testing.assert_array_equal(final[k], final_server[k], err_msg=k)
