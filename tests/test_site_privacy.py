"""A hospital that requires encryption refuses any job, and any task result, that would send its adapter in
the clear, and any job that names its own key file."""

import json
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.shareable import Shareable

from hospital_fedlora.config import ConfigError, PrivacySettings, SiteConfig
from hospital_fedlora.site.privacy_gate import ENCRYPT_FILTER, check_job_allowed, check_result, encrypts_results

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


# ------------------------------------------------------------------------- every task's result, any name
def _result(kind: str) -> Shareable:
    return DXO(kind, data={"lora_A": np.zeros(2, np.float32)}).to_shareable()


def test_get_weights_in_the_clear_is_refused_even_in_the_encrypted_job():
    """Our encrypt filter encrypts a train result's WEIGHT_DIFF only: WEIGHTS from get_weights would pass it."""
    he = client_config("fedlora_he")
    check_result(PrivacySettings(), he, "train", _result(DataKind.WEIGHT_DIFF), "x.yaml")
    for task, kind in (("get_weights", DataKind.WEIGHTS), ("submit_model", DataKind.WEIGHTS), ("train", DataKind.WEIGHTS)):
        with pytest.raises(ConfigError) as e:
            check_result(PrivacySettings(), he, task, _result(kind), "site_configs/hospital-a.yaml")
        msg = str(e.value)
        assert "site_configs/hospital-a.yaml: field 'privacy.require_encryption' is true" in msg
        assert f"'{task}' task would send the site's adapter (WEIGHTS) unencrypted" in msg


def test_a_renamed_task_and_a_collection_are_checked_too():
    he = client_config("fedlora_he")
    with pytest.raises(ConfigError, match="'my_train' task"):
        check_result(PrivacySettings(), he, "my_train", _result(DataKind.WEIGHT_DIFF), "x.yaml")
    inner = {"a": DXO(DataKind.METRICS, data={"loss": 1.0}), "b": DXO(DataKind.WEIGHTS, data={"w": np.zeros(1)})}
    collection = DXO(DataKind.COLLECTION, data=inner).to_shareable()
    with pytest.raises(ConfigError, match=r"\(WEIGHTS\)"):
        check_result(PrivacySettings(), he, "train", collection, "x.yaml")


def test_results_without_adapter_values_and_sites_that_opted_out_pass():
    plain = client_config("fedlora_plain")
    check_result(PrivacySettings(), plain, "validate", DXO(DataKind.METRICS, data={"l": 1.0}).to_shareable(), "x")
    check_result(PrivacySettings(), plain, "train", Shareable(), "x")  # an error reply carries no DXO
    check_result(PrivacySettings(require_encryption=False), plain, "get_weights", _result(DataKind.WEIGHTS), "x")


def test_nvflare_encryptor_covers_the_kinds_it_is_told_to():
    f = {"path": "nvflare.app_opt.he.model_encryptor.HEModelEncryptor", "args": {}}
    cfg = {"task_result_filters": [{"tasks": ["*"], "filters": [f]}]}
    assert encrypts_results(cfg, "get_weights", DataKind.WEIGHTS)
    f["args"]["data_kinds"] = [DataKind.WEIGHT_DIFF]
    assert not encrypts_results(cfg, "get_weights", DataKind.WEIGHTS)


def test_a_job_supplied_key_is_refused_naming_the_setting(tmp_path):
    cfg = json.loads(client_config("fedlora_he").read_text())
    cfg["components"][0]["args"]["context_file"] = "{WORKSPACE}/{JOB_ID}/app_hospital-a/custom/key.tenseal"
    path = tmp_path / "config_fed_client.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        check_job_allowed(PrivacySettings(), path, "train", "site_configs/hospital-a.yaml")
    msg = str(e.value)
    assert "site_configs/hospital-a.yaml: field 'privacy.require_encryption' is true" in msg
    assert "args 'context_file': {WORKSPACE}" in msg and "key in its own kit" in msg


@pytest.mark.parametrize(
    "value, data_type",
    [("patient text", "SCALAR"), (float("nan"), "SCALAR"), (True, "SCALAR"), (1.0, "TEXT"), ({"a": 1.0}, "PARAMETERS")],
)
def test_the_metrics_sender_carries_finite_numbers_only(value, data_type):
    from nvflare.apis.analytix import AnalyticsDataType

    from hospital_fedlora.site.metrics_sender import ScalarMetricsSender

    with pytest.raises(ValueError, match="metric 'x'"):
        ScalarMetricsSender().add("x", value, AnalyticsDataType(data_type), global_step=0)
