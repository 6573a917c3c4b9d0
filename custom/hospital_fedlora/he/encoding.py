"""Encoding: an adapter change to small integers packed into BFV plaintext slots, and a slot sum back.

Quantizing uses one scale every site shares (a fixed clip bound, not the data's range), so integer sums
mean the same at every site; rounding is stochastic, so each integer is an unbiased estimate of the
clipped value. A site's example-count weight enters before rounding (``contribution_weight``). Several
integers share a slot in lanes wide enough that no sum of up to ``max_sites`` contributions carries into
the next lane. Derivations and figures: ``docs/he.md``. Pure torch, no FLARE, no TenSEAL.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ..config import StrictModel
from .bfv_context import BFVContext
from .wire_format import CiphertextError

# ---------------------------------------------------------------------------------------- quantizing
ClipSpec = float | Mapping[str, float]

_INT_DTYPES = {8: torch.int8, 16: torch.int16}


def qmax(bits: int) -> int:
    """Largest integer magnitude used by ``bits``-bit quantization (symmetric range)."""
    if bits not in _INT_DTYPES:
        raise ValueError(f"quantization bits must be 8 or 16, got {bits!r}")
    return 2 ** (bits - 1) - 1


def step_size(clip: float, bits: int) -> float:
    """The float value of one integer step."""
    return float(clip) / qmax(bits)


def resolve_clips(names: list[str] | tuple[str, ...], clip: ClipSpec) -> dict[str, float]:
    """The clip bound of every tensor.

    ``clip`` is one float for all tensors, or a mapping from regular expressions to bounds, tried in the
    mapping's order with ``re.search`` against the tensor name (so ``{"lora_A": 0.01, "lora_B": 0.002}``
    or exact names both work). A tensor that no pattern matches is an error: a silent default would make
    sites disagree on the scale.
    """
    if isinstance(clip, Mapping):
        if not clip:
            raise ValueError("clip: empty mapping; give one float for all tensors or a pattern -> bound mapping")
        patterns = [(re.compile(p), _check_clip(v, f"clip[{p!r}]")) for p, v in clip.items()]
        out = {}
        for name in names:
            for rx, bound in patterns:
                if rx.search(name):
                    out[name] = bound
                    break
            else:
                raise ValueError(
                    f"clip: no pattern matches tensor {name!r} (patterns: {list(clip)}); add one, e.g. '.*' last"
                )
        return out
    bound = _check_clip(clip, "clip")
    return {name: bound for name in names}


def _check_clip(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field}: must be a positive finite number, got {value!r}")
    return float(value)


def rounding_generator(seed: int | None, site: str, rnd: int) -> torch.Generator:
    """Independent rounding noise per site and round; reproducible only with a fixed ``seed`` (tests)."""
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    digest = hashlib.sha256(f"{seed}:{site}:{rnd}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


@dataclass(frozen=True)
class Quantized:
    ints: dict[str, torch.Tensor]  # int8 or int16, same shapes as the inputs
    bits: int
    clips: dict[str, float]
    n_clipped: int  # values whose magnitude exceeded their clip bound
    n_values: int


def contribution_weight(example_count: float, full_weight: float) -> float:
    """A site's weight factor in ``(0, 1]``: its example count relative to the job's ``full_weight``.

    Counts above ``full_weight`` are clamped to it (the caller logs that: that site then counts a little
    less than its share); a count of 0 still gets the smallest positive weight so the sums stay valid.
    """
    if not full_weight > 0 or not math.isfinite(full_weight):
        raise ValueError(f"full_weight must be a positive number of examples, got {full_weight!r}")
    if example_count < 0 or not math.isfinite(example_count):
        raise ValueError(f"example_count must be a non-negative number, got {example_count!r}")
    return max(min(float(example_count), full_weight), min(1.0, full_weight)) / full_weight


def quantize(
    tensors: Mapping[str, torch.Tensor],
    clip: ClipSpec,
    bits: int,
    generator: torch.Generator,
    weight: float = 1.0,
) -> Quantized:
    """Clip, weight, scale and stochastically round every tensor to signed ``bits``-bit integers.

    ``generator`` (a seeded CPU ``torch.Generator``) drives the rounding, so a site can reproduce its
    own contribution; give each site and round its own seed so the rounding noise is independent.
    ``weight`` in ``(0, 1]`` is the site's ``contribution_weight``; clipping applies before it.
    """
    if not 0 < weight <= 1:
        raise ValueError(f"quantize: weight must be in (0, 1] (use contribution_weight), got {weight!r}")
    q = qmax(bits)
    dtype = _INT_DTYPES[bits]
    clips = resolve_clips(list(tensors), clip)
    ints: dict[str, torch.Tensor] = {}
    n_clipped = n_values = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"quantize: tensor {name!r} must be a floating-point torch.Tensor, got {_describe(t)}")
        x = t.detach().to(device="cpu", dtype=torch.float64, copy=True)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"quantize: tensor {name!r} contains NaN or infinity; the local training diverged")
        bound = clips[name]
        n_clipped += int((x.abs() > bound).sum())
        n_values += x.numel()
        # float64 keeps x/step exact enough that the rounding probability is the true fractional part.
        y = x.clamp_(-bound, bound).mul_(weight * q / bound)
        low = torch.floor(y)
        up = torch.rand(y.shape, generator=generator, dtype=torch.float64) < (y - low)
        ints[name] = (low + up).clamp_(-q, q).to(dtype)
    return Quantized(ints=ints, bits=bits, clips=clips, n_clipped=n_clipped, n_values=n_values)


def dequantize(
    ints: Mapping[str, torch.Tensor], clip: ClipSpec, bits: int, total_weight: float = 1
) -> dict[str, torch.Tensor]:
    """float32 tensors ``ints * step / total_weight``.

    ``ints`` may be one site's integers or the sum over sites (int64); ``total_weight`` (the sum of the
    sites' ``contribution_weight``) then turns the sum into the weighted average.
    """
    if not total_weight > 0:
        raise ValueError(f"dequantize: total_weight must be positive, got {total_weight!r}")
    q = qmax(bits)
    clips = resolve_clips(list(ints), clip)
    out = {}
    for name, t in ints.items():
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
            raise TypeError(f"dequantize: tensor {name!r} must be an integer torch.Tensor, got {_describe(t)}")
        out[name] = (t.to(torch.float64) * (clips[name] / q / total_weight)).to(torch.float32)
    return out


def _describe(t: object) -> str:
    return f"tensor of {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


# ------------------------------------------------------------------------------------------- lanes
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

    def n_ciphertexts(self, n_values: int, mac_slots: int = 0) -> int:
        """Ciphertexts for ``n_values`` packed values plus ``mac_slots`` reserved tag slots at the end."""
        return -(-(-(-n_values // self.lanes_per_slot) + mac_slots) // self.slots_per_ciphertext)

    def n_chunks(self, n_values: int, mac_slots: int = 0) -> int:
        return -(-self.n_ciphertexts(n_values, mac_slots) // self.ciphertexts_per_chunk)

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
        qmax=qmax(settings.bits),
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
    by_lanes = ((1 << lane_bits) - 1) // (2 * qmax(bits))
    by_noise = 2**context.max_sum_bits if context.max_sum_bits >= 0 else 0
    return min(by_lanes, by_noise)


def pack_lanes(ints: torch.Tensor, plan: LanePlan, reserved: int = 0) -> torch.Tensor:
    """Biased, packed slots (int64), zero-padded to whole ciphertexts with at least ``reserved`` slots left
    at the end (for the aggregate MAC's tags, which overwrite them)."""
    if ints.dim() != 1 or ints.is_floating_point() or ints.is_complex():
        raise TypeError(f"pack_lanes: expected a 1-D integer tensor, got {tuple(ints.shape)} {ints.dtype}")
    x = ints.to(torch.int64)
    if x.numel() and int(x.abs().max()) > plan.qmax:
        raise ValueError(f"pack_lanes: values exceed the int{plan.bits} range +-{plan.qmax}; quantize first")
    n_slots = plan.n_ciphertexts(x.numel(), reserved) * plan.slots_per_ciphertext
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
