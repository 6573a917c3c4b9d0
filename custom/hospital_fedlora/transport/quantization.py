"""Quantize named float tensors for transport and restore them: fp16, bf16, blockwise int8, nf4, fp4.

Each quantized tensor becomes a plain dict (strings, ints and numpy arrays, so FOBS carries it as it
carries any numpy payload) holding everything that restores it: the mode, the source dtype and shape,
the codes, and per-block scales. No FLARE types: the filters in this package are thin adapters over it.

int8 is plain torch (absmax per block of 64, codes in [-127, 127]), optionally with stochastic
rounding: each value rounds up with probability equal to its fractional part, so the expected code is
exactly the value and the errors of a FedAvg average cancel instead of adding up. nf4 and fp4 are
bitsandbytes' ``quantize_4bit`` on CPU tensors (blocks of 64): they round to the nearest of 16 fixed
codes, so their error is a deterministic function of each value and does not average out.
``docs/large-models.md`` has the measurements behind these choices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

MODES = ("fp16", "bf16", "int8", "nf4", "fp4")
ROUNDINGS = ("nearest", "stochastic")
BLOCK = 64  # values per scale (int8, nf4, fp4)
INT8_MAX = 127
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
MODE_KEY = "quantized"  # the key that marks a quantized entry; its value is the mode
SOURCE_DTYPES = ("float16", "bfloat16", "float32", "float64")
# the largest gap between neighbouring codes of bitsandbytes' 4-bit maps, as a fraction of the block's absmax
_MAX_CODE_GAP = {"nf4": 1.0 - 0.6961928009986877, "fp4": 1.0 - 0.6666666865348816}  # nf4: -1 to -0.696
# (codes dtype, codes per value) on the wire
_CODES = {"fp16": (np.float16, 1), "bf16": (np.int16, 1), "int8": (np.int8, 1), "nf4": (np.uint8, 2), "fp4": (np.uint8, 2)}


class QuantizationError(ValueError):
    """A tensor that cannot be quantized, or a payload that does not restore."""


class NonFiniteError(QuantizationError):
    """A tensor holding NaN or infinity: no mode has a code for them."""


def is_quantized(value: object) -> bool:
    return isinstance(value, Mapping) and MODE_KEY in value


def check_mode(mode: str, rounding: str = "nearest") -> None:
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}; the modes are {', '.join(MODES)}")
    if rounding not in ROUNDINGS:
        raise QuantizationError(f"unknown rounding {rounding!r}; the roundings are {', '.join(ROUNDINGS)}")
    if rounding == "stochastic" and mode != "int8":
        raise QuantizationError(
            f"stochastic rounding is implemented for int8 only; {mode} rounds to nearest "
            "(fp16/bf16: the nearest float; nf4/fp4: bitsandbytes' nearest code)"
        )


# --------------------------------------------------------------------------------------------- quantize
def quantize_tensors(
    tensors: Mapping[str, object], mode: str, rounding: str = "nearest", generator: torch.Generator | None = None
) -> dict[str, dict]:
    """Every tensor of ``tensors`` quantized to ``mode``; ``generator`` seeds stochastic rounding (else fresh)."""
    check_mode(mode, rounding)
    return {name: quantize_tensor(x, mode, rounding, generator, name) for name, x in tensors.items()}


def quantize_tensor(
    x: object, mode: str, rounding: str = "nearest", generator: torch.Generator | None = None, name: str = "tensor"
) -> dict:
    """One numpy array or torch tensor of floats as a quantized entry (see the module docstring)."""
    check_mode(mode, rounding)
    t, dtype, container = _as_float32(x, name)
    entry = {MODE_KEY: mode, "dtype": dtype, "container": container, "shape": list(_shape(x))}
    flat = t.reshape(-1)
    peak = _peak(flat)
    if not math.isfinite(peak):
        raise NonFiniteError(f"tensor {name!r} holds NaN or infinite values; they have no quantized form")
    if mode == "fp16":
        if peak > FP16_MAX:
            raise QuantizationError(f"tensor {name!r} has |value| {peak:.3g}, beyond fp16's {FP16_MAX:g}; use bf16 or int8")
        entry["codes"] = flat.to(torch.float16).numpy()
    elif mode == "bf16":  # numpy has no bfloat16: the 16 bits travel as int16
        entry["codes"] = flat.to(torch.bfloat16).view(torch.int16).numpy()
    elif mode == "int8":
        entry["codes"], entry["absmax"] = _int8(flat, rounding == "stochastic", generator)
    else:
        entry["codes"], entry["absmax"] = _four_bit(flat, mode)
    if "absmax" in entry:
        entry["block"] = BLOCK
    return entry


def _peak(flat: torch.Tensor) -> float:
    """The largest magnitude (NaN or infinity if any value is), in one pass without a copy."""
    if flat.numel() == 0:
        return 0.0
    low, high = torch.aminmax(flat)
    return max(-float(low), float(high)) if not (torch.isnan(low) or torch.isnan(high)) else math.nan


def _int8(flat: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    n = flat.numel()
    pad = (-n) % BLOCK
    blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, BLOCK)
    low, high = torch.aminmax(blocks, dim=1)  # the absmax without an |x| copy of the tensor
    absmax = torch.maximum(high, low.neg_())
    y = blocks * _int8_scale(absmax).reciprocal_()[:, None]  # one pass; in place from here on
    if stochastic:  # floor(y + U), U ~ [0, 1): rounds up with probability frac(y), so E[code] = y
        y.add_(torch.rand(y.shape, generator=generator, dtype=y.dtype)).floor_()
    else:
        y.round_()
    codes = y.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).view(-1)
    return (codes[:n] if pad else codes).numpy(), absmax.numpy()


def _int8_scale(absmax: torch.Tensor) -> torch.Tensor:
    """The value of one code step per block; computed the same way on both sides (an all-zero block: 1)."""
    scale = absmax / INT8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _int8_values(codes: np.ndarray, absmax: np.ndarray, n: int) -> torch.Tensor:
    pad = (-n) % BLOCK
    values = torch.from_numpy(codes).to(torch.float32)
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    blocks = values.view(-1, BLOCK)
    blocks.mul_(_int8_scale(torch.from_numpy(absmax))[:, None])
    return values[:n] if pad else values


def _four_bit(flat: torch.Tensor, mode: str) -> tuple[np.ndarray, np.ndarray]:
    from bitsandbytes.functional import quantize_4bit  # imported on use: int8 and 16-bit need no bitsandbytes

    if flat.numel() == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.float32)
    packed, state = quantize_4bit(flat.contiguous(), blocksize=BLOCK, quant_type=mode)
    return packed.reshape(-1).numpy(), state.absmax.float().numpy()


def _as_float32(x: object, name: str) -> tuple[torch.Tensor, str, str]:
    if isinstance(x, torch.Tensor):
        dtype, container = str(x.dtype).removeprefix("torch."), "torch"
        t = x.detach().cpu()
    elif isinstance(x, np.ndarray):
        dtype, container = x.dtype.name, "numpy"
        t = torch.from_numpy(np.ascontiguousarray(x)) if dtype in SOURCE_DTYPES else None
    else:
        raise QuantizationError(f"tensor {name!r}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if dtype not in SOURCE_DTYPES:
        raise QuantizationError(f"tensor {name!r} is {dtype}; only {', '.join(SOURCE_DTYPES)} tensors are quantized")
    return t.to(torch.float32).contiguous(), dtype, container


def _shape(x: object) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


# ------------------------------------------------------------------------------------------- dequantize
def dequantize_tensors(payload: Mapping[str, object]) -> dict[str, object]:
    """Every quantized entry of ``payload`` restored to its source dtype and shape; other entries as they are."""
    return {name: dequantize_tensor(v, name) if is_quantized(v) else v for name, v in payload.items()}


def dequantize_tensor(entry: Mapping, name: str = "tensor") -> object:
    """A quantized entry back to a numpy array (or torch tensor, if it was one) of its source dtype and shape."""
    mode, dtype, container, shape = _check_entry(entry, name)
    n = math.prod(shape)
    codes = entry["codes"]
    if mode == "fp16":
        flat = torch.from_numpy(codes).to(torch.float32)  # torch's conversion is vectorised, numpy's is not
    elif mode == "bf16":
        flat = torch.from_numpy(codes.copy()).view(torch.bfloat16).float()
    elif mode == "int8":
        flat = _int8_values(codes, entry["absmax"], n)
    else:
        flat = _four_bit_values(codes, entry["absmax"], mode, n)
    t = flat.reshape(shape)
    if container == "torch":
        return t.to(getattr(torch, dtype))
    if dtype == "bfloat16":  # cannot happen for a numpy source; kept for a payload that claims it
        raise QuantizationError(f"tensor {name!r}: a numpy tensor cannot be bfloat16")
    return t.numpy().astype(dtype, copy=False)


def _four_bit_values(codes: np.ndarray, absmax: np.ndarray, mode: str, n: int) -> torch.Tensor:
    from bitsandbytes.functional import QuantState, dequantize_4bit, get_4bit_type

    if n == 0:
        return torch.zeros(0)
    state = QuantState(
        absmax=torch.from_numpy(absmax), shape=torch.Size([n]), code=get_4bit_type(mode, device="cpu"),
        blocksize=BLOCK, quant_type=mode, dtype=torch.float32,
    )  # fmt: skip
    return dequantize_4bit(torch.from_numpy(codes).view(-1, 1), quant_state=state).reshape(-1)


def _check_entry(entry: Mapping, name: str) -> tuple[str, str, str, tuple[int, ...]]:
    """Everything a restore relies on, so a malformed payload fails here, named, and not in a kernel."""

    def bad(what: str) -> QuantizationError:
        return QuantizationError(f"quantized tensor {name!r}: {what}")

    mode = entry.get(MODE_KEY)
    if mode not in MODES:
        raise bad(f"unknown mode {mode!r}; the modes are {', '.join(MODES)}")
    dtype, container, shape = entry.get("dtype"), entry.get("container"), entry.get("shape")
    if dtype not in SOURCE_DTYPES:
        raise bad(f"unknown source dtype {dtype!r}; expected one of {', '.join(SOURCE_DTYPES)}")
    if container not in ("numpy", "torch"):
        raise bad(f"unknown container {container!r}; expected numpy or torch")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    n = math.prod(shape)
    codes_dtype, per_byte = _CODES[mode]
    _check_array(entry.get("codes"), "codes", codes_dtype, -(-n // per_byte), bad)
    if mode in ("int8", "nf4", "fp4"):
        if entry.get("block") != BLOCK:
            raise bad(f"block {entry.get('block')!r}; this version restores blocks of {BLOCK}")
        _check_array(entry.get("absmax"), "absmax", np.float32, -(-n // BLOCK), bad)
    return mode, dtype, container, tuple(shape)


def _check_array(a: object, field: str, dtype, size: int, bad) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != 1:
        got = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise bad(f"{field} must be a 1-D {np.dtype(dtype).name} array, got {got}")
    if a.size != size:
        raise bad(f"{field} holds {a.size} values, its shape needs {size}")


# ----------------------------------------------------------------------------------------------- sizes
def payload_nbytes(payload: Mapping[str, object]) -> int:
    """Bytes of the arrays in ``payload`` (quantized entries' codes and scales, plain arrays whole)."""
    total = 0
    for v in payload.values():
        arrays = [a for a in v.values() if isinstance(a, np.ndarray)] if is_quantized(v) else [v]
        total += sum(int(getattr(a, "nbytes", 0)) for a in arrays)
    return total


def max_abs_error(mode: str, rounding: str, absmax: float) -> float:
    """A bound on any value's restore error in a tensor (or block) whose largest magnitude is ``absmax``."""
    check_mode(mode, rounding)
    if mode == "fp16":  # half an ulp relative, and the absolute spacing of fp16's subnormals
        return absmax * 2.0**-11 + 2.0**-25
    if mode == "bf16":
        return absmax * 2.0**-8
    if mode == "int8":  # nearest: half a step; stochastic: less than a whole step
        return absmax / INT8_MAX * (1.0 if rounding == "stochastic" else 0.5) * (1 + 1e-6)
    return absmax * _MAX_CODE_GAP[mode] / 2 * (1 + 1e-6)
