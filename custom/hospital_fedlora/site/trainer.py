"""Local LoRA training and evaluation on one site's data, and the adapter as plain arrays: no FLARE.

The executor owns one ``LocalTrainer`` per job. Round r's batches and dropout are a function of the seed
and r alone: batches continue a stream of seeded epoch permutations at the position round r reaches, so
each round sees new examples, and a site that restarts (or a job resumed from its log) trains round r
exactly as an uninterrupted run would. The adapter's tensors use PEFT's own state-dict keys, so they are
exactly what a PEFT adapter folder holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from ..adapter_files import AdapterState
from ..adapter_layout import AdapterLayout
from .lora_variants import add_proximal_gradient
from .prompting import IGNORE_INDEX, PromptBuilder


def _derive(seed: int, purpose: str, n: int) -> int:
    """An independent 63-bit seed for one purpose and index."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}:{n}".encode()).digest()[:8], "big") >> 1


# ------------------------------------------------------------------------------------------ the adapter
def get_adapter_state(model: PeftModel) -> AdapterState:
    return {k: v.detach().float().cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(
    model: PeftModel, state: Mapping[str, np.ndarray], source: str = "global adapter", layout: AdapterLayout | None = None
) -> None:
    """Load ``state`` into ``model``'s adapter, refusing anything that does not match it exactly.

    ``layout``: the model's adapter layout when the caller already knows it (else read from the model).
    """
    (layout or AdapterLayout.from_tensors(get_adapter_state(model))).check(state, source)
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in state.items()}
    set_peft_model_state_dict(model, tensors)


def subtract(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> AdapterState:
    return {k: (new[k] - old[k]).astype(np.float32) for k in new}


def adapter_config_dict(model: PeftModel) -> dict:
    cfg = model.peft_config["default"].to_dict()
    # The base model's path is site-local; the adapter works with any copy of the same checkpoint.
    cfg["base_model_name_or_path"] = None
    # peft keeps target_modules as a set; sorted, so every site sends byte-identical configs.
    return json.loads(json.dumps(cfg, default=sorted))


# ---------------------------------------------------------------------------------------------- batching
def collate_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding has attention 0 and label -100."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention[row, :n] = 1
        labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class StepReport:
    step: int
    steps: int
    loss: float
    tokens_per_s: float


@dataclass(frozen=True)
class TrainResult:
    steps: int
    mean_loss: float
    last_loss: float
    tokens: int
    seconds: float


# (LoRA parameters, this rank's loss sum, this rank's tokens) -> the step's totals over all ranks; sums the
# parameters' gradients across ranks in place (site/data_parallel.py).
GradientSync = Callable[[list[torch.Tensor], float, int], tuple[float, int]]


def _response_tokens(example: dict) -> int:
    """Next-token targets the example adds to a batch's loss (its response tokens after the first position)."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)


LossWeighting = Literal["token", "example"]


def _loss_weight(example: dict, weighting: LossWeighting) -> int:
    """What the example counts for in a step's loss divisor: its response tokens, or 1 per answered example."""
    tokens = _response_tokens(example)
    return tokens if weighting == "token" else int(tokens > 0)


class LocalTrainer:
    # Data-parallel training (site/data_parallel.py) sets these on every rank's trainer: each rank trains on
    # its share of every step's examples and ``gradient_sync`` sums the gradients before the step.
    rank: int = 0
    world_size: int = 1
    gradient_sync: GradientSync | None = None

    def __init__(
        self,
        model: PeftModel,
        tokenizer,
        train_records: Sequence[dict],
        val_records: Sequence[dict],
        *,
        max_seq_length: int,
        batch_size: int,
        micro_batch_size: int,
        learning_rate: float,
        weight_decay: float,
        seed: int,
        prompts: PromptBuilder | None = None,
        fedprox_mu: float = 0.0,
        loss_weighting: LossWeighting = "token",
    ):
        """``prompts``: the job's prompt format for this tokenizer (default: the default task's).
        ``fedprox_mu``: FedProx's proximal weight; each round's anchor is the adapter it starts from.
        ``loss_weighting``: ``token`` (every response token counts the same) or ``example`` (every example's
        mean token loss counts the same, so a two-word answer weighs as much as a long summary)."""
        self.model = model
        self.device = next(p for p in model.parameters() if p.requires_grad).device
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        prompts = prompts or PromptBuilder(tokenizer)
        self.prompts = prompts  # the job's prompt format, also for generating answers to score
        self.prompt_format = prompts.format
        train = prompts.tokenize_all(train_records, max_seq_length, "train data (data.train)")
        val = prompts.tokenize_all(val_records, max_seq_length, "validation data (data.validation)")
        self.train_examples, self.val_examples = train.examples, val.examples
        # Records cut to max_seq_length, per split: the executor reports them, nothing is cut silently.
        self.truncated = {"train": train.truncated, "validation": val.truncated}
        self.batch_size = batch_size
        self.micro_batch_size = min(micro_batch_size, batch_size)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.seed = seed
        self.fedprox_mu = fedprox_mu
        self.loss_weighting = loss_weighting

    @property
    def num_train_examples(self) -> int:
        return len(self.train_examples)

    def _indices(self, start: int, n: int) -> list[int]:
        """Positions ``start .. start + n`` of the stream of epoch permutations (epoch e seeded by seed and e)."""
        size, out = len(self.train_examples), []
        for pos in range(start, start + n):
            epoch, i = divmod(pos, size)
            if i == 0 or not out:
                order = torch.randperm(size, generator=torch.Generator().manual_seed(_derive(self.seed, "epoch", epoch)))
            out.append(int(order[i]))
        return out

    def _micro_batches(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        chunks = [indices[i : i + self.micro_batch_size] for i in range(0, len(indices), self.micro_batch_size)]
        return [
            {k: v.to(self.device) for k, v in collate_batch([self.train_examples[i] for i in c], self.pad_id).items()}
            for c in chunks
        ]

    def _next_token_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 logits at every position but the last, the labels they predict)."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, :-1].float(), batch["labels"][:, 1:]

    def _summed_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Sum of next-token losses over response tokens, and how many there were."""
        logits, labels = self._next_token_logits(batch)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, int((labels != IGNORE_INDEX).sum())

    def _training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The micro-batch's share of a step's loss numerator under ``loss_weighting``."""
        if self.loss_weighting == "token":
            return self._summed_loss(batch)[0]
        logits, labels = self._next_token_logits(batch)
        per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                    reduction="none").view(labels.shape)  # fmt: skip
        counts = (labels != IGNORE_INDEX).sum(dim=1)
        return (per_token.sum(dim=1) / counts.clamp(min=1)).sum()

    def train(self, steps: int, progress: Callable[[StepReport], None] | None = None, round: int = 0) -> TrainResult:
        """``steps`` optimizer steps of round ``round`` (0-based): its batches follow those of rounds before it."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # dropout draws from the round's own seed, nothing else's
            # Each rank draws its own masks; rank 0 draws those of a single-process run.
            torch.manual_seed(_derive(self.seed, "dropout" if self.rank == 0 else f"dropout:{self.rank}", round))
            return self._train(steps, progress, first=round * steps * self.batch_size)

    def _train(self, steps: int, progress: Callable[[StepReport], None] | None, first: int) -> TrainResult:
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        # A fresh optimizer each round: the global adapter changed under it, old moments would be stale.
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        # A step that failed midway last round (out of memory, say) may have left gradients on the parameters.
        optimizer.zero_grad(set_to_none=True)
        # FedProx's anchor: the adapter this round starts from, i.e. the global adapter the site received.
        anchor = [p.detach().clone() for p in params] if self.fedprox_mu else None
        losses, tokens, start = [], 0, time.perf_counter()
        for step in range(1, steps + 1):
            indices = self._indices(first + (step - 1) * self.batch_size, self.batch_size)
            # Weight micro-batches by the whole step's divisor (response tokens or answered examples, all ranks')
            # so accumulation, on one rank or several, equals one big batch exactly.
            n_targets = sum(_loss_weight(self.train_examples[i], self.loss_weighting) for i in indices)
            share = indices[self.rank * len(indices) // self.world_size : (self.rank + 1) * len(indices) // self.world_size]
            step_loss, step_tokens = 0.0, 0
            for m in self._micro_batches(share):
                loss_sum = self._training_loss(m)
                (loss_sum / max(n_targets, 1)).backward()
                step_loss += loss_sum.item()
                step_tokens += int(m["attention_mask"].sum())
            if self.gradient_sync is not None:
                step_loss, step_tokens = self.gradient_sync(params, step_loss, step_tokens)
            tokens += step_tokens
            if anchor is not None:
                add_proximal_gradient(params, anchor, self.fedprox_mu)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss / max(n_targets, 1))
            if progress is not None:
                elapsed = time.perf_counter() - start
                progress(StepReport(step, steps, losses[-1], tokens / elapsed if elapsed > 0 else 0.0))
        self.model.eval()
        return TrainResult(steps, sum(losses) / len(losses), losses[-1], tokens, time.perf_counter() - start)

    @torch.no_grad()
    def evaluate(self, max_examples: int) -> float:
        """Mean loss per response token over the first ``max_examples`` validation records."""
        self.model.eval()
        examples = self.val_examples[:max_examples]
        total, count = 0.0, 0
        for i in range(0, len(examples), self.micro_batch_size):
            batch = collate_batch(examples[i : i + self.micro_batch_size], self.pad_id)
            loss_sum, n = self._summed_loss({k: v.to(self.device) for k, v in batch.items()})
            total += loss_sum.item()
            count += n
        return total / count if count else math.nan

    @torch.no_grad()
    def evaluate_base(self, max_examples: int) -> float:
        """The same score with the adapter switched off: the base model alone."""
        with self.model.disable_adapter():
            return self.evaluate(max_examples)
