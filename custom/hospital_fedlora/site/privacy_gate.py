"""The hospital's privacy gate: its privacy settings checked against the job it was sent.

It reads the client config FLARE deployed for this job (``app_<site>/config/config_fed_client.json``): the
filters named there are the ones FLARE runs on this site's results, however the job was submitted. With
``privacy.require_encryption`` on, the job is checked twice: before training (``check_job_allowed``: the
train task's results are encrypted, the key is the kit's), and after every task (``check_result``: a
result holding adapter weights or differences leaves only through a filter that encrypts that kind), so
no task name a job maps to the executor (``get_weights``, ``submit_model``, a renamed one) sends them in
the clear.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.shareable import Shareable

from ..config import ConfigError, PrivacySettings

ENCRYPT_FILTER = "hospital_fedlora.he.encrypt_filter.EncryptFilter"
# NVFlare's CKKS encryptor (jobs/fedlora_ckks_stock) counts too, unless told to encrypt only some layers.
NVFLARE_ENCRYPTOR = "nvflare.app_opt.he.model_encryptor.HEModelEncryptor"
SITE_ENCRYPTION = "hospital_fedlora.he.site_key.SiteEncryption"
# What leaves a site as adapter values: the executor's WEIGHTS (get_weights, submit_model) and WEIGHT_DIFF (train).
ADAPTER_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)
WAY_OUT = (
    "Submit the encrypted job (jobs/fedlora_he), or hospital IT sets the field to false for data that may leave "
    "the site in the clear"
)


def _encrypted_kinds(f: dict) -> set[str]:
    """The DXO kinds filter entry ``f`` encrypts completely (ours: the train result's WEIGHT_DIFF only)."""
    if f.get("path") == ENCRYPT_FILTER:
        return {DataKind.WEIGHT_DIFF}
    args = f.get("args") or {}
    if f.get("path") == NVFLARE_ENCRYPTOR and not args.get("encrypt_layers"):
        return set(args.get("data_kinds") or ADAPTER_KINDS)
    return set()


def encrypts_results(client_config: dict, task: str, kind: str = DataKind.WEIGHT_DIFF) -> bool:
    """Does this client config encrypt every ``kind`` result of ``task`` completely?"""
    for entry in client_config.get("task_result_filters", []):
        tasks = entry.get("tasks", [])
        if (task in tasks or "*" in tasks) and any(kind in _encrypted_kinds(f) for f in entry.get("filters", [])):
            return True
    return False


def adapter_kinds(result: Shareable) -> set[str]:
    """The adapter kinds (WEIGHTS, WEIGHT_DIFF) in a task result, also inside a DXO collection."""
    try:
        dxo = from_shareable(result)
    except Exception:  # an error reply, or no DXO at all: nothing the executor packed
        return set()
    found, todo = set(), [dxo]
    while todo:
        d = todo.pop()
        if d.data_kind == DataKind.COLLECTION:
            todo.extend(v for v in (d.data or {}).values() if hasattr(v, "data_kind"))
        elif d.data_kind in ADAPTER_KINDS:
            found.add(d.data_kind)
    return found


def job_supplied_key(client_config: dict) -> str | None:
    """The key file the job names for the site's encryption component, if it names one."""
    for c in client_config.get("components", []):
        if c.get("path") == SITE_ENCRYPTION and (c.get("args") or {}).get("context_file"):
            return str(c["args"]["context_file"])
    return None


def check_job_allowed(privacy: PrivacySettings, client_config_file: Path, train_task: str, site_config: str) -> None:
    """Before training: the train task's results are encrypted, with the key from this site's own kit."""
    if not privacy.require_encryption:
        return
    config = json.loads(Path(client_config_file).read_text())
    if not encrypts_results(config, train_task):
        raise ConfigError(
            f"{site_config}: field 'privacy.require_encryption' is true, but this job would send the site's "
            f"adapter updates unencrypted (no {ENCRYPT_FILTER} on its '{train_task}' results). {WAY_OUT}"
        )
    key = job_supplied_key(config)
    if key is not None:
        raise ConfigError(
            f"{site_config}: field 'privacy.require_encryption' is true, but this job names its own key file "
            f"({SITE_ENCRYPTION} args 'context_file': {key}); this site encrypts only with the key in its own "
            "kit (startup/, signature checked). Submit the job without 'context_file'"
        )


def check_result(
    privacy: PrivacySettings, client_config_file: Path, task: str, result: Shareable, site_config: str
) -> None:
    """After any task: refuse a result that holds adapter weights or differences no filter of this job
    encrypts on their way out."""
    if not privacy.require_encryption:
        return
    kinds = adapter_kinds(result)
    if not kinds:
        return
    config = json.loads(Path(client_config_file).read_text())
    clear = sorted(k for k in kinds if not encrypts_results(config, task, k))
    if clear:
        raise ConfigError(
            f"{site_config}: field 'privacy.require_encryption' is true, but this job's '{task}' task would send "
            f"the site's adapter ({', '.join(clear)}) unencrypted: no filter in its client config encrypts "
            f"'{task}' results of that kind. {WAY_OUT}"
        )
