"""Server component: the job's audit log, ``<run folder>/audit/audit.jsonl``, one chained entry per event.

It records when the job and each round start, every contribution (site, round, example count, digest of
what arrived, accepted or the aggregator's reason for rejecting it, and the hospital's signed receipt
from the result's header), who answered and who stayed silent when the round closes, each round's
aggregate (participants, example counts, digest) and the job's end. The run folder comes back in the job result the admin downloads; ``python -m hospital_fedlora.audit
verify`` checks it. Every train task carries the log's head so a hospital's receipt pins the log as it was.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from ..protocol import AUDIT_HEAD_HEADER, RECEIPT_HEADER, Meta
from .chain import AUDIT_DIR, AUDIT_FILE, AuditChain
from .digest import contribution_digest

_PENDING = "hospital_fedlora.audit.pending"  # fl_ctx prop: the contribution between BEFORE and AFTER accept


class AuditLog(FLComponent):
    """Writes the audit log of the server's job; a failed write stops the job rather than run unaudited.

    Args:
        aggregator_id: the job's aggregator; a rejection's reason is read from its ``rejected`` (site -> reason).
    """

    def __init__(self, aggregator_id: str = "aggregator"):
        super().__init__()
        self.aggregator_id = aggregator_id
        self.chain: AuditChain | None = None
        self._logged: set[tuple] = set()  # (round, site) of every contribution entry written

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type not in _HANDLERS:
            return
        try:
            _HANDLERS[event_type](self, fl_ctx)
        except Exception as err:  # an unaudited job is worse than a stopped one
            self.system_panic(f"audit log {self._path(fl_ctx)}: {type(err).__name__}: {err}", fl_ctx)

    def _path(self, fl_ctx: FLContext) -> Path:
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT) or fl_ctx.get_engine().get_workspace()
        return Path(workspace.get_run_dir(fl_ctx.get_job_id())) / AUDIT_DIR / AUDIT_FILE

    def _start(self, fl_ctx: FLContext) -> None:
        self.chain = AuditChain(self._path(fl_ctx))
        sites = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        self.chain.append("run_started", job_id=fl_ctx.get_job_id(), server=fl_ctx.get_identity_name(), sites=sites)
        self.log_info(fl_ctx, f"audit log {self.chain.path}: entry {self.chain.seq - 1}, run started")

    def _round_started(self, fl_ctx: FLContext) -> None:
        self.chain.append("round_started", round=fl_ctx.get_prop(AppConstants.CURRENT_ROUND))

    def _stamp_task(self, fl_ctx: FLContext) -> None:
        # FLARE copies a broadcast task's data after the first site's callback: every site gets this head.
        task = fl_ctx.get_prop(AppConstants.TRAIN_SHAREABLE)
        if isinstance(task, Shareable) and task.get_header(AUDIT_HEAD_HEADER) is None:
            task.set_header(AUDIT_HEAD_HEADER, self.chain.head_ref())

    def _before_accept(self, fl_ctx: FLContext) -> None:
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        # the round the site answered (FLARE returns the task's cookie), which a stale result does not share
        answered = result.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        record = {
            "round": answered if isinstance(answered, int) else fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
            "site": result.get_peer_prop(ReservedKey.IDENTITY_NAME, "unknown site"),
            "data_kind": None,
            "digest": None,
            "example_count": None,
            "signed_receipt": result.get_header(RECEIPT_HEADER),
        }
        try:  # before the aggregator sees it: the digest is of what arrived
            dxo = from_shareable(result)
            record.update(
                data_kind=dxo.data_kind,
                digest=contribution_digest(dxo.data),
                example_count=dxo.get_meta_prop(Meta.EXAMPLE_COUNT),
            )
        except Exception as err:
            record["unreadable"] = f"{type(err).__name__}: {err}"  # the aggregator rejects it with its reason
        fl_ctx.set_prop(_PENDING, record, private=True, sticky=False)

    def _after_accept(self, fl_ctx: FLContext) -> None:
        record = fl_ctx.get_prop(_PENDING)
        if record is None:
            return
        accepted = bool(fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED))
        reason = None if accepted else self._rejected(fl_ctx).get(record["site"]) or "the aggregator gave no reason"
        self._contribution(record, accepted, reason)

    def _contribution(self, record: dict, accepted: bool, reason: str | None) -> None:
        self.chain.append("contribution", **record, accepted=accepted, reason=reason)
        self._logged.add((record["round"], record["site"]))

    def _rejected(self, fl_ctx: FLContext) -> dict:
        return dict(getattr(fl_ctx.get_engine().get_component(self.aggregator_id), "rejected", None) or {})

    def _gathered(self, fl_ctx: FLContext) -> None:
        # A site's error reply reaches the aggregator without the contribution events: log it from there.
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        for site, reason in sorted(self._rejected(fl_ctx).items()):
            if (rnd, site) not in self._logged:
                empty = {"round": rnd, "site": site, "data_kind": None, "digest": None, "example_count": None}
                self._contribution({**empty, "signed_receipt": None}, False, reason)
        answered = sorted(site for r, site in self._logged if r == rnd)
        silent = sorted({c.name for c in fl_ctx.get_engine().get_clients()} - set(answered))
        self.chain.append("gathered", round=rnd, answered=answered, silent=silent)

    def _aggregated(self, fl_ctx: FLContext) -> None:
        dxo = from_shareable(fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT))
        counts = dict(dxo.get_meta_prop(Meta.EXAMPLE_COUNTS) or {})
        self.chain.append(
            "aggregate",
            round=fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
            participants=sorted(counts),
            example_counts=counts,
            data_kind=dxo.data_kind,
            digest=contribution_digest(dxo.data),
        )

    def _end(self, fl_ctx: FLContext) -> None:
        if self.chain is not None:
            self.chain.append("run_ended")


_HANDLERS = {
    EventType.START_RUN: AuditLog._start,
    AppEventType.ROUND_STARTED: AuditLog._round_started,
    AppEventType.BEFORE_TRAIN_TASK: AuditLog._stamp_task,
    AppEventType.BEFORE_CONTRIBUTION_ACCEPT: AuditLog._before_accept,
    AppEventType.AFTER_CONTRIBUTION_ACCEPT: AuditLog._after_accept,
    AppEventType.BEFORE_AGGREGATION: AuditLog._gathered,
    AppEventType.AFTER_AGGREGATION: AuditLog._aggregated,
    EventType.END_RUN: AuditLog._end,
}
