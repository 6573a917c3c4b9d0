"""A site's per-round numbers beyond the loss: the test split scored, and every metric streamed to the server.

Numbers only leave the site: the generated answers behind the test metrics stay here, and the stream goes
through ``metrics_sender.ScalarMetricsSender``, which refuses anything but finite scalars.
"""

from __future__ import annotations

import math
from typing import Sequence

from nvflare.apis.analytix import AnalyticsDataType

from ..config import TrainingRecipe
from .generation import score_test_split
from .trainer import LocalTrainer

COUNTS = ("_examples", "_tokens", "_truncated")  # test-metric keys that count records, not score them


def split_scores(trainer: LocalTrainer, records: Sequence[dict], recipe: TrainingRecipe) -> dict:
    """The trainer's model on the first ``max_test_examples`` test records: loss, perplexity, token accuracy,
    diagnosis-group exact match and ROUGE-L of greedy answers (``generation.score_test_split``)."""
    if not records or recipe.max_test_examples == 0:
        return {}
    scores = score_test_split(
        trainer.model, trainer.tokenizer, trainer.prompts, records, max_examples=recipe.max_test_examples,
        max_new_tokens=recipe.max_new_tokens, max_seq_length=recipe.max_seq_length, batch_size=trainer.micro_batch_size,
    )  # fmt: skip
    return {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def base_split_scores(trainer: LocalTrainer, records: Sequence[dict], recipe: TrainingRecipe) -> dict:
    """The same scores for the base model alone (adapter switched off), prefixed ``base_``; no counts."""
    with trainer.model.disable_adapter():
        scores = split_scores(trainer, records, recipe)
    return {f"base_{k}": v for k, v in scores.items() if not k.endswith(COUNTS)}


def stream_metrics(sender, metrics: dict, step: int) -> None:
    """Every finite scalar of ``metrics`` through the job's metric sender (None: the job streams nothing)."""
    if sender is None or not isinstance(step, int):
        return
    for tag, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            sender.add(tag, float(value), AnalyticsDataType.SCALAR, global_step=step)
