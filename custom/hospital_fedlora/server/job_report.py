"""Server widget: the job's progress and every site's failures, kept in the job's FLARE meta for the operator.

The console's ``list_jobs -d <id>``, ``nvflare job meta <id> --format json`` and the FLARE API's
``get_job_meta(id)`` show the whole job meta, so the report (key ``REPORT_META_KEY``) is read there while
the job runs and after it ends, also after a failure; no log is needed. How the report reaches the job
store from the server's job process, and why this way, is in ``docs/architecture.md`` ("The job report").
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReturnCode, SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey, RunStatus
from nvflare.apis.shareable import Shareable
from nvflare.apis.storage import StorageSpec
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.fuel.utils.class_utils import instantiate_class
from nvflare.widgets.widget import Widget

from ..protocol import ERROR_HEADER, ROUND_TEXT, Meta, Metric

REPORT_META_KEY = "hospital_fedlora_report"
LOSS_KEYS = (Metric.TRAIN_LOSS, Metric.VAL_LOSS_GLOBAL, Metric.VAL_LOSS_LOCAL)
FINAL_KEYS = (Metric.VAL_LOSS, Metric.BASE_VAL_LOSS)
MAX_FAILURES_PER_SITE = 10  # the latest ones; a site failing every round would otherwise grow the meta
MAX_CAUSE_CHARS = 1000


def rounds_text(rnd: int, num_rounds: int | None) -> str:
    """``protocol.ROUND_TEXT``: "round 0 of 0..2"; "round 0" while the total is not known."""
    return ROUND_TEXT.format(round=rnd, last=num_rounds - 1) if num_rounds else f"round {rnd}"


def find_job_store(workspace, job_id: str) -> tuple[StorageSpec, str] | None:
    """The job store and this job's URI in it, as the server kit's resources name them; None without one.

    The server's job process reads the same resources files as its parent (FLARE's
    ``FLServerStarterConfiger``), but FLARE gives its job manager to the parent's engine only.
    """
    try:
        files = workspace.get_config_files_for_startup(is_server=True, for_job=True)
    except (TypeError, OSError):
        return None  # not a server kit's workspace (a test's, the simulator's)
    components: dict[str, dict] = {}
    for path in files:
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        for c in config.get("components", []) if isinstance(config, dict) else []:
            if isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("path"), str):
                components[c["id"]] = c
    manager_config = components.get(SystemComponents.JOB_MANAGER)
    if manager_config is None:
        return None  # the simulator: no job store
    manager = instantiate_class(manager_config["path"], manager_config.get("args") or {})
    store_config = components.get(getattr(manager, "job_store_id", ""))
    if store_config is None or not hasattr(manager, "job_uri"):
        return None
    store = instantiate_class(store_config["path"], store_config.get("args") or {})
    return (store, manager.job_uri(job_id)) if isinstance(store, StorageSpec) else None


class JobReport(Widget):
    """Keeps ``REPORT_META_KEY`` in the job's meta: round, who answered, losses, failures by site, the job's error.

    The report (JSON)::

        round, num_rounds    the round running or last run (0-based, as FLARE counts) and the job's total
        answered             sites that answered this round's train task, with a result or an error
        losses_round, losses the last aggregated round and each contributing site's train loss and
                             validation loss before and after its local steps (``protocol.Metric``)
        final_validation     each site's validation loss of the final adapter and of the base model
        failures             site -> [{round, task, cause}]: the cause a site's error reply names
                             (``protocol.ERROR_HEADER``: privacy gate, site config, data, model, training)
        job_error            why the job failed (FLARE's fatal error), with the sites' causes
        state, updated       "running" or "ended"; when the report was written (UTC)

    It is written at each round start, result, aggregation and failure, and when the job ends, and only
    while the job store records the job ``RUNNING``, so FLARE's own status writes are never overwritten.

    Args:
        train_task_name: the workflow's train task; its results say who answered the round.
        validation_task_name: the final evaluation's task; its results give ``final_validation``.
    """

    def __init__(self, train_task_name: str = AppConstants.TASK_TRAIN, validation_task_name: str = AppConstants.TASK_VALIDATION):
        super().__init__()
        self.train_task_name = train_task_name
        self.validation_task_name = validation_task_name
        self.report: dict = {}
        self._store: tuple[StorageSpec, str] | None = None
        self._store_error: str | None = None

    # ------------------------------------------------------------------------------------------- events
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._start(fl_ctx)
        elif event_type == AppEventType.ROUND_STARTED:
            self.report["round"] = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            self.report["num_rounds"] = fl_ctx.get_prop(AppConstants.NUM_ROUNDS, self.report.get("num_rounds"))
            self.report["answered"] = []
        elif event_type == EventType.BEFORE_PROCESS_SUBMISSION:
            self._result(fl_ctx)
        elif event_type == AppEventType.AFTER_AGGREGATION:
            self._aggregated(fl_ctx)
        elif event_type == EventType.FATAL_SYSTEM_ERROR:
            self._failed(fl_ctx)
        elif event_type == EventType.END_RUN:
            self.report["state"] = "ended"
        else:
            return
        self._publish(fl_ctx)

    def _start(self, fl_ctx: FLContext) -> None:
        self.report = {
            "round": None,
            "num_rounds": None,
            "answered": [],
            "losses_round": None,
            "losses": {},
            "final_validation": {},
            "failures": {},
            "job_error": None,
            "state": "running",
        }
        try:
            self._store = find_job_store(fl_ctx.get_engine().get_workspace(), fl_ctx.get_job_id())
        except Exception as err:
            self._store = None
            self.log_warning(fl_ctx, f"the job report cannot reach the job store: {type(err).__name__}: {err}")
        if self._store is None:
            self.log_info(fl_ctx, "no job store (simulator?): the job report is logged only")

    def _result(self, fl_ctx: FLContext) -> None:
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
        peer = fl_ctx.get_peer_context()
        if not isinstance(result, Shareable) or peer is None:
            return
        site = peer.get_identity_name()
        rc = result.get_return_code(ReturnCode.OK)
        if task == self.train_task_name and site not in self.report["answered"]:
            self.report["answered"] = sorted(self.report["answered"] + [site])
        if rc != ReturnCode.OK:
            cause = str(result.get_header(ERROR_HEADER) or f"no cause given (return code {rc})")[:MAX_CAUSE_CHARS]
            rnd = self.report["round"] if task == self.train_task_name else None
            failures = self.report["failures"].setdefault(site, [])
            failures.append({"round": rnd, "task": task, "cause": cause})
            del failures[:-MAX_FAILURES_PER_SITE]
        elif task == self.validation_task_name:
            try:
                metrics = from_shareable(result).data
            except Exception:
                return
            self.report["final_validation"][site] = {k: metrics[k] for k in FINAL_KEYS if k in metrics}

    def _aggregated(self, fl_ctx: FLContext) -> None:
        try:
            meta = from_shareable(fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)).meta
        except Exception:
            return  # a failed round is reported by the aggregator and FATAL_SYSTEM_ERROR
        self.report["losses_round"] = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        self.report["losses"] = {
            site: {k: m[k] for k in LOSS_KEYS if k in m} for site, m in sorted(meta.get(Meta.SITE_METRICS, {}).items())
        }

    def _failed(self, fl_ctx: FLContext) -> None:
        reason = str(fl_ctx.get_prop(FLContextKey.EVENT_DATA, "") or "fatal error")
        causes = [  # each site's latest cause, unless the reason (RoundsWorkflow's, say) has it already
            f"{site} ({rounds_text(f['round'], self.report['num_rounds']) if f['round'] is not None else f['task']}): {f['cause']}"
            for site, failures in sorted(self.report["failures"].items())
            for f in failures[-1:]
            if f["cause"] not in reason
        ]
        if causes and not self.report["job_error"]:
            reason = f"{reason}; sites' failures: {'; '.join(causes)}"
        self.report["job_error"] = self.report["job_error"] or reason
        self.log_error(fl_ctx, f"the job fails: {reason}")

    # ------------------------------------------------------------------------------------------ writing
    def _publish(self, fl_ctx: FLContext) -> None:
        self.report["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if self._store is None:
            return
        store, uri = self._store
        try:
            if store.get_meta(uri).get(JobMetaKey.STATUS.value) != RunStatus.RUNNING.value:
                return  # FLARE is still dispatching the job: the next event writes the whole report
            store.update_meta(uri, {REPORT_META_KEY: self.report}, replace=False)
        except Exception as err:
            if self._store_error is None:
                self.log_warning(fl_ctx, f"cannot write the job report into the job's meta: {type(err).__name__}: {err}")
            self._store_error = str(err)
