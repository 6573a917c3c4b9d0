"""The hospital's privacy gate: its privacy settings checked against the job it was sent, before training.

It reads the client config FLARE deployed for this job (``app_<site>/config/config_fed_client.json``): the
filters named there are the ones FLARE runs on this site's results, however the job was submitted.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, PrivacySettings

ENCRYPT_FILTER = "hospital_fedlora.he.encrypt_filter.EncryptFilter"
# NVFlare's CKKS encryptor (jobs/fedlora_ckks_stock) counts too, unless told to encrypt only some layers.
NVFLARE_ENCRYPTOR = "nvflare.app_opt.he.model_encryptor.HEModelEncryptor"


def _encrypts_everything(f: dict) -> bool:
    if f.get("path") == ENCRYPT_FILTER:
        return True
    return f.get("path") == NVFLARE_ENCRYPTOR and not (f.get("args") or {}).get("encrypt_layers")


def encrypts_results(client_config: dict, task: str) -> bool:
    """Does this client config encrypt every result of ``task`` completely?"""
    for entry in client_config.get("task_result_filters", []):
        tasks = entry.get("tasks", [])
        if (task in tasks or "*" in tasks) and any(_encrypts_everything(f) for f in entry.get("filters", [])):
            return True
    return False


def check_job_allowed(privacy: PrivacySettings, client_config_file: Path, train_task: str, site_config: str) -> None:
    if not privacy.require_encryption:
        return
    config = json.loads(Path(client_config_file).read_text())
    if not encrypts_results(config, train_task):
        raise ConfigError(
            f"{site_config}: field 'privacy.require_encryption' is true, but this job would send the site's "
            f"adapter updates unencrypted (no {ENCRYPT_FILTER} on its '{train_task}' results). Submit the "
            "encrypted job (jobs/fedlora_he), or hospital IT sets the field to false for data that may leave "
            "the site in the clear"
        )
