"""A hospital's side of the encrypted job: its BFV key and the job's quantization and packing settings,
read once per job and shared by the encrypt and decrypt filters (both name it by id)."""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import Any

import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from pydantic import Field, PositiveFloat, field_validator

from ..config import ConfigError, StrictModel, validate
from .bfv_context import CLIENT_CONTEXT_FILE, BFVContext
from .kit_context import load_kit_context
from .lanes import LanePlan, PackingSettings, plan_lanes

COMPONENT = "hospital_fedlora.he.site_key.SiteEncryption"


class EncryptionSettings(StrictModel):
    clip: float | dict[str, float] = Field(description="clip bound: one for all tensors, or per regex")
    full_weight: PositiveFloat = Field(description="example count that gives a site full weight")
    packing: PackingSettings = PackingSettings()
    rounding_seed: int | None = Field(None, description="fixed seed for stochastic rounding (tests); default: fresh")

    @field_validator("clip", mode="before")
    @classmethod
    def _positive_bounds(cls, v: Any) -> Any:
        bounds = v.values() if isinstance(v, dict) else [v]
        if (isinstance(v, dict) and not v) or not all(_positive_number(b) for b in bounds):
            raise ValueError("must be a positive number, or a non-empty mapping of tensor-name patterns to positive numbers")
        return v


def _positive_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


class SiteEncryption(FLComponent):
    """The hospital's BFV key and the job's encryption settings (a client component, id ``site_encryption``).

    Args:
        clip: the bound every site clips its adapter change to: one float, or ``{regex: bound}`` per tensor.
            It fixes the integer scale all sites share; set it above the largest change one round makes
            (about ``local_steps * learning_rate`` with Adam). The encrypt filter logs how much it clipped.
        full_weight: the example count that gives a site full weight in the average; set it near the
            largest site's count (``quantize.contribution_weight``).
        packing: ``lanes.PackingSettings`` (bits 8 or 16, max_sites, ...), checked against the kit's key
            when the job starts; a combination that could overflow stops the site naming the setting.
        context_file: the key file; default ``<kit>/startup/client_bfv_context.tenseal``.
        rounding_seed: fixed seed for the stochastic rounding (tests only); default fresh randomness.
    """

    def __init__(
        self,
        clip: float | dict,
        full_weight: float,
        packing: dict | None = None,
        context_file: str = "",
        rounding_seed: int | None = None,
    ):
        super().__init__()
        raw = {"clip": clip, "full_weight": full_weight, "packing": packing or {}, "rounding_seed": rounding_seed}
        self.settings = validate(EncryptionSettings, raw, f"job config, component {COMPONENT}")
        self.context_file = context_file
        self._context: BFVContext | None = None
        self._plan: LanePlan | None = None
        self._error: str | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._context = self._plan = self._error = None
            try:
                self.prepare(fl_ctx)
            except Exception as err:  # kept, and raised by the filters with every task, naming the cause
                self._error = str(err)
                self.log_error(fl_ctx, f"encryption set-up failed: {err}")

    def prepare(self, fl_ctx: FLContext) -> None:
        """Load the key and plan the lanes (once per job)."""
        context, origin = load_kit_context(fl_ctx, CLIENT_CONTEXT_FILE, self.context_file)
        if not context.has_secret_key:
            raise ValueError(
                f"{fl_ctx.get_identity_name() or 'this site'}: the BFV context holds no secret key (is it the server's "
                f"file?); hospitals use startup/{CLIENT_CONTEXT_FILE} from their own kit"
            )
        try:
            plan = plan_lanes(self.settings.packing, context)
        except ValueError as err:
            raise ConfigError(f"job config, component {COMPONENT}, args 'packing': {err}") from None
        self._context, self._plan = context, plan
        s = self.settings
        self.log_info(
            fl_ctx,
            f"BFV key {context.key_id} from {origin}: int{plan.bits}, {plan.lanes_per_slot} lanes of {plan.lane_bits} "
            f"bits per slot (up to {plan.max_sites} sites), clip {s.clip}, full weight at {s.full_weight:g} examples",
        )

    def ready(self, fl_ctx: FLContext) -> "SiteEncryption":
        if self._error:
            raise RuntimeError(f"encryption is not set up at this site: {self._error}")
        if self._context is None:
            self.prepare(fl_ctx)
        return self

    @property
    def context(self) -> BFVContext:
        assert self._context is not None, "call ready() first"
        return self._context

    @property
    def plan(self) -> LanePlan:
        assert self._plan is not None, "call ready() first"
        return self._plan

    def rounding_generator(self, site: str, rnd: int) -> torch.Generator:
        """Independent rounding noise per site and round; reproducible only with ``rounding_seed``."""
        if self.settings.rounding_seed is None:
            seed = secrets.randbits(63)
        else:
            digest = hashlib.sha256(f"{self.settings.rounding_seed}:{site}:{rnd}".encode()).digest()
            seed = int.from_bytes(digest[:8], "big") >> 1
        return torch.Generator().manual_seed(seed)


def find_site_encryption(fl_ctx: FLContext, component_id: str) -> SiteEncryption:
    engine = fl_ctx.get_engine()
    found = engine.get_component(component_id) if engine is not None else None
    if not isinstance(found, SiteEncryption):
        raise ConfigError(
            f"job config: component {component_id!r} must be a {COMPONENT} (the filters' 'encryption_id'), "
            f"got {type(found).__name__}"
        )
    return found
