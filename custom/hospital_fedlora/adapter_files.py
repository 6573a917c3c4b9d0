"""A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), written atomically.

What every hospital and the plaintext server write after the last round: exactly what
``PeftModel.from_pretrained`` loads. Tensors are PEFT's own state-dict keys as float32 numpy arrays.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from .atomic_folder import replace_folder

AdapterState = dict[str, np.ndarray]

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
GLOBAL_ADAPTER_DIR = "global_adapter"  # the final adapter's folder in a run folder, server and sites alike


def save_peft_adapter(out_dir: Path, state: Mapping[str, np.ndarray], adapter_config: dict) -> Path:
    """Write a PEFT adapter folder atomically: readers see the old folder or the new one, never half of one."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the adapter is an ordinary folder others may serve from
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
        save_file(arrays, str(tmp / ADAPTER_WEIGHTS_FILE))
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
            raise FileNotFoundError(
                f"{f}: missing; a PEFT adapter folder holds {ADAPTER_WEIGHTS_FILE} and {ADAPTER_CONFIG_FILE}"
            )
    return dict(load_file(str(weights))), json.loads(config.read_text())
