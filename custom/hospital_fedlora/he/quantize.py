"""Adapter differences to small signed integers and back, with one scale every site shares.

Encrypted sums only make sense if every site maps floats to integers the same way, so the scale is not
measured from the data (a per-site absmax would differ between sites): it comes from a fixed, configured
clip bound. A value is clipped to ``[-clip, clip]`` and mapped to ``round(x / clip * qmax)`` with
``qmax = 2**(bits-1) - 1`` (127 for int8, 32767 for int16), so the integer range is symmetric.

Rounding is stochastic: ``x/step`` goes up with probability equal to its fractional part, so every
integer is an unbiased estimate of the clipped value and the errors of different sites average out
instead of adding up. Per value, ``|dequantized - clipped| < step`` where ``step = clip / qmax``; a
weighted average of several sites keeps that bound (it is a convex combination of per-site errors) and
its standard deviation is at most ``step / 2`` divided by the square root of the effective number of
sites. Clipping itself is biased, so the count of clipped values is reported for the filter to log: a
clip bound that cuts many values is set too low for the data.

Weighted averaging enters here, before rounding: a site multiplies its clipped values by its weight
factor ``a = min(example_count, full_weight) / full_weight`` (``contribution_weight``), so the integers
of all sites can simply be added and the sum divided by ``sum(a)``. This costs no lane bits in the
encrypted packing (see ``packed_bfv``), at a bounded price in precision: the average's error is at most
``step * n_sites / sum(a)``, i.e. one step when every site has ``a = 1`` and proportionally more when
the sites' example counts are far below ``full_weight`` (so set ``full_weight`` near the example count
of a typical large site, not far above it).

Pure torch, no FLARE types, no numpy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

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
