"""The job report in the job's meta, with FLARE's own job store: progress, losses, failures by site and cause;
the failure messages of the rounds and of the initial adapter name the sites' causes."""

from __future__ import annotations

import json

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from hospital_fedlora.protocol import ERROR_HEADER, Meta, Metric
from hospital_fedlora.server.fedavg_aggregator import FedAvgAdapterAggregator
from hospital_fedlora.server.initial_adapter import InitialAdapter
from hospital_fedlora.server.job_report import REPORT_META_KEY, JobReport, find_job_store
from hospital_fedlora.server.rounds_workflow import RoundsWorkflow

from flare_harness import Engine, fl_ctx, kit_workspace

JOB = "5d1f2c3e-0000-4000-8000-000000000001"
PRIVACY = "site config local/site_config.yaml: privacy.require_encryption is set, and this job sends updates in the clear"


def server_kit(tmp_path, status="RUNNING"):
    """A server kit's workspace whose resources name FLARE's job manager and file job store, holding JOB."""
    ws = kit_workspace(tmp_path / "server", "server")
    (tmp_path / "server" / "startup" / "fed_server.json").write_text(json.dumps({"servers": []}))
    resources = {
        "components": [
            {
                "id": "job_manager",
                "path": "nvflare.apis.impl.job_def_manager.SimpleJobDefManager",
                "args": {"uri_root": str(tmp_path / "jobs-storage"), "job_store_id": "job_store"},
            },
            {"id": "job_store", "path": "nvflare.app_common.storages.filesystem_storage.FilesystemStorage"},
        ]
    }
    (tmp_path / "server" / "local" / "resources.json").write_text(json.dumps(resources))
    store, uri = find_job_store(ws, JOB)
    store.create_object(uri, b"job", {"job_id": JOB, "status": status}, overwrite_existing=True)
    return ws, store, uri


def event(report: JobReport, engine: Engine, event_type: str, **props) -> None:
    ctx = fl_ctx("server", engine=engine, job_id=JOB)
    peer = props.pop("peer", None)
    if peer:
        peer_ctx = FLContext()
        peer_ctx.set_prop(ReservedKey.IDENTITY_NAME, peer, private=False, sticky=False)
        ctx.set_peer_context(peer_ctx)
    for key, value in props.items():
        ctx.set_prop(key, value, private=True, sticky=False)
    report.handle_event(event_type, ctx)


def error_reply(cause: str) -> Shareable:
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    reply.set_header(ERROR_HEADER, cause)
    return reply


def test_the_report_in_the_job_meta_names_rounds_answers_losses_and_each_sites_cause(tmp_path):
    ws, store, uri = server_kit(tmp_path)
    engine = Engine(clients=["hospital-a", "hospital-b", "hospital-c"], workspace=ws)
    report = JobReport()
    event(report, engine, EventType.START_RUN)
    event(report, engine, EventType.BEFORE_PROCESS_SUBMISSION, peer="hospital-b", **{
        FLContextKey.TASK_NAME: "get_weights", FLContextKey.TASK_RESULT: error_reply(PRIVACY)})  # fmt: skip
    event(report, engine, AppEventType.ROUND_STARTED, **{AppConstants.CURRENT_ROUND: 0, AppConstants.NUM_ROUNDS: 3})
    metrics = {Metric.TRAIN_LOSS: 1.5, Metric.VAL_LOSS_GLOBAL: 1.4, Metric.VAL_LOSS_LOCAL: 1.2, Metric.TRAIN_TOKENS: 9}
    ok = DXO(DataKind.WEIGHT_DIFF, data={}, meta={Meta.METRICS: metrics}).to_shareable()
    event(report, engine, EventType.BEFORE_PROCESS_SUBMISSION, peer="hospital-a", **{
        FLContextKey.TASK_NAME: "train", FLContextKey.TASK_RESULT: ok})  # fmt: skip
    bad_data = "data.train /data/c/train.jsonl, line 2: not JSON"
    event(report, engine, EventType.BEFORE_PROCESS_SUBMISSION, peer="hospital-c", **{
        FLContextKey.TASK_NAME: "train", FLContextKey.TASK_RESULT: error_reply(bad_data)})  # fmt: skip

    running = store.get_meta(uri)[REPORT_META_KEY]
    assert running["round"] == 0 and running["num_rounds"] == 3 and running["state"] == "running"
    assert running["answered"] == ["hospital-a", "hospital-c"]
    assert running["failures"] == {
        "hospital-b": [{"round": None, "task": "get_weights", "cause": PRIVACY}],
        "hospital-c": [{"round": 0, "task": "train", "cause": bad_data}],
    }

    aggregate = DXO(DataKind.WEIGHTS, data={}, meta={Meta.SITE_METRICS: {"hospital-a": metrics}}).to_shareable()
    event(report, engine, AppEventType.AFTER_AGGREGATION, **{
        AppConstants.AGGREGATION_RESULT: aggregate, AppConstants.CURRENT_ROUND: 0})  # fmt: skip
    event(report, engine, EventType.FATAL_SYSTEM_ERROR, **{FLContextKey.EVENT_DATA: "round 1 cannot reach its minimum"})
    event(report, engine, EventType.END_RUN)

    meta = store.get_meta(uri)
    assert meta["status"] == "RUNNING" and meta["job_id"] == JOB  # FLARE's keys untouched
    final = meta[REPORT_META_KEY]
    assert final["state"] == "ended" and final["losses_round"] == 0
    assert final["losses"] == {"hospital-a": {Metric.TRAIN_LOSS: 1.5, Metric.VAL_LOSS_GLOBAL: 1.4, Metric.VAL_LOSS_LOCAL: 1.2}}
    assert final["job_error"] == (
        f"round 1 cannot reach its minimum; sites' failures: hospital-b (get_weights): {PRIVACY}; "
        f"hospital-c (round 0 of 0..2): {bad_data}"
    )


def test_the_report_waits_until_flare_has_recorded_the_job_running(tmp_path):
    ws, store, uri = server_kit(tmp_path, status="DISPATCHED")
    report = JobReport()
    engine = Engine(workspace=ws)
    event(report, engine, EventType.START_RUN)
    assert REPORT_META_KEY not in store.get_meta(uri)  # FLARE writes RUNNING next: never overwrite its status
    store.update_meta(uri, {"status": "RUNNING"}, replace=False)
    event(report, engine, AppEventType.ROUND_STARTED, **{AppConstants.CURRENT_ROUND: 0, AppConstants.NUM_ROUNDS: 1})
    assert store.get_meta(uri)[REPORT_META_KEY]["round"] == 0


def test_without_a_job_store_the_report_stays_in_memory(tmp_path):
    report = JobReport()
    engine = Engine(workspace=kit_workspace(tmp_path / "sim", "server"))  # no startup/fed_server.json
    event(report, engine, EventType.START_RUN)
    event(report, engine, AppEventType.ROUND_STARTED, **{AppConstants.CURRENT_ROUND: 0})
    assert report.report["round"] == 0


def test_a_round_that_cannot_reach_its_minimum_fails_naming_the_sites_causes():
    workflow = RoundsWorkflow(min_clients=2)
    workflow.aggregator = FedAvgAdapterAggregator()
    workflow.aggregator.rejected = {"hospital-b": f"site reported EXECUTION_EXCEPTION: {PRIVACY}"}
    engine = Engine()
    ctx = fl_ctx("server", engine=engine)
    workflow.system_panic("Result from hospital-b is bad, error code: EXECUTION_EXCEPTION.", ctx)
    assert engine.events == [EventType.FATAL_SYSTEM_ERROR]
    assert ctx.get_prop(FLContextKey.EVENT_DATA) == (
        f"Result from hospital-b is bad, error code: EXECUTION_EXCEPTION. Sites' causes: hospital-b: site reported "
        f"EXECUTION_EXCEPTION: {PRIVACY}"
    )


def test_a_site_without_the_initial_adapter_is_named_and_does_not_end_the_job(caplog):
    workflow = InitialAdapter(task_name="get_weights")
    engine = Engine()
    ctx = fl_ctx("server", engine=engine)
    task = ClientTask(Client("hospital-b", None), Task("get_weights", Shareable()))
    task.result = error_reply(PRIVACY)
    workflow._process_client_response(task, ctx)
    assert EventType.FATAL_SYSTEM_ERROR not in engine.events
    assert f"hospital-b sent no initial adapter: {PRIVACY}" in caplog.text
