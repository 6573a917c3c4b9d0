"""Site configs and job recipes: valid files load, bad ones fail with the file, the field and what to do."""

from pathlib import Path

import pytest

from hospital_fedlora.config import ConfigError, load_site_config, parse_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "hospital-a.yaml"
    p.write_text(text)
    return p


GOOD = """
site: hospital-a
base_model_path: model
data: {train: d/train.jsonl, validation: d/val.jsonl}
"""


def test_committed_site_configs_are_valid():
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        cfg = load_site_config(REPO / "site_configs" / f"{site}.yaml", expected_site=site)
        assert cfg.base_model_path == (REPO / "workspace" / "base_model").resolve()
        assert cfg.data.train.name == "train.jsonl" and cfg.data.train.is_absolute()


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    cfg = load_site_config(write(tmp_path, GOOD))
    assert cfg.base_model_path == (tmp_path / "model").resolve()
    assert cfg.data.validation == (tmp_path / "d" / "val.jsonl").resolve()
    assert cfg.micro_batch_size == 4 and cfg.device == "auto"


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: site config not found"):
        load_site_config(tmp_path / "nope.yaml")


def test_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site_config(write(tmp_path, "site: [unclosed"))


def test_missing_required_field_is_named(tmp_path):
    p = write(tmp_path, "site: hospital-a\ndata: {train: t.jsonl, validation: v.jsonl}\n")
    with pytest.raises(ConfigError) as e:
        load_site_config(p)
    assert str(p) in str(e.value) and "field 'base_model_path'" in str(e.value)


def test_wrong_type_is_named_with_value(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'micro_batch_size'.*got 0"):
        load_site_config(write(tmp_path, GOOD + "micro_batch_size: 0\n"))


def test_job_setting_in_site_config_is_refused_with_where_it_belongs(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'learning_rate': this is a job-level training setting"):
        load_site_config(write(tmp_path, GOOD + "learning_rate: 0.1\n"))


def test_site_setting_in_recipe_is_refused_with_where_it_belongs():
    with pytest.raises(ConfigError, match=r"field 'micro_batch_size': this is a site-level setting"):
        parse_recipe({"micro_batch_size": 2})


def test_unknown_setting_is_called_unknown(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'devcie': unknown setting"):
        load_site_config(write(tmp_path, GOOD + "devcie: cpu\n"))


def test_site_name_must_match_the_client(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'site' is 'hospital-a' but this client is 'hospital-b'"):
        load_site_config(write(tmp_path, GOOD), expected_site="hospital-b")


def test_qlora_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="load_in_4bit"):
        load_site_config(write(tmp_path, GOOD + "device: cpu\nload_in_4bit: true\n"))


def test_recipe_defaults_and_bounds():
    r = parse_recipe({"lora": {"r": 4}, "local_steps": 3})
    assert r.lora.r == 4 and r.local_steps == 3
    assert r.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert r.loss_weighting == "example" and r.learning_rate == 2e-3
    with pytest.raises(ConfigError, match=r"field 'loss_weighting'"):
        parse_recipe({"loss_weighting": "sequence"})
    with pytest.raises(ConfigError, match=r"field 'lora.target_modules'"):
        parse_recipe({"lora": {"target_modules": []}})
