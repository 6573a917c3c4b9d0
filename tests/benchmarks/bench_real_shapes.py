"""The shipped components at the real Llama-3.2-1B and Llama-3.1-8B shapes (random weights, built offline).

Writes ``<out>/real_shapes.json`` and ``<out>/real_shapes.md``. LoRA r=16 on q/k/v/o, as the peft config the
executor builds (``model_loading.lora_config``). For each shape: the adapter's parameters; the bytes one
site uploads per round through each job's own result filters (``jobs/fedlora_plain``: fp32;
``jobs/fedlora_he``: packed BFV int16 and int8 under the job's shipped settings, real encryption); peak RSS
of loading the base model in bf16 with ``AutoModelForCausalLM`` (a child process). For the 1B shape also:
``LocalTrainer`` against ``plain_loop`` (bench_training_throughput.py) on CPU, interleaved A B A B, and one
site's whole round (``LoraExecutor`` set-up, train task, encrypt filter; a child process) with its peak RSS.

Usage: ``python tests/benchmarks/bench_real_shapes.py --out docs/benchmarks`` (builds the models into
``workspace/base_model_<shape>`` if absent); ``--quick`` runs everything on scaled-down shapes in a temp folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from bench_he_aggregation import PACKED, SHIPPED, ciphertext_bytes, packed_job, plain_job, train_result  # noqa: E402
from bench_training_throughput import plain_loop  # noqa: E402

from hospital_fedlora.config import LoraSettings  # noqa: E402
from hospital_fedlora.he.bfv_context import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE, BFVParams, make_context, serialize_context  # noqa: E402

from job_in_process import REPO, JobInProcess  # noqa: E402

LORA = LoraSettings(r=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
SHAPES = ("llama-3.2-1b", "llama-3.1-8b")
# --quick: the same code on shapes a test can afford (heads, tying and rope as published)
QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=4096)  # fmt: skip
SITE = "hospital-a"
EXAMPLES = 240  # hospital-a's training examples
DIFF_STD = 1e-3


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --------------------------------------------------------------------------------------- in this process
def adapter_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """The executor's LoRA on the model, built on the meta device: names and shapes, no memory."""
    from peft import get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from hospital_fedlora.site.model_loading import apply_lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
        peft_model = apply_lora(model, LORA, seed=0)
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}


def message_bytes(shapes: dict[str, tuple[int, ...]], keys: dict) -> dict:
    """One site's upload through each job's result filters: bytes as sent, ciphertext alone, encrypt CPU."""
    g = torch.Generator().manual_seed(0)
    diff = {k: (torch.randn(s, generator=g) * DIFF_STD).numpy() for k, s in shapes.items()}
    out = {}
    for name in ("plaintext_fp32", *PACKED):
        with tempfile.TemporaryDirectory(prefix="real_shapes_") as tmp:
            if name in PACKED:
                fed = packed_job(Path(tmp), keys, PACKED[name], dict(SHIPPED))
            else:
                fed = plain_job(Path(tmp), {k: np.zeros(s, np.float32) for k, s in shapes.items()})
            fed.receive(SITE, fed.task_data(0), 0)  # the filters learn the round and shapes
            start = time.process_time()
            upload = fed.send(SITE, train_result(diff, EXAMPLES), 0)
            seconds = time.process_time() - start
            out[name] = {"up_bytes": len(upload), "ciphertext_bytes": ciphertext_bytes(upload) or None,
                         "filters_and_serialize_cpu_s": round(seconds, 2)}  # fmt: skip
            del fed, upload
    return out


def run_child(kind: str, args, model_dir: Path, attempts: int = 1, need_gb: float = 0) -> dict:
    """``kind`` in a fresh process (its peak RSS is its own); waits for memory when others use it."""
    cmd = [sys.executable, __file__, "--child", kind, "--model", str(model_dir), "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip
    for attempt in range(attempts):
        while need_gb and available_gb() < need_gb:
            print(f"  waiting: {available_gb():.1f} GB available, {kind} needs {need_gb:.1f}", flush=True)
            time.sleep(30)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {kind} failed (rc {proc.returncode}), attempt {attempt + 1}/{attempts}:\n{proc.stderr[-3000:]}", flush=True)
    raise SystemExit(f"{kind} failed")


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


# ----------------------------------------------------------------------------------------- child processes
def child_load_bf16(args) -> dict:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, local_files_only=True)
    loaded = peak_rss_mb()  # the shards are memory-mapped: little of them is resident yet
    with torch.no_grad():  # one forward pass of 8 tokens touches every weight, as the first step would
        model(input_ids=torch.arange(1, 9).unsqueeze(0))
    return {"parameters": sum(p.numel() for p in model.parameters()), "load_and_forward_s": round(time.perf_counter() - start, 1),
            "peak_rss_mb_after_from_pretrained": round(loaded), "peak_rss_mb": round(peak_rss_mb())}  # fmt: skip


def _records_and_model(args):
    from peft import get_peft_model

    from hospital_fedlora.config import load_site_config
    from hospital_fedlora.site.dataset import load_records
    from hospital_fedlora.site.model_loading import choose_placement, load_base_model, lora_config

    site = load_site_config(REPO / "site_configs" / f"{SITE}.yaml")
    train = load_records(site.data, "train", f"site_configs/{SITE}.yaml")
    base, tok = load_base_model(args.model, choose_placement("cpu", "auto", False))
    torch.manual_seed(0)
    return train, get_peft_model(base, lora_config(LORA)), tok


def child_throughput(args) -> dict:
    """``LocalTrainer.train`` (with the executor's adapter set / read / difference) against ``plain_loop``."""
    import hospital_fedlora.site.trainer as ad
    from hospital_fedlora.site.trainer import LocalTrainer

    train, model, tok = _records_and_model(args)
    trainer = LocalTrainer(model, tok, train, [], max_seq_length=args.seq, batch_size=args.batch,
                           micro_batch_size=args.batch, learning_rate=1e-3, weight_decay=0.0, seed=0)  # fmt: skip
    examples = trainer.train_examples  # the very examples the executor trains on (its prompt format)
    start_state = ad.get_adapter_state(model)

    def executor_side() -> float:
        ad.set_adapter_state(model, start_state)
        t0 = time.perf_counter()
        res = trainer.train(args.steps)
        ad.subtract(ad.get_adapter_state(model), start_state)
        return res.tokens / (time.perf_counter() - t0)

    def plain_side(rep: int) -> float:
        ad.set_adapter_state(model, start_state)
        tokens, secs = plain_loop(model, examples, tok.pad_token_id, args.steps, args.batch, args.batch, 1e-3, rep)
        return tokens / secs

    ad.set_adapter_state(model, start_state)
    trainer.train(1), plain_loop(model, examples, tok.pad_token_id, 1, args.batch, args.batch, 1e-3, 99)  # warm-up
    runs = [(executor_side(), plain_side(rep)) for rep in range(args.repeats)]  # A B, A B, ...
    ratios = [e / p for e, p in runs]
    return {"executor_tokens_per_s": [round(e, 2) for e, _ in runs], "plain_loop_tokens_per_s": [round(p, 2) for _, p in runs],
            "ratio": spread(ratios), "torch_threads": torch.get_num_threads(), "peak_rss_mb": round(peak_rss_mb()),
            "steps": args.steps, "repeats": args.repeats, "batch": args.batch, "seq": args.seq}  # fmt: skip


def child_site_round(args) -> dict:
    """One hospital's round as the encrypted job runs it: executor set-up (base model, LoRA, data), the
    task-data filters, the train task, the task-result filters (clip, quantize, pack, encrypt)."""
    made = make_context(BFVParams(), n_threads=1)
    files = {"client": {CLIENT_CONTEXT_FILE: serialize_context(made, secret=True)},
             "server": {SERVER_CONTEXT_FILE: serialize_context(made, secret=False)}}  # fmt: skip
    recipe = {"lora": LORA.model_dump(), "local_steps": args.steps, "batch_size": args.batch, "max_seq_length": args.seq,
              "max_eval_examples": args.batch}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="real_shapes_site_") as tmp:
        configs = Path(tmp) / "site_configs"
        configs.mkdir()
        site = yaml.safe_load((REPO / "site_configs" / f"{SITE}.yaml").read_text())
        site["base_model_path"] = str(args.model)
        site["micro_batch_size"], site["num_threads"] = args.batch, torch.get_num_threads()
        for split in ("train", "validation", "test"):  # relative to the committed file's folder
            if site["data"].get(split):
                site["data"][split] = str((REPO / "site_configs" / site["data"][split]).resolve())
        (configs / f"{SITE}.yaml").write_text(yaml.safe_dump(site))
        fed = JobInProcess(REPO / "jobs" / "fedlora_he", Path(tmp) / "job", [SITE], files, site_configs=configs,
                           client_args={"lora_executor": {"recipe": recipe}})  # fmt: skip
        after_setup = peak_rss_mb()
        start = time.perf_counter()
        result = fed.train(SITE, fed.receive(SITE, fed.task_data(0), 0), 0)
        upload = fed.send(SITE, result, 0)
        seconds = time.perf_counter() - start
    return {"peak_rss_mb_after_setup": round(after_setup), "peak_rss_mb": round(peak_rss_mb()),
            "round_s": round(seconds, 1), "up_bytes": len(upload), "recipe": recipe}  # fmt: skip


CHILDREN = {"load_bf16": child_load_bf16, "throughput": child_throughput, "site_round": child_site_round}


# ------------------------------------------------------------------------------------------------ report
def mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB"


def write_markdown(path: Path, r: dict) -> None:
    rows = []
    for shape, s in r["shapes"].items():
        m = s["messages"]
        rows.append(f"| {shape} | {s['parameters']:,} | {s['adapter_parameters']:,} | {mb(m['plaintext_fp32']['up_bytes'])} "
                    f"| {mb(m['packed_bfv_int16']['up_bytes'])} | {mb(m['packed_bfv_int8']['up_bytes'])} "
                    f"| {s['load_bf16']['peak_rss_mb'] / 1024:.2f} GiB |")  # fmt: skip
    one = r["shapes"][SHAPES[0]]
    t, rnd = one["throughput"], one["site_round"]
    ex, pl = t["executor_tokens_per_s"], t["plain_loop_tokens_per_s"]
    rec = rnd["recipe"]
    text = f"""# The shipped components at real Llama-3.x shapes

Generated by `tests/benchmarks/bench_real_shapes.py` on {r['generated']} ({r['machine']}){' **QUICK: scaled-down shapes**' if r['quick'] else ''}.
The models are built offline with the published configs and seeded random bf16 weights
(`python -m hospital_fedlora_tools.base_model --shape <shape>`, `hospital_fedlora_tools/real_shapes.py`):
memory, bytes and speed are those of the true size; the weights are noise. LoRA r={LORA.r} on
{', '.join(LORA.target_modules)}, as the executor builds it. Raw numbers: [`real_shapes.json`](real_shapes.json).

| shape | base parameters | LoRA parameters | upload fp32 (`fedlora_plain`) | upload packed BFV int16 (`fedlora_he`) | int8 | peak RSS, base loaded in bf16 on CPU |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Uploads are one site's train result after its job's task-result filters, serialized as FLARE sends it
(`Shareable.to_bytes()`), with real encryption under `jobs/fedlora_he`'s shipped settings (clip
{SHIPPED['clip']}, full_weight {SHIPPED['full_weight']}, max_sites 8); ciphertexts alone and the filters' CPU
time are in the JSON. Peak RSS of loading is a fresh process's `ru_maxrss` after
`AutoModelForCausalLM.from_pretrained(..., dtype=torch.bfloat16)` and one forward pass of 8 tokens (the
shards are memory-mapped, so `from_pretrained` alone leaves most weights on disk): reported, not trained.

## {SHAPES[0]}: one site's round on CPU

One hospital's round as `jobs/fedlora_he` runs it, in a child process: `LoraExecutor` set-up (base model
in float32, as the executor loads it on CPU; LoRA; data), the task-data filters, the train task
({rec['local_steps']} steps of batch {rec['batch_size']}, sequences cut to {rec['max_seq_length']} tokens,
validation on {rec['max_eval_examples']} examples before and after) and the task-result filters (clip,
quantize, pack, encrypt). Peak RSS **{rnd['peak_rss_mb'] / 1024:.2f} GiB** ({rnd['peak_rss_mb_after_setup'] / 1024:.2f} GiB
after set-up, before the round); the round took {rnd['round_s']} s and uploaded {mb(rnd['up_bytes'])}.

## {SHAPES[0]}: executor vs a plain peft + transformers loop

`LocalTrainer.train` with the executor's adapter set / read / difference, against `plain_loop` from
`bench_training_throughput.py`, same model (float32 on CPU), data (hospital-a) and tokenized examples (the
executor's prompt format), batch {t.get('batch', r['batch'])}, sequences cut to {t.get('seq', r['seq'])} tokens,
{t.get('steps', r['steps'])} optimizer steps per side per repeat, {t.get('repeats', r['repeats'])} repeats interleaved
(executor, plain, executor, plain, ...) after one untimed step of each, {t['torch_threads']} torch threads.

| executor tokens/s (per repeat) | plain loop tokens/s (per repeat) | ratio: median (min..max) |
|---|---|---|
| {', '.join(f'{x:,.1f}' for x in ex)} | {', '.join(f'{x:,.1f}' for x in pl)} | {t['ratio']['median']:.3f} ({t['ratio']['min']:.3f}..{t['ratio']['max']:.3f}) |

This process's peak RSS (both loops, one model): {t['peak_rss_mb'] / 1024:.2f} GiB.
"""
    path.write_text(text)


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {sys.version.split()[0]}, torch {torch.__version__}"


def models(args, tmp: Path, only: tuple[str, ...] = SHAPES) -> dict[str, Path]:
    from hospital_fedlora_tools.real_shapes import build_real_shape

    out = {}
    for shape in only:
        folder = tmp / shape if args.quick else REPO / "workspace" / f"base_model_{shape}"
        out[shape] = build_real_shape(folder, shape, args.tokenizer_from, log=None, **(QUICK if args.quick else {}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    ap.add_argument("--quick", action="store_true", help="scaled-down shapes in a temporary folder")
    ap.add_argument("--tokenizer-from", type=Path, default=REPO / "workspace" / "base_model")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per side per repeat, and in the site's round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32, help="max_seq_length: short sequences")
    ap.add_argument("--throughput-only", action="store_true",
                    help="re-measure only the 1B executor vs plain loop, into the report in --out")
    ap.add_argument("--load-only", action="store_true", help="re-measure only the bf16 loads, into the report in --out")
    ap.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0

    if args.throughput_only:
        report = json.loads((args.out / "real_shapes.json").read_text())
        with tempfile.TemporaryDirectory(prefix="real_shapes_models_") as tmp:
            folder = models(args, Path(tmp), only=SHAPES[:1])[SHAPES[0]]
            report["shapes"][SHAPES[0]]["throughput"] = run_child("throughput", args, folder)
        (args.out / "real_shapes.json").write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(args.out / "real_shapes.md", report)
        return 0
    if args.load_only:
        report = json.loads((args.out / "real_shapes.json").read_text())
        with tempfile.TemporaryDirectory(prefix="real_shapes_models_") as tmp:
            for shape, folder in models(args, Path(tmp)).items():
                need = report["shapes"][shape]["weight_bytes"] / 2**30 * 1.1 + 1.5
                report["shapes"][shape]["load_bf16"] = run_child("load_bf16", args, folder, attempts=3, need_gb=need)
        (args.out / "real_shapes.json").write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(args.out / "real_shapes.md", report)
        return 0
    from nvflare.app_common.decomposers import common_decomposers

    common_decomposers.register()
    made = make_context(BFVParams(), n_threads=1)
    keys = {"client": serialize_context(made, secret=True), "server": serialize_context(made, secret=False)}
    report = {"shapes": {}}
    with tempfile.TemporaryDirectory(prefix="real_shapes_models_") as tmp:
        for shape, folder in models(args, Path(tmp)).items():
            print(f"{shape}: adapter and messages ...", flush=True)
            info = json.loads((folder / "build_info.json").read_text())
            shapes = adapter_shapes(folder)
            s = report["shapes"][shape] = {
                "model": str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else "scaled down (--quick)",
                "config": info["shape"], "parameters": info["parameters"], "weight_bytes": info["weight_bytes"],
                "adapter_parameters": sum(int(np.prod(v)) for v in shapes.values()), "adapter_tensors": len(shapes),
                "messages": message_bytes(shapes, keys),
            }  # fmt: skip
            if shape == SHAPES[0]:
                print(f"{shape}: executor vs plain loop ...", flush=True)
                s["throughput"] = run_child("throughput", args, folder)
                print(f"{shape}: one site's round ...", flush=True)
                s["site_round"] = run_child("site_round", args, folder)
            print(f"{shape}: loading in bf16 ...", flush=True)
            # bf16 weights plus the process's own ~1 GB; several tries: others share this machine
            s["load_bf16"] = run_child("load_bf16", args, folder, attempts=3, need_gb=info["weight_bytes"] / 2**30 * 1.1 + 1.5)
    report |= {"lora": LORA.model_dump(), "he_settings": {"shipped": SHIPPED, "packing": PACKED, "bfv": BFVParams().model_dump()},
               "steps": args.steps, "repeats": args.repeats, "batch": args.batch, "seq": args.seq, "quick": args.quick,
               "generated": time.strftime("%Y-%m-%d"), "machine": machine()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_shapes.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "real_shapes.md", report)
    print((args.out / "real_shapes.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
