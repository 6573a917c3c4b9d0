"""A site's trainer from its site config and the job's recipe: data, base model, seeded LoRA.

The executor builds its trainer here, and so does every data-parallel worker (``data_parallel.py``): one
function, so the ranks of a site cannot load, seed or tokenize differently.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import SiteConfig, TrainingRecipe
from .dataset import load_records
from .model_loading import Placement, apply_lora, choose_placement, load_base_model
from .prompting import PromptBuilder
from .trainer import LocalTrainer


def site_placement(site: SiteConfig, source: str, rank: int | None = None) -> Placement:
    """The site's device and dtype; with ``rank``, data-parallel rank ``rank``'s own GPU (``cuda:<rank>``)."""
    placement = choose_placement(site.device, site.dtype, site.load_in_4bit, source)
    if rank is not None and placement.device.type == "cuda":
        placement = dataclasses.replace(placement, device=torch.device("cuda", rank))
    return placement


def build_trainer(site: SiteConfig, recipe: TrainingRecipe, source: str, placement: Placement) -> LocalTrainer:
    if site.num_threads:
        torch.set_num_threads(site.num_threads)
    train_records = load_records(site.data, "train", source, recipe.task)
    val_records = load_records(site.data, "validation", source, recipe.task)
    model, tokenizer = load_base_model(site.base_model_path, placement, source, site.gradient_checkpointing)
    model = apply_lora(model, recipe.lora, recipe.seed)
    return LocalTrainer(
        model,
        tokenizer,
        train_records,
        val_records,
        max_seq_length=recipe.max_seq_length,
        batch_size=recipe.batch_size,
        micro_batch_size=site.micro_batch_size,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        # Sites draw different batches; the LoRA init above uses the shared seed alone.
        seed=recipe.seed + sum(site.site.encode()),
        prompts=PromptBuilder(tokenizer, recipe.task),
        fedprox_mu=recipe.fedprox_mu,
        loss_weighting=recipe.loss_weighting,
    )


def truncation_notes(trainer: LocalTrainer, max_seq_length: int) -> list[str]:
    """One warning per split with records cut to ``max_seq_length``, saying what the operator can change."""
    notes = []
    for split, n in trainer.truncated.items():
        if n:
            total = trainer.num_train_examples if split == "train" else len(trainer.val_examples)
            notes.append(
                f"{n} of {total} {split} records are longer than the job's max_seq_length ({max_seq_length} tokens) "
                "and were cut to fit (a note from its middle); the operator can raise max_seq_length in the job's "
                "recipe to keep them whole"
            )
    return notes
