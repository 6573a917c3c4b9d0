"""Scores of a model on a site's test split, as pure functions of logits, labels and texts: no FLARE, no model.

- token accuracy: the share of answer tokens the model predicts exactly (argmax of the logits at the position
  before each), labels -100 (prompt, padding) ignored, the same shift as the training loss;
- perplexity: ``exp`` of the mean loss per answer token;
- diagnosis-group exact match: for records asking "Assign the diagnosis group.", whether the generated group
  (the text before the first ':') equals the gold one, case and whitespace aside;
- ROUGE-L F1 for every other answer (summaries, free text), computed by ``rouge-score`` (Google's reference
  implementation, also what Hugging Face ``evaluate`` wraps).
"""

from __future__ import annotations

import math
import re

import torch

from .prompting import IGNORE_INDEX

DIAGNOSIS_GROUP_INSTRUCTION = "Assign the diagnosis group."


def token_accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) over a batch: position t's argmax against label t + 1, wherever that label is not -100.

    ``logits``: (batch, length, vocab); ``labels``: (batch, length), as the trainer collates them.
    """
    predicted = logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    return int((predicted.eq(targets) & counted).sum()), int(counted.sum())


def perplexity(mean_token_loss: float) -> float:
    """``exp`` of the mean natural-log loss per answer token; inf where that overflows, nan for nan."""
    if math.isnan(mean_token_loss):
        return math.nan
    try:
        return math.exp(mean_token_loss)
    except OverflowError:
        return math.inf


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def is_diagnosis_group_record(record: dict) -> bool:
    """Whether the record asks for the diagnosis group (its instruction, case and whitespace aside)."""
    instruction = record.get("instruction")
    return isinstance(instruction, str) and _normalise(instruction) == _normalise(DIAGNOSIS_GROUP_INSTRUCTION)


def diagnosis_group(answer: str) -> str:
    """The diagnosis group an answer names: its text before the first ':' (all of it when there is none),
    lower-cased, whitespace runs made one space and trimmed. "Oncology: colorectal cancer" -> "oncology".

    The condition after the colon is not scored: the group is what the task asks to get right, and a free-text
    condition is what ROUGE-L is for.
    """
    return _normalise(answer.split(":", 1)[0])


def diagnosis_group_match(prediction: str, reference: str) -> bool:
    """Exact match of the two answers' diagnosis groups; an empty prediction never matches."""
    predicted = diagnosis_group(prediction)
    return bool(predicted) and predicted == diagnosis_group(reference)


_scorer = None


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words) by ``rouge-score``: its tokenizer lower-cases and splits
    on anything not a letter or digit; no stemming, so the score is the plain word overlap."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer  # imported on first use: sites that never score text never load it

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_scorer.score(reference, prediction)["rougeL"].fmeasure)
