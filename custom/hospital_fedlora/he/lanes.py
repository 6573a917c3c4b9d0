"""Several quantized integers per BFV slot, so that slot sums are lane-wise integer sums that never carry.

A slot holds ``lanes_per_slot`` lanes of ``lane_bits`` bits: ``slot = sum_j u_j << (j * lane_bits)``,
with ``u = q + qmax`` for a quantized ``q`` in ``[-qmax, qmax]`` (the bias keeps lanes non-negative, so no
borrow crosses lanes). A sum of at most ``max_sites`` contributions stays below ``2 * qmax * max_sites``,
so ``lane_bits = bits + ceil(log2(max_sites)) + guard_bits`` cannot overflow. The derivation and the
figures are in ``docs/he.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ..config import StrictModel
from .bfv_context import BFVContext
from .quantize import qmax as _qmax
from .wire_format import CiphertextError


class PackingSettings(StrictModel):
    """Chosen by the job (the same at every site): how integers are quantized and packed."""

    bits: Literal[8, 16] = Field(16, description="quantization: 16 is accurate, 8 is small")
    max_sites: int = Field(8, ge=1, le=4096, description="most contributions ever summed in one round")
    guard_bits: int = Field(0, ge=0, le=16, description="extra bits per lane beyond the exact overflow bound")
    min_lanes_per_slot: int = Field(
        1, ge=1, le=16, description="refuse settings that pack fewer integers per slot (guards the upload size)"
    )
    ciphertexts_per_chunk: int = Field(64, ge=1, le=4096, description="ciphertexts per serialized chunk")


@dataclass(frozen=True)
class LanePlan:
    bits: int
    qmax: int
    lane_bits: int
    lanes_per_slot: int
    slots_per_ciphertext: int
    ciphertexts_per_chunk: int
    plain_modulus: int
    max_sites: int

    @property
    def values_per_ciphertext(self) -> int:
        return self.lanes_per_slot * self.slots_per_ciphertext

    def n_ciphertexts(self, n_values: int) -> int:
        return -(-n_values // self.values_per_ciphertext)

    def n_chunks(self, n_values: int) -> int:
        return -(-self.n_ciphertexts(n_values) // self.ciphertexts_per_chunk)

    def header_fields(self) -> dict[str, int]:
        return {"bits": self.bits, "lane_bits": self.lane_bits, "lanes": self.lanes_per_slot}


def plan_lanes(settings: PackingSettings, context: BFVContext) -> LanePlan:
    """Lane layout for ``settings`` under ``context``; a ValueError naming the setting if it cannot be safe.

    Call it when the job starts (server and sites alike) so a bad combination stops the job before any
    training happens.
    """
    t = context.plain_modulus
    usable = t.bit_length() - 1  # 2**usable < t, so a full slot never wraps
    site_bits = math.ceil(math.log2(settings.max_sites))
    lane_bits = settings.bits + site_bits + settings.guard_bits
    lanes = usable // lane_bits
    if lanes < settings.min_lanes_per_slot:
        want = settings.min_lanes_per_slot
        room = f"{want} lanes of at most {usable // want} bits" if want > 1 else f"{usable} bits"
        raise ValueError(
            f"int{settings.bits} with max_sites={settings.max_sites} and guard_bits={settings.guard_bits} needs "
            f"{lane_bits} bits per lane, but the plain modulus has {usable} usable bits per slot "
            f"(plain_modulus_bits={t.bit_length()}), room for {room} (min_lanes_per_slot={want}); lower "
            f"max_sites or guard_bits, lower min_lanes_per_slot, use bits=8, or re-provision with more "
            f"plain_modulus_bits"
        )
    most = most_summable(settings.bits, lane_bits, context)
    if settings.max_sites > most:  # the lanes hold max_sites by construction: the noise budget is short
        raise ValueError(
            f"max_sites={settings.max_sites} is more than poly_modulus_degree={context.poly_modulus_degree} with "
            f"plain_modulus_bits={t.bit_length()} can sum without noise corrupting the result (at most {most}); "
            f"lower max_sites or re-provision with plain_modulus_bits <= "
            f"{t.bit_length() + context.max_sum_bits - site_bits} (or poly_modulus_degree 8192)"
        )
    return LanePlan(
        bits=settings.bits,
        qmax=_qmax(settings.bits),
        lane_bits=lane_bits,
        lanes_per_slot=lanes,
        slots_per_ciphertext=context.poly_modulus_degree,
        ciphertexts_per_chunk=settings.ciphertexts_per_chunk,
        plain_modulus=t,
        max_sites=settings.max_sites,
    )


def most_summable(bits: int, lane_bits: int, context: BFVContext) -> int:
    """How many contributions one sum may hold: no lane carries into the next, and the noise of that many
    additions stays inside ``context``'s budget. Sites plan with it; the server checks every sum with it."""
    by_lanes = ((1 << lane_bits) - 1) // (2 * _qmax(bits))
    by_noise = 2**context.max_sum_bits if context.max_sum_bits >= 0 else 0
    return min(by_lanes, by_noise)


def pack_lanes(ints: torch.Tensor, plan: LanePlan) -> torch.Tensor:
    """Biased, packed slots (int64), zero-padded to whole ciphertexts."""
    if ints.dim() != 1 or ints.is_floating_point() or ints.is_complex():
        raise TypeError(f"pack_lanes: expected a 1-D integer tensor, got {tuple(ints.shape)} {ints.dtype}")
    x = ints.to(torch.int64)
    if x.numel() and int(x.abs().max()) > plan.qmax:
        raise ValueError(f"pack_lanes: values exceed the int{plan.bits} range +-{plan.qmax}; quantize first")
    n_slots = plan.n_ciphertexts(x.numel()) * plan.slots_per_ciphertext
    padded = torch.zeros(n_slots * plan.lanes_per_slot, dtype=torch.int64)
    padded[: x.numel()] = x
    u = padded.add_(plan.qmax).view(n_slots, plan.lanes_per_slot)
    shifts = torch.arange(plan.lanes_per_slot, dtype=torch.int64) * plan.lane_bits
    return (u << shifts).sum(dim=1)


def unpack_lanes(slots: torch.Tensor, plan: LanePlan, n_values: int, n_sites_summed: int) -> torch.Tensor:
    """``sum_i q_i`` (int64) from decrypted slots; refuses lanes no honest sum can produce."""
    mask = (1 << plan.lane_bits) - 1
    shifts = torch.arange(plan.lanes_per_slot, dtype=torch.int64) * plan.lane_bits
    if bool((slots >> (plan.lanes_per_slot * plan.lane_bits)).any()) or bool((slots < 0).any()):
        raise CiphertextError(_garbage_msg("bits above the last lane are set"))
    lanes = (slots.unsqueeze(1) >> shifts) & mask
    if bool((lanes > 2 * plan.qmax * n_sites_summed).any()):
        raise CiphertextError(_garbage_msg(f"a lane exceeds the largest sum of {n_sites_summed} contributions"))
    return lanes.reshape(-1)[:n_values] - plan.qmax * n_sites_summed


def _garbage_msg(why: str) -> str:
    return (
        f"decrypted values are impossible ({why}): the aggregate was encrypted under another key (a kit from "
        "another provisioning), corrupted, or the number of contributions it sums is wrong"
    )
