"""The LoRA adapter of a PEFT model as plain named float32 arrays: read it, load it, describe it.

Keys are PEFT's own (``get_peft_model_state_dict``), so the arrays are exactly what a PEFT adapter
folder holds (``adapter_files``).
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from ..adapter_files import AdapterState
from ..adapter_layout import AdapterLayout


def get_adapter_state(model: PeftModel) -> AdapterState:
    return {k: v.detach().float().cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(model: PeftModel, state: Mapping[str, np.ndarray], source: str = "global adapter") -> None:
    """Load ``state`` into ``model``'s adapter, refusing anything that does not match it exactly."""
    AdapterLayout.from_tensors(get_adapter_state(model)).check(state, source)
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in state.items()}
    set_peft_model_state_dict(model, tensors)


def subtract(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> AdapterState:
    return {k: (new[k] - old[k]).astype(np.float32) for k in new}


def adapter_config_dict(model: PeftModel) -> dict:
    cfg = model.peft_config["default"].to_dict()
    # The base model's path is site-local; the adapter works with any copy of the same checkpoint.
    cfg["base_model_name_or_path"] = None
    # peft keeps target_modules as a set; sorted, so every site sends byte-identical configs.
    return json.loads(json.dumps(cfg, default=sorted))
