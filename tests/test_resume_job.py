"""The pieces of a resumed job that need no federation: the job copy the resume command submits, and
the memory keeper's thread. The resume itself runs on real processes in tests/test_faults_e2e.py."""

from __future__ import annotations

import json
import time

import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext

from hospital_fedlora.deploy import memory_keeper
from hospital_fedlora.deploy.resume_job import resumable_copy

from deployment_helpers import REPO, wait_until


def persistor_args(job) -> dict:
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    return next(c for c in server["components"] if c["id"] == "persistor")["args"]


def decrypt_filter_args(job) -> list[dict]:
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    return [f.get("args", {}) for e in client["task_data_filters"] for f in e["filters"] if f["path"].endswith("DecryptFilter")]


@pytest.mark.parametrize("name", ["fedlora_he", "fedlora_plain"])
def test_the_resumed_copy_differs_from_the_job_only_in_its_persistors_and_decrypt_filters_resume_from(name, tmp_path):
    job = REPO / "jobs" / name
    copy = resumable_copy(job, "1234-abcd", tmp_path)
    assert persistor_args(copy) == {**persistor_args(job), "resume_from": "1234-abcd"}
    # the hospitals accept the earlier run's logged rounds only because their own job config names that run
    assert decrypt_filter_args(copy) == [{**a, "resume_from": "1234-abcd"} for a in decrypt_filter_args(job)]
    if name == "fedlora_plain":
        client = "app/config/config_fed_client.json"
        assert (copy / client).read_text() == (job / client).read_text()
    else:
        assert decrypt_filter_args(copy)
    assert (copy / "meta.json").read_text() == (job / "meta.json").read_text()
    assert "resume_from" not in persistor_args(job)  # the committed job is untouched


def test_a_job_that_cannot_resume_is_refused_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="not a job folder of this bundle"):
        resumable_copy(tmp_path, "x", tmp_path / "out")
    job = tmp_path / "job"
    (job / "app/config").mkdir(parents=True)
    (job / "app/config/config_fed_server.json").write_text(json.dumps({"components": [{"id": "persistor", "args": {"initial_adapter": "/a"}}]}))
    with pytest.raises(SystemExit, match="sets initial_adapter; a resumed run continues its own rounds"):
        resumable_copy(job, "x", tmp_path / "out")


def test_the_memory_keeper_releases_memory_until_the_system_ends(monkeypatch):
    calls = []
    monkeypatch.setattr(memory_keeper, "release_memory", lambda: calls.append(time.monotonic()))
    keeper = memory_keeper.MemoryKeeper(interval_s=0.05)
    keeper.handle_event(EventType.SYSTEM_START, FLContext())
    wait_until(lambda: len(calls) >= 2, 30, "two releases")  # it repeats
    keeper.handle_event(EventType.SYSTEM_END, FLContext())
    keeper._thread.join(30)
    assert not keeper._thread.is_alive()
    with pytest.raises(ValueError, match="interval_s must be positive"):
        memory_keeper.MemoryKeeper(interval_s=0)
