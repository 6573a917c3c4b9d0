"""Executor-path local training against the plain peft + transformers loop, on one placement (bf16 or 4-bit).

The executor side is what ``LoraExecutor`` does in a round besides evaluation, built as it builds it
(``load_records``, ``choose_placement``, ``load_base_model``, ``apply_lora``, ``LocalTrainer``): set the global
adapter, train, read the adapter back, take the difference. The other side is ``plain_loop`` from
``tests/benchmarks/bench_training_throughput.py`` on the same model and the same tokenized examples. After
one untimed step of each, the two alternate (A B A B ...); each run is timed from outside, between CUDA
synchronizations, with the peak GPU memory reset before it.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch
from bench_training_throughput import plain_loop

from hospital_fedlora.config import SiteConfig, TrainingRecipe
from hospital_fedlora.site.dataset import load_records
from hospital_fedlora.site.model_loading import apply_lora, choose_placement, load_base_model
from hospital_fedlora.site.trainer import LocalTrainer, get_adapter_state, set_adapter_state, subtract

MIB = 1024 * 1024


class BatchesToDevice:
    """``plain_loop`` collates on the CPU; a researcher's loop moves each batch to the model's device."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device

    def parameters(self):
        return self.model.parameters()

    def train(self, mode: bool = True):
        return self.model.train(mode)

    def __call__(self, **batch):
        return self.model(**{k: v.to(self.device) for k, v in batch.items()})


def _timed(fn: Callable[[], int], cuda: bool) -> tuple[float, float | None]:
    """Tokens per second of ``fn`` (which returns its token count) and its peak GPU memory in MiB."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tokens = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / MIB if cuda else None
    return tokens / seconds, peak


def compare(
    site: SiteConfig, recipe: TrainingRecipe, steps: int, repeats: int, log: Callable[[str], None] = print
) -> dict:
    source = f"device check ({site.site})"
    placement = choose_placement(site.device, site.dtype, site.load_in_4bit, source)
    cuda = placement.device.type == "cuda"
    label = f"{str(placement.dtype).removeprefix('torch.')}{' 4-bit' if placement.load_in_4bit else ''} on {placement.device}"
    train = load_records(site.data, "train", source)
    started = time.perf_counter()
    model, tokenizer = load_base_model(site.base_model_path, placement, source)
    model = apply_lora(model, recipe.lora, recipe.seed)
    load_s = time.perf_counter() - started
    model_mib = torch.cuda.memory_allocated() / MIB if cuda else None
    trainer = LocalTrainer(
        model, tokenizer, train, [], max_seq_length=recipe.max_seq_length, batch_size=recipe.batch_size,
        micro_batch_size=site.micro_batch_size, learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay, seed=recipe.seed,
    )  # fmt: skip
    loop_model = BatchesToDevice(model, trainer.device)
    start_state = get_adapter_state(model)
    log(f"  {label}: model loaded in {load_s:.1f} s; {len(trainer.train_examples)} examples")

    def executor(n: int) -> int:
        set_adapter_state(model, start_state)
        result = trainer.train(n)
        subtract(get_adapter_state(model), start_state)
        return result.tokens

    def plain(n: int, seed: int) -> int:
        set_adapter_state(model, start_state)
        tokens, _ = plain_loop(loop_model, trainer.train_examples, trainer.pad_id, n, recipe.batch_size,
                               trainer.micro_batch_size, recipe.learning_rate, seed)  # fmt: skip
        return tokens

    # kernels, allocator and cuBLAS set up outside the timed runs
    executor(1)
    plain(1, 0)
    runs = {"executor": [], "plain_loop": []}
    peaks = {"executor": [], "plain_loop": []}
    for rep in range(repeats):
        for side, fn in (("executor", lambda: executor(steps)), ("plain_loop", lambda: plain(steps, rep))):
            rate, peak = _timed(fn, cuda)
            runs[side].append(rate)
            peaks[side].append(peak)
        memory = f", peak {peaks['executor'][-1]:,.0f} / {peaks['plain_loop'][-1]:,.0f} MiB" if cuda else ""
        log(f"  {label} repeat {rep + 1}/{repeats}: executor {runs['executor'][-1]:,.0f} tok/s, "
            f"plain loop {runs['plain_loop'][-1]:,.0f} tok/s{memory}")  # fmt: skip
    mean_tokens = statistics.mean(len(e["input_ids"]) for e in trainer.train_examples)
    del trainer, loop_model, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    ratios = [e / p for e, p in zip(runs["executor"], runs["plain_loop"])]  # each repeat ran both sides
    return {
        "placement": label,
        "executor_tokens_per_s": round(statistics.median(runs["executor"]), 1),
        "plain_loop_tokens_per_s": round(statistics.median(runs["plain_loop"]), 1),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        # the two sides' ranges over the repeats overlap: the difference is inside run-to-run noise
        "within_run_to_run_spread": min(runs["executor"]) <= max(runs["plain_loop"])
        and min(runs["plain_loop"]) <= max(runs["executor"]),
        "peak_gpu_memory_mib": {k: round(max(v), 1) for k, v in peaks.items()} if cuda else None,
        "model_gpu_memory_mib": round(model_mib, 1) if cuda else None,
        "model_load_s": round(load_s, 1),
        "steps": steps,
        "repeats": repeats,
        "warmup_steps": 1,
        "batch_size": recipe.batch_size,
        "micro_batch_size": min(site.micro_batch_size, recipe.batch_size),
        "max_seq_length": recipe.max_seq_length,
        "mean_example_tokens": round(mean_tokens, 1),
        "all_executor_tokens_per_s": [round(x, 1) for x in runs["executor"]],
        "all_plain_loop_tokens_per_s": [round(x, 1) for x in runs["plain_loop"]],
    }
