"""Executor-path local training against a plain peft + transformers loop, same model, data and settings.

Writes ``<out>/training_throughput.json`` with ``executor_tokens_per_s``, ``plain_loop_tokens_per_s`` and
``ratio``. Both sides run in this one process, interleaved (A B A B ...), and each reports its best
repeat, so machine noise hits both alike.

The executor side is what ``LoraExecutor`` does in a round besides evaluation: set the global adapter,
``LocalTrainer.train``, read the adapter back and take the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peft import get_peft_model

import hospital_fedlora.site.trainer as ad
from hospital_fedlora.config import load_site_config, parse_recipe
from hospital_fedlora.site.dataset import load_records
from hospital_fedlora.site.model_loading import choose_placement, load_base_model, lora_config
from hospital_fedlora.site.prompting import tokenize_record
from hospital_fedlora.site.trainer import LocalTrainer, collate_batch

REPO = Path(__file__).resolve().parents[2]


def plain_loop(model, examples, pad_id, steps, batch_size, micro, lr, seed) -> tuple[int, float]:
    """The loop a researcher would write: transformers' own loss, mean over each micro-batch."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    tokens, start = 0, time.perf_counter()
    accum = max(1, batch_size // micro)
    for _ in range(steps):
        idx = torch.randint(len(examples), (batch_size,), generator=g).tolist()
        for j in range(accum):
            batch = collate_batch([examples[i] for i in idx[j * micro : (j + 1) * micro]], pad_id)
            out = model(**batch)
            (out.loss / accum).backward()
            tokens += int(batch["attention_mask"].sum())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return tokens, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workspace", type=Path, default=REPO / "workspace")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    job = json.loads((REPO / "jobs/fedlora_plain/app/config/config_fed_client.json").read_text())
    recipe = parse_recipe(job["executors"][0]["executor"]["args"]["recipe"])
    site = load_site_config(REPO / "site_configs" / "hospital-a.yaml")
    placement = choose_placement(site.device, site.dtype, site.load_in_4bit)
    train = load_records(site.data, "train", "site_configs/hospital-a.yaml")
    base, tok = load_base_model(site.base_model_path, placement)
    torch.manual_seed(recipe.seed)
    model = get_peft_model(base, lora_config(recipe.lora))
    examples = [tokenize_record(r, tok, recipe.max_seq_length) for r in train]

    trainer = LocalTrainer(
        model, tok, train, [], max_seq_length=recipe.max_seq_length, batch_size=recipe.batch_size,
        micro_batch_size=site.micro_batch_size, learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay, seed=recipe.seed,
    )
    start_state = ad.get_adapter_state(model)
    exec_runs, plain_runs = [], []
    for rep in range(args.repeats):
        ad.set_adapter_state(model, start_state)
        t0 = time.perf_counter()
        res = trainer.train(args.steps)
        ad.subtract(ad.get_adapter_state(model), start_state)
        exec_runs.append(res.tokens / (time.perf_counter() - t0))

        ad.set_adapter_state(model, start_state)
        tokens, secs = plain_loop(model, examples, tok.pad_token_id, args.steps, recipe.batch_size,
                                  site.micro_batch_size, recipe.learning_rate, rep)
        plain_runs.append(tokens / secs)

    ratios = [e / q for e, q in zip(exec_runs, plain_runs)]  # each repeat measures both, one after the other
    result = {
        "executor_tokens_per_s": round(statistics.median(exec_runs), 1),
        "plain_loop_tokens_per_s": round(statistics.median(plain_runs), 1),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        # the two sides' ranges over the repeats overlap: the difference is inside run-to-run noise
        "within_run_to_run_spread": min(exec_runs) <= max(plain_runs) and min(plain_runs) <= max(exec_runs),
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": recipe.batch_size,
        "micro_batch_size": site.micro_batch_size,
        "device": str(placement.device),
        "torch_threads": torch.get_num_threads(),
        "all_executor_tokens_per_s": [round(x, 1) for x in exec_runs],
        "all_plain_loop_tokens_per_s": [round(x, 1) for x in plain_runs],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
