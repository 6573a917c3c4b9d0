"""The adapter as named arrays: exact get/set, layout checks, differences, and the PEFT folder every site writes
(loadable by ``PeftModel.from_pretrained``, replaced atomically, with a config identical in every process)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel

from hospital_fedlora.adapter_files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    load_peft_adapter,
    save_peft_adapter,
)
from hospital_fedlora.config import LoraSettings
from hospital_fedlora.site.model_loading import apply_lora, choose_placement, load_base_model
from hospital_fedlora.site.trainer import (
    adapter_config_dict,
    get_adapter_state,
    set_adapter_state,
    subtract,
)

CPU = choose_placement("cpu", "auto", False)
SETTINGS = LoraSettings(r=4, dropout=0.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def lora_model(base_model_dir):
    model, tokenizer = load_base_model(base_model_dir, CPU)
    peft_model = apply_lora(model, SETTINGS, seed=0)
    peft_model.eval()
    return peft_model, tokenizer


@pytest.fixture
def model(lora_model):
    """The module's model, back at its initial adapter after each test."""
    peft_model, _ = lora_model
    initial = get_adapter_state(peft_model)
    yield peft_model
    set_adapter_state(peft_model, initial)


def _random_state(model, seed=1):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in get_adapter_state(model).items()}


def _logits(model, tokenizer):
    batch = tokenizer(["### Instruction:\nWrite discharge instructions.\n\n### Response:\n"], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


# ------------------------------------------------------------------------------------------- get / set
def test_get_gives_float32_arrays_keyed_like_peft(model):
    state = get_adapter_state(model)
    assert len(state) == 2 * 2 * 2  # 2 layers x q/v x A/B
    for key, value in state.items():
        assert key.startswith("base_model.model.model.layers.") and key.endswith(".weight")
        assert ".default." not in key  # PEFT's saved-file keys, without the adapter name
        assert isinstance(value, np.ndarray) and value.dtype == np.float32
    state[next(iter(state))][...] = 123.0  # a copy: changing it leaves the model alone
    assert not any((v == 123.0).all() for v in get_adapter_state(model).values())


def test_set_then_get_round_trips_exactly_and_changes_the_model(model, lora_model):
    _, tokenizer = lora_model
    before = _logits(model, tokenizer)
    state = _random_state(model)
    set_adapter_state(model, state)
    got = get_adapter_state(model)
    assert got.keys() == state.keys()
    assert all(np.array_equal(got[k], state[k]) for k in state)
    assert not torch.allclose(_logits(model, tokenizer), before)


def test_set_accepts_float64_arrays(model):
    state = {k: v.astype(np.float64) for k, v in _random_state(model).items()}
    set_adapter_state(model, state)
    got = get_adapter_state(model)
    assert all(np.array_equal(got[k], state[k].astype(np.float32)) for k in state)


def _refused(model, state, match):
    before = get_adapter_state(model)
    with pytest.raises(ValueError, match=match):
        set_adapter_state(model, state, source="adapter from round 3")
    after = get_adapter_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing half-applied


def test_set_refuses_a_missing_tensor_and_names_it(model):
    state = _random_state(model)
    key = sorted(state)[0]
    del state[key]
    _refused(model, state, rf"adapter from round 3: .*missing \['{key}'\], unexpected \[\]")


def test_set_refuses_an_extra_tensor_and_names_it(model):
    state = _random_state(model)
    state["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 256), np.float32)
    _refused(model, state, r"adapter from round 3: .*missing \[\], unexpected \['base_model.model.lm_head.lora_A.weight'\]")


def test_set_refuses_a_wrong_shape_and_names_the_tensor(model):
    state = _random_state(model)
    key = next(k for k in sorted(state) if "lora_A" in k)
    state[key] = state[key].T.copy()
    r, hidden = state[key].shape[1], state[key].shape[0]
    _refused(model, state, rf"adapter from round 3: tensor '{key}' has shape \({hidden}, {r}\), the agreed layout says \({r}, {hidden}\)")


def test_subtract_is_elementwise_float32_over_the_new_keys():
    new = {"a": np.array([1.5, 2.0], np.float64), "b": np.ones((2, 2), np.float32)}
    old = {"a": np.array([0.5, 3.0], np.float32), "b": np.full((2, 2), 0.25, np.float32), "unused": np.zeros(1)}
    diff = subtract(new, old)
    assert sorted(diff) == ["a", "b"]
    assert diff["a"].dtype == np.float32 and diff["b"].dtype == np.float32
    np.testing.assert_array_equal(diff["a"], [1.0, -1.0])
    np.testing.assert_array_equal(diff["b"], np.full((2, 2), 0.75))


# --------------------------------------------------------------------------------------- PEFT folders
def test_saved_folder_loads_with_peft_from_pretrained_giving_identical_weights(model, lora_model, tmp_path, base_model_dir):
    _, tokenizer = lora_model
    state = _random_state(model, seed=5)
    set_adapter_state(model, state)
    expected_logits = _logits(model, tokenizer)

    out = save_peft_adapter(tmp_path / "global_adapter", state, adapter_config_dict(model))
    assert out == tmp_path / "global_adapter"
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    saved_config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    assert saved_config["peft_type"] == "LORA" and saved_config["r"] == 4
    assert saved_config["base_model_name_or_path"] is None  # site-local path left out

    base, _ = load_base_model(base_model_dir, CPU)
    loaded = PeftModel.from_pretrained(base, out)
    loaded.eval()
    got = get_adapter_state(loaded)
    assert got.keys() == state.keys()
    assert all(np.array_equal(got[k], state[k]) for k in state)
    assert torch.equal(_logits(loaded, tokenizer), expected_logits)

    weights, config = load_peft_adapter(out)
    assert all(np.array_equal(weights[k], state[k]) for k in state) and weights.keys() == state.keys()
    assert config == saved_config


def test_save_replaces_the_previous_folder_and_leaves_nothing_else(model, tmp_path):
    config = adapter_config_dict(model)
    out = tmp_path / "global_adapter"
    save_peft_adapter(out, _random_state(model, seed=1), config)
    second = _random_state(model, seed=2)
    save_peft_adapter(out, second, config)
    weights, _ = load_peft_adapter(out)
    assert all(np.array_equal(weights[k], second[k]) for k in second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_adapter"]
    assert out.stat().st_mode & 0o777 == 0o755  # an ordinary folder, readable by an inference service


def test_a_save_that_fails_midway_keeps_the_previous_folder_and_no_temp(model, tmp_path):
    config = adapter_config_dict(model)
    out = tmp_path / "global_adapter"
    save_peft_adapter(out, _random_state(model), config)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    broken = _random_state(model, seed=3)
    broken[sorted(broken)[-1]] = "not an array"
    with pytest.raises(ValueError):
        save_peft_adapter(out, broken, config)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_adapter"]


def test_load_of_an_incomplete_folder_names_the_missing_file(model, tmp_path):
    out = save_peft_adapter(tmp_path / "adapter", _random_state(model), adapter_config_dict(model))
    (out / ADAPTER_WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{ADAPTER_WEIGHTS_FILE}: missing"):
        load_peft_adapter(out)


# --------------------------------------------------------------------------- config stable across processes
_CONFIG_IN_A_FRESH_PROCESS = """
import json, sys
from pathlib import Path
from hospital_fedlora.site.trainer import adapter_config_dict
from hospital_fedlora.config import LoraSettings
from hospital_fedlora.site.model_loading import apply_lora, choose_placement, load_base_model
model, _ = load_base_model(Path(sys.argv[1]), choose_placement("cpu", "auto", False))
model = apply_lora(model, LoraSettings(target_modules=sys.argv[2].split(",")), seed=0)
raw = model.peft_config["default"].target_modules
print(json.dumps({"config": json.dumps(adapter_config_dict(model)), "raw_order": list(raw)}))
"""


def test_adapter_config_is_identical_in_every_process(base_model_dir):
    # peft holds target_modules as a set, whose order follows the per-process string hash seed; every site
    # must still send (and the server compare) the same config, so the order must not leak into it.
    modules = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONFIG_IN_A_FRESH_PROCESS, str(base_model_dir), modules],
            env={**os.environ, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "2")
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    a, b = outputs
    assert a["raw_order"] != b["raw_order"], "hash seeds 1 and 2 no longer reorder the set; pick others"
    assert a["config"] == b["config"]
    config = json.loads(a["config"])
    assert config["target_modules"] == sorted(modules.split(","))
    assert config["base_model_name_or_path"] is None
