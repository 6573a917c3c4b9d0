"""Typed configuration, validated at the edge: one strict base, one error format.

``TrainingRecipe`` belongs to the job (what every hospital must train with alike), ``SiteConfig`` to the
hospital (where its data and model are, which hardware). A field of the other owner is refused with a
message saying where it belongs. The recipe's defaults are the shipped recipe: jobs carry only what they
change.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who has to fix the file."""


class StrictModel(BaseModel):
    """Base of every settings model: unknown fields are errors, values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Model = TypeVar("Model", bound=StrictModel)


def validate(model: type[Model], raw: Any, source: str, docs: str, misplaced: Mapping[str, str] | None = None) -> Model:
    """``model`` from ``raw``, or a ``ConfigError`` naming ``source`` and every bad field.

    ``docs`` is the page that lists the valid fields; ``misplaced`` maps field names that belong to another
    owner to a hint saying where they go.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source, docs, misplaced or {})) from None


def _describe(err: ValidationError, source: str, docs: str, misplaced: Mapping[str, str]) -> str:
    """The one error format: the source, then one line per field with what is wrong and what to do."""
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        last = str(e["loc"][-1]) if e["loc"] else ""
        if e["type"] == "extra_forbidden" and last in misplaced:
            lines.append(f"  field '{field}': {misplaced[last]}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  field '{field}': unknown setting; check its spelling against {docs}")
        else:
            got = e.get("input")
            got = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"  field '{field}': {e['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- job side
class LoraSettings(StrictModel):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # Every linear layer of a Llama block: under the earlier recipe (r=8 on q/v) make compare measured 0%
    # diagnosis-group exact match in every setting (docs/architecture.md, "The recipe has one source").
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    variant: Literal["lora", "ffa"] = Field(
        "lora",
        description="lora: train and send A and B; ffa (FFA-LoRA): A stays at its seeded init, the same at every "
        "site, and only B trains and travels: half the bytes, and the average of B is exact for the product B·A",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("name at least one module, e.g. [q_proj, v_proj]")
        return v


class TaskSettings(StrictModel):
    """What the job asks of every hospital's records, and how prompts are built: the same at every site."""

    instruction: str | None = Field(
        None,
        description="the task's instruction for instruction/response records, the same at every site; it may name "
        "record fields in braces ({department}) that each site maps to a column (data.columns); null takes each "
        "record's own instruction column",
    )
    system_prompt: str | None = Field(None, description="a system turn put before records that have none")
    prompt_format: Literal["auto", "chat_template", "plain"] = Field(
        "auto",
        description="chat_template: the base model tokenizer's chat template; plain: this bundle's "
        "'### Instruction / ### Response' template; auto: the chat template when the tokenizer has one",
    )
    loss_on: Literal["assistant_turns", "last_assistant_turn"] = Field(
        "assistant_turns", description="which tokens the loss is taken on; prompts and user turns never"
    )

    @field_validator("instruction")
    @classmethod
    def _template_fields(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("an empty instruction; write the task (or null to take each record's own instruction)")
        for name in template_fields(v):
            if not name.isidentifier():
                raise ValueError(
                    f"{{{name}}} is not a field name; name record fields in braces, e.g. {{department}} "
                    "(write {{ and }} for literal braces)"
                )
        return v


def template_fields(template: str) -> list[str]:
    """The field names an instruction template uses, in order; ValueError if the braces are malformed."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"malformed braces in the instruction ({err}); write {{{{ and }}}} for literal braces") from None


class TrainingRecipe(StrictModel):
    """What every hospital trains with; set in the job's client config (executor argument ``recipe``)."""

    task: TaskSettings = TaskSettings()
    lora: LoraSettings = LoraSettings()
    local_steps: int = Field(30, ge=1, description="optimizer steps per round at each site")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step (effective batch)")
    learning_rate: float = Field(2e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    fedprox_mu: float = Field(
        0.0,
        ge=0.0,
        description="FedProx: local training adds (mu/2)·||w - w_global||² over the LoRA weights, w_global being the "
        "adapter received this round; 0 trains plain FedAvg",
    )
    loss_weighting: Literal["token", "example"] = Field(
        "example",
        description="example: each record's mean response-token loss counts the same, so a two-word answer (a "
        "diagnosis group) weighs as much as a long summary; token: every response token counts the same",
    )
    max_seq_length: int = Field(256, ge=16)
    max_eval_examples: int = Field(48, ge=1, description="validation examples scored per round")
    max_test_examples: int = Field(
        16, ge=0, description="test-split records each site scores the global adapter on every round (0: none)"
    )
    max_new_tokens: int = Field(32, ge=1, description="the longest answer generated for the test metrics")
    seed: int = 0


# -------------------------------------------------------------------------------------------- site side
DataFormat = Literal["jsonl", "csv", "parquet"]
# Instruction/response records; a mapping with 'messages' instead means conversational records.
DEFAULT_COLUMNS = {"instruction": "instruction", "input": "input", "response": "response"}
COLUMNS_HELP = (
    "data.columns maps the task's fields to your column names: instruction (only when the job has no fixed "
    "instruction), input (the note; null if none), response, any {field} the job's instruction names; or "
    "messages alone for conversations (a list of {role, content})"
)


class DataFiles(StrictModel):
    """A hospital's own files. Paths relative to the site config file."""

    train: Path
    validation: Path
    test: Path | None = None
    format: DataFormat | None = Field(None, description="inferred from the file suffix when omitted")
    columns: dict[str, str | None] = Field(
        default_factory=dict,
        validate_default=True,
        description="the task's fields -> this hospital's column names; see DEFAULT_COLUMNS and COLUMNS_HELP",
    )

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        for field, column in v.items():
            if not field.isidentifier():
                raise ValueError(f"{field!r} is not a field name; {COLUMNS_HELP}")
            if column is None and field not in ("input", "instruction"):
                raise ValueError(f"columns.{field} is null; only 'input' and 'instruction' may be left unmapped")
        if v.get("messages") is not None:
            extra = sorted(set(v) & {"instruction", "input", "response"})
            if extra:
                raise ValueError(f"columns.messages (conversations) cannot be combined with columns {extra}; {COLUMNS_HELP}")
        return {**({} if v.get("messages") else DEFAULT_COLUMNS), **v}

    @property
    def conversational(self) -> bool:
        return bool(self.columns.get("messages"))


class PrivacySettings(StrictModel):
    """What this hospital lets a job do with its data; enforced at the site, whatever the job says."""

    require_encryption: bool = Field(
        True,
        description="send adapter updates only encrypted (jobs/fedlora_he); a job that would send them in the "
        "clear is refused before training starts",
    )
    min_contributors: int = Field(
        2,
        ge=2,
        description="apply an encrypted round's aggregate only if at least this many distinct hospitals, verified by "
        "the aggregate MAC, contributed to it; set it to the job's number of hospitals to refuse any round "
        "closed without one (then one absent hospital stops the job)",
    )


class SiteConfig(StrictModel):
    """One hospital's settings (``site_configs/<site>.yaml``)."""

    site: str = Field(description="the site's name in project.yml, e.g. hospital-a")
    data: DataFiles
    base_model_path: Path = Field(description="local Hugging Face causal-LM folder (Llama, Mistral, Qwen2)")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_in_4bit: bool = Field(False, description="QLoRA through bitsandbytes; needs CUDA")
    micro_batch_size: int = Field(4, ge=1, description="examples per forward pass; sized to this site's memory")
    lora_rank: int | None = Field(
        None,
        ge=1,
        description="train only the first lora_rank ranks of the job's LoRA (at most the job's lora.r), for a "
        "site with little data or compute; plaintext jobs only (HetLoRA-style zero-padding)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass: less GPU memory for more compute (forward passes run again); "
        "results are unchanged",
    )
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; default leaves torch's")
    data_parallel: int | Literal["all"] = Field(
        1, description="training processes at this site, one per GPU ('all': every visible GPU); see docs/hospital-it.md"
    )
    privacy: PrivacySettings = PrivacySettings()

    @field_validator("data_parallel", mode="before")
    @classmethod
    def _processes(cls, v: Any) -> Any:
        # Checked before the union's own checks, whose messages would name its branches, not the field.
        if v != "all" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError("expected a number of training processes, one per GPU (1 or more), or 'all'")
        return v

    @model_validator(mode="after")
    def _qlora_needs_cuda(self) -> "SiteConfig":
        if self.load_in_4bit and self.device == "cpu":
            raise ValueError("load_in_4bit needs device 'cuda' or 'auto' (bitsandbytes 4-bit kernels are CUDA only)")
        return self


# ------------------------------------------------------------------------------------------- loading
_SITE_HINT = "this is a site-level setting: hospital IT sets it in site_configs/<site>.yaml, not the job"
_JOB_HINT = "this is a job-level training setting: the operator sets it in the job's recipe, not the site"
_SITE_ONLY = {name: _SITE_HINT for name in SiteConfig.model_fields}
_NOT_SITE_FIELDS = {
    name: _JOB_HINT for name in (*TrainingRecipe.model_fields, *LoraSettings.model_fields, *TaskSettings.model_fields)
}
# Site configs written before data.columns existed.
_NOT_SITE_FIELDS.update(
    {f"{field}_field": f"replaced by data.columns: write '{field}: <your column>' under data.columns"
     for field in ("instruction", "input", "response")}
)


def parse_recipe(raw: dict[str, Any] | None, source: str = "job config (executor argument 'recipe')") -> TrainingRecipe:
    return validate(TrainingRecipe, raw or {}, source, "docs/architecture.md", _SITE_ONLY)


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
    cfg = validate(SiteConfig, raw, str(path), "docs/hospital-it.md", _NOT_SITE_FIELDS)
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
