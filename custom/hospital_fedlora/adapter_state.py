"""The LoRA adapter as plain named arrays: what travels between sites and server, and how it is saved.

Keys are PEFT's own (``get_peft_model_state_dict``), so a saved file is exactly what
``PeftModel.from_pretrained`` expects in ``adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.numpy import load_file, save_file

from .atomic_folder import replace_folder

AdapterState = dict[str, np.ndarray]

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def get_adapter_state(model: PeftModel) -> AdapterState:
    return {k: v.detach().float().cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(model: PeftModel, state: Mapping[str, np.ndarray], source: str = "global adapter") -> None:
    """Load ``state`` into ``model``'s adapter, refusing anything that does not match it exactly."""
    check_same_layout(get_adapter_state(model), state, source)
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in state.items()}
    set_peft_model_state_dict(model, tensors)


def check_same_layout(expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], source: str) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{source}: adapter tensors do not match this model's LoRA layout "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); "
            "all sites must use the same base-model architecture and the job's LoRA settings"
        )
    for k, v in expected.items():
        if tuple(np.shape(got[k])) != tuple(v.shape):
            raise ValueError(f"{source}: tensor {k} has shape {tuple(np.shape(got[k]))}, expected {tuple(v.shape)}")


def subtract(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> AdapterState:
    return {k: (new[k] - old[k]).astype(np.float32) for k in new}


def adapter_config_dict(model: PeftModel) -> dict:
    cfg = model.peft_config["default"].to_dict()
    # The base model's path is site-local; the adapter works with any copy of the same checkpoint.
    cfg["base_model_name_or_path"] = None
    # peft keeps target_modules as a set; sorted, so every site sends byte-identical configs.
    return json.loads(json.dumps(cfg, default=sorted))


def save_peft_adapter(out_dir: Path, state: Mapping[str, np.ndarray], adapter_config: dict) -> Path:
    """Write a PEFT adapter folder atomically: readers see the old folder or the new one, never half of one."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the adapter is an ordinary folder others may serve from
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS_FILE))
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_peft_adapter(adapter_dir: Path) -> tuple[AdapterState, dict]:
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS_FILE
    config = adapter_dir / ADAPTER_CONFIG_FILE
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a PEFT adapter folder holds {ADAPTER_WEIGHTS_FILE} and {ADAPTER_CONFIG_FILE}")
    return dict(load_file(str(weights))), json.loads(config.read_text())
