"""The base model with a trained PEFT adapter on it, from local folders only; clear errors for a wrong adapter.

Shared by ``generate`` and ``merge``: both refuse an adapter that does not fit the base model before doing
anything with it, naming the folder and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import PeftModel

from ..adapter_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, GLOBAL_ADAPTER_DIR, load_peft_adapter
from ..adapter_layout import AdapterLayout
from ..config import ConfigError
from ..site.model_loading import Placement, choose_placement, load_base_model
from ..site.trainer import get_adapter_state


def check_adapter_folder(adapter: Path) -> dict:
    """The adapter's config, or a ``ConfigError`` saying which file is missing and where adapters are written."""
    where = f"--adapter {adapter}"
    if not adapter.is_dir():
        raise ConfigError(
            f"{where}: folder not found; point it at a PEFT adapter folder, e.g. a run's {GLOBAL_ADAPTER_DIR}/ "
            "written after the last round"
        )
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        if not (adapter / name).is_file():
            raise ConfigError(
                f"{where}: no {name}; a PEFT adapter folder holds {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE} "
                f"(a run's {GLOBAL_ADAPTER_DIR}/ has both)"
            )
    try:
        config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: {ADAPTER_CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ConfigError(f"{where}: {ADAPTER_CONFIG_FILE} is not a LoRA adapter's config (peft_type LORA)")
    return config


def load_adapted_model(base_model: Path, adapter: Path, placement: Placement | None = None):
    """(PeftModel in eval mode, tokenizer): ``base_model`` with ``adapter`` loaded on it, exactly as saved."""
    config = check_adapter_folder(adapter)
    placement = placement or choose_placement("auto", "auto", False, "--base-model")
    model, tokenizer = load_base_model(base_model, placement, "--base-model")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    wanted = config.get("target_modules") or []
    missing = sorted(m for m in ([wanted] if isinstance(wanted, str) else wanted) if m not in present)
    if missing:
        raise ConfigError(
            f"--adapter {adapter}: adapts layers {missing} that the base model in {base_model} does not have; "
            "this adapter was trained on another base model: pass the checkpoint the federation trained on"
        )
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), local_files_only=True, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:  # shape mismatches surface as RuntimeError from torch
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(err).__name__)
        raise ConfigError(
            f"--adapter {adapter}: does not fit the base model in {base_model} ({detail}); pass the base "
            f"checkpoint the federation trained on, with the adapter folder exactly as the run wrote it"
        ) from None
    # peft only warns about adapter tensors it could not place; every saved tensor must land, or the
    # answers would silently come from a partly adapted model.
    saved, _ = load_peft_adapter(adapter)
    placed = get_adapter_state(peft_model)
    unplaced, unsaved = sorted(set(saved) - set(placed)), sorted(set(placed) - set(saved))
    if unplaced or unsaved:
        raise ConfigError(
            f"--adapter {adapter}: its {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE} disagree on this base model "
            f"({len(unplaced)} saved tensors have no place, e.g. {unplaced[:1]}; {len(unsaved)} adapted layers have "
            "no saved tensor); use the adapter folder exactly as the run wrote it, with the base checkpoint it "
            "was trained on"
        )
    AdapterLayout.from_tensors(placed).check(saved, f"--adapter {adapter}")  # shapes: from_pretrained checked them
    peft_model.eval()
    return peft_model, tokenizer
