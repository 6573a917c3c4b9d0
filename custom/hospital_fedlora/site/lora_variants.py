"""Which LoRA tensors train and travel, per ``lora.variant``, and the FedProx proximal gradient.

FFA-LoRA (Sun et al. 2024) freezes every A matrix at its seeded initial value, which every site draws
identically (``apply_lora`` is seeded by the recipe), so A never needs to travel: a site sends only the B
tensors and rebuilds the full adapter from its own initial A. Both variants are linear in what is sent, so
they work under encrypted sums (docs/architecture.md, "LoRA variants and encrypted aggregation").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, TypeVar

import numpy as np
import torch
from peft import PeftModel

from ..adapter_layout import rank_axis
from ..config import ConfigError, SiteConfig, TrainingRecipe
from .privacy_gate import encrypts_results

# Name parts of the tensors each variant keeps at their initial value (never trained, never sent).
FROZEN_PARTS: dict[str, tuple[str, ...]] = {"lora": (), "ffa": ("lora_A",)}

Value = TypeVar("Value")


def is_frozen(name: str, variant: str) -> bool:
    """Whether tensor or parameter ``name`` stays at its initial value under ``variant``."""
    return any(f".{part}." in f".{name}." for part in FROZEN_PARTS[variant])


def freeze(model: PeftModel, variant: str) -> None:
    """Stop gradients for the tensors ``variant`` keeps fixed (none for plain LoRA)."""
    for name, param in model.named_parameters():
        if param.requires_grad and is_frozen(name, variant):
            param.requires_grad_(False)


def sent_tensors(state: Mapping[str, Value], variant: str) -> dict[str, Value]:
    """The part of an adapter state a site sends and receives: everything but the frozen tensors."""
    return {k: v for k, v in state.items() if not is_frozen(k, variant)}


def truncate_rank(state: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """``state`` with every rank slot from ``rank`` on set to zero (HetLoRA's truncation to a site's rank).

    With both A's rows and B's columns of a slot at zero, the slot's gradients are zero too, so training
    leaves it at zero: the site trains its first ``rank`` ranks and sends the rest as zero padding.
    """
    out = {}
    for name, value in state.items():
        value = np.array(value, dtype=np.float32)
        axis = rank_axis(name, value.ndim)
        if axis is not None:
            index = [slice(None)] * value.ndim
            index[axis] = slice(rank, None)
            value[tuple(index)] = 0.0
        out[name] = value
    return out


def site_rank(site: SiteConfig, recipe: TrainingRecipe, client_config_file: Path, train_task: str, source: str) -> int | None:
    """The site's own lower LoRA rank, or None when it trains the job's; refuses what cannot work."""
    if site.lora_rank is None or site.lora_rank == recipe.lora.r:
        return None
    if site.lora_rank > recipe.lora.r:
        raise ConfigError(
            f"{source}: field 'lora_rank' is {site.lora_rank}, above the job's LoRA rank (lora.r {recipe.lora.r}); "
            "set it to at most the job's rank or remove it"
        )
    if encrypts_results(json.loads(Path(client_config_file).read_text()), train_task):
        raise ConfigError(
            f"{source}: field 'lora_rank' ({site.lora_rank}, below the job's {recipe.lora.r}) works in plaintext jobs "
            "only: an encrypted sum cannot average each rank slot over just the hospitals that train it (the "
            "zero padding would count as updates); remove lora_rank for this encrypted job"
        )
    return site.lora_rank


def add_proximal_gradient(params: Iterable[torch.Tensor], anchor: Iterable[torch.Tensor], mu: float) -> None:
    """Add the gradient of (mu/2)·||w - w_anchor||², i.e. mu·(w - w_anchor), to each parameter's gradient.

    Added once, after the data gradients are complete (and summed over data-parallel ranks), so the term
    counts once per step whatever the number of micro-batches or ranks.
    """
    with torch.no_grad():
        for p, a in zip(params, anchor):
            prox = mu * (p - a)
            if p.grad is None:
                p.grad = prox
            else:
                p.grad.add_(prox)
