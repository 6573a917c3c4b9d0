"""Greedy answers to records in the job's prompt format, and a model's scores on a site's test split.

``generate_answers`` is what a reader of the result sees (the inference command uses it too);
``score_test_split`` is what a hospital reports each round: numbers only, no text leaves the site.
The loss is the trainer's (mean per answer token, ``LocalTrainer.evaluate``), so test and validation losses
compare directly.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from .prompting import IGNORE_INDEX, PromptBuilder
from .test_metrics import (
    diagnosis_group_match,
    is_diagnosis_group_record,
    perplexity,
    rouge_l_f1,
    token_accuracy_counts,
)
from .trainer import collate_batch

# Chat templates' end-of-turn tokens (Llama 3, Qwen2/ChatML, Gemma, Phi-3): an instruct model ends its answer
# with one of these rather than with the tokenizer's eos, so generation stops at whichever comes first.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """eos, the generation config's eos ids, and any end-of-turn token the tokenizer knows."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return sorted({i for i in ids if i is not None})


def reference_answer(record: dict) -> str:
    """The gold answer of a record: its response, or the content of its last (assistant) message."""
    if "messages" in record:
        return record["messages"][-1]["content"]
    return record.get("response", "")


def prompt_ids(tokenizer, prompts: PromptBuilder, record: dict) -> list[int]:
    """The token ids a model continues to answer ``record``: those training put before the answer.

    The plain format's prompt text has no ``<s>`` (the tokenizer adds it, as in training); a rendered chat
    template carries its own begin-of-text, so adding one would double it.
    """
    return tokenizer(prompts.prompt_text(record), add_special_tokens=prompts.format == "plain")["input_ids"]


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: PromptBuilder, records: Sequence[dict], max_new_tokens: int = 32, batch_size: int = 8
) -> list[str]:
    """Greedy answers, one per record, from ``prompts.prompt_text(record)`` (the record's last answer left out).

    Prompts are padded on the LEFT so every row's next token follows its own prompt; generation stops at eos or
    an end-of-turn token, and never runs past ``max_new_tokens``. Special tokens are dropped from the answers.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad_id
    )
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        encoded = [prompt_ids(tokenizer, prompts, r) for r in records[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


@torch.no_grad()
def loss_and_accuracy(model, examples: list[dict], pad_id: int, batch_size: int) -> tuple[float, int, int, int]:
    """(summed loss, answer tokens, correctly predicted answer tokens, counted) over the examples."""
    device = next(model.parameters()).device
    total, tokens, correct, counted = 0.0, 0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_batch(examples[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        shifted = logits[:, :-1]
        total += F.cross_entropy(
            shifted.reshape(-1, shifted.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        tokens += int((labels != IGNORE_INDEX).sum())
        right, n = token_accuracy_counts(logits, batch["labels"])
        correct, counted = correct + right, counted + n
    return total, tokens, correct, counted


def score_test_split(
    model,
    tokenizer,
    prompts: PromptBuilder,
    records: Sequence[dict],
    *,
    max_examples: int,
    max_new_tokens: int,
    max_seq_length: int,
    batch_size: int = 8,
) -> dict:
    """The model's scores on the first ``max_examples`` test records, as a plain dict of numbers:

    ``test_loss`` (mean per answer token, as ``LocalTrainer.evaluate``), ``test_perplexity``,
    ``test_token_accuracy``, ``test_exact_match`` (diagnosis group, over records asking for it; None when
    none do), ``test_rouge_l`` (mean ROUGE-L F1 over the other records; None when there are none), and the
    counts behind them: ``test_examples``, ``test_tokens``, ``test_exact_match_examples``,
    ``test_rouge_l_examples``, ``test_truncated``.
    """
    records = list(records[:max_examples])
    model.eval()
    split = prompts.tokenize_all(records, max_seq_length, "test data (data.test)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss_sum, tokens, correct, counted = loss_and_accuracy(model, split.examples, pad_id, batch_size)
    loss = loss_sum / tokens if tokens else math.nan
    answers = generate_answers(model, tokenizer, prompts, records, max_new_tokens, batch_size) if records else []
    matches, rouge = [], []
    for record, answer in zip(records, answers):
        gold = reference_answer(record)
        if is_diagnosis_group_record(record):
            matches.append(diagnosis_group_match(answer, gold))
        else:
            rouge.append(rouge_l_f1(answer, gold))
    return {
        "test_loss": loss,
        "test_perplexity": perplexity(loss),
        "test_token_accuracy": correct / counted if counted else math.nan,
        "test_exact_match": sum(matches) / len(matches) if matches else None,
        "test_rouge_l": sum(rouge) / len(rouge) if rouge else None,
        "test_examples": len(records),
        "test_tokens": tokens,
        "test_exact_match_examples": len(matches),
        "test_rouge_l_examples": len(rouge),
        "test_truncated": split.truncated,
    }
