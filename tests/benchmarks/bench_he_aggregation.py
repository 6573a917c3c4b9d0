"""One round of encrypted aggregation of a LoRA-shaped adapter, four ways, measured in one run.

Writes ``<out>/he_aggregation.json`` and ``<out>/he_aggregation.md``:

* ``packed_bfv_int16`` / ``packed_bfv_int8``: ours (``quantize`` + ``packed_bfv``), as the HE filters
  and aggregator will run them.
* ``nvflare_ckks_stock``: NVFlare's own ``HEModelEncryptor`` -> ``HEInTimeAccumulateWeightedAggregator``
  -> ``HEModelShareableGenerator`` -> ``HEModelDecryptor``, driven through their FLARE interfaces with a
  CKKS context made the way NVFlare's ``HEBuilder`` makes it (8192, [60, 40, 40], scale 2^40, loaded
  through FLARE's ``load_tenseal_context_from_workspace``).
* ``plaintext_fp32``: NVFlare's ``InTimeAccumulateWeightedAggregator`` on fp32 arrays.

Bytes are what FLARE puts on the wire: the FOBS serialization of the Shareable each side sends
(``Shareable.to_bytes``). CPU seconds are process CPU time (all threads) for everything a side does with
the message: filters, (de)serialization, aggregation. ``client_cpu_s`` is per site (encrypt + decrypt
side); ``server_cpu_s`` is the server's whole round for all sites.

Usage: ``python tests/benchmarks/bench_he_aggregation.py --out docs/benchmarks [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tenseal as ts
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import common_decomposers
from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
from nvflare.app_opt.he.model_shareable_generator import HEModelShareableGenerator
from nvflare.fuel.sec.security_content_service import SecurityContentService

from hospital_fedlora.adapter_layout import AdapterLayout
from hospital_fedlora.he.bfv_context import BFVParams, load_context, make_context, serialize_context
from hospital_fedlora.he.packed_bfv import EncryptedSum, decrypt_ints, encrypt_ints
from hospital_fedlora.he.lanes import PackingSettings, plan_lanes
from hospital_fedlora.he.quantize import contribution_weight, dequantize, quantize, step_size

SITES = ["hospital-a", "hospital-b", "hospital-c"]
EXAMPLES = [1200, 800, 1600]  # per-site training examples (FLARE's NUM_STEPS_CURRENT_ROUND)
FULL_WEIGHT = 1600  # the job's full_weight: weight factors 0.75, 0.5, 1.0
DIFF_STD = 1e-3  # typical per-round LoRA difference magnitude
CLIP = 6 * DIFF_STD
BFV = BFVParams(poly_modulus_degree=4096, plain_modulus_bits=58)
PACKED = {
    "packed_bfv_int16": PackingSettings(bits=16, max_sites=8, min_lanes_per_slot=3),
    "packed_bfv_int8": PackingSettings(bits=8, max_sites=8, min_lanes_per_slot=5),
}
ROUND = 1


# ------------------------------------------------------------------------------------------- inputs
def lora_shapes(layers: int, hidden: int = 4096, r: int = 8) -> dict[str, tuple[int, int]]:
    """PEFT state-dict names and shapes of a Llama-7B LoRA adapter, r=8 on q_proj and v_proj."""
    shapes = {}
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            base = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            shapes[f"{base}.lora_A.weight"] = (r, hidden)
            shapes[f"{base}.lora_B.weight"] = (hidden, r)
    return shapes


def site_diffs(shapes: dict[str, tuple[int, int]], seed: int) -> list[dict[str, torch.Tensor]]:
    """Correlated per-site differences, std DIFF_STD each: a shared direction plus site-specific noise."""
    g = torch.Generator().manual_seed(seed)
    common = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    sites = []
    for _ in SITES:
        sites.append({k: (0.6 * common[k] + 0.8 * torch.randn(s, generator=g)) * DIFF_STD for k, s in shapes.items()})
    return sites


def errors(estimate: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    diff = estimate.astype(np.float64) - truth
    return {
        "max_rel_error": float(np.abs(diff).max() / np.abs(truth).max()),
        "rms_rel_error": float(np.linalg.norm(diff) / np.linalg.norm(truth)),
    }


def figures(clock: "Clock", uploads: list[bytes], down: bytes, estimate: np.ndarray, truth: np.ndarray) -> dict:
    """The figures every mode reports, measured the same way for each."""
    return {
        "up_bytes_per_site": float(np.mean([len(u) for u in uploads])),
        "down_bytes_per_site": len(down),
        "client_cpu_s": (clock.t["client_up"] + clock.t["client_down"]) / len(SITES),
        "client_encrypt_cpu_s": clock.t["client_up"] / len(SITES),
        "client_decrypt_cpu_s": clock.t["client_down"] / len(SITES),
        "server_cpu_s": clock.t["server"],
        **errors(estimate, truth),
        "max_abs_error": float(np.abs(estimate.astype(np.float64) - truth).max()),
    }


class Clock:
    """Process CPU time (all threads), accumulated per label."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def __call__(self, label: str):
        clock = self

        class _Span:
            def __enter__(self):
                gc.collect()
                self.start = time.process_time()

            def __exit__(self, *exc):
                clock.t[label] = clock.t.get(label, 0.0) + time.process_time() - self.start

        return _Span()


def peer_fl_ctx(site: str) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.SECURE_MODE, False, private=True, sticky=True)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, ROUND, private=True, sticky=True)
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    fl_ctx.set_peer_context(peer)
    return fl_ctx


def as_received(data: bytes, site: str) -> Shareable:
    """What the server's FLARE hands an aggregator: the deserialized Shareable with the sender's identity."""
    shareable = Shareable.from_bytes(data)
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    return shareable


def result_shareable(dxo: DXO) -> Shareable:
    s = dxo.to_shareable()
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, ROUND)
    return s


# ------------------------------------------------------------------------------------------ packed
def run_packed(name: str, settings: PackingSettings, diffs, truth, layout: AdapterLayout, seed: int) -> dict:
    made = make_context(BFV, n_threads=1)
    client = load_context(serialize_context(made, secret=True), "client kit")
    server = load_context(serialize_context(made, secret=False), "server kit")
    plan = plan_lanes(settings, server)
    clock = Clock()
    uploads, clipped = [], 0
    tag = f"round {ROUND}"
    for i, (site, d, count) in enumerate(zip(SITES, diffs, EXAMPLES)):
        with clock("client_up"):
            w = contribution_weight(count, FULL_WEIGHT)
            q = quantize(d, CLIP, settings.bits, torch.Generator().manual_seed(seed * 1000 + i), weight=w)
            chunks = encrypt_ints(client, layout.flatten(q.ints), plan, tag=tag)
            meta = {"weight": w, "layout": layout.to_manifest(), "n_clipped": q.n_clipped}
            uploads.append(result_shareable(DXO(DataKind.WEIGHT_DIFF, {"bfv_chunks": chunks}, meta)).to_bytes())
        clipped += q.n_clipped
    with clock("server"):
        total, total_weight = EncryptedSum(server, expected_tag=tag), 0
        for site, data in zip(SITES, uploads):
            dxo = from_shareable(as_received(data, site))
            total.add(dxo.data["bfv_chunks"], site)
            total_weight += float(dxo.get_meta_prop("weight"))
        meta = {"total_weight": total_weight, "layout": layout.to_manifest(), "sites": total.count}
        down = result_shareable(DXO(DataKind.WEIGHT_DIFF, {"bfv_chunks": total.result()}, meta)).to_bytes()
    estimates = []
    for site in SITES:
        with clock("client_down"):
            dxo = from_shareable(Shareable.from_bytes(down))
            w_total, n_sites = float(dxo.get_meta_prop("total_weight")), int(dxo.get_meta_prop("sites"))
            summed = decrypt_ints(client, dxo.data["bfv_chunks"], plan, layout.n_values, n_sites, expected_tag=tag)
            avg = dequantize(layout.unflatten(summed), CLIP, settings.bits, w_total)
        estimates.append(layout.flatten(avg).numpy())
    assert all(np.array_equal(estimates[0], e) for e in estimates), "sites decoded different aggregates"
    n_ct = plan.n_ciphertexts(layout.n_values)
    return {
        **figures(clock, uploads, down, estimates[0], truth),
        "error_bound_abs": step_size(CLIP, settings.bits) * len(SITES) / sum(
            contribution_weight(c, FULL_WEIGHT) for c in EXAMPLES
        ),
        "values_clipped": clipped,
        "packing": {
            "bits": plan.bits,
            "lane_bits": plan.lane_bits,
            "lanes_per_slot": plan.lanes_per_slot,
            "max_sites": plan.max_sites,
            "ciphertexts": n_ct,
            "chunks": plan.n_chunks(layout.n_values),
            "bytes_per_ciphertext": round(len(down) / n_ct),
        },
    }


# ---------------------------------------------------------------------------------------- NVFlare
def run_nvflare_ckks(diffs, truth, layout: AdapterLayout, workdir: Path) -> dict:
    # The context exactly as nvflare.lighter.impl.he.HEBuilder makes and writes it.
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=[60, 40, 40],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ctx.generate_relin_keys()
    ctx.global_scale = 2**40
    startup = workdir / "startup"
    startup.mkdir()
    common = dict(save_galois_keys=False, save_relin_keys=True)
    (startup / "server_context.tenseal").write_bytes(ctx.serialize(save_public_key=False, save_secret_key=False, **common))
    (startup / "client_context.tenseal").write_bytes(ctx.serialize(save_public_key=True, save_secret_key=True, **common))
    SecurityContentService.initialize(content_folder=str(startup))

    clock = Clock()
    encryptor, decryptor = HEModelEncryptor(), HEModelDecryptor()
    aggregator, generator = HEInTimeAccumulateWeightedAggregator(), HEModelShareableGenerator()
    server_ctx = peer_fl_ctx("server")
    for component in (encryptor, decryptor):
        component.handle_event(EventType.START_RUN, peer_fl_ctx(SITES[0]))
    with clock("server"):
        for component in (aggregator, generator):
            component.handle_event(EventType.START_RUN, server_ctx)

    uploads = []
    for site, d, w in zip(SITES, diffs, EXAMPLES):
        arrays = {k: v.numpy() for k, v in d.items()}
        with clock("client_up"):
            s = result_shareable(DXO(DataKind.WEIGHT_DIFF, arrays, {MetaKey.NUM_STEPS_CURRENT_ROUND: w}))
            s = encryptor.process(s, peer_fl_ctx(site))
            uploads.append(s.to_bytes())
        del s
    gc.collect()
    with clock("server"):
        for site, data in zip(SITES, uploads):
            if not aggregator.accept(as_received(data, site), server_ctx):
                raise RuntimeError(f"NVFlare's HE aggregator rejected {site}")
        aggregated = aggregator.aggregate(server_ctx)
        # Round 1: the global model is the (plaintext) initial adapter, here zeros, so the new global
        # model equals the encrypted average; ScatterAndGather sends that to every site.
        initial = {s.name: np.zeros(s.numel, dtype=np.float32) for s in layout.tensors}
        server_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(initial, {}), private=True, sticky=True)
        learnable = generator.shareable_to_learnable(aggregated, server_ctx)
        down = generator.learnable_to_shareable(learnable, server_ctx).to_bytes()
    del aggregated, learnable
    gc.collect()
    estimates = []
    for site in SITES:
        with clock("client_down"):
            s = decryptor.process(Shareable.from_bytes(down), peer_fl_ctx(site))
            data = from_shareable(s).data
            flat = np.concatenate([np.asarray(data[n], dtype=np.float32).reshape(-1) for n in layout.names])
        estimates.append(flat)
        del s, data
    return {
        **figures(clock, uploads, down, estimates[0], truth),
        "context_bytes": {
            # what CKKSVectorDecomposer writes next to every tensor: target.context().serialize()
            "per_tensor_in_fobs": len(encryptor.tenseal_context.serialize()),
            "client_context.tenseal": (startup / "client_context.tenseal").stat().st_size,
            "server_context.tenseal": (startup / "server_context.tenseal").stat().st_size,
        },
    }


def run_plaintext(diffs, truth, layout: AdapterLayout) -> dict:
    clock = Clock()
    aggregator = InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHT_DIFF)
    server_ctx = peer_fl_ctx("server")
    aggregator.handle_event(EventType.START_RUN, server_ctx)
    uploads = []
    for site, d, w in zip(SITES, diffs, EXAMPLES):
        arrays = {k: v.numpy() for k, v in d.items()}
        with clock("client_up"):
            uploads.append(
                result_shareable(DXO(DataKind.WEIGHT_DIFF, arrays, {MetaKey.NUM_STEPS_CURRENT_ROUND: w})).to_bytes()
            )
    with clock("server"):
        for site, data in zip(SITES, uploads):
            if not aggregator.accept(as_received(data, site), server_ctx):
                raise RuntimeError(f"NVFlare's aggregator rejected {site}")
        down = aggregator.aggregate(server_ctx).to_bytes()
    estimates = []
    for _ in SITES:
        with clock("client_down"):
            data = from_shareable(Shareable.from_bytes(down)).data
            flat = np.concatenate([np.asarray(data[n]).reshape(-1) for n in layout.names])
        estimates.append(flat)
    return {
        **figures(clock, uploads, down, estimates[0], truth),
        "down_dtype": str(estimates[0].dtype),
    }


# ------------------------------------------------------------------------------------------ report
def targets(modes: dict) -> dict:
    ckks, fp32 = modes["nvflare_ckks_stock"], modes["plaintext_fp32"]
    out = {}
    for name in PACKED:
        m = modes[name]
        out[name] = {
            "upload_fewer_than_ckks_x": ckks["up_bytes_per_site"] / m["up_bytes_per_site"],
            "server_cpu_less_than_ckks_x": ckks["server_cpu_s"] / m["server_cpu_s"],
            "upload_vs_fp32_x": m["up_bytes_per_site"] / fp32["up_bytes_per_site"],
        }
    i16, i8 = out["packed_bfv_int16"], out["packed_bfv_int8"]
    met = {
        "both packed modes >= 10x fewer upload bytes than nvflare_ckks_stock": all(
            v["upload_fewer_than_ckks_x"] >= 10 for v in out.values()
        ),
        "both packed modes >= 10x less server CPU than nvflare_ckks_stock": all(
            v["server_cpu_less_than_ckks_x"] >= 10 for v in out.values()
        ),
        "int16 upload <= 3x plaintext fp32": i16["upload_vs_fp32_x"] <= 3,
        "int16 max_rel_error <= 1e-4": modes["packed_bfv_int16"]["max_rel_error"] <= 1e-4,
        "int8 upload <= 1.5x plaintext fp32": i8["upload_vs_fp32_x"] <= 1.5,
    }
    return {"ratios": out, "met": met}


def mb(x: float) -> str:
    return f"{x / 1e6:.1f} MB"


def write_markdown(path: Path, report: dict) -> None:
    m = report["modes"]
    rows = []
    for name in ("packed_bfv_int16", "packed_bfv_int8", "nvflare_ckks_stock", "plaintext_fp32"):
        r = m[name]
        rows.append(
            f"| `{name}` | {mb(r['up_bytes_per_site'])} | {mb(r['down_bytes_per_site'])} | {r['client_cpu_s']:.2f} "
            f"| {r['server_cpu_s']:.2f} | {r['max_rel_error']:.1e} | {r['rms_rel_error']:.1e} |"
        )
    t = report["targets"]
    ratio_rows = [
        f"| `{n}` | {v['upload_fewer_than_ckks_x']:.1f}x | {v['server_cpu_less_than_ckks_x']:.1f}x "
        f"| {v['upload_vs_fp32_x']:.2f}x |"
        for n, v in t["ratios"].items()
    ]
    met = "\n".join(f"- {'met' if ok else '**not met**'}: {what}" for what, ok in t["met"].items())
    p16, p8 = m["packed_bfv_int16"], m["packed_bfv_int8"]
    i16, i8 = p16["packing"], p8["packing"]
    ckks, fp32 = m["nvflare_ckks_stock"], m["plaintext_fp32"]
    n = report["adapter_params"]
    ct = i16["bytes_per_ciphertext"]
    usable = BFV.plain_modulus_bits - 1
    payload = 4096 * usable / 8
    # int16 with integer weights in the lanes instead (same 8 sites, weights up to 256): 16 + 11 bits
    lanes_int_weights = usable // (16 + math.ceil(math.log2(8 * 256)))
    ct_int_weights = math.ceil(n / (lanes_int_weights * 4096))
    text = f"""# Encrypted aggregation of a LoRA adapter: packed BFV vs NVFlare's CKKS path

Generated by `tests/benchmarks/bench_he_aggregation.py` on {report['generated']} ({report['machine']}).
One run, one round, {report['sites']} sites, the same adapter in every mode: {report['adapter']}
({n:,} parameters). Raw numbers: [`he_aggregation.json`](he_aggregation.json).

| mode | up / site | down / site | client CPU s / site | server CPU s | max rel. error | rms rel. error |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

| packed mode | upload vs CKKS (fewer) | server CPU vs CKKS (less) | upload vs fp32 |
|---|---|---|---|
{chr(10).join(ratio_rows)}

Targets (issue 4):

{met}

## What was measured

- **Bytes**: the FOBS serialization of the Shareable each side sends (`Shareable.to_bytes()`, what FLARE
  puts on the wire before streaming), metadata included. "down" is what the server sends every site
  after aggregating: for the packed modes the encrypted sum, for NVFlare's CKKS path the encrypted
  global model its `HEModelShareableGenerator` produces, for fp32 the plaintext average.
- **CPU**: process CPU time, all threads, on a 2-core machine. Client = quantize + encrypt + serialize on
  the way up plus deserialize + decrypt + dequantize on the way down (per site). Server = deserialize the
  uploads, check and add them, serialize the result.
- **Error**: every mode is compared with the float64 average of the sites' fp32 differences weighted by
  their example counts {report['example_counts']}. `max_rel_error` = max |estimate - truth| / max |truth|;
  `rms_rel_error` = ||estimate - truth||_2 / ||truth||_2.
- **Data**: per-site differences with std {report['diff_std']:g} (the size of one round's LoRA update),
  correlated between sites (a shared direction plus site noise); clip bound {report['clip']:g} (6 sigma);
  values clipped: int16 {p16['values_clipped']}, int8 {p8['values_clipped']}.
- **NVFlare CKKS**: `HEModelEncryptor` (weighs by `NUM_STEPS_CURRENT_ROUND`, its HE default),
  `HEInTimeAccumulateWeightedAggregator`, `HEModelShareableGenerator` and `HEModelDecryptor`, the real
  classes driven through their FLARE interfaces (`process`, `accept`, `aggregate`,
  `shareable_to_learnable`, `learnable_to_shareable`), with a context made like `HEBuilder`'s (8192,
  [60, 40, 40], scale 2^40, symmetric, relinearization keys) and loaded through FLARE's own
  `load_tenseal_context_from_workspace`. Its FOBS decomposer serializes the context with its
  evaluation keys ({ckks['context_bytes']['per_tensor_in_fobs'] / 1e3:.0f} KB) next to every one of the
  {report['tensors']} tensors ({mb(ckks['context_bytes']['per_tensor_in_fobs'] * report['tensors'])} per upload) and
  parses it again on receipt, which is much of its server CPU; the CKKS ciphertexts themselves
  (8192 slots, 3 x 64-bit words per coefficient) take the rest. Its error is CKKS's approximation noise.

## Packed BFV settings

Context: BFV, poly_modulus_degree {BFV.poly_modulus_degree}, SEAL's 128-bit default coefficient modulus
(36+36+37 bits, 72 of them carry data), plain modulus the largest {BFV.plain_modulus_bits}-bit batching
prime, symmetric encryption. The server's context holds parameters only.

| mode | bits | lane bits | lanes / slot | max sites | ciphertexts | chunks | bytes / ciphertext |
|---|---|---|---|---|---|---|---|
| int16 | {i16['bits']} | {i16['lane_bits']} | {i16['lanes_per_slot']} | {i16['max_sites']} | {i16['ciphertexts']} | {i16['chunks']} | {i16['bytes_per_ciphertext']:,} |
| int8 | {i8['bits']} | {i8['lane_bits']} | {i8['lanes_per_slot']} | {i8['max_sites']} | {i8['ciphertexts']} | {i8['chunks']} | {i8['bytes_per_ciphertext']:,} |

Lane width = bits + ceil(log2(max_sites)): the exact bound for a sum of `max_sites` biased integers, so no
sum can carry into the next lane. Weights enter before rounding (each site scales its clipped values by
min(count, full_weight) / full_weight, here full_weight = {report['full_weight']}), so they cost no lane
bits; the error bound becomes step x n / sum(a) = {p16['error_bound_abs']:.2e} (int16) instead of one step.
Putting integer weights into the lanes instead (say up to 256 per site) would widen int16 lanes to
{16 + math.ceil(math.log2(8 * 256))} bits: {lanes_int_weights} lanes per slot, {ct_int_weights} ciphertexts,
about {mb(ct_int_weights * ct)} per upload, {ckks['up_bytes_per_site'] / (ct_int_weights * ct):.1f}x fewer bytes than
CKKS: short of the 10x target.

## Where the limits are

- A ciphertext at n=4096 is two polynomials of 4096 coefficients modulo a 72-bit modulus: 73.7 KB of
  entropy. SEAL stores each 36-bit residue in a 64-bit word and compresses with zstd; TenSEAL writes
  {ct / 1e3:.1f} KB. It carries 4096 slots x {usable} usable bits = {payload / 1e3:.1f} KB of packed integers,
  an expansion of {ct / payload:.2f}x that no packing can beat at these parameters.
- int16: {i16['lanes_per_slot']} lanes use {i16['lanes_per_slot'] * i16['lane_bits']} of {usable} bits, so
  {ct / (i16['lanes_per_slot'] * 4096):.2f} bytes per parameter against 4 for fp32
  ({p16['up_bytes_per_site'] / fp32['up_bytes_per_site']:.2f}x fp32). A fourth lane needs 4 x 19 = 76 bits
  (or lanes of 14 bits, too narrow for 16-bit integers).
- int8: {i8['lanes_per_slot']} lanes use {i8['lanes_per_slot'] * i8['lane_bits']} bits:
  {ct / (i8['lanes_per_slot'] * 4096):.2f} bytes per parameter ({p8['up_bytes_per_site'] / fp32['up_bytes_per_site']:.2f}x fp32).
  A sixth lane would need lanes of at most {usable // 6} bits, i.e. max_sites <= {2 ** (usable // 6 - 8)}.
- The plain modulus cannot grow: a ciphertext at n=4096 survives 67 - plain_modulus_bits doublings of its
  noise (measured), and {BFV.plain_modulus_bits} bits keep room for 32 sites with a 3-bit margin over that
  worst case; SEAL caps the plain modulus at 60 bits. n=8192 more than doubles the bytes per slot (174 of
  its 218 modulus bits carry data) without lifting the cap, so it only helps beyond 32 sites.
- What would go further: SEAL can write a symmetric ciphertext with its second polynomial replaced by a
  64-byte seed (`Encryptor::encrypt_symmetric` as `Serializable<Ciphertext>`), halving uploads (int8
  near {0.5 * p8['up_bytes_per_site'] / fp32['up_bytes_per_site']:.2f}x fp32, int16 near
  {0.5 * p16['up_bytes_per_site'] / fp32['up_bytes_per_site']:.2f}x). TenSEAL 0.3.18 does not expose it. The
  aggregate coming down stays a full ciphertext.
- int16's error is the quantization step: clip / 32767 = {step_size(report['clip'], 16):.2e} per site,
  bound {p16['error_bound_abs']:.2e} for this average, measured {p16['max_abs_error']:.2e}. Relative error
  therefore depends on the clip bound matching the data: 6 sigma costs one bit against 3 sigma but clips
  (almost) nothing; a bound far above the data wastes bits, one far below biases the average.
"""
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="folder for the JSON and md")
    ap.add_argument("--quick", action="store_true", help="4 layers (524,288 parameters) instead of 32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    common_decomposers.register()  # numpy arrays in Shareables, as every FLARE process registers them
    layers = 4 if args.quick else 32
    shapes = lora_shapes(layers)
    diffs = site_diffs(shapes, args.seed)
    layout = AdapterLayout.from_tensors(diffs[0])
    truth = sum(c * layout.flatten(d).double() for c, d in zip(EXAMPLES, diffs)) / sum(EXAMPLES)
    truth = truth.numpy()

    modes = {}
    for name, settings in PACKED.items():
        print(f"{name} ...", flush=True)
        modes[name] = run_packed(name, settings, diffs, truth, layout, args.seed)
    print("nvflare_ckks_stock ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="he_bench_") as tmp:
        modes["nvflare_ckks_stock"] = run_nvflare_ckks(diffs, truth, layout, Path(tmp))
    print("plaintext_fp32 ...", flush=True)
    modes["plaintext_fp32"] = run_plaintext(diffs, truth, layout)

    report = {
        "adapter": f"Llama-7B shapes (hidden 4096, {layers} layers), LoRA r=8 on q_proj and v_proj, lora_A 8x4096 "
        "and lora_B 4096x8 per module",
        "adapter_params": layout.n_values,
        "sites": len(SITES),
        "quick": args.quick,
        "example_counts": EXAMPLES,
        "full_weight": FULL_WEIGHT,
        "bfv": BFV.model_dump(),
        "diff_std": DIFF_STD,
        "clip": CLIP,
        "definitions": {
            "up_bytes_per_site": "FOBS-serialized Shareable one site sends the server (mean over sites)",
            "down_bytes_per_site": "FOBS-serialized Shareable the server sends each site after aggregating",
            "client_cpu_s": "process CPU seconds per site: encrypt side + decrypt side (filters, (de)serialization)",
            "server_cpu_s": "process CPU seconds for the server's whole round: deserialize, check, aggregate, serialize",
            "max_rel_error": "max |estimate - truth| / max |truth|, truth = float64 average of the sites' fp32 "
            "differences weighted by their example counts",
            "rms_rel_error": "||estimate - truth||_2 / ||truth||_2",
        },
        "modes": modes,
        "tensors": len(shapes),
        "generated": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {sys.version.split()[0]}, "
        f"tenseal {ts.__version__}",
    }
    report["targets"] = targets(modes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "he_aggregation.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "he_aggregation.md", report)
    for name, r in modes.items():
        print(
            f"{name:20s} up {mb(r['up_bytes_per_site']):>9s} down {mb(r['down_bytes_per_site']):>9s} "
            f"client {r['client_cpu_s']:6.2f}s server {r['server_cpu_s']:6.2f}s max_rel_err {r['max_rel_error']:.2e}"
        )
    for what, ok in report["targets"]["met"].items():
        print(f"{'met' if ok else 'NOT MET':8s} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
