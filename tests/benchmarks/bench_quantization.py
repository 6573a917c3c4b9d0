"""Quantized transport on Llama-3.2-1B tensor shapes: bytes, error and CPU seconds per mode.

Writes ``<out>/quantization.json`` and ``<out>/quantization.md``. Two tensor sets, random normal values
(std 0.02, seeded) at Llama-3.2-1B's published shapes (``hospital_fedlora_tools.real_shapes``):

* ``decoder_layers``: the seven linear weights of decoder layers 0 and 1 (14 tensors, 121.6M values):
  what a full-model message is made of, at a volume a 2-core machine quantizes in seconds;
* ``lora_adapter``: a LoRA r=16 adapter on all seven linear layers of all 16 decoder layers (448 tensors,
  11.0M values): what this bundle's plaintext job sends.

For each mode of ``hospital_fedlora.transport.quantization`` (the filters' numeric core), beside
bitsandbytes' ``quantize_blockwise`` (int8, dynamic code, blocks of 64, on CPU tensors) and NVFlare's
``ModelQuantizer`` / ``ModelDequantizer`` (float16 runs on CPU; its 8- and 4-bit modes call ``.cuda()``:
their error on this machine is recorded, and they are measured where CUDA is present): bytes (codes and
scales), ratio to fp32, relative L2 error, largest error over the largest value, and quantize and
dequantize seconds (wall, median of the repeats with min and max).

Usage: ``python tests/benchmarks/bench_quantization.py --out docs/benchmarks [--repeats 3] [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
from hospital_fedlora.bitsandbytes_notice import silence_kernels_notice  # noqa: E402

silence_kernels_notice()
import bitsandbytes  # noqa: E402
import nvflare  # noqa: E402
from bitsandbytes.functional import dequantize_blockwise, quantize_blockwise  # noqa: E402
from nvflare.apis.fl_context import FLContext  # noqa: E402
from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer  # noqa: E402
from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer  # noqa: E402

from hospital_fedlora.transport.quantization import dequantize_tensors, payload_nbytes, quantize_tensors  # noqa: E402
from hospital_fedlora_tools.real_shapes import SHAPES, weight_shapes  # noqa: E402

OURS = [("fp16", "nearest"), ("bf16", "nearest"), ("int8", "nearest"), ("int8", "stochastic"), ("nf4", "nearest"), ("fp4", "nearest")]
NVFLARE = ["float16", "blockwise8", "normfloat4", "float4"]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tensor_sets(quick: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    shape = SHAPES["llama-3.2-1b"]
    weights = weight_shapes(shape)
    layers = ("model.layers.0.",) if quick else ("model.layers.0.", "model.layers.1.")
    decoder = {k: v for k, v in weights.items() if k.startswith(layers) and any(p in k for p in LINEAR)}
    if quick:  # a quarter of every dimension: the same code paths in a second
        decoder = {k: tuple(d // 4 for d in v) for k, v in decoder.items()}
    r = 16
    adapter = {}
    for name, (out_f, in_f) in decoder.items() if quick else ((k, v) for k, v in weights.items() if any(p in k for p in LINEAR)):
        base = name.removesuffix(".weight")
        adapter[f"{base}.lora_A.weight"] = (r, in_f)
        adapter[f"{base}.lora_B.weight"] = (out_f, r)
    return {"decoder_layers": decoder, "lora_adapter": adapter}


def make_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * 0.02).numpy() for k, s in shapes.items()}


def errors(original: dict[str, np.ndarray], restored: dict) -> dict[str, float]:
    num = den = 0.0
    worst = peak = 0.0
    for k, x in original.items():
        y = torch.as_tensor(restored[k]).float().cpu()
        xt = torch.from_numpy(x)
        num += float(torch.linalg.vector_norm(y - xt, dtype=torch.float64)) ** 2
        den += float(torch.linalg.vector_norm(xt, dtype=torch.float64)) ** 2
        worst = max(worst, float((y - xt).abs().max()))
        peak = max(peak, float(xt.abs().max()))
    return {"relative_l2_error": (num / den) ** 0.5, "max_abs_error_over_max_abs": worst / peak}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ the codecs
def ours(mode: str, rounding: str):
    def run(tensors):
        generator = torch.Generator().manual_seed(0) if rounding == "stochastic" else None
        payload, q_s = timed(lambda: quantize_tensors(tensors, mode, rounding, generator))
        restored, d_s = timed(lambda: dequantize_tensors(payload))
        return payload_nbytes(payload), restored, q_s, d_s

    return run


def bnb_blockwise(tensors):
    def quantize():
        out = {}
        for k, x in tensors.items():
            codes, state = quantize_blockwise(torch.from_numpy(x), blocksize=64)
            out[k] = (codes, state)
        return out

    payload, q_s = timed(quantize)
    restored, d_s = timed(lambda: {k: dequantize_blockwise(c, s) for k, (c, s) in payload.items()})
    nbytes = sum(c.numel() + s.absmax.numel() * 4 + s.code.numel() * 4 for c, s in payload.values())
    return nbytes, restored, q_s, d_s


def nvflare_codec(kind: str):
    def run(tensors):
        ctx = FLContext()
        q, dq = ModelQuantizer(quantization_type=kind), ModelDequantizer()
        (params, state, source), q_s = timed(lambda: q.quantization(params=dict(tensors), fl_ctx=ctx))
        nbytes = sum(v.nbytes for v in params.values())
        nbytes += sum(a.nbytes for s in state.values() for a in s.values() if hasattr(a, "nbytes"))
        restored, d_s = timed(lambda: dq.dequantization(dict(params), state, kind, source, fl_ctx=ctx))
        return nbytes, restored, q_s, d_s

    return run


def codecs() -> list[tuple[str, str, object]]:
    out = [(f"ours/{m}" + ("/stochastic" if r == "stochastic" else ""), m, ours(m, r)) for m, r in OURS]
    out.append(("bitsandbytes/quantize_blockwise", "int8", bnb_blockwise))
    out += [(f"nvflare/{k}", k, nvflare_codec(k)) for k in NVFLARE]
    return out


# ------------------------------------------------------------------------------------------- measuring
def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(tensors: dict[str, np.ndarray], repeats: int) -> dict[str, dict]:
    fp32 = sum(x.nbytes for x in tensors.values())
    rows: dict[str, dict] = {}
    for name, mode, run in codecs():
        q_s, d_s, row = [], [], {"mode": mode}
        print(f"  {name} ...", flush=True)
        try:
            for _ in range(repeats):
                nbytes, restored, q, d = run(tensors)
                q_s.append(q)
                d_s.append(d)
        except Exception as err:  # NVFlare's 8/4-bit modes without CUDA
            rows[name] = {**row, "error": f"{type(err).__name__}: {err}"}
            continue
        row.update(bytes=nbytes, ratio_to_fp32=nbytes / fp32, **errors(tensors, restored))
        rows[name] = {**row, "quantize_s": spread(q_s), "dequantize_s": spread(d_s)}
        del restored
    return rows


def write_markdown(path: Path, report: dict) -> None:
    lines = [
        "# Quantized transport on Llama-3.2-1B shapes",
        "",
        f"`tests/benchmarks/bench_quantization.py`, {report['machine']}; {report['repeats']} repeats, seconds are "
        "wall time, median (min-max). Random normal values (std 0.02) at the published shapes. `ours` is "
        "`hospital_fedlora.transport.quantization`, what the plaintext job's filters run.",
    ]
    for set_name, s in report["sets"].items():
        lines += ["", f"## {set_name}: {s['description']}", "", f"{s['tensors']} tensors, {s['values']:,} values, "
                  f"{s['fp32_bytes'] / 2**20:,.1f} MiB in fp32.", "",
                  "| codec | bytes | ratio to fp32 | relative L2 error | max error / max value | quantize s | dequantize s |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in s["rows"].items():
            if "error" in r:
                lines.append(f"| {name} | fails on this machine: `{r['error'][:90]}` | | | | | |")
                continue
            cell = lambda t: f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})"  # noqa: E731
            lines.append(
                f"| {name} | {r['bytes']:,} | {r['ratio_to_fp32']:.3f} | {r['relative_l2_error']:.2e} | "
                f"{r['max_abs_error_over_max_abs']:.2e} | {cell(r['quantize_s'])} | {cell(r['dequantize_s'])} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one decoder layer at a quarter of every dimension")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine "
                    "two threads spin against whatever else runs, and small tensors take 40x longer)")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    descriptions = {
        "decoder_layers": "the linear weights of decoder layer 0" + ("" if args.quick else " and 1"),
        "lora_adapter": "LoRA r=16 on q, k, v, o, gate, up, down" + (" (those of the set above)" if args.quick else " of all 16 layers"),
    }
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, nvflare {nvflare.__version__}, CUDA {torch.cuda.is_available()}",
        "repeats": args.repeats,
        "quick": args.quick,
        "sets": {},
    }
    for set_name, shapes in tensor_sets(args.quick).items():
        print(f"{set_name}: {len(shapes)} tensors", flush=True)
        tensors = make_tensors(shapes)
        report["sets"][set_name] = {
            "description": descriptions[set_name],
            "tensors": len(tensors),
            "values": sum(x.size for x in tensors.values()),
            "fp32_bytes": sum(x.nbytes for x in tensors.values()),
            "rows": measure(tensors, args.repeats),
        }
        del tensors
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "quantization.md", report)
    print(f"wrote {args.out / 'quantization.json'} and quantization.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
