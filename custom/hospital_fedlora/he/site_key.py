"""A hospital's side of the encrypted job: its BFV key and the job's quantization and packing settings,
read once per job and shared by the encrypt and decrypt filters (both name it by id)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from pydantic import Field, PositiveFloat, field_validator

from ..config import ConfigError, StrictModel, validate
from .bfv_context import CLIENT_CONTEXT_FILE, BFVContext
from .encoding import LanePlan, PackingSettings, plan_lanes
from .kit_context import load_kit_context

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


@dataclass(frozen=True)
class SiteKey:
    """What the filters use every round: the hospital's key, the job's lane plan and settings."""

    context: BFVContext
    plan: LanePlan
    settings: EncryptionSettings


class SiteEncryption(FLComponent):
    """The hospital's BFV key and the job's encryption settings (a client component, id ``site_encryption``).

    Args:
        clip: the bound every site clips its adapter change to: one float, or ``{regex: bound}`` per tensor.
            It fixes the integer scale all sites share; set it above the largest change one round makes
            (about ``local_steps * learning_rate`` with Adam). The encrypt filter logs how much it clipped.
        full_weight: the example count that gives a site full weight in the average; set it near the
            largest site's count (``encoding.contribution_weight``).
        packing: ``encoding.PackingSettings`` (bits 8 or 16, max_sites, ...), checked against the kit's key
            when the job starts; a combination that could overflow stops the site naming the setting.
        context_file: never used. The key is always ``<kit>/startup/client_bfv_context.tenseal``, read
            with the kit's signature check, whatever the job says: a file the job names (one its submitter
            could hold) is ignored with a warning, and a site that requires encryption refuses the job
            (``site/privacy_gate.py``, which names the site config and this argument in the job report).
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
        self.settings = validate(EncryptionSettings, raw, f"job config, component {COMPONENT}", "docs/architecture.md")
        self.job_key_file = context_file  # never read: named in a warning only
        self._key: SiteKey | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            try:
                self.key(fl_ctx)
            except Exception as err:  # the filters hold it and raise it with every task, naming the cause
                self.log_error(fl_ctx, f"encryption set-up failed: {err}")
        elif event_type == EventType.END_RUN:
            self._key = None

    def key(self, fl_ctx: FLContext) -> SiteKey:
        """The key and lane plan for this job, loaded and checked on the first call."""
        if self._key is None:
            self._key = self._load(fl_ctx)
        return self._key

    def _load(self, fl_ctx: FLContext) -> SiteKey:
        if self.job_key_file:
            self.log_warning(
                fl_ctx,
                f"job config, component {COMPONENT}, args 'context_file' ({self.job_key_file}) ignored: a hospital "
                f"encrypts only with the key in its own kit (startup/{CLIENT_CONTEXT_FILE}, signature checked)",
            )
        context, origin = load_kit_context(fl_ctx, CLIENT_CONTEXT_FILE)
        if not context.has_secret_key:
            raise ValueError(
                f"{fl_ctx.get_identity_name() or 'this site'}: the BFV context holds no secret key (is it the server's "
                f"file?); hospitals use startup/{CLIENT_CONTEXT_FILE} from their own kit"
            )
        try:
            plan = plan_lanes(self.settings.packing, context)
        except ValueError as err:
            raise ConfigError(f"job config, component {COMPONENT}, args 'packing': {err}") from None
        s = self.settings
        self.log_info(
            fl_ctx,
            f"BFV key {context.key_id} from {origin}: int{plan.bits}, {plan.lanes_per_slot} lanes of {plan.lane_bits} "
            f"bits per slot (up to {plan.max_sites} sites), clip {s.clip}, full weight at {s.full_weight:g} examples",
        )
        return SiteKey(context, plan, s)


def load_site_key(fl_ctx: FLContext, component_id: str) -> tuple[SiteKey | None, str]:
    """For the filters at job start: the site's key from component ``component_id``, or why there is none."""
    engine = fl_ctx.get_engine()
    found = engine.get_component(component_id) if engine is not None else None
    if not isinstance(found, SiteEncryption):
        return None, (
            f"job config: component {component_id!r} must be a {COMPONENT} (the filters' 'encryption_id'), "
            f"got {type(found).__name__}"
        )
    try:
        return found.key(fl_ctx), ""
    except Exception as err:
        return None, str(err)
