"""``make compare``'s one model in this process: scoring every setting's adapter, and the in-process baselines.

``score_split`` is the one evaluation every setting goes through (response-token mean loss, perplexity,
token accuracy); on the test split ``answer_scores`` adds what the answers are worth (diagnosis-group exact
match, ROUGE-L), with the very functions the hospitals score with (``site/generation.py``,
``site/test_metrics.py``). ``train_baseline`` trains the local-only and centralized
settings with the executor's own ``LocalTrainer`` (its batches, fresh AdamW per round, its loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from hospital_fedlora.adapter_files import load_peft_adapter
from hospital_fedlora.config import SiteConfig, TrainingRecipe, load_site_config
from hospital_fedlora.site.dataset import load_records
from hospital_fedlora.site.generation import generate_answers, loss_and_accuracy, reference_answer
from hospital_fedlora.site.model_loading import apply_lora, choose_placement, load_base_model
from hospital_fedlora.site.prompting import PromptBuilder
from hospital_fedlora.site.test_metrics import diagnosis_group_match, is_diagnosis_group_record, rouge_l_f1
from hospital_fedlora.site.trainer import LocalTrainer, get_adapter_state, set_adapter_state

Metrics = dict[str, float]


def _summed(model, examples: Sequence[dict], pad_id: int, micro: int) -> tuple[float, int, int]:
    """Summed next-token loss, response-token count and correct argmax predictions: the hospitals' own sums."""
    loss_sum, tokens, correct, _ = loss_and_accuracy(model, list(examples), pad_id, micro)
    return loss_sum, tokens, correct


def _metrics(loss_sum: float, tokens: int, correct: int, examples: int) -> Metrics:
    loss = loss_sum / tokens if tokens else math.nan
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else math.nan,
            "token_accuracy": correct / tokens if tokens else math.nan, "tokens": tokens, "examples": examples}  # fmt: skip


@torch.no_grad()
def score_split(model, splits: Mapping[str, Sequence[dict]], pad_id: int, micro: int = 4) -> dict:
    """THE evaluation of ``make compare``: ``model`` (adapter set) on each hospital's tokenized split and on
    their union. Returns ``{"per_hospital": {site: metrics}, "pooled": metrics}``; the pooled figures are
    token-weighted over all hospitals' examples, as if the splits were one file."""
    model.eval()
    per, total = {}, [0.0, 0, 0, 0]
    for site, examples in splits.items():
        s = _summed(model, examples, pad_id, micro)
        per[site] = _metrics(*s, len(examples))
        total = [a + b for a, b in zip(total, [*s, len(examples)])]
    return {"per_hospital": per, "pooled": _metrics(*total)}


def answer_scores(model, prompts: PromptBuilder, records: Mapping[str, Sequence[dict]], max_new_tokens: int,
                  batch_size: int) -> dict:  # fmt: skip
    """Greedy answers scored as the hospitals score them (``site/generation.py``, ``site/test_metrics.py``):
    diagnosis-group exact match over the records asking for it, ROUGE-L F1 over the others; per hospital and
    pooled over all hospitals' records."""
    per, pooled = {}, {"matches": [], "rouge": []}
    for site, recs in records.items():
        answers = generate_answers(model, prompts.tokenizer, prompts, list(recs), max_new_tokens, batch_size)
        matches = [diagnosis_group_match(a, reference_answer(r)) for r, a in zip(recs, answers) if is_diagnosis_group_record(r)]
        rouge = [rouge_l_f1(a, reference_answer(r)) for r, a in zip(recs, answers) if not is_diagnosis_group_record(r)]
        per[site] = _answer_metrics(matches, rouge)
        pooled["matches"] += matches
        pooled["rouge"] += rouge
    return {"per_hospital": per, "pooled": _answer_metrics(pooled["matches"], pooled["rouge"])}


def _answer_metrics(matches: list[bool], rouge: list[float]) -> Metrics:
    return {"exact_match": sum(matches) / len(matches) if matches else math.nan, "exact_match_examples": len(matches),
            "rouge_l": sum(rouge) / len(rouge) if rouge else math.nan, "rouge_l_examples": len(rouge)}  # fmt: skip


@dataclass
class Bench:
    """The base model with the job's seeded LoRA, every hospital's records, tokenized as the executor does."""

    model: object
    pad_id: int
    prompts: PromptBuilder
    initial: dict[str, np.ndarray]
    recipe: TrainingRecipe
    sites: dict[str, SiteConfig]
    micro: int

    @classmethod
    def load(cls, site_configs: Path, sites: Sequence[str], recipe: TrainingRecipe) -> "Bench":
        configs = {s: load_site_config(Path(site_configs) / f"{s}.yaml", expected_site=s) for s in sites}
        first = configs[sites[0]]
        placement = choose_placement(first.device, first.dtype, first.load_in_4bit)
        model, tokenizer = load_base_model(first.base_model_path, placement)
        model = apply_lora(model, recipe.lora, recipe.seed)  # the same seeded A matrices as every site's
        return cls(model, tokenizer.pad_token_id, PromptBuilder(tokenizer, recipe.task),
                   get_adapter_state(model), recipe, configs, first.micro_batch_size)  # fmt: skip

    def records(self, site: str, split: str) -> list[dict]:
        return load_records(self.sites[site].data, split, f"site_configs/{site}.yaml", self.recipe.task)

    def tokenized(self, split: str, limit: int | None) -> dict[str, list[dict]]:
        """Every hospital's ``split``, its first ``limit`` records (all with None), as training sees them."""
        out = {}
        for site in self.sites:
            records = self.records(site, split)[:limit]
            out[site] = self.prompts.tokenize_all(records, self.recipe.max_seq_length, f"{site} {split}").examples
        return out

    def score(self, state: Mapping[str, np.ndarray] | None, splits: Mapping[str, Sequence[dict]],
              answers_for: Mapping[str, Sequence[dict]] | None = None) -> dict:  # fmt: skip
        """``score_split`` with ``state`` as the adapter; ``None``: the base model alone (adapter off). With
        ``answers_for`` (each hospital's records), also the answer metrics of ``answer_scores``."""
        if state is None:
            with self.model.disable_adapter():
                return self._scores(splits, answers_for)
        set_adapter_state(self.model, state, "adapter under evaluation")
        return self._scores(splits, answers_for)

    def _scores(self, splits, answers_for) -> dict:
        scores = score_split(self.model, splits, self.pad_id, self.micro)
        if answers_for is not None:
            answers = answer_scores(self.model, self.prompts, answers_for, self.recipe.max_new_tokens, self.micro)
            for site, m in answers["per_hospital"].items():
                scores["per_hospital"][site].update(m)
            scores["pooled"].update(answers["pooled"])
        return scores

    def score_folder(self, adapter_dir: Path, splits: Mapping[str, Sequence[dict]],
                     answers_for: Mapping[str, Sequence[dict]] | None = None) -> dict:  # fmt: skip
        state, _ = load_peft_adapter(adapter_dir)
        return self.score(state, splits, answers_for)

    def train_baseline(self, train_records: list[dict], seed: int, rounds: int, steps_per_round: int,
                       val: Mapping[str, Sequence[dict]]) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:  # fmt: skip
        """Train from the seeded initial adapter on ``train_records`` for ``rounds`` x ``steps_per_round``
        steps (a fresh AdamW per round, as at a site); return the adapter and the validation loss on each
        of ``val``'s hospitals after 0..rounds rounds' worth of steps."""
        set_adapter_state(self.model, self.initial, "initial adapter")
        trainer = LocalTrainer(
            self.model, self.prompts.tokenizer, train_records, [], max_seq_length=self.recipe.max_seq_length,
            batch_size=self.recipe.batch_size, micro_batch_size=self.micro, learning_rate=self.recipe.learning_rate,
            weight_decay=self.recipe.weight_decay, seed=seed, prompts=self.prompts,
            loss_weighting=self.recipe.loss_weighting,
        )  # fmt: skip
        curve = {site: [m["loss"]] for site, m in score_split(self.model, val, self.pad_id, self.micro)["per_hospital"].items()}
        for r in range(rounds):
            trainer.train(steps_per_round, round=r)
            for site, m in score_split(self.model, val, self.pad_id, self.micro)["per_hospital"].items():
                curve[site].append(m["loss"])
        return get_adapter_state(self.model), curve


def site_seed(recipe: TrainingRecipe, site: str) -> int:
    """The batch seed a site's executor uses (``site/trainer_setup.py``): local-only draws the same batches."""
    return recipe.seed + sum(site.encode())
