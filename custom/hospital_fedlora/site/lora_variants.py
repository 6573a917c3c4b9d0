"""Which LoRA tensors train and travel, per ``lora.variant``, and the FedProx proximal gradient.

FFA-LoRA (Sun et al. 2024) freezes every A matrix at its seeded initial value, which every site draws
identically (``apply_lora`` is seeded by the recipe), so A never needs to travel: a site sends only the B
tensors and rebuilds the full adapter from its own initial A. Both variants are linear in what is sent, so
they work under encrypted sums (docs/architecture.md, "LoRA variants and encrypted aggregation").
"""

from __future__ import annotations

from typing import Iterable, Mapping, TypeVar

import torch
from peft import PeftModel

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
