"""Typed configuration, validated at the edge.

Two owners, two models, no knob in both:

* ``TrainingRecipe`` belongs to the **job** the operator submits: everything that must be identical at
  every hospital for federated averaging to make sense (LoRA shape, local steps, learning rate, effective
  batch size, sequence length, seed).
* ``SiteConfig`` belongs to the **hospital** (``site_configs/<site>.yaml``, placed by hospital IT in the
  site's startup kit): where its data and base model live, which hardware it trains on.

A field that belongs to the other owner is rejected with a message saying where it goes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who has to fix the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- job side
class LoraSettings(_Strict):
    r: int = Field(8, ge=1, le=1024)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("name at least one module, e.g. [q_proj, v_proj]")
        return v


class TrainingRecipe(_Strict):
    """What every hospital trains with; set in the job's client config (executor argument ``recipe``)."""

    lora: LoraSettings = LoraSettings()
    local_steps: int = Field(20, ge=1, description="optimizer steps per round at each site")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step (effective batch)")
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_seq_length: int = Field(256, ge=16)
    max_eval_examples: int = Field(64, ge=1, description="validation examples scored per round")
    seed: int = 0


# -------------------------------------------------------------------------------------------- site side
DataFormat = Literal["jsonl", "csv", "parquet"]


class DataFiles(_Strict):
    """A hospital's own files. Paths relative to the site config file."""

    train: Path
    validation: Path
    test: Path | None = None
    format: DataFormat | None = Field(None, description="inferred from the file suffix when omitted")
    instruction_field: str = "instruction"
    input_field: str | None = Field("input", description="context (e.g. the note); null if the files have none")
    response_field: str = "response"


class PrivacySettings(_Strict):
    """What this hospital lets a job do with its data; enforced at the site, whatever the job says."""

    require_encryption: bool = Field(
        True,
        description="send adapter updates only encrypted (jobs/fedlora_he); a job that would send them in the "
        "clear is refused before training starts",
    )


class SiteConfig(_Strict):
    """One hospital's settings (``site_configs/<site>.yaml``)."""

    site: str = Field(description="the site's name in project.yml, e.g. hospital-a")
    data: DataFiles
    base_model_path: Path = Field(description="local Hugging Face causal-LM folder (Llama, Mistral, Qwen2)")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_in_4bit: bool = Field(False, description="QLoRA through bitsandbytes; needs CUDA")
    micro_batch_size: int = Field(4, ge=1, description="examples per forward pass; sized to this site's memory")
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; default leaves torch's")
    privacy: PrivacySettings = PrivacySettings()

    @model_validator(mode="after")
    def _qlora_needs_cuda(self) -> "SiteConfig":
        if self.load_in_4bit and self.device == "cpu":
            raise ValueError("load_in_4bit needs device 'cuda' or 'auto' (bitsandbytes 4-bit kernels are CUDA only)")
        return self


# ------------------------------------------------------------------------------------ loading and errors
_SITE_ONLY = set(SiteConfig.model_fields)
_JOB_ONLY = set(TrainingRecipe.model_fields) | set(LoraSettings.model_fields)


def _describe(err: ValidationError, source: str, wrong_owner: set[str], owner_hint: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden" and str(e["loc"][-1]) in wrong_owner:
            lines.append(f"  field '{field}': {owner_hint}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  field '{field}': unknown setting; check the spelling against docs/hospital-it.md")
        else:
            got = e.get("input")
            got = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  field '{field}': {e['msg']}{got}")
    return "\n".join(lines)


def parse_recipe(raw: dict[str, Any] | None, source: str = "job config (executor argument 'recipe')") -> TrainingRecipe:
    try:
        return TrainingRecipe.model_validate(raw or {})
    except ValidationError as err:
        hint = "this is a site-level setting: hospital IT sets it in site_configs/<site>.yaml, not the job"
        raise ConfigError(_describe(err, source, _SITE_ONLY, hint)) from None


def load_site_config(path: str | Path, expected_site: str | None = None) -> SiteConfig:
    """Read and validate ``path``; relative paths inside it are resolved against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: site config not found; copy site_configs/hospital-a.yaml and edit it")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    try:
        cfg = SiteConfig.model_validate(raw)
    except ValidationError as err:
        hint = "this is a job-level training setting: the operator sets it in the job's recipe, not the site"
        raise ConfigError(_describe(err, str(path), _JOB_ONLY, hint)) from None
    if expected_site is not None and cfg.site != expected_site:
        raise ConfigError(f"{path}: field 'site' is {cfg.site!r} but this client is {expected_site!r}")
    return _resolve_paths(cfg, path.parent)


def _resolve_paths(cfg: SiteConfig, base: Path) -> SiteConfig:
    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p).resolve())

    data = cfg.data.model_copy(
        update={"train": fix(cfg.data.train), "validation": fix(cfg.data.validation), "test": fix(cfg.data.test)}
    )
    return cfg.model_copy(update={"data": data, "base_model_path": fix(cfg.base_model_path)})
