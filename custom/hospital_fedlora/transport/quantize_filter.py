"""FLARE filter: quantize a WEIGHTS or WEIGHT_DIFF payload before it travels (plaintext jobs).

On a hospital's ``train`` results (the upload) and on the server's ``train`` task data (the global
adapter sent down). ``dequantize_filter.DequantizeFilter`` restores it at the other end. Configured only
by its arguments in the job config; ``docs/large-models.md`` has the modes and the measurements.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Literal

import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from pydantic import Field, model_validator

from ..config import StrictModel, validate
from ..protocol import Meta
from .quantization import MODES, NonFiniteError, payload_nbytes, quantize_tensor

FILTER = "hospital_fedlora.transport.quantize_filter.QuantizeFilter"


class QuantizeSettings(StrictModel):
    mode: Literal[MODES] = Field(description="fp16, bf16, int8 (blockwise absmax, 64 values per scale), nf4, fp4")
    rounding: Literal["nearest", "stochastic"] = Field(
        "nearest", description="stochastic (int8 only): unbiased rounding, for what the server averages"
    )
    rounding_seed: int | None = Field(None, description="fixed seed for stochastic rounding (tests); default: fresh")

    @model_validator(mode="after")
    def _stochastic_is_int8(self):
        if self.rounding == "stochastic" and self.mode != "int8":
            raise ValueError(f"rounding 'stochastic' is implemented for mode 'int8' only, not {self.mode!r}; use 'nearest'")
        return self


def rounding_generator(seed: int | None, site: str, rnd: object) -> torch.Generator:
    """Independent rounding noise per site and round; reproducible only with a fixed ``seed`` (tests)."""
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    digest = hashlib.sha256(f"{seed}:{site}:{rnd}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


class QuantizeFilter(DXOFilter):
    """Replaces every tensor of a WEIGHTS / WEIGHT_DIFF DXO with its quantized entry and marks the DXO.

    Args:
        mode: one of fp16, bf16, int8, nf4, fp4.
        rounding: ``nearest`` (default) or ``stochastic`` (int8 only: each value's expected code is the
            value, so the errors of an average cancel). It applies to WEIGHT_DIFF, what the server
            averages; WEIGHTS (a global adapter every site must receive identically) round to nearest.
        rounding_seed: fixed seed for stochastic rounding (tests only); default fresh randomness.

    A DXO already marked quantized passes unchanged: FLARE may hand the server's one broadcast task to
    this filter once per site, and every site must receive the same global adapter. A tensor holding NaN
    or infinity travels as it is, so the server's checks refuse it with that reason.
    """

    def __init__(self, mode: str = "", rounding: str = "nearest", rounding_seed: int | None = None):
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        raw = {"mode": mode or None, "rounding": rounding, "rounding_seed": rounding_seed}
        self.settings = validate(QuantizeSettings, raw, f"job config, filter {FILTER}", "docs/large-models.md")

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.get_meta_prop(Meta.QUANTIZATION):
            return None
        s = self.settings
        who = fl_ctx.get_identity_name()
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND, fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        rounding = s.rounding if dxo.data_kind == DataKind.WEIGHT_DIFF else "nearest"
        generator = rounding_generator(s.rounding_seed, who, rnd) if rounding == "stochastic" else None
        data, kept = {}, []
        for name, x in dxo.data.items():
            try:
                data[name] = quantize_tensor(x, s.mode, rounding, generator, name)
            except NonFiniteError:
                data[name] = x  # no quantized form; the receiver's checks say why they refuse it
                kept.append(name)
            except ValueError as err:
                raise ValueError(f"{who} round {rnd}: cannot quantize the {dxo.data_kind} to {s.mode}: {err}") from None
        if kept:
            names = ", ".join(kept[:3])
            self.log_warning(fl_ctx, f"{who} round {rnd}: {len(kept)} tensors hold NaN or infinity, sent unquantized ({names})")
        before, after = payload_nbytes(dxo.data), payload_nbytes(data)
        self.log_info(fl_ctx, f"{who} round {rnd}: {dxo.data_kind} quantized to {s.mode}: {before:,} -> {after:,} bytes")
        return DXO(dxo.data_kind, data=data, meta={**dxo.meta, Meta.QUANTIZATION: s.mode})
