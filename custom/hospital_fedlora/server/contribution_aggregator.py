"""The base of both aggregators: what every contribution must pass, and what a round needs to close."""

from __future__ import annotations

import json

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from ..protocol import ERROR_HEADER, Meta

# Clear metadata of one contribution (metrics, LoRA config, the encrypted job's layout manifest): even an
# all-linear-layers adapter of a 70B model lists its tensors in about 200 KB of JSON; more is not a site's
# honest metadata. A fixed protocol limit, not a job setting. docs/security.md lists every size check.
MAX_META_BYTES = 1 << 20


class ContributionAggregator(Aggregator):
    """Checks each contribution before it counts; ends the job rather than average fewer hospitals.

    Every contribution must carry the site's OK, answer the current round, be the site's first this round,
    be a DXO of ``expected_kind`` with a positive integer example count and the same LoRA configuration as
    the others; then the subclass's ``add`` checks and takes in the payload. A rejected contribution is
    logged with the site and the reason. ``aggregate`` refuses a round with fewer accepted contributions
    than required, naming every rejection, and otherwise returns the subclass's ``result`` with the
    round's example counts and each site's training metrics in its metadata.

    Args:
        min_contributions: accepted contributions needed per round; 0 means every site in the job. The
            jobs leave it 0: their ``RoundsWorkflow`` sets it to the workflow's ``min_clients``.
    """

    expected_kind = ""
    kind_hint = ""  # appended to the wrong-kind message: what to check in the job

    def __init__(self, min_contributions: int = 0):
        super().__init__()
        self.min_contributions = min_contributions
        # task id -> (site, round) of every train task sent; kept over rounds (a few entries per round) so a
        # late or replayed result can be named precisely. Filled from FLARE's events, so reset never clears it.
        self.sent_tasks: dict[str, tuple[str, int]] = {}
        self.reset(None)

    def reset(self, fl_ctx: FLContext | None) -> None:
        self.example_counts: dict[str, int] = {}
        self.site_metrics: dict[str, dict] = {}
        self.adapter_config: dict | None = None
        self.rejected: dict[str, str] = {}

    # ------------------------------------------------------------------------------------ subclass hooks
    def add(self, site: str, dxo: DXO, fl_ctx: FLContext) -> str | None:
        """Check the payload further and add it to the round's sum; return a reason to reject instead."""
        raise NotImplementedError

    def result(self, fl_ctx: FLContext) -> DXO:
        """The round's aggregate; called only when enough contributions were accepted."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- accepting
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.AFTER_TASK_DATA_FILTER:
            self._record_sent_task(fl_ctx)

    def _record_sent_task(self, fl_ctx: FLContext) -> None:
        # FLARE's server runner fires this as a task leaves for a site, with the task id it will stamp on
        # the site's result. Only tasks whose results are contributions (``ScatterAndGather`` gives them the
        # round cookie) are recorded; get_weights and validate tasks are not.
        task = fl_ctx.get_prop(FLContextKey.TASK_DATA)
        rnd = task.get_cookie(AppConstants.CONTRIBUTION_ROUND) if isinstance(task, Shareable) else None
        peer = fl_ctx.get_peer_context()
        task_id = fl_ctx.get_prop(FLContextKey.TASK_ID)
        if rnd is not None and peer is not None and task_id:
            self.sent_tasks[task_id] = (peer.get_identity_name(), rnd)

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "unknown site")
        try:
            reason = self._check_and_add(site, shareable, fl_ctx)
        except ValueError as err:  # payload checks raise with the site named
            reason = str(err)
        if reason:
            self.rejected[site] = reason
            self.log_error(fl_ctx, f"rejected contribution from {site}: {reason}")
            return False
        self.log_info(fl_ctx, f"accepted contribution from {site} ({self.example_counts[site]} examples)")
        return True

    def _check_and_add(self, site: str, shareable: Shareable, fl_ctx: FLContext) -> str | None:
        engine = fl_ctx.get_engine()
        sites = sorted(c.name for c in engine.get_clients()) if engine is not None else None
        if sites is not None and site not in sites:
            return f"{site} is not a site of this job (its sites: {', '.join(sites)})"
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            cause = shareable.get_header(ERROR_HEADER)
            return f"site reported {rc}" + (f": {cause}" if cause else "")
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contributed = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if current is not None and contributed != current:
            return f"result is for round {contributed}, the current round is {current}"
        reason = self._check_task(site, shareable, current)
        if reason:
            return reason
        if site in self.example_counts:
            return "a second contribution in the same round"
        try:
            dxo = from_shareable(shareable)
        except Exception as err:
            return f"not a DXO ({err})"
        if dxo.data_kind != self.expected_kind:
            return f"expected {self.expected_kind}{self.kind_hint}, got {dxo.data_kind}"
        meta_bytes = len(json.dumps(dxo.meta, default=repr))
        if meta_bytes > MAX_META_BYTES:
            return f"oversize: its clear metadata is {meta_bytes:,} bytes of JSON, at most {MAX_META_BYTES:,} are accepted"
        count = dxo.get_meta_prop(Meta.EXAMPLE_COUNT)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            return f"example count (meta '{Meta.EXAMPLE_COUNT}') must be a positive integer, got {count!r}"
        config = dxo.get_meta_prop(Meta.ADAPTER_CONFIG)
        if self.adapter_config and config and config != self.adapter_config:
            return "its LoRA configuration differs from the other sites'"
        reason = self.add(site, dxo, fl_ctx)
        if reason:
            return reason
        self.example_counts[site] = count
        self.site_metrics[site] = dict(dxo.get_meta_prop(Meta.METRICS) or {})
        self.adapter_config = self.adapter_config or config
        return None

    def _check_task(self, site: str, shareable: Shareable, current: int | None) -> str | None:
        """A result must answer a train task this server sent to this site for this round.

        FLARE's server runner stamps every submission with the id of the task it answers, and hands the
        results of tasks it no longer tracks to ``ScatterAndGather.process_result_of_unknown_task``, which
        passes them here. A result without a task id did not come through the runner (a component test
        calling ``accept`` directly); it is checked by its round alone, unless tasks were sent this run.
        """
        task_id = shareable.get_header(ReservedHeaderKey.TASK_ID)
        if task_id is None:
            return "a result that names no task, although this server tracks the tasks it sent" if self.sent_tasks else None
        sent = self.sent_tasks.get(task_id)
        if sent is None:
            return f"a result for task {task_id}, which this server never sent to {site} (forged or from another job)"
        to, rnd = sent
        if to != site:
            return f"a result for task {task_id}, which was sent to {to}, not to {site}"
        if current is not None and rnd != current:
            return f"a result for task {task_id} of round {rnd}, the current round is {current} (late or replayed)"
        return None

    def silent(self, sites) -> list[str]:
        """The sites among ``sites`` that sent nothing this round (neither accepted nor rejected)."""
        return [s for s in sites if s not in self.example_counts and s not in self.rejected]

    # ---------------------------------------------------------------------------------------- aggregating
    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        engine = fl_ctx.get_engine()
        sites = sorted(c.name for c in engine.get_clients()) if engine is not None else []
        required = self.min_contributions or len(sites)
        if len(self.example_counts) < required:
            why = [f"{s}: {r}" for s, r in self.rejected.items()] + [f"{s}: no answer" for s in self.silent(sites)]
            reason = (
                f"round {rnd}: {len(self.example_counts)} accepted contributions, {required} required "
                f"({'; '.join(why) or 'no site answered'})"
            )
            self.system_panic(reason, fl_ctx)
            raise RuntimeError(reason)
        dxo = self.result(fl_ctx)
        dxo.meta.update(
            {
                Meta.ROUND: rnd,
                Meta.EXAMPLE_COUNTS: dict(self.example_counts),
                Meta.SITE_METRICS: dict(self.site_metrics),
                Meta.ADAPTER_CONFIG: self.adapter_config,
            }
        )
        return dxo.to_shareable()
