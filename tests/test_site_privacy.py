"""A hospital that requires encryption refuses any job that would send its updates in the clear."""

import json
from pathlib import Path

import pytest

from hospital_fedlora.config import ConfigError, PrivacySettings, SiteConfig
from hospital_fedlora.site.privacy_gate import ENCRYPT_FILTER, check_job_allowed, encrypts_results

REPO = Path(__file__).resolve().parents[1]


def client_config(job: str) -> Path:
    return REPO / "jobs" / job / "app" / "config" / "config_fed_client.json"


def test_encryption_is_required_unless_the_site_says_otherwise():
    assert SiteConfig.model_fields["privacy"].default.require_encryption is True


def test_the_committed_jobs_are_told_apart():
    assert encrypts_results(json.loads(client_config("fedlora_he").read_text()), "train")
    assert encrypts_results(json.loads(client_config("fedlora_ckks_stock").read_text()), "train")
    assert not encrypts_results(json.loads(client_config("fedlora_plain").read_text()), "train")


def test_nvflare_encryptor_counts_only_when_it_encrypts_every_layer():
    f = {"path": "nvflare.app_opt.he.model_encryptor.HEModelEncryptor", "args": {"encrypt_layers": ["lora_A"]}}
    assert not encrypts_results({"task_result_filters": [{"tasks": ["train"], "filters": [f]}]}, "train")


def test_plaintext_job_is_refused_naming_the_setting_and_the_way_out():
    with pytest.raises(ConfigError) as e:
        check_job_allowed(PrivacySettings(), client_config("fedlora_plain"), "train", "site_configs/hospital-a.yaml")
    msg = str(e.value)
    assert "site_configs/hospital-a.yaml: field 'privacy.require_encryption'" in msg and "jobs/fedlora_he" in msg


def test_encrypted_job_passes_and_opt_out_allows_plaintext():
    check_job_allowed(PrivacySettings(), client_config("fedlora_he"), "train", "x.yaml")
    check_job_allowed(PrivacySettings(require_encryption=False), client_config("fedlora_plain"), "train", "x.yaml")


def test_a_filter_on_another_task_does_not_count():
    cfg = {"task_result_filters": [{"tasks": ["validate"], "filters": [{"path": ENCRYPT_FILTER}]}]}
    assert not encrypts_results(cfg, "train")
    cfg["task_result_filters"][0]["tasks"] = ["*"]
    assert encrypts_results(cfg, "train")
